"""Result types: the tensor output of ``model(pixel_values)`` and the friendly ``predict`` result.

This module imports no torch (``AnomalyResult`` is plain numpy), so torch-free runtimes share it:
the ONNX runtime (:mod:`anomalyclip.onnx`) builds its results with :meth:`AnomalyResult.from_map`,
whose :func:`resize_map` is the numpy twin of the ``F.interpolate`` call in ``AnomalyCLIP.predict``
(which stays on the model's device).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .errors import InvalidInputError

if TYPE_CHECKING:
    import torch

__all__ = ["AnomalyOutput", "AnomalyResult", "resize_map"]


def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of 1-D linear resampling, half-pixel centres (``align_corners=False``).

    Returns ``(i0, i1, w1)``: output ``j`` is ``(1 - w1[j]) * x[i0[j]] + w1[j] * x[i1[j]]``, as in
    PyTorch's CPU ``upsample_bilinear2d``: source coordinate ``scale * (j + 0.5) - 0.5`` with the
    float32 ``scale = in / out``, rounded once to float32 (a fused multiply-add; the float64
    product is exact), clamped at 0.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    src = (np.float64(scale) * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(src.astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, w1


def resize_map(anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinearly resize a float ``[h, w]`` map to ``size = (H, W)``: float32 ``[H, W]``.

    The sampling of ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``
    without antialiasing, in numpy; the two agree to float32 rounding (< 1e-6 on anomaly maps).
    """
    m = np.asarray(anomaly_map, dtype=np.float32)
    if m.ndim != 2:
        raise InvalidInputError(f"resize_map: expected a map of shape [h, w], got {tuple(m.shape)}.")
    out_h, out_w = int(size[0]), int(size[1])
    if (out_h, out_w) == m.shape:
        return m.copy()
    r0, r1, rw = _linear_taps(m.shape[0], out_h)
    c0, c1, cw = _linear_taps(m.shape[1], out_w)
    # Columns first, on the small map; then whole rows of that are gathered (contiguous copies).
    cols = np.take(m, c0, axis=1)
    cols *= np.float32(1.0) - cw
    cols += np.take(m, c1, axis=1) * cw  # [h, W]
    out = np.take(cols, r0, axis=0)
    out *= (np.float32(1.0) - rw)[:, None]
    out += np.take(cols, r1, axis=0) * rw[:, None]  # [H, W]
    return out


@dataclass
class AnomalyOutput:
    """Output of :meth:`AnomalyCLIP.forward`, on the model's device, at the processing size S.

    Without references (zero-shot), ``scores`` and ``anomaly_maps`` are the zero-shot ones and
    ``zero_shot_scores`` / ``zero_shot_maps`` are the same tensors. With few-shot references
    (:meth:`AnomalyCLIP.add_references`), ``scores`` and ``anomaly_maps`` are fused (see
    ``docs/fewshot.md``) and both parts stay inspectable.

    Attributes:
        scores: ``[B]`` float32 image anomaly scores in [0, 1]: the anomalous-class probability
            (zero-shot), or ``(zero_shot_scores + reference_scores) / 2`` with references.
        anomaly_maps: ``[B, S, S]`` float32 final maps: the sum over output layers of the
            per-layer anomalous probability (values in [0, n_layers]), plus the raw reference map
            with references, Gaussian-blurred.
        raw_anomaly_maps: ``[B, S, S]`` the same before the blur.
        image_features: ``[B, D]`` L2-normalized global features.
        patch_features: output layer -> ``[B, N, D]`` projected tokens (class token first, not
            normalized).
        zero_shot_scores: ``[B]`` the zero-shot image scores.
        zero_shot_maps: ``[B, S, S]`` the zero-shot final (blurred) maps.
        reference_scores: ``[B]`` in [0, 1], the largest layer-averaged nearest-neighbour cosine
            distance to the references, halved; None without references.
        reference_maps: ``[B, S, S]`` the sum over output layers of the upsampled nearest-neighbour
            cosine distances, blurred like the zero-shot map (values in [0, 2 n_layers]);
            ``anomaly_maps`` equals ``zero_shot_maps + reference_maps`` up to rounding (the blur
            is linear). None without references.
    """

    scores: torch.Tensor
    anomaly_maps: torch.Tensor
    raw_anomaly_maps: torch.Tensor
    image_features: torch.Tensor
    patch_features: dict[int, torch.Tensor] = field(default_factory=dict)
    zero_shot_scores: torch.Tensor | None = None
    zero_shot_maps: torch.Tensor | None = None
    reference_scores: torch.Tensor | None = None
    reference_maps: torch.Tensor | None = None


@dataclass
class AnomalyResult:
    """The anomaly score and map of one image, at the image's original size.

    Attributes:
        score: image anomaly score in [0, 1] (higher is more anomalous).
        anomaly_map: float32 ``[H, W]`` pixel anomaly map at the input's original size; None
            only for an image that could not be read (``error`` set).
        image_threshold: the threshold ``label`` was computed with, if any.
        pixel_threshold: the threshold ``mask`` was computed with, if any.
        path: the image's file path when the input was a path, else None.
        error: None for a scored image; with ``predict_iter(..., on_error="record")``, why the
            image could not be read or scored (then ``score`` is NaN, ``anomaly_map``, ``label``
            and ``mask`` are None).
    """

    score: float
    anomaly_map: np.ndarray | None
    image_threshold: float | None = None
    pixel_threshold: float | None = None
    path: str | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        if self.error is not None:
            if not isinstance(self.error, str) or self.anomaly_map is not None or not math.isnan(self.score):
                raise InvalidInputError(
                    "AnomalyResult.error: a failed image has a message (str), score NaN and no anomaly_map, got "
                    f"error={self.error!r}, score={self.score!r}, anomaly_map of type {type(self.anomaly_map).__name__}."
                )
            return
        if not isinstance(self.anomaly_map, np.ndarray) or self.anomaly_map.ndim != 2:
            shape = getattr(self.anomaly_map, "shape", None)
            raise InvalidInputError(
                f"AnomalyResult.anomaly_map: expected a numpy array of shape [H, W], got "
                f"{type(self.anomaly_map).__name__} of shape {tuple(shape) if shape is not None else '?'}."
            )

    @classmethod
    def from_map(
        cls,
        score: float,
        anomaly_map: np.ndarray,
        size: tuple[int, int],
        *,
        image_threshold: float | None = None,
        pixel_threshold: float | None = None,
        path: str | None = None,
    ) -> "AnomalyResult":
        """The result of one image from its score and its map at the processing size S.

        Args:
            score: the image score.
            anomaly_map: float ``[S, S]`` map (numpy).
            size: the image's original ``(height, width)``; the map is resized to it with
                :func:`resize_map` (bilinear, as ``F.interpolate(..., align_corners=False)``).
            image_threshold, pixel_threshold: optional decision thresholds.
            path: the image's file path, if it was given as one.
        """
        return cls(
            score=float(score),
            anomaly_map=resize_map(anomaly_map, size),
            image_threshold=image_threshold,
            pixel_threshold=pixel_threshold,
            path=path,
        )

    @property
    def label(self) -> int | None:
        """1 (anomalous) if ``score > image_threshold``, else 0; None without a threshold or on error."""
        if self.image_threshold is None or self.error is not None:
            return None
        return int(self.score > self.image_threshold)

    @property
    def mask(self) -> np.ndarray | None:
        """Boolean ``[H, W]``: ``anomaly_map > pixel_threshold``; None without a threshold or on error."""
        if self.pixel_threshold is None or self.anomaly_map is None:
            return None
        return self.anomaly_map > self.pixel_threshold

    # anomalib-style aliases, familiar to many anomaly-detection users.
    @property
    def pred_score(self) -> float:
        return self.score

    @property
    def pred_label(self) -> int | None:
        return self.label

    @property
    def pred_mask(self) -> np.ndarray | None:
        return self.mask
