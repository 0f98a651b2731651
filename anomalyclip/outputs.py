"""Result types: the tensor output of ``model(pixel_values)`` and the friendly ``predict`` result.

This module imports no torch (``AnomalyResult`` is plain numpy), so torch-free runtimes share it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .errors import InvalidInputError

if TYPE_CHECKING:
    import torch

__all__ = ["AnomalyOutput", "AnomalyResult"]


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
        anomaly_map: float32 ``[H, W]`` pixel anomaly map at the input's original size.
        image_threshold: the threshold ``label`` was computed with, if any.
        pixel_threshold: the threshold ``mask`` was computed with, if any.
        path: the image's file path when the input was a path, else None.
    """

    score: float
    anomaly_map: np.ndarray
    image_threshold: float | None = None
    pixel_threshold: float | None = None
    path: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.anomaly_map, np.ndarray) or self.anomaly_map.ndim != 2:
            shape = getattr(self.anomaly_map, "shape", None)
            raise InvalidInputError(
                f"AnomalyResult.anomaly_map: expected a numpy array of shape [H, W], got "
                f"{type(self.anomaly_map).__name__} of shape {tuple(shape) if shape is not None else '?'}."
            )

    @property
    def label(self) -> int | None:
        """1 (anomalous) if ``score > image_threshold``, else 0; None without a threshold."""
        if self.image_threshold is None:
            return None
        return int(self.score > self.image_threshold)

    @property
    def mask(self) -> np.ndarray | None:
        """Boolean ``[H, W]``: ``anomaly_map > pixel_threshold``; None without a threshold."""
        if self.pixel_threshold is None:
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
