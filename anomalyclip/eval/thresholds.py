"""Decision thresholds: turning image scores and anomaly maps into anomalous / normal decisions.

Decision rule (everywhere in anomalyclip): a value is **anomalous iff value > threshold**
(strict), the rule the official AUPRO code uses to binarize maps. :func:`is_anomalous` applies it.

Two ways to pick a threshold:
    * :func:`threshold_from_normal`: a quantile of the values of *normal* images only (no labels
      needed): at ``quantile=0.99`` about 1 % of normal values lie above it and are flagged.
    * :func:`threshold_f1_max`: on a labelled set, the threshold whose decisions reach the
      F1-max of :mod:`anomalyclip.eval.metrics` (same precision-recall computation).

Returned thresholds are representable in the values' dtype (a float32 value for float32 maps),
so comparing float32 or float64 copies of the data against them gives the same decisions.
:class:`Thresholds` bundles an image-level and a pixel-level threshold and round-trips via JSON.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from ..errors import InvalidInputError
from .metrics import as_values, f1_curve, image_inputs, pixel_inputs, rank_counts

__all__ = ["is_anomalous", "threshold_from_normal", "threshold_f1_max", "Thresholds"]


def is_anomalous(values: ArrayLike, threshold: float) -> np.ndarray:
    """Apply the decision rule: ``values > threshold``.

    Args:
        values: image scores ``[N]`` or maps ``[N, H, W]`` (any shape).
        threshold: a threshold from this module.

    Returns:
        bool array of the same shape, True = anomalous.
    """
    return np.asarray(values) > threshold


def _values_and_labels(values: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``(scores [N], labels [N])`` or ``(maps [N, H, W], masks [N, H, W])``."""
    ndim = np.ndim(values)
    if ndim == 1:
        return image_inputs(values, labels)
    if ndim == 3:
        return pixel_inputs(values, labels)
    raise InvalidInputError(
        f"expected image scores [N] or maps [N, H, W], got values of shape {list(np.shape(values))}."
    )


def threshold_from_normal(values: ArrayLike, quantile: float = 0.99) -> float:
    """Threshold from normal data only: the ``quantile`` of their values.

    Values strictly above the returned threshold are flagged, so about ``1 - quantile`` of the
    normal values (none at ``quantile=1.0``) would be flagged.

    Args:
        values: scores ``[N]`` or maps ``[N, H, W]`` of NORMAL images (any shape, non-empty,
            finite).
        quantile: in [0, 1]; NumPy's default (linear) quantile over all values.

    Returns:
        the threshold, rounded to the values' dtype, as a Python float.
    """
    if isinstance(quantile, bool) or not isinstance(quantile, (int, float, np.floating)) or not 0 <= quantile <= 1:
        raise InvalidInputError(f"quantile must be a number in [0, 1], got {quantile!r}.")
    array = as_values(values, "values")
    threshold = np.quantile(array.reshape(-1), float(quantile))
    return float(array.dtype.type(threshold))


def threshold_f1_max(values: ArrayLike, labels: ArrayLike) -> float:
    """The threshold whose decisions ``values > threshold`` reach the F1-max on a labelled set.

    Uses the precision-recall computation of :mod:`anomalyclip.eval.metrics`: the best cut keeps every
    value >= some data value ``v``; the returned threshold lies in ``[u, v)`` where ``u`` is the
    next lower data value (the midpoint when the dtype can represent it, else ``u``), so the
    strict rule flags exactly the values >= ``v``. If ``v`` is the smallest value, the threshold is
    the next representable number below it. Ties among F1 maxima go to the highest threshold.

    Args:
        values: scores ``[N]`` or maps ``[N, H, W]``.
        labels: labels ``[N]`` or masks ``[N, H, W]``, bool or {0, 1}; both classes required.

    Returns:
        the threshold (representable in the values' dtype) as a Python float.
    """
    array, truth = _values_and_labels(values, labels)
    n_pos = int(np.count_nonzero(truth))
    if n_pos == 0 or n_pos == truth.size:
        raise InvalidInputError(
            "threshold_f1_max needs both normal and anomalous examples; "
            f"got {n_pos} anomalous out of {truth.size}. Use threshold_from_normal for normal-only data."
        )
    counts = rank_counts(array, truth)
    best = int(np.argmax(f1_curve(counts)))
    cut = counts.thresholds[best]
    lower = counts.neg_below[best]
    if best + 1 < counts.thresholds.size:
        lower = max(lower, counts.thresholds[best + 1])
    if not np.isfinite(lower):
        return float(np.nextafter(cut, cut.dtype.type(-np.inf)))
    two = cut.dtype.type(2)
    middle = lower + (cut - lower) / two
    if not lower <= middle < cut:  # rounding (or overflow) pushed it out of [lower, cut)
        middle = lower
    return float(middle)


def _check_threshold(value: Any, name: str) -> float | None:
    """None, or a finite real number as a float."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidInputError(f"Thresholds.{name} must be a finite number or None, got {value!r}.")
    if not math.isfinite(float(value)):
        raise InvalidInputError(f"Thresholds.{name} must be finite, got {value!r}.")
    return float(value)


@dataclass(frozen=True)
class Thresholds:
    """Image-level and pixel-level thresholds (either may be None); decide with ``value > threshold``.

    Attributes:
        image: threshold on image scores, or None.
        pixel: threshold on anomaly-map values, or None.
        mode: the decision mode they were chosen in (a dict of
            :class:`anomalyclip.predictor.DecisionMode`, set by ``AnomalyCLIP.calibrate``), or None
            (then ``predict`` applies them in any mode). Passed to ``predict`` in another mode,
            thresholds with a mode are refused.
    """

    image: float | None = None
    pixel: float | None = None
    mode: Mapping[str, Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "image", _check_threshold(self.image, "image"))
        object.__setattr__(self, "pixel", _check_threshold(self.pixel, "pixel"))

    @classmethod
    def from_normal(
        cls, scores: ArrayLike | None, maps: ArrayLike | None = None, quantile: float = 0.99
    ) -> Thresholds:
        """Quantile thresholds of normal images (see :func:`threshold_from_normal`).

        Args:
            scores: ``[N]`` scores of normal images, or None for a pixel threshold only.
            maps: optional ``[N, H, W]`` maps of normal images.
            quantile: in [0, 1].
        """
        if scores is None and maps is None:
            raise InvalidInputError("Thresholds.from_normal needs normal scores [N] and/or maps [N, H, W].")
        if scores is not None and np.ndim(scores) != 1:
            raise InvalidInputError(f"expected scores of shape [N], got {list(np.shape(scores))}.")
        if maps is not None and np.ndim(maps) != 3:
            raise InvalidInputError(f"expected maps of shape [N, H, W], got {list(np.shape(maps))}.")
        return cls(
            image=None if scores is None else threshold_from_normal(scores, quantile),
            pixel=None if maps is None else threshold_from_normal(maps, quantile),
        )

    @classmethod
    def from_labelled(
        cls,
        scores: ArrayLike | None,
        labels: ArrayLike | None,
        maps: ArrayLike | None = None,
        masks: ArrayLike | None = None,
    ) -> Thresholds:
        """F1-max thresholds on a labelled set (see :func:`threshold_f1_max`).

        Args:
            scores, labels: ``[N]`` image scores and {0, 1} labels, or both None.
            maps, masks: ``[N, H, W]`` maps and {0, 1} masks, or both None.
        """
        if (scores is None) != (labels is None):
            raise InvalidInputError("pass scores and labels together (both [N]), or neither.")
        if (maps is None) != (masks is None):
            raise InvalidInputError("pass maps and masks together (both [N, H, W]), or neither.")
        if scores is None and maps is None:
            raise InvalidInputError("Thresholds.from_labelled needs scores+labels and/or maps+masks.")
        image = pixel = None
        if scores is not None:
            scores_array, label_array = image_inputs(scores, labels)
            image = threshold_f1_max(scores_array, label_array)
        if maps is not None:
            map_array, mask_array = pixel_inputs(maps, masks)
            pixel = threshold_f1_max(map_array, mask_array)
        return cls(image=image, pixel=pixel)

    def to_dict(self) -> dict[str, float | None]:
        """``{"image": float | None, "pixel": float | None}``, JSON-serializable."""
        return {"image": self.image, "pixel": self.pixel}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Thresholds:
        """Inverse of :meth:`to_dict`; missing keys are None, unknown keys are an error."""
        if not isinstance(data, Mapping):
            raise InvalidInputError(f"expected a mapping with keys 'image' and 'pixel', got {type(data).__name__}.")
        unknown = sorted(set(data) - {"image", "pixel", "mode"})
        if unknown:
            raise InvalidInputError(f"unknown threshold keys {unknown}; expected only 'image', 'pixel' (and 'mode').")
        return cls(image=data.get("image"), pixel=data.get("pixel"), mode=data.get("mode"))
