"""anomalyclip.eval.thresholds: quantile and F1-max thresholds, the strict decision rule, JSON round trip."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from scipy import ndimage

sklearn_metrics = pytest.importorskip("sklearn.metrics")

from anomalyclip.eval import metrics  # noqa: E402
from anomalyclip.errors import InvalidInputError  # noqa: E402
from anomalyclip.eval.thresholds import (  # noqa: E402
    Thresholds,
    is_anomalous,
    threshold_f1_max,
    threshold_from_normal,
)


def blob_masks(rng, n=5, size=32, level=0.56):
    return (ndimage.gaussian_filter(rng.random((n, size, size)), (0, 3, 3)) > level).astype(np.uint8)


def f1_of(values, labels, threshold):
    """F1 of the decisions ``values > threshold`` (sklearn)."""
    predicted = is_anomalous(values, threshold).ravel()
    return sklearn_metrics.f1_score(np.asarray(labels).ravel().astype(bool), predicted)


# ----------------------------------------------------------------------------- is_anomalous


def test_decision_rule_is_strict():
    assert is_anomalous([0.4, 0.5, 0.6], 0.5).tolist() == [False, False, True]


# ----------------------------------------------------------------------------- from normal data


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_threshold_from_normal_is_the_quantile(dtype):
    values = np.random.default_rng(0).random(1000).astype(dtype)
    threshold = threshold_from_normal(values, 0.99)
    assert isinstance(threshold, float)
    assert threshold == pytest.approx(float(np.quantile(values, 0.99)), rel=1e-6)
    assert float(dtype(threshold)) == threshold  # representable in the data's dtype
    assert np.mean(is_anomalous(values, threshold)) <= 0.01 + 1e-12


def test_threshold_from_normal_on_maps_and_full_quantile():
    maps = np.random.default_rng(1).random((3, 16, 16)).astype(np.float32)
    threshold = threshold_from_normal(maps, 1.0)
    assert threshold == float(maps.max())
    assert not is_anomalous(maps, threshold).any()  # quantile 1: no normal pixel flagged
    assert not is_anomalous(maps.astype(np.float64), threshold).any()
    assert threshold_from_normal(maps, 0.0) == float(maps.min())


@pytest.mark.parametrize(
    ("values", "quantile", "message"),
    [
        ([], 0.99, "empty"),
        ([0.1, float("nan")], 0.99, "NaN"),
        ([0.1, 0.2], 1.5, "quantile"),
        ([0.1, 0.2], float("nan"), "quantile"),
        ([0.1, 0.2], True, "quantile"),
    ],
)
def test_threshold_from_normal_invalid(values, quantile, message):
    with pytest.raises(InvalidInputError, match=message):
        threshold_from_normal(values, quantile)


# ----------------------------------------------------------------------------- F1-max


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("round_to", [None, 1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_f1_threshold_reaches_image_f1_max(seed, round_to, dtype):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 80)
    labels[:2] = [0, 1]
    scores = 0.3 * labels + rng.random(80)
    if round_to is not None:
        scores = np.round(scores, round_to)
    scores = scores.astype(dtype)
    threshold = threshold_f1_max(scores, labels)
    assert float(dtype(threshold)) == threshold
    expected = metrics.image_f1_max(scores, labels)
    assert f1_of(scores, labels, threshold) == pytest.approx(expected, abs=1e-12)
    # Same decisions on a float64 copy of float32 data.
    assert f1_of(scores.astype(np.float64), labels, threshold) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_f1_threshold_reaches_pixel_f1_max(seed):
    rng = np.random.default_rng(seed)
    masks = blob_masks(rng)
    maps = (0.3 * masks + rng.random(masks.shape)).astype(np.float32)
    if seed == 2:
        maps = np.round(maps, 1)
    threshold = threshold_f1_max(maps, masks)
    assert f1_of(maps, masks, threshold) == pytest.approx(metrics.pixel_f1_max(maps, masks), abs=1e-12)


def test_f1_threshold_is_a_midpoint():
    threshold = threshold_f1_max([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1])
    assert threshold == pytest.approx(0.5)


def test_f1_threshold_between_adjacent_float32_values():
    low = np.float32(0.5)
    high = np.nextafter(low, np.float32(1))
    values = np.array([low, high, low, high], dtype=np.float32)
    threshold = threshold_f1_max(values, [0, 1, 0, 1])
    assert threshold == float(low)  # no float32 between them: the lower value itself
    assert is_anomalous(values, threshold).tolist() == [False, True, False, True]
    assert is_anomalous(values.astype(np.float64), threshold).tolist() == [False, True, False, True]


def test_f1_threshold_flags_everything_when_best():
    values = np.array([0.0, 1.0, 2.0, 3.0])
    labels = [1, 0, 1, 1]  # F1: cut 3 -> 0.5, cut 2 -> 0.8, all -> 6/7
    threshold = threshold_f1_max(values, labels)
    assert threshold < 0.0
    assert is_anomalous(values, threshold).all()
    assert f1_of(values, labels, threshold) == pytest.approx(metrics.image_f1_max(values, labels), abs=1e-12)


@pytest.mark.parametrize(
    ("values", "labels", "message"),
    [
        ([0.1, 0.2], [0, 0], "both normal and anomalous"),
        ([0.1, 0.2], [1, 1], "both normal and anomalous"),
        ([0.1, 0.2], [0, 2], "0 and 1"),
        ([0.1, 0.2], [0, 1, 1], "shape"),
        (np.zeros((2, 2)), np.zeros((2, 2)), "shape"),
        (np.zeros((2, 3, 3)), np.zeros((2, 3, 4)), "masks of shape"),
        ([], [], "empty"),
        ([0.1, float("inf")], [0, 1], "finite"),
    ],
)
def test_threshold_f1_max_invalid(values, labels, message):
    with pytest.raises(InvalidInputError, match=message):
        threshold_f1_max(values, labels)


# ----------------------------------------------------------------------------- Thresholds


def test_thresholds_from_normal_and_json_round_trip():
    rng = np.random.default_rng(5)
    scores, maps = rng.random(20), rng.random((4, 8, 8)).astype(np.float32)
    t = Thresholds.from_normal(scores, maps, quantile=0.95)
    assert t.image == threshold_from_normal(scores, 0.95)
    assert t.pixel == threshold_from_normal(maps, 0.95)
    assert Thresholds.from_dict(json.loads(json.dumps(t.to_dict()))) == t
    assert Thresholds.from_normal(None, maps) == Thresholds(pixel=threshold_from_normal(maps))
    assert Thresholds.from_normal(scores).pixel is None


def test_thresholds_from_labelled():
    rng = np.random.default_rng(6)
    masks = blob_masks(rng)
    masks[0] = 0
    maps = (0.3 * masks + rng.random(masks.shape)).astype(np.float32)
    labels = masks.max(axis=(1, 2))
    scores = maps.max(axis=(1, 2))
    t = Thresholds.from_labelled(scores, labels, maps, masks)
    assert t.image == threshold_f1_max(scores, labels)
    assert t.pixel == threshold_f1_max(maps, masks)
    assert f1_of(maps, masks, t.pixel) == pytest.approx(metrics.pixel_f1_max(maps, masks), abs=1e-12)
    assert Thresholds.from_labelled(None, None, maps, masks).image is None
    assert Thresholds.from_dict(t.to_dict()) == t


def test_thresholds_dataclass_behaviour():
    t = Thresholds(image=np.float32(0.5), pixel=1)
    assert t.to_dict() == {"image": 0.5, "pixel": 1.0}
    assert type(t.image) is float and type(t.pixel) is float
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.image = 0.1  # type: ignore[misc]
    assert Thresholds.from_dict({}) == Thresholds()
    assert Thresholds().to_dict() == {"image": None, "pixel": None}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: Thresholds.from_normal(None), "needs normal scores"),
        (lambda: Thresholds.from_normal([]), "empty"),
        (lambda: Thresholds.from_normal(np.zeros((2, 2))), r"\[N\]"),
        (lambda: Thresholds.from_normal([0.1], np.zeros((2, 2))), r"\[N, H, W\]"),
        (lambda: Thresholds.from_normal([0.1, float("nan")]), "NaN"),
        (lambda: Thresholds.from_labelled([0.1, 0.2], None), "together"),
        (lambda: Thresholds.from_labelled(None, None, np.zeros((1, 2, 2))), "together"),
        (lambda: Thresholds.from_labelled(None, None), "needs"),
        (lambda: Thresholds.from_labelled([0.1, 0.2], [0, 0]), "both normal and anomalous"),
        (lambda: Thresholds(image=float("nan")), "finite"),
        (lambda: Thresholds(pixel=True), "finite number or None"),
        (lambda: Thresholds(pixel="0.5"), "finite number or None"),
        (lambda: Thresholds.from_dict({"image": 0.5, "imgae": 0.1}), "unknown threshold keys"),
        (lambda: Thresholds.from_dict([0.5]), "mapping"),
    ],
)
def test_thresholds_invalid(call, message):
    with pytest.raises(InvalidInputError, match=message):
        call()
