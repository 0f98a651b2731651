"""OnnxAnomalyCLIP on OpenVINO (``backend="openvino"``): the project's ONNX file, unchanged, no torch.

References as for onnxruntime (tests/test_onnx.py): the torch model's own outputs on the same
exports (the session's, tests/onnx_fixtures.py), within the golden bounds (scores 1e-4, maps
1e-3) in float32, and the official golden outputs at 518 px. bfloat16 is held to its measured
deviation (docs/deployment.md) with a margin.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")
pytest.importorskip("onnxscript")  # the exports

from anomalyclip.errors import CheckpointError, InvalidInputError, MissingDependencyError  # noqa: E402
from anomalyclip.onnx import OnnxAnomalyCLIP  # noqa: E402

from .conftest import IMAGE_A, IMAGE_B  # noqa: E402
from .onnx_fixtures import ANY, BATCH_3, LAYERS, PARITY_CASES, PROFILE, REFERENCES, max_abs  # noqa: E402

#: bfloat16 against float32 on this project's tiny CLIP: measured up to 4.5e-3 (scores) and 3.6e-2
#: (maps) at 518 px with four layers (docs/deployment.md), 7.1e-3 / 4.4e-2 at 224 px with one layer
#: and two references (the export ANY), 6e-4 / 4.5e-2 with four layers and one reference (the
#: profile's export); the bounds leave a margin of 2-3x.
BF16_SCORE_BOUND, BF16_MAP_BOUND = 1.5e-2, 1e-1


def _has_bf16() -> bool:
    import openvino

    return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


_BATCH_3_RUNS: dict[Path, tuple] = {}


def _batch_3(path: Path) -> tuple:
    """``(runtime, *runtime.run(runtime.preprocess(BATCH_3)))`` of ``OnnxAnomalyCLIP(path,
    backend="openvino", threads=1)``, once per file in a test process: the parity test and the
    golden test of a 518 px export read the same run."""
    if path not in _BATCH_3_RUNS:
        runtime = OnnxAnomalyCLIP(path, backend="openvino", threads=1)
        _BATCH_3_RUNS[path] = (runtime, *runtime.run(runtime.preprocess(BATCH_3)))
    return _BATCH_3_RUNS[path]


@pytest.mark.parametrize("size, variant, references, options", PARITY_CASES)
def test_openvino_float32_matches_torch(torch_reference, exported, size, variant, references, options):
    """The onnxruntime parity cases, on OpenVINO in float32 (the same files): batches of 3, 2 and 1, run and predict."""
    path = exported(size, variant, references, **options)
    runtime, scores, maps = _batch_3(path)
    assert runtime.backend == "openvino" and runtime.session.get_property("INFERENCE_PRECISION_HINT").to_string() == "f32"
    assert runtime.providers == ["OpenVINO CPU (f32)"]
    pixel_values, out, torch_results = torch_reference(size, variant, references)
    # The metadata, read through OpenVINO's ONNX reader, is the file's.
    assert runtime.metadata.image_size == size and runtime.metadata.feature_layers == LAYERS[variant]
    assert runtime.num_references == (0 if references is None else len(REFERENCES[references]["images"]()))

    # Batch 3: run(preprocess(BATCH_3)), the same arrays as the torch model's (test_onnx checks it).
    assert np.array_equal(runtime.preprocess(BATCH_3), pixel_values.numpy())
    assert scores.shape == (3,) and maps.shape == (3, size, size) and maps.dtype == np.float32
    assert max_abs(scores, out.scores) <= 1e-4
    assert max_abs(maps, out.anomaly_maps) <= 1e-3
    # Batches of 2 and 1 (A, B, then A alone) in predict, at the original sizes, as the torch
    # model's predict resizes its maps.
    results = runtime.predict(BATCH_3, batch_size=2)
    for ours, theirs in zip(results, torch_results):
        assert ours.anomaly_map.shape == theirs.anomaly_map.shape
        assert abs(ours.score - theirs.score) <= 1e-4
        assert max_abs(ours.anomaly_map, theirs.anomaly_map) <= 1e-3


@pytest.mark.parametrize("variant", list(LAYERS))
def test_openvino_matches_the_official_golden_outputs(exported, golden, variant):
    _, scores, maps = _batch_3(exported(518, variant))  # images A, B, A, on one thread: the parity test's run
    for i, name in enumerate("ab"):
        assert abs(float(scores[i]) - float(golden[f"{name}.{variant}.score"])) <= 1e-4
        assert max_abs(maps[i], golden[f"{name}.{variant}.anomaly_map"][0]) <= 1e-3


@pytest.mark.parametrize("case", [ANY, PROFILE], ids=["224-top-two-references", "224-multi-cli-profile"])
def test_openvino_bfloat16_within_its_measured_deviation(exported, case):
    """precision="bf16" reaches the plugin (the outputs move) and stays within the documented bound
    (on two of the session's parity exports at 224 px: the bound does not depend on the size)."""
    if not _has_bf16():
        pytest.skip("this CPU has no bfloat16 arithmetic (AVX512-BF16 / AMX); the refusal is tested below")
    path = exported(*case, profile=case == PROFILE)
    f32 = OnnxAnomalyCLIP(path, backend="openvino", precision="f32")
    bf16 = OnnxAnomalyCLIP(path, backend="openvino", precision="bfloat16")
    assert bf16.session.get_property("INFERENCE_PRECISION_HINT").to_string() == "bf16"
    pixel_values = f32.preprocess(BATCH_3)
    (s32, m32), (s16, m16) = f32.run(pixel_values), bf16.run(pixel_values)
    assert 1e-5 < max_abs(s16, s32) <= BF16_SCORE_BOUND
    assert 1e-4 < max_abs(m16, m32) <= BF16_MAP_BOUND


def test_bfloat16_refused_where_the_cpu_lacks_it(exported, monkeypatch):
    import openvino

    path = exported(*ANY)
    real = openvino.Core.get_property

    def without_bf16(self, device, name):
        value = real(self, device, name)
        return [c for c in value if c != "BF16"] if name == "OPTIMIZATION_CAPABILITIES" else value

    monkeypatch.setattr(openvino.Core, "get_property", without_bf16)
    with pytest.raises(InvalidInputError, match="precision='bf16' needs a CPU with bfloat16.*precision='f32'"):
        OnnxAnomalyCLIP(path, backend="openvino", precision="bf16")


def test_openvino_runs_from_several_threads(exported):
    """Concurrent run() calls take turns on the compiled model and each gets its own outputs."""
    runtime = OnnxAnomalyCLIP(exported(*ANY), backend="openvino")
    pixel_values = runtime.preprocess([IMAGE_A, IMAGE_B])
    expected = [runtime.run(pixel_values[i : i + 1]) for i in range(2)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: runtime.run(pixel_values[i % 2 : i % 2 + 1]), range(8)))
    for i, (scores, maps) in enumerate(got):
        assert np.array_equal(scores, expected[i % 2][0]) and np.array_equal(maps, expected[i % 2][1])


def test_openvino_options_and_files_refused(exported, tmp_path):
    path = exported(*ANY)
    with pytest.raises(InvalidInputError, match=r"backend must be one of \['onnxruntime', 'openvino'\]"):
        OnnxAnomalyCLIP(path, backend="tensorrt")
    with pytest.raises(InvalidInputError, match="providers and session_options configure onnxruntime"):
        OnnxAnomalyCLIP(path, ["CPUExecutionProvider"], backend="openvino")
    with pytest.raises(InvalidInputError, match=r"precision must be one of .*'bf16'.*got 'f16'"):
        OnnxAnomalyCLIP(path, backend="openvino", precision="f16")
    with pytest.raises(InvalidInputError, match="OpenVINO option"):
        OnnxAnomalyCLIP(path, precision="bf16")  # onnxruntime
    with pytest.raises(InvalidInputError, match="threads must be a positive int"):
        OnnxAnomalyCLIP(path, backend="openvino", threads=0)
    damaged = tmp_path / "damaged.onnx"
    damaged.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="OpenVINO cannot load.*copy it again"):
        OnnxAnomalyCLIP(damaged, backend="openvino")
    from .test_onnx import _tiny_onnx

    with pytest.raises(CheckpointError, match="not an anomalyclip export"):
        OnnxAnomalyCLIP(_tiny_onnx(tmp_path / "other.onnx"), backend="openvino")


def test_missing_openvino_names_the_extra(exported, monkeypatch):
    path = exported(*ANY)
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    with pytest.raises(MissingDependencyError, match=r'pip install "anomalyclip\[openvino\]"'):
        OnnxAnomalyCLIP(path, backend="openvino")


_NO_TORCH_NO_ONNXRUNTIME = """
import sys
for name in ("torch", "open_clip", "onnxruntime"):
    sys.modules[name] = None       # any import of them now raises ImportError
import numpy as np
from anomalyclip.onnx import OnnxAnomalyCLIP
model = OnnxAnomalyCLIP(sys.argv[1], backend="openvino")
results = model.predict([sys.argv[2], sys.argv[3]], image_threshold=0.5, pixel_threshold=0.9)
np.savez(sys.argv[4], scores=np.array([r.score for r in results]), map_a=results[0].anomaly_map,
         map_b=results[1].anomaly_map, labels=np.array([r.label for r in results]), mask_a=results[0].mask)
loaded = sorted(n for n in sys.modules if n.split(".")[0] in ("torch", "open_clip", "onnxruntime") and sys.modules[n] is not None)
assert not loaded, loaded
print("ok")
"""


def test_openvino_runs_without_torch_or_onnxruntime(torch_reference, exported, tmp_path):
    from .test_onnx import check_isolated_run

    check_isolated_run(_NO_TORCH_NO_ONNXRUNTIME, exported(*ANY), torch_reference, tmp_path)
