"""Image inputs of every supported kind, and a clear error for each kind of bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from anomalyclip import ImageLoadError, InvalidInputError
from anomalyclip.preprocessing import OPENAI_MEAN, OPENAI_STD, preprocess_image, preprocess_images

from .conftest import IMAGE_A, IMAGE_B

S = 56  # small processing size: preprocessing tests need no model


def _reference(img: Image.Image, size: int = S) -> torch.Tensor:
    """The official pipeline written out independently: PIL bicubic squash, RGB, ToTensor, Normalize."""
    rgb = np.asarray(img.resize((size, size), Image.BICUBIC).convert("RGB"), dtype=np.float32) / 255.0
    t = torch.from_numpy(rgb).permute(2, 0, 1)
    return (t - torch.tensor(OPENAI_MEAN).view(3, 1, 1)) / torch.tensor(OPENAI_STD).view(3, 1, 1)


@pytest.fixture(scope="module")
def pil_a() -> Image.Image:
    return Image.open(IMAGE_A).convert("RGB")


def test_path_pil_and_uint8_array_are_identical(pil_a):
    expected = _reference(pil_a)
    assert torch.equal(preprocess_image(IMAGE_A, S), expected)
    assert torch.equal(preprocess_image(str(IMAGE_A), S), expected)
    assert torch.equal(preprocess_image(pil_a, S), expected)
    assert torch.equal(preprocess_image(np.asarray(pil_a), S), expected)


def test_grayscale_is_resized_then_converted():
    gray = Image.open(IMAGE_B)
    assert gray.mode == "L"
    out = preprocess_image(IMAGE_B, S)
    assert torch.equal(out, _reference(gray))
    assert torch.equal(preprocess_image(np.asarray(gray), S), out)  # HxW uint8
    assert torch.equal(preprocess_image(np.asarray(gray)[:, :, None], S), out)  # HxWx1


def test_rgba_array_matches_pil_rgba(pil_a):
    rgba = np.concatenate([np.asarray(pil_a), np.full((*np.asarray(pil_a).shape[:2], 1), 255, np.uint8)], axis=2)
    assert torch.equal(preprocess_image(rgba, S), _reference(Image.fromarray(rgba, "RGBA")))


def test_float_inputs_agree_with_uint8_within_quantization(pil_a):
    arr = np.array(pil_a)
    expected = preprocess_image(arr, S)
    as_float = preprocess_image(arr.astype(np.float32) / 255.0, S)
    as_tensor = preprocess_image(torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0, S)
    as_uint8_tensor = preprocess_image(torch.from_numpy(arr).permute(2, 0, 1).contiguous(), S)
    # 8-bit PIL rounds after resampling: at most one level (1/255) apart, divided by std.
    bound = 1.01 / 255 / min(OPENAI_STD)
    assert (as_float - expected).abs().max() <= bound
    assert torch.allclose(as_tensor, as_float, atol=1e-6)
    assert torch.equal(as_uint8_tensor, expected)


def test_batch_shape():
    batch = preprocess_images([IMAGE_A, IMAGE_B], S)
    assert batch.shape == (2, 3, S, S) and batch.dtype == torch.float32


@pytest.mark.parametrize(
    "bad, message",
    [
        (12345, "Unsupported image type"),
        (np.zeros((10, 10, 2), np.uint8), "HxWx3"),
        (np.zeros((2, 10, 10, 3), np.uint8), "HxWx3"),
        (np.zeros((0, 10), np.uint8), "zero size"),
        (np.zeros((10, 10), np.int64), "Unsupported image dtype"),
        (np.zeros((10, 10), np.int16), "Unsupported image dtype"),
        (np.full((10, 10), np.nan, np.float32), "NaN"),
        (np.full((10, 10, 3), 2.0, np.float32), r"\[0, 1\]"),
        (torch.zeros(5, 10, 10), "1, 3 or 4 channels"),
        (torch.zeros(1, 3, 10, 10), "CHW"),
        (torch.full((3, 10, 10), float("inf")), "NaN or infinite"),
        (Image.new("F", (10, 10), 2.0), r"\[0, 1\]"),
        (Image.new("I", (10, 10), -1), r"do not fit a range of \[0, 2147483647\]"),
        (Image.new("I;16", (10, 10)).convert("F").point(lambda v: float("nan")), "NaN"),
    ],
)
def test_bad_inputs_raise_invalid_input(bad, message):
    with pytest.raises(InvalidInputError, match=message):
        preprocess_image(bad, S)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ImageLoadError, match="not found"):
        preprocess_image(tmp_path / "nope.png", S)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ImageLoadError, match="broken.png"):
        preprocess_image(broken, S)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(IMAGE_A.read_bytes()[:2000])
    with pytest.raises(ImageLoadError, match="truncated.png"):
        preprocess_image(truncated, S)
    with pytest.raises(ImageLoadError, match="directory"):
        preprocess_image(tmp_path, S)


def test_empty_list():
    with pytest.raises(InvalidInputError, match="empty"):
        preprocess_images([], S)


# ----------------------------------------------------------------------------- through the model
def test_predict_accepts_every_input_kind(golden_model):
    pil = Image.open(IMAGE_A)
    arr = np.array(pil.convert("RGB"))  # writable, as torch.from_numpy wants
    inputs = [IMAGE_A, pil, arr, torch.from_numpy(arr).permute(2, 0, 1).contiguous()]
    results = golden_model.predict(inputs, batch_size=4)
    assert len(results) == 4
    for r in results:
        assert r.anomaly_map.shape == (300, 400) and r.anomaly_map.dtype == np.float32
        assert abs(r.score - results[0].score) < 1e-6
        assert np.abs(r.anomaly_map - results[0].anomaly_map).max() < 1e-5


def test_predict_batching_does_not_change_results(golden_model):
    together = golden_model.predict([IMAGE_A, IMAGE_B], batch_size=2)
    apart = golden_model.predict([IMAGE_A, IMAGE_B], batch_size=1)
    for x, y in zip(together, apart):
        assert abs(x.score - y.score) < 1e-5
        assert np.abs(x.anomaly_map - y.anomaly_map).max() < 1e-4
    assert apart[1].anomaly_map.shape == (256, 256)


def test_predict_thresholds_give_label_and_mask(golden_model):
    r = golden_model.predict(IMAGE_A, image_threshold=0.1, pixel_threshold=0.3)
    assert r.label == int(r.score > 0.1)
    assert r.mask.dtype == bool and r.mask.shape == r.anomaly_map.shape
    assert np.array_equal(r.mask, r.anomaly_map > 0.3)
    plain = golden_model.predict(IMAGE_A)
    assert plain.label is None and plain.mask is None


def test_predict_bad_inputs(golden_model, tmp_path):
    with pytest.raises(InvalidInputError, match="empty"):
        golden_model.predict([])
    with pytest.raises(InvalidInputError, match="smaller than one 14x14 patch"):
        golden_model.predict(np.zeros((10, 40, 3), np.uint8))
    with pytest.raises(ImageLoadError, match="missing.png"):
        golden_model.predict([IMAGE_A, tmp_path / "missing.png"])
    with pytest.raises(InvalidInputError, match="batch_size"):
        golden_model.predict(IMAGE_A, batch_size=0)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((1, 3, 518, 518), np.float32), "takes a tensor"),
        (torch.zeros(3, 518, 518), r"\[B, 3, S, S\]"),
        (torch.zeros(1, 1, 518, 518), r"\[B, 3, S, S\]"),
        (torch.zeros(0, 3, 518, 518), "empty batch"),
        (torch.zeros(1, 3, 518, 512), "multiple of the patch size"),
        (torch.zeros(1, 3, 500, 500), "multiple of the patch size"),
        (torch.zeros(1, 3, 518, 518, dtype=torch.uint8), "floating point"),
        (torch.full((1, 3, 518, 518), float("nan")), "NaN"),
    ],
)
def test_forward_rejects_bad_tensors(golden_model, bad, message):
    with pytest.raises(InvalidInputError, match=message):
        golden_model(bad)


def test_calibrate_on_normal_images_flags_above_the_quantile(fresh_model):  # calibrate keeps its thresholds on the model
    from anomalyclip.eval.thresholds import Thresholds

    normal = [IMAGE_B, np.asarray(Image.open(IMAGE_B))[::-1].copy()]
    thresholds = fresh_model.calibrate(normal, quantile=1.0)
    assert isinstance(thresholds, Thresholds)
    results = fresh_model.predict(normal, thresholds=thresholds)
    # quantile 1.0 is the maximum: the threshold is the highest normal score (that image's own
    # label is a knife edge, not asserted), and the normal image clear below it is not flagged.
    lower, highest = sorted(results, key=lambda r: r.score)
    assert highest.score == pytest.approx(thresholds.image, abs=1e-5)
    assert thresholds.image - lower.score > 1e-3 and lower.label == 0
    assert all(r.label == int(r.score > thresholds.image) for r in results)
    explicit = fresh_model.predict(IMAGE_A, thresholds=thresholds, image_threshold=0.0)
    assert explicit.image_threshold == 0.0 and explicit.pixel_threshold == thresholds.pixel
