"""What the HTML evaluation report shows beyond the metrics, collected while ``evaluate`` runs.

Per class, at a bounded cost (nothing here grows with the number of pixels):

* the image scores and labels (``[n]`` each: the score histogram);
* the ROC and precision-recall curves, image level and (where the class has masks) pixel level,
  taken from the very :class:`~anomalyclip.eval.metrics.RankCounts` the metrics were computed
  from (:func:`~anomalyclip.eval.metrics.roc_points`, :func:`~anomalyclip.eval.metrics.pr_points`;
  no second implementation, no second pass over the maps), thinned to at most
  ``max_points`` points by :func:`thin_curve`;
* the worst cases: the ``k`` highest-scoring normal images and the ``k`` lowest-scoring anomalous
  ones, kept in two heaps of ``k`` maps while the class streams past (:class:`WorstCases`), and
  rendered at the end of the class as small overlay JPEGs with the ground-truth contour.

Curve thinning (:func:`thin_curve`): the points are binned by their arc length along the curve
(``|dx| + |dy|``, both axes in [0, 1]) into ``max_points`` equal bins, and the first and last
point of every bin are kept, so a segment of the thinned curve either is a segment of the
full curve or spans at most ``L / max_points`` of arc length ``L <= 2``. A monotone ROC piece
inside a ``dx x dy`` box differs from its chord by at most ``dx dy / 2``; summed over the bins,
the trapezoid area of the thinned ROC curve is within ``L^2 / (8 max_points) <= 1 / (2
max_points)`` of the AUROC (1e-3 at the default 500 points; in practice 1e-5 or less), and the
step area of the thinned PR curve is within ``2 / max_points`` of the AP. Image-level curves of
up to ``max_points`` points are kept whole, so their areas equal the table's to round-off.
"""

from __future__ import annotations

import heapq
import io
import math
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .metrics import RankCounts, f1_curve, pr_points, roc_points

__all__ = ["ClassDetails", "WorstCase", "WorstCases", "class_details", "thin_curve"]

#: Points kept per curve (see the module docstring for the area error this allows).
MAX_CURVE_POINTS = 500
#: Worst cases kept per class and side (normal, anomalous).
WORST_CASES = 4
#: Longest side of a worst-case thumbnail, in pixels.
THUMBNAIL_SIDE = 224


def thin_curve(x: np.ndarray, y: np.ndarray, max_points: int = MAX_CURVE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most ``2 * max_points`` points of the curve ``(x, y)`` (``[K]`` each), ends kept.

    Keeps the first and last point of each of ``max_points`` equal arc-length bins (arc length
    ``|dx| + |dy|``); curves of at most ``max_points`` points are returned whole. See the module
    docstring for the bound on the change in area.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.size <= max_points:
        return x.copy(), y.copy()
    arc = np.concatenate(([0.0], np.cumsum(np.abs(np.diff(x)) + np.abs(np.diff(y)))))
    if arc[-1] <= 0:
        return x[[0, -1]], y[[0, -1]]
    bins = np.minimum((arc / arc[-1] * max_points).astype(np.int64), max_points - 1)
    change = np.flatnonzero(bins[1:] != bins[:-1])  # i: last of a bin, i + 1: first of the next
    keep = np.unique(np.concatenate(([0, x.size - 1], change, change + 1)))
    return x[keep], y[keep]


@dataclass
class WorstCase:
    """One worst case of a class: the image, its score and label, and its overlay as a JPEG.

    Attributes:
        path: the image file.
        score: its image score.
        label: 0 normal (a high score: a would-be false alarm), 1 anomalous (a low score: a miss).
        jpeg: the overlay (heat map at the evaluation's fixed colour range and, for anomalous
            images with a mask, the ground-truth contour in white), at most
            :data:`THUMBNAIL_SIDE` pixels on a side, JPEG-encoded (quality 90: a fifth of a PNG's
            size for these noisy pictures, which keeps a page of many classes small).
    """

    path: str
    score: float
    label: int
    jpeg: bytes


class WorstCases:
    """The ``k`` highest-scoring normal and ``k`` lowest-scoring anomalous images of a stream.

    Two heaps of at most ``k`` entries; a map (and mask) is copied only when its image enters
    a heap, so the memory is ``2 k`` maps whatever the class size.
    """

    def __init__(self, k: int = WORST_CASES) -> None:
        self.k = int(k)
        self._normal: list[tuple[float, int, np.ndarray, np.ndarray | None]] = []  # min-heap of score
        self._anomalous: list[tuple[float, int, np.ndarray, np.ndarray | None]] = []  # min-heap of -score

    def update(self, start: int, scores: np.ndarray, labels: np.ndarray, maps: np.ndarray, masks: np.ndarray | None) -> None:
        """Offer a batch: sample indices ``start ..``, ``[b]`` scores and labels, ``[b, S, S]``
        maps and optional ``[b, S, S]`` bool masks."""
        for i, (score, label) in enumerate(zip(scores.tolist(), labels.tolist())):
            heap, key = (self._anomalous, -score) if label else (self._normal, score)
            if len(heap) < self.k or key > heap[0][0]:
                entry = (key, start + i, np.array(maps[i], dtype=np.float32), None if masks is None else masks[i].copy())
                (heapq.heappush if len(heap) < self.k else heapq.heapreplace)(heap, entry)

    def render(self, samples: Sequence[Any], vmin: float, vmax: float) -> tuple[list[WorstCase], list[WorstCase]]:
        """``(normal, anomalous)`` worst cases, worst first, as overlays of ``samples[index]``'s
        image with the map coloured over ``[vmin, vmax]``."""
        return self._render(self._normal, samples, vmin, vmax, 0), self._render(self._anomalous, samples, vmin, vmax, 1)

    @staticmethod
    def _render(heap: list, samples: Sequence[Any], vmin: float, vmax: float, label: int) -> list[WorstCase]:
        out = []
        for key, index, amap, mask in sorted(heap, key=lambda e: (-e[0], e[1])):
            path = samples[index].image_path
            picture = _overlay_thumbnail(path, amap, vmin, vmax, mask if mask is not None and mask.any() else None)
            out.append(WorstCase(path=os.fspath(path), score=float(-key if label else key), label=label, jpeg=picture))
        return out


def _overlay_thumbnail(path: Any, amap: np.ndarray, vmin: float, vmax: float, mask: np.ndarray | None) -> bytes:
    from PIL import Image

    from ..preprocessing import load_image
    from ..visualize import overlay

    image = load_image(path)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit / float: stretch to 8 bits
        values = np.asarray(image, dtype=np.float64)
        span = max(values.max() - values.min(), 1e-12)
        image = Image.fromarray(np.uint8(255 * (values - values.min()) / span))
    image = image.convert("RGB")
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.BILINEAR)
    picture = overlay(image, amap, vmin=vmin, vmax=vmax, mask=mask, contour_width=1)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@dataclass
class ClassDetails:
    """Everything the report draws for one class (bounded in size, see the module docstring).

    Attributes:
        scores: ``[n]`` float32 image scores.
        labels: ``[n]`` int8 image labels (1 = anomalous).
        curves: level (``"image"``, ``"pixel"``) -> ``{"roc": (fpr, tpr), "pr": (recall,
            precision)}``, float64 arrays; a level is absent where its metrics are undefined.
            ``trapezoid(tpr, fpr)`` is the AUROC, ``sum(diff(recall, prepend=0) * precision)`` the AP.
        f1_threshold: the image score at which the class's F1 is maximal (decide
            ``score >= f1_threshold``), or None where undefined.
        worst_normal: the highest-scoring normal images, worst first.
        worst_anomalous: the lowest-scoring anomalous images, worst first.
    """

    scores: np.ndarray
    labels: np.ndarray
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    f1_threshold: float | None = None
    worst_normal: list[WorstCase] = field(default_factory=list)
    worst_anomalous: list[WorstCase] = field(default_factory=list)


def class_details(
    scores: np.ndarray,
    labels: np.ndarray,
    counts: dict[str, RankCounts],
    worst: WorstCases,
    samples: Sequence[Any],
    map_range: tuple[float, float],
    max_points: int = MAX_CURVE_POINTS,
) -> ClassDetails:
    """Assemble a class's :class:`ClassDetails` once its metrics are computed.

    Args:
        scores, labels: ``[n]`` image scores and labels of the class.
        counts: the :class:`RankCounts` from ``compute_metrics(..., counts=counts)``.
        worst: the class's :class:`WorstCases`, fed batch by batch.
        samples: the evaluated samples (``image_path``), in stream order.
        map_range: ``(vmin, vmax)`` colour range of the overlays (the model's ``map_range``).
        max_points: points kept per curve (:func:`thin_curve`).
    """
    curves = {}
    for level, c in counts.items():
        curves[level] = {"roc": thin_curve(*roc_points(c), max_points), "pr": thin_curve(*pr_points(c), max_points)}
    f1_threshold = None
    if "image" in counts:
        c = counts["image"]
        f1_threshold = float(c.thresholds[int(np.argmax(f1_curve(c)))])
    normal, anomalous = worst.render(samples, *map_range)
    return ClassDetails(
        scores=np.asarray(scores, dtype=np.float32).copy(),
        labels=np.asarray(labels, dtype=np.int8).copy(),
        curves=curves,
        f1_threshold=None if f1_threshold is None or not math.isfinite(f1_threshold) else f1_threshold,
        worst_normal=normal,
        worst_anomalous=anomalous,
    )

