"""anomalyclip.eval.metrics against scikit-learn and the official (scikit-image) AUPRO loop."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from scipy import ndimage

sklearn_metrics = pytest.importorskip("sklearn.metrics")
measure = pytest.importorskip("skimage.measure")

from anomalyclip.eval import metrics  # noqa: E402
from anomalyclip.errors import InvalidInputError  # noqa: E402

TOL = 1e-6
PIXEL_KEYS = ("pixel_auroc", "pixel_aupro", "pixel_ap", "pixel_f1_max")
IMAGE_KEYS = ("image_auroc", "image_ap", "image_f1_max")


# ----------------------------------------------------------------------------- references


def cal_pro_score(masks, amaps, max_step=200, expect_fpr=0.3, connectivity=None):
    """The official AnomalyCLIP AUPRO code, verbatim (``connectivity`` added, None = official)."""
    binary_amaps = np.zeros_like(amaps, dtype=bool)
    min_th, max_th = amaps.min(), amaps.max()
    delta = (max_th - min_th) / max_step
    pros, fprs, ths = [], [], []
    for th in np.arange(min_th, max_th, delta):
        binary_amaps[amaps <= th], binary_amaps[amaps > th] = 0, 1
        pro = []
        for binary_amap, mask in zip(binary_amaps, masks):
            for region in measure.regionprops(measure.label(mask, connectivity=connectivity)):
                tp_pixels = binary_amap[region.coords[:, 0], region.coords[:, 1]].sum()
                pro.append(tp_pixels / region.area)
        inverse_masks = 1 - masks
        fp_pixels = np.logical_and(inverse_masks, binary_amaps).sum()
        fpr = fp_pixels / inverse_masks.sum()
        pros.append(np.array(pro).mean())
        fprs.append(fpr)
        ths.append(th)
    pros, fprs, ths = np.array(pros), np.array(fprs), np.array(ths)
    idxes = fprs < expect_fpr
    fprs = fprs[idxes]
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    pro_auc = sklearn_metrics.auc(fprs, pros[idxes])
    return pro_auc


def reference_f1_max(labels, scores):
    """The official F1-max: max over finite F1 of sklearn's precision-recall curve."""
    precisions, recalls, _ = sklearn_metrics.precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore"):  # 0 / 0 where precision = recall = 0, as upstream
        f1 = 2 * precisions * recalls / (precisions + recalls)
    return float(np.max(f1[np.isfinite(f1)]))


def check_pixel_metrics(maps, masks, **aupro_kwargs):
    """Assert all pixel metrics match the references (masks as uint8, as the official code)."""
    masks = np.asarray(masks).astype(np.uint8)
    y, s = masks.ravel(), np.asarray(maps).ravel()
    assert metrics.pixel_auroc(maps, masks) == pytest.approx(sklearn_metrics.roc_auc_score(y, s), abs=TOL)
    assert metrics.pixel_ap(maps, masks) == pytest.approx(sklearn_metrics.average_precision_score(y, s), abs=TOL)
    assert metrics.pixel_f1_max(maps, masks) == pytest.approx(reference_f1_max(y, s), abs=TOL)
    official = {"max_step": aupro_kwargs.get("max_steps", 200), "expect_fpr": aupro_kwargs.get("max_fpr", 0.3)}
    expected = cal_pro_score(masks, maps, **official)
    assert metrics.pixel_aupro(maps, masks, **aupro_kwargs) == pytest.approx(expected, abs=TOL)
    return expected


def blob_masks(rng, n=6, size=40, level=0.56, sigma=3.0):
    """``[n, size, size]`` uint8 masks of random smooth blobs."""
    noise = ndimage.gaussian_filter(rng.random((n, size, size)), (0, sigma, sigma))
    return (noise > level).astype(np.uint8)


def noisy_maps(rng, masks, signal=0.3, dtype=np.float32):
    """Maps correlated with the masks: ``signal * mask + uniform noise``."""
    return (signal * masks + rng.random(masks.shape)).astype(dtype)


# ----------------------------------------------------------------------------- image level


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("round_to", [None, 1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_image_metrics_match_sklearn(seed, round_to, dtype):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    labels[:2] = [0, 1]
    scores = 0.4 * labels + rng.random(60)
    if round_to is not None:  # heavy ties, across classes
        scores = np.round(scores, round_to)
    scores = scores.astype(dtype)
    assert metrics.image_auroc(scores, labels) == pytest.approx(sklearn_metrics.roc_auc_score(labels, scores), abs=TOL)
    assert metrics.image_ap(scores, labels) == pytest.approx(
        sklearn_metrics.average_precision_score(labels, scores), abs=TOL
    )
    assert metrics.image_f1_max(scores, labels) == pytest.approx(reference_f1_max(labels, scores), abs=TOL)


@pytest.mark.parametrize(
    ("scores", "labels"),
    [
        ([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]),  # all tied
        ([1, 2, 3, 4], [True, False, True, False]),  # int scores, bool labels
        ([0.9, 0.1, 0.8, 0.2, 0.7], [0, 1, 0, 1, 0]),  # perfectly wrong
        ([0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 1.0, 1.0]),  # perfect, float labels
        ([0.3, 0.3, 0.1, 0.3, 0.2], [1, 0, 0, 1, 1]),
        ([0.0, -0.0, 0.0, 1.0], [1, 0, 0, 1]),  # -0.0 ties with 0.0
    ],
)
def test_image_metrics_edge_cases_match_sklearn(scores, labels):
    y, s = np.asarray(labels), np.asarray(scores)
    assert metrics.image_auroc(scores, labels) == pytest.approx(sklearn_metrics.roc_auc_score(y, s), abs=TOL)
    assert metrics.image_ap(scores, labels) == pytest.approx(sklearn_metrics.average_precision_score(y, s), abs=TOL)
    assert metrics.image_f1_max(scores, labels) == pytest.approx(reference_f1_max(y, s), abs=TOL)


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1], [False, False, False]])
def test_image_metrics_single_class_are_nan_and_warn(labels, caplog):
    with caplog.at_level(logging.WARNING, logger="anomalyclip.eval.metrics"):
        for fn in (metrics.image_auroc, metrics.image_ap, metrics.image_f1_max):
            assert math.isnan(fn([0.1, 0.5, 0.9], labels))
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 3
    assert "undefined" in caplog.text


# ----------------------------------------------------------------------------- pixel level


@pytest.mark.parametrize("seed", range(4))
def test_pixel_metrics_random_blobs(seed):
    rng = np.random.default_rng(seed)
    masks = blob_masks(rng)
    masks[0] = 0  # one normal image
    check_pixel_metrics(noisy_maps(rng, masks), masks)


@pytest.mark.parametrize("seed", range(2))
def test_pixel_metrics_heavy_ties(seed):
    rng = np.random.default_rng(10 + seed)
    masks = blob_masks(rng)
    maps = np.round(noisy_maps(rng, masks, dtype=np.float64), 1).astype(np.float32)
    check_pixel_metrics(maps, masks)


def test_pixel_metrics_float64_maps():
    rng = np.random.default_rng(20)
    masks = blob_masks(rng)
    check_pixel_metrics(noisy_maps(rng, masks, dtype=np.float64), masks)


def test_aupro_values_on_the_threshold_grid():
    """Integer-valued maps 0..200: every threshold (0, 1, ..., 199) equals some pixel value, so
    the strict ``value > th`` rule matters at every step."""
    rng = np.random.default_rng(30)
    masks = blob_masks(rng)
    maps = np.clip(rng.integers(0, 150, masks.shape) + 50 * masks, 0, 200).astype(np.float32)
    maps[0, 0, 0], maps[0, 0, 1] = 0, 200
    check_pixel_metrics(maps, masks)


def test_aupro_many_small_regions():
    rng = np.random.default_rng(40)
    masks = (rng.random((4, 30, 30)) > 0.85).astype(np.uint8)  # hundreds of 1-3 pixel regions
    check_pixel_metrics(noisy_maps(rng, masks, signal=0.5), masks)


def test_aupro_uses_8_connectivity():
    """Regions connected only diagonally: one region each under 8-connectivity (official)."""
    rng = np.random.default_rng(50)
    masks = np.zeros((3, 24, 24), dtype=np.uint8)
    idx = np.arange(20)
    masks[0, idx, idx] = 1  # a diagonal line
    masks[1, 2:22, 2:22] = (np.add.outer(np.arange(20), np.arange(20)) % 2 == 0)  # checkerboard
    masks[2, idx, 19 - idx] = 1
    masks[2, 5, 5] = 1  # a lone pixel
    maps = noisy_maps(rng, masks, signal=0.2)
    # A map where one pixel of the diagonal line gets every score: 4- and 8-connectivity differ.
    maps[0, 0, 0] = 2.0
    expected = check_pixel_metrics(maps, masks)
    four_connected = cal_pro_score(masks, maps, connectivity=1)
    assert abs(expected - four_connected) > 1e-3  # the case discriminates the connectivities


def test_pixel_metrics_single_anomalous_pixel():
    rng = np.random.default_rng(60)
    masks = np.zeros((3, 20, 20), dtype=np.uint8)
    masks[1, 7, 9] = 1
    maps = rng.random(masks.shape).astype(np.float32)
    maps[1, 7, 9] = 0.9
    check_pixel_metrics(maps, masks)


def test_aupro_never_found_regions_is_positive_zero():
    """Anomalous pixels below every threshold: the official value is (-)0; reported as +0.0."""
    rng = np.random.default_rng(70)
    masks = blob_masks(rng)
    maps = rng.random(masks.shape).astype(np.float32) + 1.0
    maps[masks.astype(bool)] = 0.0  # the minimum: never above a threshold
    reference = cal_pro_score(masks, maps)
    value = metrics.pixel_aupro(maps, masks)
    assert reference == 0.0 and value == 0.0
    assert math.copysign(1.0, value) == 1.0  # prints as 0.0, not -0.0


@pytest.mark.parametrize(("max_steps", "max_fpr"), [(50, 0.5), (10, 1.0), (200, 0.05), (7, 0.3)])
def test_aupro_other_steps_and_fpr_limits(max_steps, max_fpr):
    rng = np.random.default_rng(70)
    masks = blob_masks(rng, n=4)
    check_pixel_metrics(noisy_maps(rng, masks), masks, max_steps=max_steps, max_fpr=max_fpr)


def test_pixel_inputs_dtypes_and_layouts_agree():
    rng = np.random.default_rng(80)
    masks = blob_masks(rng, n=4)
    masks[0] = 0
    maps = noisy_maps(rng, masks)
    labels = masks.max(axis=(1, 2))
    expected = metrics.compute_metrics(labels, labels, maps, masks)
    assert not any(math.isnan(v) for v in expected.values())
    variants = [
        (maps, masks.astype(bool)),
        (maps, masks.astype(np.float32)),
        (np.ascontiguousarray(maps.transpose(0, 2, 1)).transpose(0, 2, 1), masks),  # non-contiguous
        (list(maps), list(masks)),
    ]
    for m, k in variants:
        got = metrics.compute_metrics(labels, labels, m, k)
        assert got == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------- degenerate cases


def test_constant_maps():
    """Constant maps: AUPRO is 0.0 by definition (nothing ever flagged); the others match sklearn."""
    masks = blob_masks(np.random.default_rng(90))
    maps = np.full(masks.shape, 0.25, dtype=np.float32)
    y, s = masks.ravel(), maps.ravel()
    assert metrics.pixel_aupro(maps, masks) == 0.0
    assert metrics.pixel_auroc(maps, masks) == pytest.approx(sklearn_metrics.roc_auc_score(y, s), abs=TOL)
    assert metrics.pixel_ap(maps, masks) == pytest.approx(sklearn_metrics.average_precision_score(y, s), abs=TOL)
    assert metrics.pixel_f1_max(maps, masks) == pytest.approx(reference_f1_max(y, s), abs=TOL)
    with np.errstate(all="ignore"), pytest.raises(ValueError):  # official: no thresholds at all
        cal_pro_score(masks, maps)


@pytest.mark.parametrize("fill", [0, 1])
def test_pixel_metrics_single_class_are_nan(fill, caplog):
    masks = np.full((2, 8, 8), fill, dtype=np.uint8)
    maps = np.random.default_rng(0).random(masks.shape)
    with caplog.at_level(logging.WARNING, logger="anomalyclip.eval.metrics"):
        for fn in (metrics.pixel_auroc, metrics.pixel_ap, metrics.pixel_f1_max, metrics.pixel_aupro):
            assert math.isnan(fn(maps, masks))
    assert "undefined" in caplog.text


def test_aupro_no_threshold_below_max_fpr_is_nan(caplog):
    """Every threshold flags >= 30 % of normal pixels: no curve to integrate (official: crash)."""
    masks = np.zeros((2, 10, 10), dtype=np.uint8)
    masks[:, :3] = 1
    maps = np.where(masks == 1, 0.0, 1.0).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="anomalyclip.eval.metrics"):
        assert math.isnan(metrics.pixel_aupro(maps, masks))
    assert "fewer than two distinct FPR" in caplog.text and "(0 threshold(s) kept)" in caplog.text
    with pytest.raises(ValueError):
        cal_pro_score(masks, maps)


def test_aupro_one_threshold_below_max_fpr_is_nan(caplog):
    """Only the last threshold has FPR < 0.3 (official: nan rescale, then auc() raises)."""
    masks = np.zeros((1, 10, 10), dtype=np.uint8)
    masks[0, 0, :5] = 1
    normal = np.zeros(95, dtype=np.float32)
    normal[:25] = 1.0  # above every threshold
    normal[25:35] = 0.993  # between the last two thresholds (0.990, 0.995)
    maps = np.zeros((1, 10, 10), dtype=np.float32)
    maps[masks == 0] = normal
    maps[0, 0, :5] = np.linspace(0.2, 0.8, 5)
    with caplog.at_level(logging.WARNING, logger="anomalyclip.eval.metrics"):
        assert math.isnan(metrics.pixel_aupro(maps, masks))
    assert "(1 threshold(s) kept)" in caplog.text
    with np.errstate(invalid="ignore"), pytest.raises(ValueError):
        cal_pro_score(masks, maps)


def test_aupro_all_fprs_equal_is_nan_like_official(caplog):
    """Normal pixels all at the minimum: FPR = 0 at every threshold; official gives nan too."""
    rng = np.random.default_rng(100)
    masks = blob_masks(rng, n=3)
    maps = np.where(masks == 1, 0.5 + 0.5 * rng.random(masks.shape), 0.0).astype(np.float32)
    with np.errstate(invalid="ignore"):  # official: 0 / 0 in the FPR rescale
        assert math.isnan(cal_pro_score(masks, maps))
    with caplog.at_level(logging.WARNING, logger="anomalyclip.eval.metrics"):
        assert math.isnan(metrics.pixel_aupro(maps, masks))
    assert "(200 threshold(s) kept)" in caplog.text


# ----------------------------------------------------------------------------- compute_metrics


def test_compute_metrics_keys_and_values():
    rng = np.random.default_rng(110)
    masks = blob_masks(rng)
    masks[:2] = 0
    maps = noisy_maps(rng, masks)
    labels = masks.max(axis=(1, 2))
    scores = maps.max(axis=(1, 2))
    result = metrics.compute_metrics(scores, labels, maps, masks)
    assert tuple(result) == IMAGE_KEYS + PIXEL_KEYS
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in result.values())
    assert result["image_auroc"] == metrics.image_auroc(scores, labels)
    assert result["image_ap"] == metrics.image_ap(scores, labels)
    assert result["image_f1_max"] == metrics.image_f1_max(scores, labels)
    assert result["pixel_auroc"] == metrics.pixel_auroc(maps, masks)
    assert result["pixel_aupro"] == metrics.pixel_aupro(maps, masks)
    assert result["pixel_ap"] == metrics.pixel_ap(maps, masks)
    assert result["pixel_f1_max"] == metrics.pixel_f1_max(maps, masks)

    image_only = metrics.compute_metrics(scores, labels)
    assert tuple(image_only) == IMAGE_KEYS


def test_compute_metrics_all_normal_class_is_nan():
    maps = np.random.default_rng(0).random((3, 8, 8))
    result = metrics.compute_metrics([0.1, 0.2, 0.3], [0, 0, 0], maps, np.zeros(maps.shape, dtype=bool))
    assert tuple(result) == IMAGE_KEYS + PIXEL_KEYS
    assert all(math.isnan(v) for v in result.values())


# ----------------------------------------------------------------------------- invalid inputs

MAPS = np.zeros((2, 4, 4), dtype=np.float32)
MASKS = np.zeros((2, 4, 4), dtype=np.uint8)


@pytest.mark.parametrize(
    ("fn", "args", "message"),
    [
        (metrics.image_auroc, ([0.1, 0.2], [0, 1, 1]), "shape"),
        (metrics.image_auroc, ([], []), "empty"),
        (metrics.image_ap, ([0.1, float("nan")], [0, 1]), "NaN"),
        (metrics.image_f1_max, ([0.1, float("inf")], [0, 1]), "finite"),
        (metrics.image_auroc, ([0.1, 0.2], [0, 2]), "0 and 1"),
        (metrics.image_auroc, ([0.1, 0.2], [0.0, float("nan")]), "0 and 1"),
        (metrics.image_auroc, ([0.1, 0.2], [0.0, 0.5]), "0 and 1"),
        (metrics.image_auroc, (["a", "b"], [0, 1]), "real-valued"),
        (metrics.image_auroc, ([[0.1, 0.2]], [[0, 1]]), "[N]"),
        (metrics.pixel_auroc, (MAPS, MASKS[:1]), "masks of shape"),
        (metrics.pixel_ap, (MAPS[0], MASKS[0]), "[N, H, W]"),
        (metrics.pixel_f1_max, (MAPS[:0], MASKS[:0]), "empty"),
        (metrics.pixel_aupro, (np.full((2, 4, 4), np.nan), MASKS), "NaN"),
        (metrics.pixel_aupro, (MAPS, MASKS + 255), "0 and 1"),
        (metrics.pixel_aupro, (MAPS, MASKS, 0), "max_steps"),
        (metrics.pixel_aupro, (MAPS, MASKS, 200, 0.0), "max_fpr"),
        (metrics.pixel_aupro, (MAPS, MASKS, 200, 1.5), "max_fpr"),
        (metrics.compute_metrics, ([0.1, 0.2], [0, 1], MAPS), "together"),
        (metrics.compute_metrics, ([0.1, 0.2, 0.3], [0, 1, 1], MAPS, MASKS), "one map per image"),
    ],
)
def test_invalid_inputs_raise(fn, args, message):
    with pytest.raises(InvalidInputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        fn(*args)
