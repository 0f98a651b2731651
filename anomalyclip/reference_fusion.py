"""How the few-shot reference part is fused with the zero-shot output (pure tensor functions).

Notation: B batch, U reference units (images, or their tiles), G*G patches, L output layers,
S processing size. ``d_l(p)`` is the nearest-neighbour cosine distance of patch ``p`` to the
reference memory of layer ``l`` (:func:`anomalyclip.references.reference_distances`).

Two rules (``docs/fewshot.md``), recorded in the :class:`~anomalyclip.references.ReferenceMemory`:

- ``"sum"`` (APRIL-GAN / WinCLIP+): map ``blur(Z + R)``, score ``(s_z + s_r) / 2``, where ``Z``
  is the zero-shot raw map, ``R = sum_l upsample(d_l)`` the reference map and ``s_z``, ``s_r``
  the zero-shot and reference scores. The larger-scaled part dominates.
- ``"standardized"``: each part is first standardized by its mean and standard deviation over
  the normal references (:class:`FusionStatistics`; the reference part leave-one-out: each
  reference image's distances against the memory without its own patches), then the two are
  averaged and squashed into (0, 1) by :func:`squash`:
  map ``squash(((blur Z - m_Z) / s_Z + (blur R - m_R) / s_R) / 2)``, score likewise from
  ``s_z`` and ``s_r``. Scale-free: neither part drowns the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .errors import InvalidInputError
from .scoring import gaussian_blur

__all__ = [
    "FUSIONS",
    "Moments",
    "FusionStatistics",
    "squash",
    "unsquash",
    "reference_map",
    "reference_score",
    "fuse_scores",
    "ReferenceFusion",
    "fuse_references",
]

#: The fusion rules: ``"sum"`` (APRIL-GAN's plain sum) and ``"standardized"``.
FUSIONS = ("sum", "standardized")
#: Smallest standard deviation a part is divided by (its values lie in [0, 1] or [0, 2L]).
MIN_STD = 1e-6


@dataclass(frozen=True)
class Moments:
    """Count, mean and sum of squared deviations (``m2``) of a set of values; mergeable (Chan et al.)."""

    count: float = 0.0
    mean: float = 0.0
    m2: float = 0.0

    @classmethod
    def of(cls, values: torch.Tensor) -> "Moments":
        """The moments of all elements of ``values`` (computed in float64)."""
        x = values.detach().double().flatten()
        if x.numel() == 0:
            return cls()
        mean = float(x.mean())
        return cls(float(x.numel()), mean, float(((x - mean) ** 2).sum()))

    def merge(self, other: "Moments") -> "Moments":
        """The moments of both sets together."""
        n = self.count + other.count
        if n == 0:
            return Moments()
        delta = other.mean - self.mean
        mean = self.mean + delta * other.count / n
        return Moments(n, mean, self.m2 + other.m2 + delta * delta * self.count * other.count / n)

    @property
    def std(self) -> float:
        """Population standard deviation, at least :data:`MIN_STD`."""
        return max(math.sqrt(self.m2 / self.count) if self.count else 0.0, MIN_STD)


#: Order of the parts in :meth:`FusionStatistics.to_tensor`.
_PARTS = ("zero_shot_map", "reference_map", "zero_shot_score", "reference_score")


@dataclass(frozen=True)
class FusionStatistics:
    """The normal references' spread of each part, for the ``"standardized"`` fusion.

    Attributes:
        zero_shot_map: over every pixel of the blurred zero-shot maps of the reference units.
        reference_map: over every pixel of the blurred leave-one-out reference maps of the units.
        zero_shot_score: over the units' zero-shot scores.
        reference_score: over the units' leave-one-out reference scores.

    A unit whose image is the only one in the memory has no leave-one-out distances: it adds
    to the zero-shot parts only. :attr:`usable` needs both score parts measured on at least two
    units (a standard deviation of one value is meaningless).
    """

    zero_shot_map: Moments = Moments()
    reference_map: Moments = Moments()
    zero_shot_score: Moments = Moments()
    reference_score: Moments = Moments()

    @classmethod
    def of(
        cls,
        *,
        zero_shot_scores: torch.Tensor,
        zero_shot_maps: torch.Tensor,
        reference_scores: torch.Tensor,
        reference_maps: torch.Tensor,
    ) -> "FusionStatistics":
        """Statistics of units: zero-shot scores ``[U]`` and blurred maps ``[U, S, S]``;
        leave-one-out reference scores ``[V]`` and blurred maps ``[V, S, S]`` (``V <= U``)."""
        return cls(
            Moments.of(zero_shot_maps),
            Moments.of(reference_maps),
            Moments.of(zero_shot_scores),
            Moments.of(reference_scores),
        )

    def merge(self, other: "FusionStatistics") -> "FusionStatistics":
        """Pooled statistics of both sets of units."""
        return FusionStatistics(*(getattr(self, p).merge(getattr(other, p)) for p in _PARTS))

    @property
    def usable(self) -> bool:
        """Whether the statistics can standardize: each score part measured on 2+ units."""
        return self.zero_shot_score.count >= 2 and self.reference_score.count >= 2

    def to_tensor(self) -> torch.Tensor:
        """``[4, 3]`` float64: per part (the order of the attributes) ``(count, mean, m2)``."""
        return torch.tensor([[m.count, m.mean, m.m2] for m in (getattr(self, p) for p in _PARTS)], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> "FusionStatistics":
        """Inverse of :meth:`to_tensor`; :class:`InvalidInputError` for a wrong shape or values."""
        if tuple(values.shape) != (4, 3) or not torch.isfinite(values).all() or bool((values[:, [0, 2]] < 0).any()):
            raise InvalidInputError(f"fusion statistics must be a finite [4, 3] tensor with counts >= 0, got {list(values.shape)}.")
        return cls(*(Moments(*row) for row in values.double().tolist()))


def squash(z: torch.Tensor) -> torch.Tensor:
    """``0.5 + z / (2 (1 + |z|))``: standard units -> (0, 1), monotonic, 0 -> 0.5, 1 -> 0.75,
    3 -> 0.875, 9 -> 0.95. Unlike a logistic it does not round to 1 in float32 (distinct up to
    z ~ 1e3), so the order of strong anomalies survives."""
    return 0.5 + z / (2.0 * (1.0 + z.abs()))


def unsquash(value: float) -> float:
    """Inverse of :func:`squash` for a threshold ``t`` in (0, 1): ``(2t - 1) / (1 - |2t - 1|)``."""
    if not 0.0 < value < 1.0:
        raise InvalidInputError(f"unsquash takes a value in (0, 1), got {value!r}.")
    c = 2.0 * value - 1.0
    return c / (1.0 - abs(c))


def reference_map(distances: dict[int, torch.Tensor], image_size: int) -> torch.Tensor:
    """The raw reference map ``[B, S, S]``: each layer's ``G x G`` distances ``[B, G*G]``
    upsampled bilinearly (align_corners=False, as the zero-shot layer maps) and summed over
    layers (values in [0, 2L])."""
    total: torch.Tensor | None = None
    for dist in distances.values():
        b, n = dist.shape
        grid = int(round(math.sqrt(n)))
        up = F.interpolate(dist.reshape(b, 1, grid, grid), size=(image_size, image_size), mode="bilinear", align_corners=False)
        total = up[:, 0] if total is None else total + up[:, 0]
    if total is None:
        raise InvalidInputError("reference_map: no output layer given.")
    return total


def reference_score(distances: dict[int, torch.Tensor]) -> torch.Tensor:
    """``[B]`` in [0, 1]: the largest, over patches, layer-averaged visual association score
    ``mean_l d_l / 2`` (WinCLIP+), from distances ``[B, G*G]`` per layer."""
    stacked = torch.stack(list(distances.values()))  # [L, B, G*G]
    return (stacked.mean(dim=0) / 2.0).amax(dim=-1)


def _standardize(values: torch.Tensor, moments: Moments) -> torch.Tensor:
    return (values.float() - moments.mean) / moments.std


def fuse_scores(
    zero_shot_scores: torch.Tensor, reference_scores: torch.Tensor, statistics: FusionStatistics | None = None
) -> torch.Tensor:
    """The fused image score ``[B]`` in [0, 1] from the two parts' scores ``[B]``.

    ``statistics`` None: ``(zero-shot + reference) / 2`` (WinCLIP+, the ``"sum"`` fusion);
    otherwise ``squash(((s_z - m) / s + (s_r - m) / s) / 2)`` with each part's moments.
    """
    if statistics is None:
        return (zero_shot_scores.float() + reference_scores.float()) / 2.0
    z = _standardize(zero_shot_scores, statistics.zero_shot_score) + _standardize(reference_scores, statistics.reference_score)
    return squash(z / 2.0)


class ReferenceFusion(NamedTuple):
    """The fused outputs of :func:`fuse_references` (all float32)."""

    scores: torch.Tensor  #: ``[B]`` fused image scores in [0, 1]
    maps: torch.Tensor  #: ``[B, S, S]`` fused maps (blurred; ``"standardized"``: in (0, 1))
    raw_maps: torch.Tensor  #: ``[B, S, S]`` before the blur (``"standardized"``: mean z, before the squash too)
    reference_scores: torch.Tensor  #: ``[B]`` reference scores in [0, 1]
    reference_maps: torch.Tensor | None  #: ``[B, S, S]`` the reference map alone, blurred (in [0, 2L]), if asked
    reference_raw_maps: torch.Tensor  #: ``[B, S, S]`` the reference map alone, before the blur


def fuse_references(
    zero_shot_scores: torch.Tensor,
    zero_shot_raw_maps: torch.Tensor,
    distances: dict[int, torch.Tensor],
    *,
    sigma: float,
    statistics: FusionStatistics | None = None,
    with_reference_maps: bool = True,
) -> ReferenceFusion:
    """Fuse the zero-shot outputs with the reference distances (the module docstring's rules).

    Args:
        zero_shot_scores: ``[B]`` zero-shot image scores.
        zero_shot_raw_maps: ``[B, S, S]`` zero-shot layer-sum maps, before the blur.
        distances: layer -> ``[B, G*G]`` nearest-neighbour distances.
        sigma: the model's Gaussian blur (pixels), applied once to the fused map.
        statistics: None for the ``"sum"`` fusion, the references' :class:`FusionStatistics`
            for the ``"standardized"`` one.
        with_reference_maps: also blur the reference map alone (False: ``reference_maps`` None).

    Returns:
        :class:`ReferenceFusion`. The blur is linear and keeps constants, so standardizing the
        raw maps with statistics of blurred maps and blurring afterwards is the same as
        standardizing the blurred maps.
    """
    reference_raw = reference_map(distances, zero_shot_raw_maps.shape[-1])
    reference_scores = reference_score(distances)
    if statistics is None:
        raw = zero_shot_raw_maps.float() + reference_raw
    else:
        raw = (_standardize(zero_shot_raw_maps, statistics.zero_shot_map) + _standardize(reference_raw, statistics.reference_map)) / 2.0
    blurred = gaussian_blur(torch.cat([raw, reference_raw]) if with_reference_maps else raw, sigma)
    b = raw.shape[0]
    maps = blurred[:b] if statistics is None else squash(blurred[:b])
    return ReferenceFusion(
        scores=fuse_scores(zero_shot_scores, reference_scores, statistics),
        maps=maps,
        raw_maps=raw,
        reference_scores=reference_scores,
        reference_maps=blurred[b:] if with_reference_maps else None,
        reference_raw_maps=reference_raw,
    )
