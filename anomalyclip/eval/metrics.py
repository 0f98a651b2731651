"""Evaluation metrics of the AnomalyCLIP paper: image/pixel AUROC, AP, F1-max and pixel AUPRO.

Run-time dependencies: NumPy and SciPy only. Every metric agrees with the official evaluation
(scikit-learn's ``roc_auc_score``, ``average_precision_score``, ``precision_recall_curve`` and the
official ``cal_pro_score`` loop with scikit-image) to floating-point round-off, ties included,
but works from one sort of the values instead of sklearn's indirect sort, so the pixel metrics of
an evaluation (~200 maps of 518 x 518 per class, ~50 M pixels) take seconds and no float64 copy
of the maps.

Inputs:
    scores: ``[N]`` image anomaly scores, any real dtype (higher = more anomalous).
    labels: ``[N]`` image labels, bool or numbers in {0, 1} (1 = anomalous).
    maps: ``[N, H, W]`` pixel anomaly maps, any real dtype (float32 is used as is, not copied to
        float64).
    masks: ``[N, H, W]`` ground-truth masks, bool or numbers in {0, 1} (1 = anomalous pixel).

All metrics are fractions in [0, 1], returned as Python floats.

Degenerate cases (documented behaviour, tested):
    * Only one class present (all labels 0 or all 1; masks without any anomalous pixel or
      without any normal pixel): AUROC, AP, F1-max and AUPRO are undefined. The functions log a
      warning and return ``float('nan')``; they do not raise.
    * AUPRO of maps that are constant over the whole set (min == max): no threshold flags any
      pixel, so the PRO is 0 at every threshold and the AUPRO is ``0.0`` (the official code
      crashes here).
    * AUPRO when fewer than two *distinct* FPR values lie below ``max_fpr`` (no, one, or only
      equal points survive the FPR filter): the normalised FPR axis has zero length, the area is
      undefined; log a warning and return ``float('nan')``. The official code returns nan in the
      "equal points" case and crashes in the others.
    * Ties are handled exactly as scikit-learn does (all samples with equal values share one
      threshold).

Invalid inputs (wrong shapes, empty arrays, NaN or infinite values, labels outside {0, 1}) raise
:class:`anomalyclip.errors.InvalidInputError`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage

from ..errors import InvalidInputError

__all__ = [
    "METRIC_NAMES",
    "METRIC_HEADERS",
    "image_auroc",
    "image_ap",
    "image_f1_max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1_max",
    "pixel_aupro",
    "compute_metrics",
    # building blocks shared with anomalyclip.eval.thresholds
    "as_values",
    "image_inputs",
    "pixel_inputs",
    "RankCounts",
    "rank_counts",
    "f1_curve",
    # curve points of the same counts, for plots (anomalyclip.eval.details)
    "roc_points",
    "pr_points",
]

logger = logging.getLogger(__name__)

#: Metric keys in the order of the paper's tables (image-level first), as ``compute_metrics`` names them.
METRIC_NAMES = (
    "image_auroc",
    "image_ap",
    "image_f1_max",
    "pixel_auroc",
    "pixel_aupro",
    "pixel_ap",
    "pixel_f1_max",
)
#: Their column headers in the paper's tables.
METRIC_HEADERS = ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "AUPRO", "P-AP", "P-F1max")

# 8-connectivity, as skimage.measure.label uses on a 2-D mask by default.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


# ----------------------------------------------------------------------------- validation


def as_values(values: ArrayLike, name: str) -> np.ndarray:
    """``values`` as a real ndarray: floats keep their dtype (no copy), bools/ints become float64.

    Raises InvalidInputError when empty, non-numeric, NaN or infinite.
    """
    array = np.asarray(values)
    if array.dtype.kind in "biu":
        array = array.astype(np.float64)
    elif array.dtype.kind != "f":
        raise InvalidInputError(f"expected real-valued {name}, got dtype {array.dtype}.")
    if array.size == 0:
        raise InvalidInputError(f"{name} is empty (shape {tuple(array.shape)}); pass at least one value.")
    # min/max propagate NaN and expose +-inf without allocating a boolean temporary.
    if not (np.isfinite(array.min()) and np.isfinite(array.max())):
        raise InvalidInputError(f"{name} contains NaN or infinite values; every value must be finite.")
    return array


def _as_labels(labels: ArrayLike, name: str, shape: tuple[int, ...], like: str) -> np.ndarray:
    """``labels`` as a bool ndarray of ``shape``; values must be bool or numbers in {0, 1}."""
    array = np.asarray(labels)
    if array.shape != shape:
        raise InvalidInputError(
            f"expected {name} of shape {list(shape)} matching {like} {list(shape)}, got {list(array.shape)}."
        )
    if array.dtype == bool:
        return array
    if array.dtype.kind not in "iuf":
        raise InvalidInputError(f"expected {name} as bool or numbers in {{0, 1}}, got dtype {array.dtype}.")
    if not np.all((array == 0) | (array == 1)):
        found = np.unique(array[(array != 0) & (array != 1)])[:5].tolist()
        raise InvalidInputError(
            f"{name} must contain only 0 and 1 (or bool), found e.g. {found}; "
            f"binarize them first, e.g. {name} > 0."
        )
    return array != 0


def image_inputs(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``([N] real scores, [N] bool labels)``."""
    scores = as_values(scores, "scores")
    if scores.ndim != 1:
        raise InvalidInputError(f"expected scores of shape [N], got {list(scores.shape)}.")
    return scores, _as_labels(labels, "labels", scores.shape, "scores")


def pixel_inputs(maps: ArrayLike, masks: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``([N, H, W] real maps, [N, H, W] bool masks)``."""
    maps = as_values(maps, "maps")
    if maps.ndim != 3:
        raise InvalidInputError(
            f"expected maps of shape [N, H, W], got {list(maps.shape)}; stack 2-D maps with np.stack "
            "and drop channel axes."
        )
    return maps, _as_labels(masks, "masks", maps.shape, "maps")


# ----------------------------------------------------------------------------- ranking core


@dataclass(frozen=True)
class RankCounts:
    """Confusion counts at every threshold where the recall changes (shared with thresholds.py).

    Decision at a threshold t: predicted anomalous iff value >= t (scikit-learn's convention).
    The thresholds are the K distinct values taken by positive samples; every other threshold of
    sklearn's curves either leaves the recall unchanged (adds no AP, cannot improve F1) or is
    accounted for through ``fps_strict`` (AUROC).

    Attributes:
        thresholds: ``[K]`` distinct positive values, decreasing, in the values' dtype.
        tps: ``[K]`` int64, positives with value >= thresholds[i] (increasing, tps[-1] == n_pos).
        fps: ``[K]`` int64, negatives with value >= thresholds[i].
        fps_strict: ``[K]`` int64, negatives with value > thresholds[i].
        neg_below: ``[K]`` largest negative value < thresholds[i] (values' dtype), -inf if none.
        n_pos, n_neg: number of positive / negative samples.
    """

    thresholds: np.ndarray
    tps: np.ndarray
    fps: np.ndarray
    fps_strict: np.ndarray
    neg_below: np.ndarray
    n_pos: int
    n_neg: int


def rank_counts(values: np.ndarray, labels: np.ndarray) -> RankCounts:
    """Count positives/negatives above each distinct positive value.

    Args:
        values: real array of any shape (validated, finite).
        labels: bool array of the same shape.

    Cost: copies of the positive and negative values (in their own dtype) sorted in place; no
    argsort, no float64 copy. Both classes must be present (callers check).
    """
    values = values.reshape(-1)
    labels = labels.reshape(-1)
    positives = values[labels]
    negatives = values[~labels]
    positives.sort()
    negatives.sort()
    n_pos, n_neg = positives.size, negatives.size

    # Distinct positive values (ascending) and how many positives take each.
    starts = np.flatnonzero(positives[1:] != positives[:-1]) + 1
    starts = np.concatenate(([0], starts))
    distinct = positives[starts]
    counts = np.diff(np.append(starts, n_pos))
    del positives

    below = np.searchsorted(negatives, distinct, side="left")  # negatives < value
    not_above = np.searchsorted(negatives, distinct, side="right")  # negatives <= value
    neg_below = np.full(distinct.shape, -np.inf, dtype=distinct.dtype)
    has_below = below > 0
    neg_below[has_below] = negatives[below[has_below] - 1]

    # Reverse to decreasing thresholds, as sklearn's curves.
    return RankCounts(
        thresholds=distinct[::-1],
        tps=np.cumsum(counts[::-1], dtype=np.int64),
        fps=(n_neg - below[::-1]).astype(np.int64),
        fps_strict=(n_neg - not_above[::-1]).astype(np.int64),
        neg_below=neg_below[::-1],
        n_pos=int(n_pos),
        n_neg=int(n_neg),
    )


def _both_classes(labels: np.ndarray, what: str) -> bool:
    """True when both classes are present; otherwise log a warning (metric is undefined)."""
    n_pos = int(np.count_nonzero(labels))
    if 0 < n_pos < labels.size:
        return True
    kind = "anomalous" if n_pos == 0 else "normal"
    logger.warning("%s undefined: the ground truth has no %s sample; returning nan.", what, kind)
    return False


def _auroc(c: RankCounts) -> float:
    """Area under the ROC curve (trapezoid, ties as diagonal steps) = Mann-Whitney U / (P N).

    Each positive scores 1 per negative below it and 1/2 per tied negative; computed exactly in
    integers, ``sum(count * (2 N - fps - fps_strict)) / (2 P N)``.
    """
    counts = np.diff(c.tps, prepend=0)
    numerator = int(np.dot(counts, 2 * c.n_neg - c.fps - c.fps_strict))
    return numerator / (2 * c.n_pos * c.n_neg)


def _ap(c: RankCounts) -> float:
    """Average precision as sklearn: ``sum_n (R_n - R_{n-1}) P_n`` (step function, no interpolation)."""
    counts = np.diff(c.tps, prepend=0)
    precision = c.tps / (c.tps + c.fps)
    return float(np.dot(counts, precision) / c.n_pos)


def f1_curve(c: RankCounts) -> np.ndarray:
    """``[K]`` float64 F1 = 2PR / (P + R) = 2 TP / (TP + FP + n_pos) at each threshold."""
    return 2.0 * c.tps / (c.tps + c.fps + c.n_pos)


def roc_points(c: RankCounts) -> tuple[np.ndarray, np.ndarray]:
    """The ROC curve ``(fpr, tpr)``, ``[2K + 2]`` float64 each, whose trapezoid area is the AUROC.

    From (0, 0) to (1, 1): at each threshold t_i, a point just above it
    ``(fps_strict_i, tps_{i-1})`` and one at it ``(fps_i, tps_i)``; the segment between them is
    the diagonal step of tied values, so ``trapezoid(tpr, fpr)`` equals :func:`_auroc` (sklearn's
    ``roc_auc_score``) to round-off. Consecutive points may repeat (zero-length segments).
    """
    k = c.tps.size
    fps = np.empty(2 * k + 2, dtype=np.float64)
    tps = np.empty(2 * k + 2, dtype=np.float64)
    fps[0] = tps[0] = 0.0
    fps[1 : 2 * k + 1 : 2] = c.fps_strict
    tps[1 : 2 * k + 1 : 2] = np.concatenate(([0], c.tps[:-1]))
    fps[2 : 2 * k + 2 : 2] = c.fps
    tps[2 : 2 * k + 2 : 2] = c.tps
    fps[-1], tps[-1] = c.n_neg, c.n_pos
    return fps / c.n_neg, tps / c.n_pos


def pr_points(c: RankCounts) -> tuple[np.ndarray, np.ndarray]:
    """The precision-recall curve ``(recall, precision)``, ``[K]`` float64 each, recall increasing.

    One point per threshold where the recall changes; AP is its step area
    ``sum_i (recall_i - recall_{i-1}) * precision_i`` with ``recall_{-1} = 0`` (:func:`_ap`), and
    F1-max is ``max 2 P R / (P + R)`` over the points (:func:`_f1_max`).
    """
    return c.tps / c.n_pos, c.tps / (c.tps + c.fps)


def _f1_max(c: RankCounts) -> float:
    """Max F1 over the precision-recall curve (the official code's ``max`` over finite F1).

    Between two distinct positive values TP is constant and FP can only grow as the threshold
    falls, so the maximum over all of sklearn's thresholds is reached at a positive value.
    """
    return float(f1_curve(c).max())


# ----------------------------------------------------------------------------- image metrics


def image_auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Image-level AUROC, equal to ``sklearn.metrics.roc_auc_score(labels, scores)``.

    Args:
        scores: ``[N]`` real anomaly scores (higher = more anomalous).
        labels: ``[N]`` bool or {0, 1}; 1 = anomalous.

    Returns:
        AUROC in [0, 1]; nan (with a logged warning) when only one class is present.
    """
    scores, labels = image_inputs(scores, labels)
    if not _both_classes(labels, "image AUROC"):
        return math.nan
    return _auroc(rank_counts(scores, labels))


def image_ap(scores: ArrayLike, labels: ArrayLike) -> float:
    """Image-level average precision, equal to ``sklearn.metrics.average_precision_score``.

    Shapes as :func:`image_auroc`. Returns nan (with a warning) when only one class is present.
    """
    scores, labels = image_inputs(scores, labels)
    if not _both_classes(labels, "image AP"):
        return math.nan
    return _ap(rank_counts(scores, labels))


def image_f1_max(scores: ArrayLike, labels: ArrayLike) -> float:
    """Image-level F1-max: the best F1 over sklearn's ``precision_recall_curve`` (official code).

    Shapes as :func:`image_auroc`. Returns nan (with a warning) when only one class is present.
    """
    scores, labels = image_inputs(scores, labels)
    if not _both_classes(labels, "image F1-max"):
        return math.nan
    return _f1_max(rank_counts(scores, labels))


# ----------------------------------------------------------------------------- pixel metrics


def pixel_auroc(maps: ArrayLike, masks: ArrayLike) -> float:
    """Pixel-level AUROC over all pixels of all maps (``roc_auc_score`` on the flattened arrays).

    Args:
        maps: ``[N, H, W]`` real anomaly maps.
        masks: ``[N, H, W]`` bool or {0, 1} ground truth; 1 = anomalous pixel.

    Returns:
        AUROC in [0, 1]; nan (with a warning) when the masks hold no anomalous or no normal pixel.
    """
    maps, masks = pixel_inputs(maps, masks)
    if not _both_classes(masks, "pixel AUROC"):
        return math.nan
    return _auroc(rank_counts(maps, masks))


def pixel_ap(maps: ArrayLike, masks: ArrayLike) -> float:
    """Pixel-level average precision over all pixels (``average_precision_score``, flattened).

    Shapes as :func:`pixel_auroc`; nan (with a warning) when only one class is present.
    """
    maps, masks = pixel_inputs(maps, masks)
    if not _both_classes(masks, "pixel AP"):
        return math.nan
    return _ap(rank_counts(maps, masks))


def pixel_f1_max(maps: ArrayLike, masks: ArrayLike) -> float:
    """Pixel-level F1-max over all pixels (official ``precision_recall_curve`` protocol).

    Shapes as :func:`pixel_auroc`; nan (with a warning) when only one class is present.
    """
    maps, masks = pixel_inputs(maps, masks)
    if not _both_classes(masks, "pixel F1-max"):
        return math.nan
    return _f1_max(rank_counts(maps, masks))


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    """``numpy.trapezoid(y, x)`` (same expression, also on NumPy < 2 which lacks the name)."""
    return float((np.diff(x) * (y[1:] + y[:-1]) / 2.0).sum())


def _sklearn_auc(x: np.ndarray, y: np.ndarray) -> float:
    """``sklearn.metrics.auc``: trapezoid, sign flipped when x is non-increasing (x is monotonic)."""
    direction = -1.0 if np.any(np.diff(x) < 0) else 1.0
    return direction * _trapezoid(y, x)


def pixel_aupro(maps: ArrayLike, masks: ArrayLike, max_steps: int = 200, max_fpr: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to ``max_fpr``: the official AnomalyCLIP protocol.

    Same numbers as the official ``cal_pro_score(masks, maps, max_step, expect_fpr)``:
    thresholds ``np.arange(min, max, (max - min) / max_steps)`` computed from the maps' own
    dtype; at each threshold a pixel is predicted anomalous iff ``value > th``; PRO = mean over
    all connected regions (8-connectivity, per map) of the fraction of the region predicted
    anomalous; FPR = predicted-anomalous normal pixels / normal pixels; keep thresholds with
    FPR < max_fpr, rescale those FPRs to [0, 1] by min-max, and integrate PRO over them with
    sklearn's ``auc`` (trapezoid).

    Instead of re-thresholding and re-labelling all maps at every threshold, each mask is
    labelled once, each pixel's count of thresholds below it is found with ``searchsorted``,
    and the normal pixels of each map are sorted once: O(pixels log pixels), chunked per map.

    Args:
        maps: ``[N, H, W]`` real anomaly maps.
        masks: ``[N, H, W]`` bool or {0, 1} ground truth.
        max_steps: number of threshold steps between the global min and max (official: 200).
        max_fpr: FPR limit (exclusive) of the integrated part of the curve (official: 0.3).

    Returns:
        AUPRO in [0, 1]. ``0.0`` for maps that are constant over the whole set (nothing is ever
        predicted, PRO = 0); nan with a warning when the masks hold no anomalous or no normal
        pixel, or when fewer than two distinct FPR values lie below ``max_fpr``.
    """
    if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
        raise InvalidInputError(f"max_steps must be a positive int, got {max_steps!r}.")
    if not (isinstance(max_fpr, (int, float, np.floating)) and 0.0 < max_fpr <= 1.0):
        raise InvalidInputError(f"max_fpr must be a number in (0, 1], got {max_fpr!r}.")
    maps, masks = pixel_inputs(maps, masks)
    if not _both_classes(masks, "pixel AUPRO"):
        return math.nan
    return _aupro(maps, masks, int(max_steps), float(max_fpr))


def _aupro(maps: np.ndarray, masks: np.ndarray, max_steps: int, max_fpr: float) -> float:
    """:func:`pixel_aupro` on validated inputs with both classes present."""
    min_th, max_th = maps.min(), maps.max()
    delta = (max_th - min_th) / max_steps  # same expression and dtypes as the official code
    if not delta > 0:  # constant maps (or a range too small for the dtype to step through)
        logger.warning("pixel AUPRO: the maps are constant; no pixel is ever flagged, AUPRO = 0.0.")
        return 0.0
    thresholds = np.arange(min_th, max_th, delta)
    # Compare in the dtype NumPy uses for the official `amaps > th` (array vs. scalar `th`).
    thresholds = thresholds.astype(np.result_type(maps, thresholds[0]), copy=False)
    n_th = thresholds.size

    fp = np.zeros(n_th, dtype=np.int64)  # normal pixels > th
    pro_hist = np.zeros(n_th + 1, dtype=np.float64)  # sum of 1/area over anomalous pixels, by #th below
    n_regions = 0
    n_normal = 0
    for amap, mask in zip(maps, masks):
        if mask.any():
            regions, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
            region_of_pixel = regions[mask]
            inverse_area = 1.0 / np.bincount(region_of_pixel, minlength=count + 1)[region_of_pixel]
            # k = number of thresholds < value: the pixel is flagged at thresholds 0 .. k-1.
            k = np.searchsorted(thresholds, amap[mask], side="left")
            pro_hist += np.bincount(k, weights=inverse_area, minlength=n_th + 1)
            n_regions += count
            normal = amap[~mask]
        else:
            normal = amap.reshape(-1).copy()
        normal.sort()
        fp += normal.size - np.searchsorted(normal, thresholds, side="right")
        n_normal += normal.size

    # PRO at threshold j: mean over regions of the flagged fraction = sum over k > j of pro_hist[k].
    pros = np.cumsum(pro_hist[::-1])[::-1][1:] / n_regions
    fprs = fp / n_normal
    keep = fprs < max_fpr
    fprs, pros = fprs[keep], pros[keep]
    if fprs.size < 2 or fprs.max() == fprs.min():
        logger.warning(
            "pixel AUPRO undefined: fewer than two distinct FPR values below max_fpr=%s "
            "(%d threshold(s) kept); returning nan.",
            max_fpr,
            fprs.size,
        )
        return math.nan
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    # + 0.0: when no region is ever found (all PRO 0), the trapezoid over the decreasing FPR axis is
    # -0.0, which would print as "-0.0"; the value is the official one either way.
    return _sklearn_auc(fprs, pros) + 0.0


# ----------------------------------------------------------------------------- all at once


def compute_metrics(
    scores: ArrayLike,
    labels: ArrayLike,
    maps: ArrayLike | None = None,
    masks: ArrayLike | None = None,
    *,
    counts: dict[str, RankCounts] | None = None,
) -> dict[str, float]:
    """All metrics of one class (or one data set) as in the paper's tables.

    Args:
        scores: ``[N]`` image anomaly scores.
        labels: ``[N]`` image labels, bool or {0, 1}.
        maps: optional ``[N, H, W]`` anomaly maps of the same N images.
        masks: optional ``[N, H, W]`` ground-truth masks; required together with ``maps``.
        counts: optional dict that receives the :class:`RankCounts` the metrics were computed
            from, under ``"image"`` and ``"pixel"`` (where defined): the curves of
            :func:`roc_points` and :func:`pr_points` then come from the same sort, at no extra
            pass over the maps (the evaluation report's plots).

    Returns:
        ``{"image_auroc", "image_ap", "image_f1_max"}`` and, when maps and masks are given,
        ``{"pixel_auroc", "pixel_aupro", "pixel_ap", "pixel_f1_max"}``; fractions in [0, 1]
        (nan for undefined metrics, see the module docstring). The values are sorted once per
        level and shared between the metrics.
    """
    if (maps is None) != (masks is None):
        raise InvalidInputError("pass maps and masks together (both [N, H, W]), or neither.")
    scores, labels = image_inputs(scores, labels)
    result: dict[str, float] = {}
    if _both_classes(labels, "image metrics"):
        c = rank_counts(scores, labels)
        result.update(image_auroc=_auroc(c), image_ap=_ap(c), image_f1_max=_f1_max(c))
        if counts is not None:
            counts["image"] = c
    else:
        result.update(image_auroc=math.nan, image_ap=math.nan, image_f1_max=math.nan)
    if maps is None:
        return result

    maps, masks = pixel_inputs(maps, masks)
    if maps.shape[0] != scores.shape[0]:
        raise InvalidInputError(
            f"expected one map per image score: scores [{scores.shape[0]}] but maps {list(maps.shape)}."
        )
    if _both_classes(masks, "pixel metrics"):
        c = rank_counts(maps, masks)
        result.update(
            pixel_auroc=_auroc(c),
            pixel_aupro=_aupro(maps, masks, 200, 0.3),
            pixel_ap=_ap(c),
            pixel_f1_max=_f1_max(c),
        )
        if counts is not None:
            counts["pixel"] = c
    else:
        result.update(pixel_auroc=math.nan, pixel_aupro=math.nan, pixel_ap=math.nan, pixel_f1_max=math.nan)
    return result
