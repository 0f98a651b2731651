"""Thresholds live on the model: calibrate keeps them, config.json stores them, from_pretrained
restores them, predict applies them unless told otherwise."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

import anomalyclip
from anomalyclip import AnomalyCLIP, AnomalyCLIPConfig, CheckpointError, InvalidInputError, Thresholds

from .conftest import IMAGE_A, IMAGE_B


@pytest.fixture
def normal_images():
    return [IMAGE_B, np.asarray(Image.open(IMAGE_B))[::-1].copy()]


def test_thresholds_is_exported_lazily_from_the_package():
    from anomalyclip.eval.thresholds import Thresholds as defined_there

    assert anomalyclip.Thresholds is defined_there
    assert "Thresholds" in anomalyclip.__all__


def test_calibrated_model_saved_and_reloaded_labels_images_with_no_argument(fresh_model, normal_images, tmp_path):
    assert fresh_model.thresholds is None
    thresholds = fresh_model.calibrate(normal_images, quantile=1.0)
    assert fresh_model.thresholds == thresholds  # kept on the model

    fresh_model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["thresholds"]
    assert saved == {"image": thresholds.image, "pixel": thresholds.pixel}

    reloaded = AnomalyCLIP.from_pretrained(tmp_path, device="cpu")
    assert reloaded.thresholds == thresholds
    result = reloaded.predict(IMAGE_A)  # no threshold argument
    assert (result.image_threshold, result.pixel_threshold) == (thresholds.image, thresholds.pixel)
    assert result.label == int(result.score > thresholds.image)
    assert np.array_equal(result.mask, result.anomaly_map > thresholds.pixel)
    # quantile 1.0 is the maximum over the calibration set: the threshold is the highest normal
    # score (its own label sits on the knife edge: a 1e-7 difference between batches or CPUs
    # flips it, so it is not asserted), and the other normal image, clear below it, is passed.
    lower, highest = sorted(reloaded.predict(normal_images), key=lambda r: r.score)
    assert thresholds.image == pytest.approx(highest.score, abs=1e-5)
    assert thresholds.image - lower.score > 1e-3 and lower.label == 0


def test_explicit_arguments_win_and_false_means_none(fresh_model, normal_images):
    fresh_model.thresholds = Thresholds(image=0.25, pixel=0.5)
    own = fresh_model.predict(IMAGE_A)
    assert (own.image_threshold, own.pixel_threshold) == (0.25, 0.5)

    explicit = fresh_model.predict(IMAGE_A, image_threshold=0.0)
    assert (explicit.image_threshold, explicit.pixel_threshold) == (0.0, 0.5)
    other = fresh_model.predict(IMAGE_A, thresholds=Thresholds(image=0.9))
    assert (other.image_threshold, other.pixel_threshold) == (0.9, None)
    none = fresh_model.predict(IMAGE_A, thresholds=False)
    assert none.label is None and none.mask is None
    only_pixel = fresh_model.predict(IMAGE_A, thresholds=False, pixel_threshold=0.1)
    assert (only_pixel.image_threshold, only_pixel.pixel_threshold) == (None, 0.1)
    assert own.score == none.score  # thresholds never change the numbers


def test_thresholds_setter_validates(fresh_model):
    fresh_model.thresholds = {"image": 0.5}
    assert fresh_model.thresholds == Thresholds(image=0.5, pixel=None)
    assert fresh_model.config.thresholds == {"image": 0.5, "pixel": None}
    fresh_model.thresholds = None
    assert fresh_model.thresholds is None and fresh_model.config.thresholds is None
    with pytest.raises(InvalidInputError, match=r"model.thresholds takes an anomalyclip.Thresholds.*got float"):
        fresh_model.thresholds = 0.5
    with pytest.raises(InvalidInputError, match=r"thresholds\['pixel'\] must be a finite number or None, got nan"):
        fresh_model.thresholds = {"pixel": float("nan")}
    with pytest.raises(InvalidInputError, match=r"unknown keys \['score'\]"):
        fresh_model.thresholds = {"score": 0.5}
    assert fresh_model.thresholds is None  # a refused value changes nothing


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_threshold": "0.5"}, "image_threshold must be a finite number or None, got '0.5'"),
        ({"pixel_threshold": float("inf")}, "pixel_threshold must be a finite number or None, got inf"),
        ({"thresholds": {"score": 0.5}}, r"thresholds: unknown keys \['score'\]"),
        ({"thresholds": True}, r"thresholds must be an anomalyclip.Thresholds, a mapping .* or False"),
    ],
)
def test_predict_refuses_bad_thresholds(golden_model, kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        golden_model.predict(IMAGE_A, **kwargs)


def test_calibrate_checks_its_options_before_running(golden_model):
    with pytest.raises(InvalidInputError, match=r"batch_size must be a positive int, got 0"):
        golden_model.calibrate([IMAGE_B], batch_size=0)
    with pytest.raises(InvalidInputError, match=r"quantile must be a number in \[0, 1\].*got 99"):
        golden_model.calibrate([IMAGE_B], quantile=99)


def test_changing_an_option_drops_stale_thresholds(fresh_model, caplog):
    fresh_model.thresholds = Thresholds(image=0.5, pixel=0.5)
    fresh_model.reconfigure(image_size=fresh_model.config.image_size)  # no change: kept
    assert fresh_model.thresholds is not None
    with caplog.at_level(logging.WARNING, logger="anomalyclip"):
        fresh_model.reconfigure(feature_layers=(6, 24))
    assert fresh_model.thresholds is None
    assert "Dropping the model's thresholds" in caplog.text and "feature_layers" in caplog.text


def test_adding_or_clearing_references_drops_stale_thresholds(fresh_model, caplog):
    """References change scores and maps (and the maps' range): thresholds chosen before no longer hold."""
    fresh_model.reconfigure(image_size=224)
    fresh_model.thresholds = Thresholds(image=0.5, pixel=0.5)
    with caplog.at_level(logging.WARNING, logger="anomalyclip"):
        fresh_model.add_references([IMAGE_B])
    assert fresh_model.thresholds is None
    assert "Dropping the model's thresholds" in caplog.text and "references changed" in caplog.text
    calibrated = fresh_model.calibrate([IMAGE_B])  # with the references: kept
    assert fresh_model.thresholds == calibrated
    fresh_model.references = fresh_model.references  # the same memory: kept
    assert fresh_model.thresholds == calibrated
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="anomalyclip"):
        fresh_model.clear_references()
    assert fresh_model.thresholds is None and "references were cleared" in caplog.text
    fresh_model.thresholds = calibrated
    fresh_model.clear_references()  # no references to clear: the thresholds stay
    assert fresh_model.thresholds == calibrated


def test_from_pretrained_override_drops_saved_thresholds(fresh_model, tmp_path):
    fresh_model.thresholds = Thresholds(image=0.5, pixel=0.5)
    fresh_model.save_pretrained(tmp_path)
    assert AnomalyCLIP.from_pretrained(tmp_path, device="cpu", image_size=518).thresholds is not None
    assert AnomalyCLIP.from_pretrained(tmp_path, device="cpu", sigma=2.0).thresholds is None


def test_format_version_1_files_still_load(golden_model, tmp_path):
    """A config.json written by anomalyclip 0.1 (format 1, no thresholds / trained_on) loads and reads back."""
    golden_model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    old = {k: v for k, v in data.items() if k not in ("thresholds", "trained_on", "threshold_mode")}
    (tmp_path / "config.json").write_text(json.dumps({**old, "format_version": 1}))
    model = AnomalyCLIP.from_pretrained(tmp_path, device="cpu")
    assert model.thresholds is None and model.config.trained_on is None
    assert model.config.format_version == 3  # upgraded in memory: a save writes the current format
    model.thresholds = Thresholds(image=0.3)
    model.save_pretrained(tmp_path)
    assert AnomalyCLIP.from_pretrained(tmp_path, device="cpu").thresholds == Thresholds(image=0.3)


def test_config_thresholds_round_trip_through_json():
    config = AnomalyCLIPConfig(thresholds=Thresholds(image=0.25, pixel=1.5))
    assert config.thresholds == {"image": 0.25, "pixel": 1.5}
    assert AnomalyCLIPConfig.from_dict(json.loads(config.to_json())) == config
    assert AnomalyCLIPConfig(thresholds={"image": None, "pixel": None}).thresholds is None
    with pytest.raises(CheckpointError, match=r"cfg: thresholds\['image'\] must be a finite number"):
        AnomalyCLIPConfig.from_dict({**config.to_dict(), "thresholds": {"image": [1]}}, source="cfg")
