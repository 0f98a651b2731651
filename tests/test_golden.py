"""Fidelity: the official implementation's outputs on the tiny CLIP, reproduced in float32 on the CPU.

Tolerances from fixtures/golden/README.md: features 1e-4, patch tokens 1e-4 relative to their
scale, scores 1e-4, anomaly maps 1e-3. Everything starts from the official-format checkpoint and
from the PNG files.
"""

from __future__ import annotations

import pytest
import torch

from anomalyclip import AnomalyCLIP

from .conftest import IMAGE_A, IMAGE_B, MASK_A, OFFICIAL_PTH, TINY_CLIP_REF

LAYERS = {"top": (24,), "multi": (6, 12, 18, 24)}
IMAGES = {"a": IMAGE_A, "b": IMAGE_B}
# Patch tokens the golden run stored (to keep the fixture small): every output layer of image a,
# the top layer of image b.
PATCH_TOKENS = {("a", "top"): (24,), ("a", "multi"): (6, 12, 18, 24), ("b", "top"): (24,), ("b", "multi"): ()}


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.float() - b.float()).abs().max())


@pytest.fixture(scope="module")
def model_from_reference() -> AnomalyCLIP:
    """Built from the backbone reference string, as a user would (not from a prebuilt CLIP)."""
    return AnomalyCLIP.from_official_checkpoint(OFFICIAL_PTH, clip=TINY_CLIP_REF, device="cpu")


@pytest.fixture(scope="module")
def outputs(model_from_reference):
    """Outputs for both images and both layer settings (two forwards of a batch of 2)."""
    model = model_from_reference
    pixel_values = model.preprocess([IMAGE_A, IMAGE_B])
    result = {}
    for variant, layers in LAYERS.items():
        model.reconfigure(feature_layers=layers)
        with torch.inference_mode():
            result[variant] = model(pixel_values)
    model.reconfigure(feature_layers=(24,))
    return pixel_values, result


def test_text_features(model_from_reference, golden):
    with torch.inference_mode():
        text = model_from_reference.encode_text()
    assert _max_abs(text, golden["text_features"]) < 1e-4


def test_pixel_values(outputs, golden):
    pixel_values, _ = outputs
    for i, name in enumerate(IMAGES):
        assert _max_abs(pixel_values[i : i + 1], golden[f"{name}.pixel_values"]) < 1e-5


@pytest.mark.parametrize("variant", list(LAYERS))
@pytest.mark.parametrize("index,name", list(enumerate(IMAGES)))
def test_features_scores_and_maps(outputs, golden, variant, index, name):
    out = outputs[1][variant]
    prefix = f"{name}.{variant}"
    assert _max_abs(out.image_features[index : index + 1], golden[f"{prefix}.image_features"]) < 1e-4
    assert _max_abs(out.scores[index : index + 1], golden[f"{prefix}.score"]) < 1e-4
    assert _max_abs(out.anomaly_maps[index : index + 1], golden[f"{prefix}.anomaly_map"]) < 1e-3
    for layer in PATCH_TOKENS[(name, variant)]:
        expected = golden[f"{prefix}.patch_tokens.{layer}"]
        scale = float(expected.abs().max())
        assert _max_abs(out.patch_features[layer][index : index + 1], expected) / scale < 1e-4


def test_golden_file_holds_exactly_the_patch_tokens_checked(golden):
    """The patch-token checks above cover every stored key: none is skipped silently."""
    stored = {key for key in golden if ".patch_tokens." in key}
    checked = {f"{name}.{variant}.patch_tokens.{layer}" for (name, variant), layers in PATCH_TOKENS.items() for layer in layers}
    assert stored == checked


def test_raw_map_before_blur(outputs, golden):
    out = outputs[1]["top"]
    assert _max_abs(out.raw_anomaly_maps[:1], golden["a.top.anomaly_map_raw"]) < 1e-3


def test_mask_preprocessing(golden):
    from anomalyclip.preprocessing import preprocess_mask

    mask = preprocess_mask(MASK_A, 518)
    assert torch.equal(mask.to(torch.uint8), golden["train.gt_mask"][0])


def test_blur_matches_scipy(golden):
    import numpy as np
    from scipy.ndimage import gaussian_filter

    from anomalyclip.scoring import gaussian_blur

    raw = golden["a.top.anomaly_map_raw"]
    expected = gaussian_filter(raw[0].numpy(), 4)
    assert np.abs(gaussian_blur(raw, 4)[0].numpy() - expected).max() < 1e-5
    small = torch.rand(2, 9, 5)  # smaller than the kernel radius: repeated reflections
    expected_small = np.stack([gaussian_filter(m, 4) for m in small.numpy()])
    assert np.abs(gaussian_blur(small, 4).numpy() - expected_small).max() < 1e-5


def test_predict_returns_original_size_and_official_score(model_from_reference, golden):
    result = model_from_reference.predict(IMAGE_A)
    assert result.anomaly_map.shape == (300, 400) and result.anomaly_map.dtype.name == "float32"
    assert abs(result.score - float(golden["a.top.score"])) < 1e-4
