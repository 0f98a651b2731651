"""``anomalyclip predict`` never loses a result: streamed rows, error rows, ``--resume``, raw maps
and masks; and ``predict_iter`` keeps memory flat over many large images."""

from __future__ import annotations

import csv
import json
import os
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from anomalyclip.cli import main

from .fixtures_images import TWINS, UNREADABLE, make_input_folder

S = 224


@pytest.fixture(scope="module")
def saved(tmp_path_factory, golden_model):
    return golden_model.save_pretrained(tmp_path_factory.mktemp("pipeline") / "model")


@pytest.fixture(scope="module")
def model(saved):
    from anomalyclip import AnomalyCLIP

    return AnomalyCLIP.from_pretrained(saved, device="cpu", image_size=S)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline-images") / "images"
    make_input_folder(root)
    return root


def _rows(out):
    with open(out / "scores.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _predict(saved, out, *inputs, extra=()):
    return main(["-q", "predict", *map(str, inputs), "--model", str(saved), "--out", str(out), "--image-size", str(S), *extra])


def test_a_folder_of_real_files_gives_one_row_each_and_an_error_row(saved, folder, tmp_path, model):
    out = tmp_path / "out"
    assert _predict(saved, out, folder) == 1  # exit status 1: some images failed
    rows = _rows(out)
    files = sorted(p for p in folder.iterdir())
    assert [r["image"] for r in rows] == [str(p) for p in files]
    assert list(rows[0]) == ["image", "score", "overlay", "error"]
    by_name = {os.path.basename(r["image"]): r for r in rows}
    for name in UNREADABLE:
        assert by_name[name]["score"] == "" and by_name[name]["overlay"] == "" and "Cannot read image" in by_name[name]["error"]
    for name, (twin, bound) in TWINS.items():
        if name in by_name:  # rgb16.tif needs tifffile
            assert abs(float(by_name[name]["score"]) - float(by_name[twin]["score"])) <= (1e-3 if bound == "1e-3" else 2e-6)
    good = [r for r in rows if not r["error"]]
    assert all((out / r["overlay"]).is_file() for r in good)
    # scores.json is scores.csv typed; predict_iter gives the same rows.
    assert [r["score"] for r in json.loads((out / "scores.json").read_text())] == [
        float(r["score"]) if r["score"] else None for r in rows
    ]
    results = list(model.predict_iter(files, on_error="record", batch_size=3))
    assert [r.path for r in results] == [str(p) for p in files]
    for result, row in zip(results, rows):
        assert (result.error is not None) == bool(row["error"])
        if result.error is None:
            assert abs(result.score - float(row["score"])) <= 2e-6
    if _has_pyarrow():
        import pyarrow.parquet as pq

        table = pq.read_table(out / "scores.parquet")
        assert table.column_names == list(rows[0]) and table.column("error").null_count == len(good)


def _has_pyarrow() -> bool:
    import importlib.util

    return importlib.util.find_spec("pyarrow") is not None


def test_resume_after_an_interrupted_run_scores_every_image_once(saved, folder, tmp_path):
    files = sorted(p for p in folder.iterdir() if p.name not in UNREADABLE)
    out = tmp_path / "out"
    assert _predict(saved, out, *files[:4], extra=["--threshold", "0.5"]) == 0  # "interrupted" after 4
    first = _rows(out)
    # A row cut mid-write by a kill: dropped, and that image scored again.
    text = (out / "scores.csv").read_text()
    (out / "scores.csv").write_text(text[: len(text) - 12])
    kept_overlay = out / first[0]["overlay"]
    stamp = kept_overlay.stat().st_mtime_ns
    assert _predict(saved, out, *files, extra=["--threshold", "0.5", "--resume"]) == 0
    rows = _rows(out)
    assert sorted(r["image"] for r in rows) == sorted(map(str, files))  # each exactly once
    assert len(rows) == len(files)
    assert rows[:3] == first[:3]  # finished rows kept as they were
    assert kept_overlay.stat().st_mtime_ns == stamp  # and their overlays not rewritten
    assert [r["image"] for r in json.loads((out / "scores.json").read_text())] == [str(p) for p in files]  # input order
    # Other options: refused, nothing changed.
    before = (out / "scores.csv").read_bytes()
    assert _predict(saved, out, *files, extra=["--resume"]) == 2
    assert _predict(saved, out, *files, extra=["--threshold", "0.6", "--resume"]) == 2
    assert (out / "scores.csv").read_bytes() == before


def test_maps_masks_and_the_anomalous_fraction(saved, folder, tmp_path, model):
    image = folder / "rgb8.png"
    out = tmp_path / "out"
    reference = model.predict(str(image), thresholds=False)
    lo, hi = model.map_range
    values = np.unique(reference.anomaly_map)
    k = int(0.8 * len(values))
    pixel = float((values[k] + values[k + 1]) / 2)  # between two map values: no pixel on the edge
    common = ["--pixel-threshold", repr(pixel), "--save-masks", "--no-overlays"]
    assert _predict(saved, out, image, extra=[*common, "--save-maps", "npy"]) == 0
    row = _rows(out)[0]
    assert list(row) == ["image", "score", "overlay", "anomalous_fraction", "map", "mask", "error"]
    assert row["overlay"] == "" and not list(out.glob("*_overlay.png"))
    raw = np.load(out / row["map"])
    np.testing.assert_allclose(raw, reference.anomaly_map, atol=1e-5)
    mask = np.asarray(Image.open(out / row["mask"])) > 0
    np.testing.assert_array_equal(mask, reference.anomaly_map > pixel)
    assert abs(float(row["anomalous_fraction"]) - mask.mean()) < 1e-6 and 0.1 < mask.mean() < 0.3
    out16 = tmp_path / "out16"
    assert _predict(saved, out16, image, extra=[*common, "--save-maps", "png16"]) == 0
    stored = np.asarray(Image.open(out16 / _rows(out16)[0]["map"]))
    assert stored.dtype == np.uint16 or stored.dtype == np.int32
    scale = json.loads((out16 / "run.json").read_text())["map_scale"]
    assert (scale["lo"], scale["hi"]) == (lo, hi)
    decoded = scale["lo"] + stored.astype(np.float64) / scale["max_value"] * (scale["hi"] - scale["lo"])
    np.testing.assert_allclose(decoded, reference.anomaly_map, atol=(hi - lo) / 65535)
    assert _predict(saved, tmp_path / "x", image, extra=["--save-masks", "--no-thresholds"]) == 2  # no pixel threshold


def test_predict_iter_memory_stays_flat_over_many_large_images(model):
    side = 1024

    def peak_over(n: int) -> int:
        def images():
            for i in range(n):
                yield np.full((side, side), 40 + i % 100, dtype=np.uint8)

        tracemalloc.start()
        try:
            count = sum(1 for r in model.predict_iter(images(), batch_size=4, num_workers=1) if r.score >= 0)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert count == n
        return peak

    small, large = peak_over(12), peak_over(36)
    one_map = side * side * 4
    # Flat: three times the images, about the same peak (two batches of maps and inputs in
    # flight), far below the 36 maps the run produced.
    assert large < 1.25 * small + one_map, (small, large)
    assert large < 0.25 * 36 * one_map, large


def test_calibrate_cli_saves_a_profile_that_predict_applies(saved, folder, tmp_path, model):
    from anomalyclip import AnomalyCLIP

    normal = [folder / "rgb8.png", folder / "gray8.png", folder / "upright.png"]
    profile = tmp_path / "profile"
    args = ["-q", "calibrate", *map(str, normal), "--model", str(saved), "--out", str(profile), "--image-size", str(S)]
    assert main([*args, "--quantile", "0.9", "--references", str(folder / "palette_as_rgb.png")]) == 0
    loaded = AnomalyCLIP.from_pretrained(profile, device="cpu")
    assert loaded.num_references == 1 and loaded.config.image_size == S
    # The same thresholds as calibrating in Python with the same references.
    expected = AnomalyCLIP.from_pretrained(saved, device="cpu", image_size=S)
    expected.add_references([str(folder / "palette_as_rgb.png")])
    want = expected.calibrate([str(p) for p in normal], quantile=0.9)
    assert abs(loaded.thresholds.image - want.image) < 1e-6 and abs(loaded.thresholds.pixel - want.pixel) < 1e-6
    # predict with the profile applies them: a label column.
    out = tmp_path / "out"
    assert main(["-q", "predict", str(normal[0]), "--model", str(profile), "--out", str(out)]) == 0
    assert "label" in _rows(out)[0] and "anomalous_fraction" in _rows(out)[0]
    assert main([*args, "--coreset", "0.5"]) == 2  # --coreset without --references
