"""errors.py's promise: every error a user can trigger is one of the library's types, and says
what was received and how to fix it. Running out of memory is a ResourceError, not bad input."""

from __future__ import annotations

import ast
import builtins
from pathlib import Path

import pytest
import torch

from anomalyclip import AnomalyCLIPError, BackboneError, InvalidInputError
from anomalyclip.errors import ResourceError
from anomalyclip.flops import ModelDims, count_inference_flops
from anomalyclip.scoring import anomaly_maps
from anomalyclip.vision import resize_positional_embedding

from .conftest import IMAGE_A, IMAGE_B

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "anomalyclip"
# Built-in exceptions the library may raise itself: PEP 562 __getattr__ must raise AttributeError,
# and abstract methods NotImplementedError.
ALLOWED_BUILTIN_RAISES = {"AttributeError", "NotImplementedError"}


def _builtin_raises_and_asserts() -> list[str]:
    builtin_exceptions = {
        name for name, obj in vars(builtins).items() if isinstance(obj, type) and issubclass(obj, BaseException)
    }
    found = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            where = f"{path.relative_to(PACKAGE_DIR.parent)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Assert):
                found.append(f"{where} assert (stripped by python -O)")
            elif isinstance(node, ast.Raise) and node.exc is not None:
                target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                name = target.id if isinstance(target, ast.Name) else None
                if name in builtin_exceptions and name not in ALLOWED_BUILTIN_RAISES:
                    found.append(f"{where} raise {name}")
    return found


def test_the_package_raises_only_its_own_error_types():
    assert _builtin_raises_and_asserts() == []


def test_resource_error_is_a_memory_error_and_not_bad_input():
    assert issubclass(ResourceError, AnomalyCLIPError) and issubclass(ResourceError, MemoryError)
    assert not issubclass(ResourceError, InvalidInputError)


@pytest.mark.parametrize(
    "oom",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.10 GiB total capacity)"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"),
        RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB)"),
    ],
)
def test_out_of_memory_in_predict_is_a_resource_error_with_advice(fresh_model, monkeypatch, oom):
    def encode_image(pixel_values):
        raise oom

    monkeypatch.setattr(fresh_model, "encode_image", encode_image)
    with pytest.raises(ResourceError, match=r"Out of memory while running AnomalyCLIP on pixel_values \[2x3x518x518\]") as info:
        fresh_model.predict([IMAGE_A, IMAGE_B], batch_size=2)
    message = str(info.value)
    assert "float32 on cpu" in message and "smaller batch_size" in message and "image_size" in message
    assert str(oom).splitlines()[0][:40] in message  # torch's own words are kept
    assert not isinstance(info.value, InvalidInputError)
    assert info.value.__cause__ is oom


def test_other_runtime_errors_are_not_mistaken_for_out_of_memory(fresh_model, monkeypatch):
    def encode_image(pixel_values):
        raise RuntimeError("expected scalar type Float but found Half")

    monkeypatch.setattr(fresh_model, "encode_image", encode_image)
    with pytest.raises(RuntimeError, match="expected scalar type") as info:
        fresh_model.predict(IMAGE_A)
    assert not isinstance(info.value, AnomalyCLIPError)


def test_feature_cache_that_does_not_fit_is_a_resource_error(golden_model):
    """A real allocation failure (terabytes), not a simulated one."""
    from anomalyclip.train.feature_cache import make_feature_cache

    with pytest.raises(ResourceError, match=r"allocating the in-memory feature cache \(10000000 images") as info:
        make_feature_cache("memory", golden_model, range(10_000_000), torch.float32, None)
    assert "cache_dtype='float16', feature_cache='disk'" in str(info.value)


def test_feature_cache_miss_is_invalid_input(golden_model):
    from anomalyclip.train.feature_cache import MemoryFeatureCache

    cache = MemoryFeatureCache(3, [24], 5, 4, torch.float32)
    cache.put([0], torch.zeros(1, 4), {24: torch.zeros(1, 5, 4)})
    assert cache.get([0])[0].shape == (1, 4)
    with pytest.raises(InvalidInputError, match=r"no entry for sample\(s\) \[1, 2\] \(2 missing\); put\(\)"):
        cache.get([0, 1, 2])


def test_flops_inputs():
    assert count_inference_flops(image_size=336)["total"] > 0
    with pytest.raises(InvalidInputError, match=r"image_size 500 is not a multiple of patch_size 14 \(e.g. 504\)"):
        count_inference_flops(image_size=500)
    with pytest.raises(InvalidInputError, match=r"Unknown ModelDims field\(s\) \['img_size'\]"):
        count_inference_flops(img_size=336)
    with pytest.raises(InvalidInputError, match=r"ModelDims.layers must be an int >= 1, got 0"):
        ModelDims(layers=0)
    with pytest.raises(InvalidInputError, match=r"feature_layers must be 1-based block indices in 1..24, got \(25,\)"):
        ModelDims(feature_layers=(25,))


def test_positional_embedding_that_is_not_a_square_grid_is_a_backbone_error():
    assert resize_positional_embedding(torch.zeros(17, 8), 4).shape == (17, 8)
    with pytest.raises(BackboneError, match=r"positional embedding has shape \[11, 8\]: not \[1 \+ g\*g, width\]"):
        resize_positional_embedding(torch.zeros(11, 8), 4)


def test_anomaly_maps_of_no_layer_is_invalid_input():
    with pytest.raises(InvalidInputError, match="patch_features is empty"):
        anomaly_maps({}, torch.zeros(2, 8), temperature=0.07, image_size=28, sigma=4.0)


def test_prepared_image_needs_exactly_one_form():
    from anomalyclip.preprocessing import PreparedImage

    with pytest.raises(InvalidInputError, match="exactly one of pil and array"):
        PreparedImage(pil=None, array=None)
