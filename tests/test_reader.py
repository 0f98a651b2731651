"""One way to read samples (``anomalyclip.data.reader.SampleReader``) and one preprocessing for
every path: predict, evaluate, calibrate and finetune all see the pixels ``model.preprocess``
gives, normalized with ``config.mean`` / ``config.std``, which come from the backbone."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomalyclip import AnomalyCLIP, evaluate, load_dataset
from anomalyclip.config import OPENAI_MEAN, OPENAI_STD
from anomalyclip.data.datasets import Sample, read_mvtec
from anomalyclip.data.reader import SampleReader
from anomalyclip.data.synthetic import make_synthetic_dataset
from anomalyclip.errors import DatasetError, ImageLoadError, InvalidInputError
from anomalyclip.preprocessing import preprocess_image, preprocess_mask
from anomalyclip.train.finetune import finetune

from .conftest import TINY_CLIP, TINY_CLIP_REF

S = 24  # processing size of the reader tests
SIZE = 112  # processing size of the model tests (8 x 8 patches of the tiny CLIP)
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _write_png(path: Path, size_wh: tuple[int, int], mode: str = "RGB", value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size_wh, value).save(path)
    return path


# ---------------------------------------------------------------- the reader


def test_sample_reader_items(tmp_path):
    root = make_synthetic_dataset(tmp_path / "mvtec", layout="mvtec", n_normal=3, n_anomalous=4, size=(32, 40), seed=1)
    ds = read_mvtec(root)
    reader = SampleReader(ds, S)
    assert len(reader) == 7
    for i, s in enumerate(ds):
        item = reader[i]
        assert set(item) == {"pixel_values", "mask", "has_mask", "label", "index"}
        assert item["pixel_values"].shape == (3, S, S) and item["pixel_values"].dtype == torch.float32
        assert item["mask"].shape == (S, S) and item["mask"].dtype == torch.float32
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        assert item["label"] == s.label and item["index"] == i and item["has_mask"] is True
        assert torch.equal(item["pixel_values"], preprocess_image(s.image_path, S))
        if s.label:
            assert torch.equal(item["mask"], preprocess_mask(s.mask_path, S)) and item["mask"].sum() > 0
        else:
            assert item["mask"].sum() == 0
    assert reader[-1]["index"] == 6
    batch = next(iter(torch.utils.data.DataLoader(reader, batch_size=7)))
    assert batch["pixel_values"].shape == (7, 3, S, S) and batch["mask"].shape == (7, S, S)
    assert batch["label"].tolist() == [s.label for s in ds] and batch["has_mask"].all()

    # The normalization is the reader's: another mean/std, other pixels, the same masks.
    other = SampleReader(ds, S, MEAN, STD)
    assert torch.equal(other[0]["pixel_values"], preprocess_image(ds[0].image_path, S, MEAN, STD))
    assert not torch.allclose(other[0]["pixel_values"], reader[0]["pixel_values"])
    # Images only, masks only.
    assert set(SampleReader(ds, S, images=True, masks=False)[4]) == {"pixel_values", "label", "index"}
    masks_only = SampleReader(ds, S, images=False, masks=True)[4]
    assert set(masks_only) == {"mask", "has_mask", "label", "index"}
    assert torch.equal(masks_only["mask"], reader[4]["mask"])


def test_masks_only_reading_checks_sizes_without_decoding_images(tmp_path, monkeypatch):
    image = _write_png(tmp_path / "img.png", size_wh=(20, 16))
    good = _write_png(tmp_path / "good_mask.png", size_wh=(20, 16), mode="L", value=255)
    wrong = _write_png(tmp_path / "wrong_mask.png", size_wh=(16, 20), mode="L", value=255)
    samples = [Sample(image, good, 1, "c", "crack"), Sample(image, wrong, 1, "c", "crack")]

    def no_decoding(*args, **kwargs):
        raise AssertionError("the image was decoded")

    monkeypatch.setattr("anomalyclip.data.reader.prepare_image", no_decoding)
    reader = SampleReader(samples, S, images=False)
    assert reader[0]["mask"].sum() == S * S
    with pytest.raises(DatasetError) as info:
        reader[1]
    message = str(info.value)
    assert "img.png" in message and "wrong_mask.png" in message and "16x20" in message and "20x16" in message


def test_sample_reader_maskless_mismatch_and_unreadable(tmp_path):
    image = _write_png(tmp_path / "img.png", size_wh=(20, 16))
    wrong = _write_png(tmp_path / "wrong_mask.png", size_wh=(16, 20), mode="L", value=255)
    reader = SampleReader([Sample(image, None, 1, "c", "crack"), Sample(image, wrong, 1, "c", "crack")], S)
    item = reader[0]
    assert item["has_mask"] is False and item["label"] == 1 and item["mask"].sum() == 0
    with pytest.raises(DatasetError) as info:
        reader[1]
    message = str(info.value)
    assert "img.png" in message and "wrong_mask.png" in message and "16x20" in message and "20x16" in message
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ImageLoadError, match="broken.png"):
        SampleReader([Sample(broken, None, 0, "c", "good")], S)[0]
    with pytest.raises(ImageLoadError, match="broken.png"):  # masks only: the header is still read
        SampleReader([Sample(broken, wrong, 1, "c", "crack")], S, images=False)[0]
    with pytest.raises(ImageLoadError, match="absent.png"):
        SampleReader([Sample(image, tmp_path / "absent.png", 1, "c", "crack")], S)[0]
    with pytest.raises(DatasetError):
        SampleReader([], S)
    with pytest.raises(InvalidInputError):
        SampleReader([Sample(image, None, 0, "c", "good")], 0)
    with pytest.raises(InvalidInputError, match="image_path"):
        SampleReader(["not a sample"], S)
    with pytest.raises(InvalidInputError, match="images, masks or both"):
        SampleReader([Sample(image, None, 0, "c", "good")], S, images=False, masks=False)


# ---------------------------------------------------------------- one preprocessing, from the backbone


@pytest.fixture
def other_normalization_clip(tmp_path) -> str:
    """The tiny CLIP in a local-dir whose open_clip preprocess_cfg has a non-OpenAI mean and std."""
    folder = tmp_path / "tiny-clip-other-norm"
    folder.mkdir()
    config = json.loads((TINY_CLIP / "open_clip_config.json").read_text())
    config["preprocess_cfg"].update(mean=list(MEAN), std=list(STD))
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    (folder / "open_clip_model.safetensors").symlink_to(TINY_CLIP / "open_clip_model.safetensors")
    return f"local-dir:{folder}"


def test_config_normalization_comes_from_the_backbone(other_normalization_clip, golden_model):
    model = AnomalyCLIP.from_backbone(other_normalization_clip, device="cpu", image_size=SIZE, seed=0)
    assert model.config.mean == MEAN and model.config.std == STD
    # OpenAI weights give OpenAI's values: the golden model's config is unchanged.
    assert golden_model.config.mean == OPENAI_MEAN and golden_model.config.std == OPENAI_STD


def test_predict_evaluate_calibrate_and_finetune_preprocess_alike(tiny_clip, tmp_path, monkeypatch):
    model = AnomalyCLIP.from_clip(tiny_clip, backbone=TINY_CLIP_REF, image_size=SIZE, seed=0)
    model.config = model.config.replace(mean=MEAN, std=STD)  # a model whose normalization is not OpenAI's
    root = make_synthetic_dataset(tmp_path / "data", layout="mvtec", n_normal=1, n_anomalous=2, size=(64, 64), seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = load_dataset(root, "mvtec")
    paths = [s.image_path for s in data]
    expected_pixels = model.preprocess(paths)
    assert not torch.allclose(expected_pixels, torch.stack([preprocess_image(p, SIZE) for p in paths]))

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = model.register_forward_hook(lambda m, args, out: seen.append((args[0].clone(), out.scores.clone())))

    def forwarded() -> tuple[torch.Tensor, torch.Tensor]:
        pixels, scores = torch.cat([p for p, _ in seen]), torch.cat([s for _, s in seen])
        seen.clear()
        return pixels, scores

    predicted = np.array([r.score for r in model.predict(paths)], dtype=np.float32)
    pixels, _ = forwarded()
    assert torch.equal(pixels, expected_pixels)

    report = evaluate(model, data, progress=False)
    pixels, scores = forwarded()
    assert torch.equal(pixels, expected_pixels)
    np.testing.assert_allclose(scores.numpy(), predicted, rtol=0, atol=1e-6)
    assert report.counts == {"texture_a": {"images": 3, "anomalous": 2}}

    thresholds = model.calibrate(paths, quantile=1.0)  # quantile 1: the highest score
    pixels, scores = forwarded()
    assert torch.equal(pixels, expected_pixels)
    np.testing.assert_allclose(scores.numpy(), predicted, rtol=0, atol=1e-6)
    assert thresholds.image == pytest.approx(float(predicted.max()), abs=1e-6)
    hook.remove()

    # finetune: the images the vision encoder sees (feature cache, and without one) are the same pixels.
    encoded: list[torch.Tensor] = []
    encode_image = model.encode_image

    def recording(pixel_values):
        encoded.append(pixel_values.clone())
        return encode_image(pixel_values)

    monkeypatch.setattr(model, "encode_image", recording)
    for cache in ("memory", None):
        finetune(model, data, epochs=1, batch_size=len(paths), shuffle=False, feature_cache=cache, progress=False)
        assert len(encoded) == 1 and torch.equal(encoded.pop(), expected_pixels)
