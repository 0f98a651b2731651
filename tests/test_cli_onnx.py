"""``anomalyclip predict --model FILE.onnx``: the deployed file run by onnxruntime, writing the
same files as the torch model; torch-free, and a clean message when a dependency is missing."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from anomalyclip.cli import main  # noqa: E402

from .conftest import IMAGE_A, IMAGE_B  # noqa: E402
from .onnx_fixtures import PROFILE  # noqa: E402
from .test_onnx import _repo_env  # noqa: E402


@pytest.fixture(scope="module")
def deployed(saved_profile, exported, tmp_path_factory):
    """``(model directory, its ONNX export, the images, the torch CLI's scores.csv rows)``: the
    session's inspection profile (224 px, four layers, one reference, thresholds) and its CLI
    export (tests/onnx_fixtures.py), shared with the ONNX tests (an export costs 15-20 CPU-seconds)."""
    root = tmp_path_factory.mktemp("deployed")
    folder = saved_profile(*PROFILE)
    onnx_file = exported(*PROFILE, profile=True)
    images = root / "images"
    images.mkdir()
    for image in (IMAGE_A, IMAGE_B):
        (images / image.name).write_bytes(image.read_bytes())
    assert main(["-q", "predict", str(images), "--model", str(folder), "--out", str(root / "torch-out")]) == 0
    return folder, onnx_file, images, _rows(root / "torch-out")


def _rows(out):
    with open(out / "scores.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _has_pyarrow() -> bool:
    import importlib.util

    return importlib.util.find_spec("pyarrow") is not None


def _same_outputs(rows, expected, out):
    assert [r["image"] for r in rows] == [r["image"] for r in expected]
    assert [r["overlay"] for r in rows] == [r["overlay"] for r in expected]
    assert all(abs(float(a["score"]) - float(b["score"])) <= 1e-4 for a, b in zip(rows, expected))
    summaries = ["run.json", "scores.csv", "scores.json"] + (["scores.parquet"] if _has_pyarrow() else [])
    assert sorted(p.name for p in out.iterdir()) == sorted([*(r["overlay"] for r in expected), *summaries])
    assert len(json.loads((out / "scores.json").read_text())) == len(expected)


def test_predict_runs_an_onnx_file_with_the_torch_models_outputs(deployed, tmp_path):
    _, onnx_file, images, expected = deployed
    out = tmp_path / "onnx-out"
    assert main(["-q", "predict", str(images), "--model", str(onnx_file), "--out", str(out)]) == 0
    _same_outputs(_rows(out), expected, out)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--image-size", "224"], r"--image-size cannot change an ONNX export.*anomalyclip export"),
        (["--references", str(IMAGE_B)], r"--references cannot change an ONNX export"),
        (["--tile-size", "56"], r"--tile-size do not apply to an ONNX export"),
        (["--ray"], r"--ray runs torch models"),
    ],
)
def test_options_an_export_fixed_are_refused(deployed, tmp_path, capsys, extra, message):
    import re

    _, onnx_file, images, _ = deployed
    assert main(["-q", "predict", str(images), "--model", str(onnx_file), "--out", str(tmp_path / "o"), *extra]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


_TORCH_FREE_CLI = """
import contextlib, io, json, sys
sys.modules["torch"] = None        # any `import torch` now raises ImportError: a torch-free install
sys.modules["open_clip"] = None
sys.modules["tqdm"] = None
from anomalyclip.cli import main
model_dir, onnx_file, images, out = sys.argv[1:5]
report = {}
for name, argv in [("onnx", ["predict", images, "--model", onnx_file, "--out", out]),
                   ("torch", ["predict", images, "--model", model_dir, "--out", out + "-torch"])]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        report[name] = [main(argv), err.getvalue()]
sys.modules["onnxruntime"] = None  # and an install without onnxruntime
err = io.StringIO()
with contextlib.redirect_stderr(err):
    report["no-onnxruntime"] = [main(["predict", images, "--model", onnx_file, "--out", out + "-2"]), err.getvalue()]
report["loaded"] = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "open_clip", "tqdm") and sys.modules[m] is not None)
print(json.dumps(report))
"""


def test_predict_with_an_onnx_file_needs_no_torch(deployed, tmp_path):
    model_dir, onnx_file, images, expected = deployed
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", _TORCH_FREE_CLI, str(model_dir), str(onnx_file), str(images), str(out)],
        capture_output=True,
        text=True,
        env=_repo_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["onnx"][0] == 0, report["onnx"][1]
    _same_outputs(_rows(out), expected, out)
    assert report["loaded"] == []

    code, err = report["torch"]  # the torch model on a torch-free install: what is missing, no traceback
    assert code == 2 and "Traceback" not in err and err.count("error:") == 1
    assert "needs torch, open_clip, tqdm" in err and "--model anomalyclip.onnx" in err
    code, err = report["no-onnxruntime"]
    assert code == 2 and "Traceback" not in err and 'pip install "anomalyclip[onnx]"' in err


def test_an_onnx_file_runs_the_streaming_pipeline(deployed, tmp_path):
    """The ONNX file goes through the same streaming run as the torch model: an unreadable file is
    an error row (exit 1), raw maps are saved, and --resume scores only what is missing."""
    import numpy as np

    _, onnx_file, images, expected = deployed
    folder = tmp_path / "images"
    folder.mkdir()
    for source in sorted(images.iterdir()):
        (folder / source.name).write_bytes(source.read_bytes())
    (folder / "broken.png").write_bytes(IMAGE_A.read_bytes()[:200])  # a truncated PNG
    out = tmp_path / "out"
    args = ["-q", "predict", str(folder), "--model", str(onnx_file), "--out", str(out), "--save-maps", "npy", "--no-overlays"]
    assert main(args) == 1  # finished, with one image that could not be scored
    rows = {Path(r["image"]).name: r for r in _rows(out)}
    assert rows["broken.png"]["error"] and rows["broken.png"]["score"] in ("", "nan")
    for row in expected:
        name = Path(row["image"]).name
        assert abs(float(rows[name]["score"]) - float(row["score"])) <= 1e-4 and not rows[name]["error"]
        anomaly_map = np.load(out / rows[name]["map"])
        assert anomaly_map.ndim == 2 and np.isfinite(anomaly_map).all()
    (folder / "broken.png").unlink()
    (folder / "image_c.png").write_bytes(IMAGE_B.read_bytes())
    assert main([*args, "--resume"]) == 0
    again = _rows(out)
    names = [Path(r["image"]).name for r in again]
    # error rows are dropped on resume and their images scored again (broken.png is gone now)
    assert sorted(names) == sorted([*(Path(r["image"]).name for r in expected), "image_c.png"])
