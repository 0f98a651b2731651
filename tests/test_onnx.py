"""ONNX deployment: export (torch side) and OnnxAnomalyCLIP (onnxruntime, no torch).

References: the torch model's own outputs (``model(pixel_values)``, ``model.predict``) and, at
518 px, the official implementation's golden outputs. Tolerances from the issue: scores 1e-4,
maps 1e-3. Each export of the tiny golden CLIP costs 15-20 CPU-seconds, so exports are made
once per configuration for the whole session and shared (``exported``, tests/onnx_fixtures.py),
and the tests ask for few configurations: the parity cases, one of them the CLI's export of the
session's inspection profile, and one float16 CLI export of that profile.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from anomalyclip import AnomalyCLIP  # noqa: E402
from anomalyclip.cli import main  # noqa: E402
from anomalyclip.errors import CheckpointError, InvalidInputError, WeightsNotFoundError  # noqa: E402
from anomalyclip.onnx import OnnxAnomalyCLIP, export_onnx, quantize_int8  # noqa: E402
from anomalyclip.onnx import export as export_module  # noqa: E402
from anomalyclip.onnx.metadata import FORMAT_KEY, FORMAT_VERSION, REFERENCE_BUFFER_PREFIX  # noqa: E402
from anomalyclip.eval.thresholds import Thresholds  # noqa: E402
from anomalyclip.references import ReferenceMemory  # noqa: E402

from .conftest import IMAGE_A, IMAGE_B  # noqa: E402
from .onnx_fixtures import ANY, BATCH_3, LAYERS, PARITY_CASES, PROFILE, REFERENCES, made_once  # noqa: E402
from .onnx_fixtures import configured as _configured, max_abs as _max_abs  # noqa: E402



def _repo_env() -> dict[str, str]:
    """The environment of a child Python that imports this checkout's anomalyclip."""
    import anomalyclip

    root = str(Path(anomalyclip.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}


@pytest.fixture
def model(onnx_model) -> AnomalyCLIP:
    """The session's private golden model (tests/onnx_fixtures.py), reconfigured per test for the torch reference."""
    return onnx_model


def _assert_same_masks(mask, reference_mask, reference_map, threshold: float, tolerance: float = 1e-3) -> None:
    """Masks of two runtimes agree on every pixel whose reference map value is clear of the threshold
    by more than the maps' tolerance (pixels inside that band may go either way), and the band is
    a small part of the image, so the comparison still covers nearly all of it."""
    clear = np.abs(np.asarray(reference_map, np.float64) - threshold) > tolerance
    assert clear.mean() > 0.99, f"{(~clear).sum()} pixels within {tolerance} of the threshold {threshold}"
    assert np.array_equal(mask[clear], reference_mask[clear])


# ----------------------------------------------------------------------------- parity

_BATCH_3_RUNS: dict[Path, tuple[np.ndarray, np.ndarray]] = {}


def _run_batch_3(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``OnnxAnomalyCLIP(path).run`` of the preprocessed :data:`BATCH_3`, once per file in a test
    process: the parity test and the golden test of a 518 px export read the same outputs."""
    if path not in _BATCH_3_RUNS:
        runtime = OnnxAnomalyCLIP(path)
        _BATCH_3_RUNS[path] = runtime.run(runtime.preprocess(BATCH_3))
    return _BATCH_3_RUNS[path]


@pytest.mark.parametrize("size, variant, references, options", PARITY_CASES)
def test_onnxruntime_matches_torch(torch_reference, exported, size, variant, references, options):
    """Two sizes, one and four layers, without and with few-shot references (PARITY_CASES: each
    setting appears, not every combination); batches of 3, 2 and 1."""
    path = exported(size, variant, references, **options)
    runtime = OnnxAnomalyCLIP(path)
    pixel_values, out, torch_results = torch_reference(size, variant, references)
    n_layers = len(LAYERS[variant])
    if references is None:
        assert runtime.num_references == 0 and runtime.map_range == (0.0, n_layers)
    else:
        n_images = len(REFERENCES[references]["images"]())
        assert runtime.num_references == n_images
        # One reference image: the plain sum; two: the standardized fusion, its statistics constants of the graph.
        assert runtime.map_range == ((0.0, 1.0) if n_images > 1 else (0.0, 3.0 * n_layers))
        assert runtime.metadata.fusion == ("standardized" if n_images > 1 else "sum")
        # The references matter, by far more than the tolerances: a zero-shot graph would fail.
        assert _max_abs(out.scores, out.zero_shot_scores) > 1e-2
        assert _max_abs(out.anomaly_maps, out.zero_shot_maps) > 1e-1

    # The same preprocessing, literally: equal arrays.
    assert np.array_equal(runtime.preprocess(BATCH_3), pixel_values.numpy())
    # Batch 3 through the same file ...
    scores, maps = _run_batch_3(path)  # runtime.run(runtime.preprocess(BATCH_3)): pixel_values, as just checked
    assert scores.shape == (3,) and maps.shape == (3, size, size) and maps.dtype == np.float32
    assert _max_abs(scores, out.scores) <= 1e-4
    assert _max_abs(maps, out.anomaly_maps) <= 1e-3
    # ... and batches of 2 and 1 (A, B, then A alone) in predict: AnomalyResults at the original
    # sizes, as the torch model's predict resizes its maps.
    results = runtime.predict(BATCH_3, batch_size=2)
    for ours, theirs in zip(results, torch_results):
        assert ours.anomaly_map.shape == theirs.anomaly_map.shape
        assert abs(ours.score - theirs.score) <= 1e-4
        assert _max_abs(ours.anomaly_map, theirs.anomaly_map) <= 1e-3
    assert results[0].anomaly_map.shape == (300, 400) and results[1].anomaly_map.shape == (256, 256)


@pytest.mark.parametrize("variant", list(LAYERS))
def test_onnxruntime_matches_the_official_golden_outputs(exported, golden, variant):
    """At 518 px the export reproduces the official implementation's own outputs."""
    scores, maps = _run_batch_3(exported(518, variant))  # images A, B, A: the parity test's run
    for i, name in enumerate("ab"):
        assert abs(float(scores[i]) - float(golden[f"{name}.{variant}.score"])) <= 1e-4
        assert _max_abs(maps[i], golden[f"{name}.{variant}.anomaly_map"][0]) <= 1e-3


def test_file_layout_and_metadata(exported):
    """(That an export leaves the model as it was is checked by every export ``exported`` makes.)"""
    path = exported(*ANY)
    proto = onnx.load(str(path))
    props = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert props[FORMAT_KEY] == FORMAT_VERSION
    assert props["anomalyclip.image_size"] == 224
    assert props["anomalyclip.feature_layers"] == [24]
    assert props["anomalyclip.references"] == 2
    assert props["anomalyclip.patch_size"] == 14 and props["anomalyclip.dtype"] == "float32"
    assert len(props["anomalyclip.mean"]) == 3 and len(props["anomalyclip.std"]) == 3
    assert "anomalyclip.image_threshold" not in props  # none set
    import anomalyclip

    assert props["anomalyclip.library_version"] == anomalyclip.__version__
    # One input with a dynamic batch axis, two outputs; everything in the one file.
    (inp,) = proto.graph.input
    dims = inp.type.tensor_type.shape.dim
    assert inp.name == "pixel_values" and dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 224, 224]
    assert [o.name for o in proto.graph.output] == ["scores", "anomaly_maps"]
    assert not any(t.data_location == TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert not path.with_name(path.name + ".data").exists()
    # The text features are a constant of the graph: nothing text-related is an input.
    assert len(proto.graph.input) == 1


class _FakeProgram:
    """Stands in for torch's ONNXProgram in the file-handling tests: writes marker files."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def save(self, destination, *, external_data: bool) -> None:
        destination = Path(destination)
        destination.write_text("model")
        if external_data:
            destination.with_name(destination.name + ".data").write_text("weights")
        if self.fail:
            raise RuntimeError("disk full")


def test_save_is_atomic_and_removes_stale_weights(tmp_path):
    path = tmp_path / "m.onnx"
    export_module._save_atomically(_FakeProgram(), path, external=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    export_module._save_atomically(_FakeProgram(), path, external=False)  # now small enough for one file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    with pytest.raises(RuntimeError, match="disk full"):
        export_module._save_atomically(_FakeProgram(fail=True), path, external=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # the old file, untouched; no leftovers
    assert path.read_text() == "model"


#: The pixel threshold of the float16 CLI export: replaces the profile's (3.76 here), keeps its image threshold.
CLI_PIXEL_THRESHOLD = 4.0


@pytest.fixture(scope="session")
def cli_float16_export(exported, saved_profile, onnx_folder) -> Path:
    """``anomalyclip export --model PROFILE --dtype float16 --pixel-threshold 4.0`` of the session's
    inspection profile (tests/onnx_fixtures.py), once for the session: the float16 export and the
    CLI's end-to-end test read the same file (each export costs 15-20 CPU-seconds).

    The weight limit of a single file is lowered for this export so that it also exercises the
    external-data layout (``<file>.data`` next to it), which real models reach only past 2 GiB.
    The file is ``<folder>/deploy/anomalyclip.onnx``, alone in its folder with its weights."""
    profile = saved_profile(*PROFILE)

    def make(folder: Path) -> None:  # written beside, then renamed: an existing folder is complete
        tmp = folder.with_name(folder.name + ".tmp")
        out = tmp / "deploy" / "anomalyclip.onnx"
        args = ["-q", "export", "--model", str(profile), "--format", "onnx", "--out", str(out),
                "--dtype", "float16", "--pixel-threshold", str(CLI_PIXEL_THRESHOLD)]
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(export_module, "MAX_INLINE_BYTES", 1024)
            assert main(args) == 0
        os.replace(tmp, folder)

    return made_once(onnx_folder / "cli-float16-profile", make) / "deploy" / "anomalyclip.onnx"


def test_float16_export(torch_reference, cli_float16_export):
    """float16 weights and vision compute, here with few-shot references (which stay float32
    constants): the CLI's float16 export of the profile against the torch model in float32."""
    path = cli_float16_export
    runtime = OnnxAnomalyCLIP(path)
    assert runtime.metadata.dtype == "float16" and runtime.num_references == 1
    initializers = onnx.load(str(path)).graph.initializer  # with the weights of <file>.data
    weights = [t for t in initializers if t.dims and np.prod(t.dims) >= 128 * 128 and not t.name.startswith(REFERENCE_BUFFER_PREFIX)]
    assert weights and all(t.data_type == TensorProto.FLOAT16 for t in weights)
    memory = [t for t in initializers if t.name.startswith(REFERENCE_BUFFER_PREFIX)]
    assert memory and all(t.data_type == TensorProto.FLOAT for t in memory)
    pixel_values, out, _ = torch_reference(*PROFILE)
    assert np.array_equal(runtime.preprocess(BATCH_3), pixel_values.numpy())
    scores, maps = runtime.run(pixel_values.numpy())  # float32 in, float32 out
    assert scores.dtype == np.float32 and maps.dtype == np.float32
    # float16 weights and activations: close to float32, not equal.
    assert 0 < _max_abs(scores, out.scores) < 5e-3
    assert _max_abs(maps, out.anomaly_maps) < 5e-2


def test_int8_quantization_runs_and_stays_close(exported, quantized, tmp_path):
    """A loose check; the measured deviation is in docs/benchmarks.md (benchmarks/bench_onnx.py)."""
    source, path = exported(*ANY), quantized
    assert path.stat().st_size < source.stat().st_size / 2
    runtime, reference = OnnxAnomalyCLIP(path), OnnxAnomalyCLIP(source)
    assert runtime.metadata.quantization == "int8-dynamic"
    assert runtime.metadata.image_size == 224 and runtime.metadata.feature_layers == (24,)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul"}
    pixel_values = reference.preprocess([IMAGE_A, IMAGE_B])
    (s8, m8), (s32, m32) = runtime.run(pixel_values), reference.run(pixel_values)
    assert 0 < _max_abs(s8, s32) < 0.05
    assert _max_abs(m8, m32) < 0.25
    with pytest.raises(CheckpointError, match="already quantized"):
        quantize_int8(path, tmp_path / "twice.onnx")


@pytest.fixture(scope="session")
def quantized(exported, onnx_folder) -> Path:
    """``quantize_int8`` of the export :data:`ANY` (two references, searched in uneven blocks), once for the session."""
    source = exported(*ANY)
    return made_once(onnx_folder / "any-int8.onnx", lambda path: quantize_int8(source, path))


def _reference_products(path: Path) -> list[str]:
    """Op types of the nodes that read a reference memory constant."""
    return [n.op_type for n in onnx.load(str(path)).graph.node if any(i.startswith(REFERENCE_BUFFER_PREFIX) for i in n.input)]


def test_int8_quantization_keeps_the_reference_search_in_float32(exported, quantized, tmp_path):
    source, path = exported(*ANY), quantized
    products = _reference_products(source)
    assert products == ["MatMul", "MatMul"]  # one layer, 2 x 256 reference rows in blocks of 300 and 212
    assert _reference_products(path) == products  # the same float32 MatMuls on the same constants
    assert OnnxAnomalyCLIP(path).num_references == 2
    # Its outputs stay close to float32's: test_int8_quantization_runs_and_stays_close, on the same file.

    # A file whose reference constants were renamed cannot be quantized safely: refused.
    proto = onnx.load(str(source))
    renamed = {t.name: "memory_" + t.name for t in proto.graph.initializer if t.name.startswith(REFERENCE_BUFFER_PREFIX)}
    for t in proto.graph.initializer:
        t.name = renamed.get(t.name, t.name)
    for node in proto.graph.node:
        node.input[:] = [renamed.get(i, i) for i in node.input]
    onnx.save(proto, str(tmp_path / "renamed.onnx"))
    with pytest.raises(CheckpointError, match="2 reference image.*nearest-neighbour products were not found"):
        quantize_int8(tmp_path / "renamed.onnx", tmp_path / "renamed-int8.onnx")
    assert not (tmp_path / "renamed-int8.onnx").exists()


# ----------------------------------------------------------------------------- torch-free runtime

_TORCH_FREE_SCRIPT = """
import sys
sys.modules["torch"] = None        # any `import torch` now raises ImportError
sys.modules["open_clip"] = None
import numpy as np
from anomalyclip.onnx import OnnxAnomalyCLIP
model = OnnxAnomalyCLIP(sys.argv[1])
results = model.predict([sys.argv[2], sys.argv[3]], image_threshold=0.5, pixel_threshold=0.9)
np.savez(sys.argv[4], scores=np.array([r.score for r in results]), map_a=results[0].anomaly_map,
         map_b=results[1].anomaly_map, labels=np.array([r.label for r in results]), mask_a=results[0].mask)
loaded = sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "open_clip") and sys.modules[name] is not None)
assert not loaded, loaded
print("ok")
"""


def check_isolated_run(script: str, path, torch_reference, tmp_path) -> None:
    """Run ``script`` (one of the blocked-import scripts: it scores images A and B with the export
    at ``path`` and saves the results to an ``.npz``) in a subprocess, and compare its results with
    the torch model's (scores 1e-4, maps 1e-3, labels at 0.5, the mask at 0.9). Shared with the
    OpenVINO test."""
    out = tmp_path / "results.npz"
    proc = subprocess.run(
        [sys.executable, "-c", script, str(path), str(IMAGE_A), str(IMAGE_B), str(out)],
        capture_output=True,
        text=True,
        env=_repo_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")
    got = np.load(out)
    torch_results = torch_reference(*ANY)[2][:2]  # images A, B
    assert min(abs(r.score - 0.5) for r in torch_results) > 1e-2  # labels clear of the 1e-4 tolerance
    assert _max_abs(got["scores"], [r.score for r in torch_results]) <= 1e-4
    assert _max_abs(got["map_a"], torch_results[0].anomaly_map) <= 1e-3
    assert _max_abs(got["map_b"], torch_results[1].anomaly_map) <= 1e-3
    assert list(got["labels"]) == [int(r.score > 0.5) for r in torch_results]
    assert np.array_equal(got["mask_a"], got["map_a"] > 0.9)


def test_runtime_runs_with_torch_blocked(torch_reference, exported, tmp_path):
    check_isolated_run(_TORCH_FREE_SCRIPT, exported(*ANY), torch_reference, tmp_path)


# ----------------------------------------------------------------------------- CLI


def test_cli_export_end_to_end(cli_float16_export, saved_profile):
    """``anomalyclip export`` of a saved profile -> OnnxAnomalyCLIP: the file and its weights,
    the profile's settings and references, the thresholds stored field by field (the profile's
    image threshold, ``--pixel-threshold`` replacing its pixel one) and applied by default.

    The float16 export of the session (``cli_float16_export``), written with the weight limit of
    a single file lowered, so that it exercises the external-data layout (``<file>.data``). Its
    outputs against the torch model: test_float16_export; the CLI's float32 export of the same
    profile against the torch profile's outputs, labels and masks: test_cli_export_of_an_inspection_profile.
    """
    out = cli_float16_export
    # The model file and its weights, no temporary files left.
    assert sorted(p.name for p in out.parent.iterdir()) == ["anomalyclip.onnx", "anomalyclip.onnx.data"]
    assert (out.parent / "anomalyclip.onnx.data").stat().st_size > out.stat().st_size
    saved = json.loads((saved_profile(*PROFILE) / "config.json").read_text())["thresholds"]  # the profile's
    runtime = OnnxAnomalyCLIP(out)
    assert runtime.metadata.feature_layers == (6, 12, 18, 24) and runtime.metadata.image_size == 224
    assert runtime.num_references == 1
    assert saved["pixel"] != CLI_PIXEL_THRESHOLD
    assert (runtime.metadata.image_threshold, runtime.metadata.pixel_threshold) == (saved["image"], CLI_PIXEL_THRESHOLD)
    # Thresholds stored at export apply by default; explicit ones take precedence.
    results = runtime.predict(BATCH_3)
    for result, path in zip(results, BATCH_3):
        assert result.label == int(result.score > saved["image"]) and result.path == str(path)
        assert np.array_equal(result.mask, result.anomaly_map > CLI_PIXEL_THRESHOLD)
    # The profile's image threshold lies 0.028 from both images' scores, float16 moves them < 5e-3.
    assert [r.label for r in results] == [1, 0, 1] and 0 < results[0].mask.mean() < 1
    explicit = runtime.predict(IMAGE_A, image_threshold=0.0, pixel_threshold=runtime.map_range[1])
    assert explicit.label == 1 and not explicit.mask.any()  # no map value lies above the range's top
    assert runtime.predict(IMAGE_A, thresholds=Thresholds(image=1.0)).label == 0


def test_cli_export_of_an_inspection_profile(exported, saved_profile):
    """A saved profile (prompts, references, thresholds) -> ``anomalyclip export --model PROFILE``
    -> one ONNX file that gives its outputs and labels, with the profile's thresholds.

    The session's profile and its CLI export (tests/onnx_fixtures.py; a parity case too): its
    image threshold lies halfway between the normal image's score and the defective one's, 0.028
    from each, and its pixel threshold 0.25 above the normal image's largest map value (no
    threshold at an image's own score, where a 1e-7 difference would flip a label)."""
    profile = saved_profile(*PROFILE)
    loaded = AnomalyCLIP.from_pretrained(profile, device="cpu")
    thresholds = loaded.thresholds
    assert loaded.num_references == 1 and thresholds is not None
    assert (loaded.config.image_size, loaded.config.feature_layers) == (224, (6, 12, 18, 24))

    runtime = OnnxAnomalyCLIP(exported(*PROFILE, profile=True))
    assert runtime.num_references == 1 and runtime.metadata.feature_layers == (6, 12, 18, 24)
    assert (runtime.metadata.image_threshold, runtime.metadata.pixel_threshold) == (thresholds.image, thresholds.pixel)
    ours, theirs = runtime.predict(BATCH_3), loaded.predict(BATCH_3)
    assert min(abs(b.score - thresholds.image) for b in theirs) > 0.01  # labels clear of the 1e-4 tolerance
    for a, b in zip(ours, theirs):
        assert abs(a.score - b.score) <= 1e-4 and _max_abs(a.anomaly_map, b.anomaly_map) <= 1e-3
        assert a.label == b.label
        _assert_same_masks(a.mask, b.mask, b.anomaly_map, thresholds.pixel)
    assert [r.label for r in ours] == [1, 0, 1]  # the defective image flagged, the normal one passed
    assert 0 < ours[0].mask.mean() < 1 and not ours[1].mask.any()  # the pixel threshold splits the defective image's map


def test_cli_export_adds_references(model, saved_profile, tmp_path, caplog, monkeypatch):
    """``export --references --coreset`` from a zero-shot model with saved thresholds (which no
    longer hold): the references are taken at the export's settings, the thresholds dropped.

    What the command hands to ``export_onnx`` is checked here, the export itself replaced by a
    recorder (an export costs 15-20 CPU-seconds): the model's settings, thresholds and reference
    memory, and the options. The memory's patch tokens are checked against those of the session's
    profile (tests/onnx_fixtures.py), whose one reference is the same image taken by
    ``add_references`` at the same settings (224 px, four layers) in float32: the coreset keeps
    half of them. That an export of a model with references gives the model's outputs is the
    parity tests' part (test_onnxruntime_matches_torch, one of its cases the CLI's export of
    that profile)."""
    saved = tmp_path / "model"
    model.thresholds = Thresholds(image=0.5, pixel=1.0)
    model.save_pretrained(saved)
    model.thresholds = None
    handed = []

    def recorder(self, path, **options):
        handed.append((self, options))
        Path(path).write_bytes(b"")
        return Path(path)

    monkeypatch.setattr(AnomalyCLIP, "export_onnx", recorder)
    out = tmp_path / "few-shot.onnx"
    args = ["export", "--model", str(saved), "--format", "onnx", "--out", str(out), "--image-size", "224",
            "--feature-layers", "6", "12", "18", "24", "--references", str(IMAGE_B), "--coreset", "0.5"]
    with caplog.at_level(logging.WARNING, logger="anomalyclip"):
        assert main(["-q", *args]) == 0
    assert "Dropping the model's thresholds" in caplog.text and "the file stores none" in caplog.text
    ((exporting, options),) = handed
    assert exporting.thresholds is None  # nothing of the model's to store ...
    assert (options["thresholds"], options["image_threshold"], options["pixel_threshold"]) == (None, None, None)  # ... nor given
    assert (options["image_size"], options["feature_layers"]) == (224, [6, 12, 18, 24])
    assert (exporting.config.image_size, exporting.config.feature_layers) == (224, (6, 12, 18, 24))
    memory = exporting.references
    assert memory.num_images == 1 and len(memory) == 128  # half of the 16 x 16 patches
    assert memory.mismatches(image_size=224, feature_layers=(6, 12, 18, 24), dpam_layers=model.config.dpam_layers) == []
    full = ReferenceMemory.load(saved_profile(*PROFILE) / "references.safetensors").memories  # all 256 of image B
    assert sorted(memory.memories) == sorted(full) == [6, 12, 18, 24]
    for layer, kept in memory.memories.items():
        kept, every = kept.float().reshape(-1, kept.shape[-1]), full[layer].float().reshape(-1, kept.shape[-1])
        assert kept.shape == (128, every.shape[1]) and every.shape[0] == 256
        # Each kept token is one of the image's tokens at these settings (and no token twice).
        nearest = (kept[:, None] - every[None]).abs().amax(dim=-1).min(dim=1)  # largest element difference
        assert float(nearest.values.max()) <= 1e-6 and len(set(nearest.indices.tolist())) == 128


def test_cli_export_bad_options(tmp_path, capsys):
    out = str(tmp_path / "x.onnx")
    with pytest.raises(SystemExit):
        main(["export", "--format", "tflite", "--out", out])
    with pytest.raises(SystemExit):
        main(["export", "--format", "onnx", "--out", out, "--dtype", "bfloat16"])
    code = main(["export", "--format", "onnx", "--out", out, "--quantize", "int8", "--dtype", "float16"])
    assert code == 2 and "float32 export" in capsys.readouterr().err
    code = main(["export", "--format", "onnx", "--out", out, "--coreset", "0.5"])
    assert code == 2 and "--coreset applies to --references" in capsys.readouterr().err


def test_cli_export_references_at_other_settings_than_the_profiles_are_refused(saved_profile, tmp_path, capsys):
    profile = saved_profile(*PROFILE)  # references taken at 224 px
    out = str(tmp_path / "x.onnx")
    base = ["export", "--model", str(profile), "--format", "onnx", "--out", out]
    assert main([*base, "--image-size", "518"]) == 2
    assert "this export asks for image_size 518" in capsys.readouterr().err
    assert main([*base, "--image-size", "518", "--references", str(IMAGE_A)]) == 2
    assert "--references adds to the model's own references, taken with image_size 224" in capsys.readouterr().err
    assert not Path(out).exists()


# ----------------------------------------------------------------------------- bad inputs


def _tiny_onnx(path: Path, props: dict[str, str] | None = None, input_name: str = "x") -> Path:
    node = helper.make_node("Identity", [input_name], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["b", 3, 224, 224])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3, 224, 224])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 8
    for key, value in (props or {}).items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))
    return path


_VALID_PROPS = {
    FORMAT_KEY: "1",
    "anomalyclip.image_size": "224",
    "anomalyclip.mean": "[0.5, 0.5, 0.5]",
    "anomalyclip.std": "[0.5, 0.5, 0.5]",
    "anomalyclip.feature_layers": "[24]",
    "anomalyclip.patch_size": "14",
    "anomalyclip.dtype": '"float32"',
    "anomalyclip.library_version": '"0.1.0"',
}


def test_file_that_is_not_an_anomalyclip_export(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="anomalyclip export"):
        OnnxAnomalyCLIP(tmp_path / "missing.onnx")
    text = tmp_path / "notes.onnx"
    text.write_text("not a model")
    with pytest.raises(CheckpointError, match="cannot load"):
        OnnxAnomalyCLIP(text)
    with pytest.raises(CheckpointError, match="not an anomalyclip export.*anomalyclip export"):
        OnnxAnomalyCLIP(_tiny_onnx(tmp_path / "other.onnx"))
    newer = _tiny_onnx(tmp_path / "newer.onnx", {**_VALID_PROPS, FORMAT_KEY: str(FORMAT_VERSION + 1)})
    with pytest.raises(CheckpointError, match="pip install -U"):
        OnnxAnomalyCLIP(newer)
    broken = _tiny_onnx(tmp_path / "broken.onnx", {**_VALID_PROPS, "anomalyclip.image_size": "{"})
    with pytest.raises(CheckpointError, match="not valid JSON"):
        OnnxAnomalyCLIP(broken)
    lacking = {k: v for k, v in _VALID_PROPS.items() if k != "anomalyclip.mean"}
    with pytest.raises(CheckpointError, match="lacks"):
        OnnxAnomalyCLIP(_tiny_onnx(tmp_path / "lacking.onnx", lacking))
    with pytest.raises(CheckpointError, match="Re-export"):  # metadata fine, graph signature wrong
        OnnxAnomalyCLIP(_tiny_onnx(tmp_path / "renamed.onnx", _VALID_PROPS))


def test_truncated_export(exported, tmp_path):
    source = exported(*ANY)
    damaged = tmp_path / "damaged.onnx"
    damaged.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="copy it again"):
        OnnxAnomalyCLIP(damaged)


def test_wrong_input_size_and_types(exported):
    runtime = OnnxAnomalyCLIP(exported(518, "top"))
    with pytest.raises(InvalidInputError, match=r"processes 518x518 .* --image-size 224"):
        runtime.run(np.zeros((1, 3, 224, 224), np.float32))
    with pytest.raises(InvalidInputError, match="predict"):
        runtime.run(torch.zeros(1, 3, 518, 518))
    with pytest.raises(InvalidInputError, match=r"\[B, 3, 518, 518\]"):
        runtime.run(np.zeros((3, 518, 518), np.float32))
    with pytest.raises(InvalidInputError, match="NaN"):
        runtime.run(np.full((1, 3, 518, 518), np.nan, np.float32))
    with pytest.raises(InvalidInputError, match="empty"):
        runtime.predict([])
    with pytest.raises(InvalidInputError, match="patch"):
        runtime.predict(np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(InvalidInputError, match="batch_size"):
        runtime.predict(IMAGE_A, batch_size=0)


def test_unavailable_provider(exported):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(InvalidInputError, match="onnxruntime-gpu"):
        OnnxAnomalyCLIP(exported(*ANY), providers=["CUDAExecutionProvider"])


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(dtype="bfloat16"), "float16"),
        (dict(dtype="int8"), "float32"),
        (dict(opset=11), "opset"),
        (dict(opset=99), "opset"),
        (dict(image_size=500), "multiple of the patch size 14"),
        (dict(feature_layers=(25,)), "feature_layers"),
        (dict(thresholds=0.5), "Thresholds"),
    ],
)
def test_unsupported_export_options(model, tmp_path, options, message):
    with pytest.raises(InvalidInputError, match=message):
        export_onnx(model, tmp_path / "x.onnx", **options)
    assert not list(tmp_path.iterdir())


def test_references_the_export_cannot_use_are_refused(model, saved_profile, tmp_path, caplog):
    """References of another image size, other layers or other DPAM settings, or taken from tiles,
    would give wrong maps: refused (before any tracing), naming the fix for this export."""
    profile = saved_profile(*PROFILE)  # (made before reconfiguring the model: making it reconfigures the same model)
    with _configured(model, 224, "multi"):
        # The session profile's memory: image B at 224 px, four layers (no forward pass needed here).
        model.references = ReferenceMemory.load(profile / "references.safetensors")
        with pytest.raises(InvalidInputError, match=r"taken with image_size 224; this export asks for image_size 518.*drop --image-size"):
            model.export_onnx(tmp_path / "x.onnx", image_size=518)
        with pytest.raises(InvalidInputError, match=r"feature_layers \[6, 12, 18, 24\]; this export asks for feature_layers \[6, 24\]"):
            model.export_onnx(tmp_path / "x.onnx", feature_layers=(6, 24))
        config = model.config.replace(dpam_layers=model.config.dpam_layers - 1)
        with pytest.raises(InvalidInputError, match="dpam_layers"):
            export_module._check_references(model.references, config, torch.float32, torch.float32)
        with caplog.at_level(logging.WARNING, logger="anomalyclip"):  # tokens of a bf16 model in a float32 graph
            export_module._check_references(model.references, model.config, torch.bfloat16, torch.float32)
        assert "come from this bfloat16 model" in caplog.text and "model.to(torch.float32)" in caplog.text
    with _configured(model, 224, "top"):
        # One 112 px tile is enough to record the tiling (the refusal reads the memory's tile_size).
        model.add_references([np.asarray(Image.open(IMAGE_B))[:112, :112].copy()], tile_size=112)
        with pytest.raises(InvalidInputError, match="112 px tiles.*does not tile"):
            model.export_onnx(tmp_path / "x.onnx")
    assert not list(tmp_path.iterdir())


def test_stored_thresholds_resolve_as_predict_applies_them(model, caplog):
    """Default: the model's own; explicit values win field by field; False: none; other settings: none."""
    with _configured(model, 224, "top"):
        model.thresholds = Thresholds(image=0.3, pixel=0.7)  # within the map range [0, 1] (refused outside)
        config = model.config
        mode = export_module._export_mode

        def resolve(model, config, thresholds, image, pixel):
            return export_module._stored_thresholds(model, config, thresholds, image, pixel, mode(model, config))

        assert resolve(model, config, None, None, None) == (0.3, 0.7)
        assert resolve(model, config, None, None, 0.9) == (0.3, 0.9)
        assert resolve(model, config, False, None, None) == (None, None)
        assert resolve(model, config, False, 0.5, None) == (0.5, None)
        assert resolve(model, config, Thresholds(image=0.1, pixel=None), None, None) == (0.1, None)
        with caplog.at_level(logging.WARNING, logger="anomalyclip"):
            other = config.replace(feature_layers=(6, 24))
            assert resolve(model, other, None, None, None) == (None, None)
            assert resolve(model, other, None, 0.5, None) == (0.5, None)
        assert "Not storing the model's thresholds" in caplog.text and "feature_layers" in caplog.text
        with pytest.raises(InvalidInputError, match="pixel_threshold must be a finite number"):
            resolve(model, config, None, None, float("nan"))


def test_export_to_a_directory_is_refused(model, tmp_path):
    with pytest.raises(InvalidInputError, match="directory"):
        model.export_onnx(tmp_path)


def test_runtime_modules_never_import_torch_modules():
    """Statically too: what the runtime imports (transitively) is numpy/Pillow-only anomalyclip code."""
    from .test_layering import import_graph

    graph = import_graph()
    torch_modules = {"anomalyclip.model", "anomalyclip.model.module", "anomalyclip.vision", "anomalyclip.ops", "anomalyclip.scoring",
                     "anomalyclip.runtime", "anomalyclip.backbone", "anomalyclip.prompts", "anomalyclip.onnx.export"}
    for start in ("anomalyclip.onnx.runtime", "anomalyclip.onnx.openvino_backend", "anomalyclip.onnx.metadata", "anomalyclip.onnx.quantize"):
        seen, todo = set(), [start]
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo.extend(graph[module])
        assert not seen & torch_modules, (start, sorted(seen & torch_modules))
