"""What a decision threshold belongs to, and the one resolution of the thresholds ``predict`` applies.

A threshold only means something for the outputs it was chosen on. :class:`DecisionMode` records
everything that changes those outputs: the processing size, the output layers, the DPAM settings,
the blur, the tiling, the few-shot references (a fingerprint of the memory, its fusion included)
and the backbone.
:func:`resolve_thresholds` is used by ``AnomalyCLIP.predict``, ``OnnxAnomalyCLIP.predict`` and the
Ray actor alike. Torch-free.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, Mapping

from ..errors import InvalidInputError

__all__ = ["DecisionMode", "resolve_thresholds", "SCORE_RANGE"]

logger = logging.getLogger(__name__)

#: The range of image scores (a softmax probability, fused or not).
SCORE_RANGE = (0.0, 1.0)


@dataclass(frozen=True)
class DecisionMode:
    """The settings that make a model's scores and maps what they are (JSON-ready, comparable).

    Attributes:
        image_size: processing size S.
        feature_layers: output layers summed in the map.
        dpam_layers, dpam_mode: DPAM settings.
        sigma: the map's blur.
        tile_size, tile_overlap: tiling of the images (None: untiled).
        references: :meth:`ReferenceMemory.fingerprint
            <anomalyclip.references.ReferenceMemory.fingerprint>` of the few-shot memory (tokens,
            settings, fusion rule and statistics; None: zero-shot).
        backbone: the backbone reference.
    """

    image_size: int
    feature_layers: tuple[int, ...]
    dpam_layers: int
    dpam_mode: str
    sigma: float
    tile_size: int | None = None
    tile_overlap: float | None = None
    references: str | None = None
    backbone: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "feature_layers", tuple(int(x) for x in self.feature_layers))
        object.__setattr__(self, "sigma", float(self.sigma))
        if self.tile_size is None:
            object.__setattr__(self, "tile_overlap", None)
        elif self.tile_overlap is not None:
            object.__setattr__(self, "tile_overlap", float(self.tile_overlap))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["feature_layers"] = list(self.feature_layers)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DecisionMode":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInputError(f"decision mode: unknown keys {unknown}; known: {sorted(known)}.")
        try:
            return cls(**dict(data))
        except TypeError as exc:
            raise InvalidInputError(f"decision mode: {exc}.") from exc

    def differences(self, other: "DecisionMode") -> list[str]:
        """``"name: mine -> other"`` for each setting that differs."""
        return [
            f"{f.name} {getattr(self, f.name)!r} -> {getattr(other, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


def _as_mode(value: Any) -> DecisionMode | None:
    if value is None or isinstance(value, DecisionMode):
        return value
    if isinstance(value, Mapping):
        return DecisionMode.from_dict(value)
    raise InvalidInputError(f"a decision mode must be a DecisionMode or a mapping, got {type(value).__name__}.")


def _check_value(value: Any, name: str, valid: tuple[float, float], what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise InvalidInputError(f"{name} must be a finite number or None, got {value!r}.")
    lo, hi = valid
    if not lo <= float(value) <= hi:
        raise InvalidInputError(
            f"{name}={value!r} is outside the {what} range [{lo:g}, {hi:g}]; a threshold there would decide nothing "
            f"(for a percentile use calibrate(quantile=...); scores lie in [0, 1], map values in [{lo:g}, {hi:g}] "
            "for this model)." if what == "map" else
            f"{name}={value!r} is outside the {what} range [{lo:g}, {hi:g}]; a threshold there would decide nothing "
            "(image scores are probabilities in [0, 1]; for a percentile use calibrate(quantile=...))."
        )
    return float(value)


def _parts(thresholds: Any) -> tuple[Any, Any, Any]:
    """``(image, pixel, mode)`` of a Thresholds-like object or a mapping."""
    if isinstance(thresholds, Mapping):
        unknown = sorted(set(thresholds) - {"image", "pixel", "mode"})
        if unknown:
            raise InvalidInputError(f"thresholds: unknown keys {unknown}; expected 'image', 'pixel' (and 'mode').")
        return thresholds.get("image"), thresholds.get("pixel"), thresholds.get("mode")
    if hasattr(thresholds, "image") and hasattr(thresholds, "pixel"):
        return thresholds.image, thresholds.pixel, getattr(thresholds, "mode", None)
    raise InvalidInputError(
        "thresholds must be an anomalyclip.Thresholds, a mapping {'image': ..., 'pixel': ...}, None (the model's "
        f"own thresholds) or False (none), got {thresholds!r}."
    )


def resolve_thresholds(
    *,
    own: Any,
    thresholds: Any | Literal[False] | None,
    image_threshold: float | None,
    pixel_threshold: float | None,
    map_range: tuple[float, float],
    mode: DecisionMode | Mapping[str, Any] | None,
    warned: set | None = None,
) -> tuple[float | None, float | None]:
    """The ``(image, pixel)`` thresholds a prediction applies.

    Args:
        own: the model's (or file's) own thresholds: a ``Thresholds``-like object or mapping with
            ``image``, ``pixel`` and ``mode`` (the :class:`DecisionMode` they were chosen in), or None.
        thresholds: None applies ``own``; False applies none; a ``Thresholds`` or a mapping
            ``{"image": ..., "pixel": ...}`` applies those.
        image_threshold, pixel_threshold: override one field each (they win over ``thresholds``).
        map_range: the maps' value range; a pixel threshold outside it is refused.
        mode: the decision mode of this prediction.
        warned: a set that remembers the warnings already logged (warn once per model).

    Own thresholds chosen in another mode are not applied: a warning (once) names the
    difference and the result carries no label or mask. Passed thresholds whose recorded mode
    differs raise :class:`InvalidInputError`. NaN, infinity and values outside the score range
    [0, 1] or ``map_range`` are refused everywhere.
    """
    image_threshold = _check_value(image_threshold, "image_threshold", (0.0, 1.0), "score")
    pixel_threshold = _check_value(pixel_threshold, "pixel_threshold", map_range, "map")
    current = _as_mode(mode)
    chosen_image = chosen_pixel = None
    if thresholds is False:
        pass
    elif thresholds is None:
        if own is not None:
            image, pixel, own_mode = _parts(own)
            own_mode = _as_mode(own_mode)
            if own_mode is not None and current is not None and own_mode != current:
                key = (own_mode, current)
                if warned is None or key not in warned:
                    logger.warning(
                        "Not applying the model's thresholds: they were chosen in another mode (%s). Results carry no "
                        "label or mask. Calibrate in this mode (model.calibrate(..., tile_size=...)) or pass thresholds.",
                        "; ".join(own_mode.differences(current)),
                    )
                    if warned is not None:
                        warned.add(key)
            else:
                chosen_image, chosen_pixel = image, pixel
    else:
        image, pixel, given_mode = _parts(thresholds)
        given_mode = _as_mode(given_mode)
        if given_mode is not None and current is not None and given_mode != current:
            raise InvalidInputError(
                "The thresholds passed were chosen in another mode ("
                + "; ".join(given_mode.differences(current))
                + "). Calibrate in this mode, or pass plain values (image_threshold=/pixel_threshold=)."
            )
        chosen_image, chosen_pixel = image, pixel
    if thresholds is not False:
        chosen_image = _check_value(chosen_image, "thresholds.image", (0.0, 1.0), "score")
        chosen_pixel = _check_value(chosen_pixel, "thresholds.pixel", map_range, "map")
    return (
        chosen_image if image_threshold is None else image_threshold,
        chosen_pixel if pixel_threshold is None else pixel_threshold,
    )
