"""Every option of README's table changes the output as a second computation says, through
``reconfigure`` and ``from_pretrained``; constructors return eval-mode models; the map's range;
results carry their image's path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from anomalyclip import AnomalyCLIP, InvalidInputError
from anomalyclip.scoring import gaussian_blur
from anomalyclip.vision import encode_image

from .conftest import IMAGE_A, IMAGE_B, OFFICIAL_PTH, TINY_CLIP_REF

S = 112  # small processing size (8 x 8 patches): fast


@pytest.fixture
def model(fresh_model):
    return fresh_model.reconfigure(image_size=S)


def _run(model: AnomalyCLIP):
    with torch.inference_mode():
        return model(model.preprocess(IMAGE_A))


def test_sigma_is_the_blur_of_the_raw_map(model):
    default = _run(model)
    for sigma in (1.5, 0.0):
        out = _run(model.reconfigure(sigma=sigma))
        assert model.config.sigma == sigma
        torch.testing.assert_close(out.raw_anomaly_maps, default.raw_anomaly_maps)  # the blur only
        torch.testing.assert_close(out.anomaly_maps, gaussian_blur(out.raw_anomaly_maps, sigma), rtol=0, atol=1e-6)
        assert (out.anomaly_maps - default.anomaly_maps).abs().max() > 1e-3
    torch.testing.assert_close(out.anomaly_maps, out.raw_anomaly_maps)  # sigma 0: no blur


@pytest.mark.parametrize("dpam_layers, dpam_mode", [(3, "vv"), (19, "qq"), (19, "kk"), (0, "vv")])
def test_dpam_options_match_the_vision_forward_called_directly(model, dpam_layers, dpam_mode):
    default = _run(model)
    out = _run(model.reconfigure(dpam_layers=dpam_layers, dpam_mode=dpam_mode))
    pixel_values = model.preprocess(IMAGE_A)
    with torch.inference_mode():
        direct = encode_image(
            model.clip.visual, pixel_values, feature_layers=(24,), dpam_layers=dpam_layers, dpam_mode=dpam_mode
        )
    torch.testing.assert_close(out.patch_features[24], direct.patch_features[24])
    assert (out.patch_features[24] - default.patch_features[24]).abs().max() > 1e-3
    assert (model.config.dpam_layers, model.config.dpam_mode) == (dpam_layers, dpam_mode)


def test_image_size_and_feature_layers(model):
    out = _run(model.reconfigure(image_size=140, feature_layers=[6, 24]))
    assert model.config.image_size == 140 and model.config.feature_layers == (6, 24)
    assert out.anomaly_maps.shape == (1, 140, 140) and sorted(out.patch_features) == [6, 24]


def test_from_pretrained_takes_every_option(model, tmp_path):
    options = dict(image_size=140, feature_layers=(12, 24), dpam_layers=5, dpam_mode="kk", sigma=2.0)
    model.save_pretrained(tmp_path)
    loaded = AnomalyCLIP.from_pretrained(tmp_path, device="cpu", **options)
    assert {k: getattr(loaded.config, k) for k in options} == options
    expected = _run(model.reconfigure(**options))
    out = _run(loaded)
    torch.testing.assert_close(out.scores, expected.scores)
    torch.testing.assert_close(out.anomaly_maps, expected.anomaly_maps)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"dpam_layers": 25}, "dpam_layers must be in 0..24, got 25"),
        ({"dpam_layers": 2.5}, r"dpam_layers must be an int, got 2.5 \(float\)"),
        ({"dpam_mode": "vk"}, r"dpam_mode must be one of \('vv', 'qq', 'kk'\), got 'vk'"),
        ({"sigma": -1.0}, "sigma must be a finite number >= 0, got -1.0"),
        ({"sigma": "2"}, r"sigma must be a number, got '2' \(str\)"),
        ({"feature_layers": [6.5]}, r"feature_layers must hold ints .*got \[6.5\]"),
        ({"feature_layers": 24}, r"feature_layers must be a sequence of ints.*got 24"),
        ({"image_size": 500}, "image_size=500 is not a multiple of the patch size 14"),
    ],
)
def test_options_are_validated_and_a_refusal_changes_nothing(model, tmp_path, options, message):
    before = model.config
    with pytest.raises(InvalidInputError, match=message):
        model.reconfigure(**options)
    assert model.config == before
    model.save_pretrained(tmp_path)
    with pytest.raises(InvalidInputError, match=message):
        AnomalyCLIP.from_pretrained(tmp_path, device="cpu", **options)


def test_every_constructor_returns_an_eval_mode_model(tiny_clip, golden_model, tmp_path):
    golden_model.save_pretrained(tmp_path)
    models = {
        "from_clip": AnomalyCLIP.from_clip(tiny_clip, backbone=TINY_CLIP_REF),
        "from_backbone": AnomalyCLIP.from_backbone(TINY_CLIP_REF, device="cpu"),
        "from_official_checkpoint": AnomalyCLIP.from_official_checkpoint(OFFICIAL_PTH, clip=TINY_CLIP_REF, device="cpu"),
        "from_pretrained": AnomalyCLIP.from_pretrained(tmp_path, device="cpu"),
    }
    for name, m in models.items():
        assert m.training is False, name
        assert not any(module.training for module in m.modules()), name


def test_map_range_follows_the_feature_layers(model):
    assert model.map_range == (0.0, 1.0)
    model.reconfigure(feature_layers=(6, 12, 18, 24))
    assert model.map_range == (0.0, 4.0)
    out = _run(model)
    assert 1.0 < float(out.anomaly_maps.max()) <= 4.0  # a sum of 4 probabilities: beyond 1 here


def test_results_carry_the_path_of_path_inputs(model):
    results = model.predict([IMAGE_A, str(IMAGE_B), Image.open(IMAGE_A), np.asarray(Image.open(IMAGE_B))])
    assert [r.path for r in results] == [str(IMAGE_A), str(IMAGE_B), None, None]
    assert model.predict(IMAGE_A).path == str(IMAGE_A)
