"""What ``anomalyclip serve`` loads, as a small picklable record (sent to Ray Serve replicas too)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from .engine import Engine

logger = logging.getLogger(__name__)

__all__ = ["ModelSpec", "load_engine"]


@dataclass(frozen=True)
class ModelSpec:
    """How to build the served model.

    Attributes:
        model: preset, profile folder or Hub id (``AnomalyCLIP.from_pretrained``); None: the default preset.
        options: more ``from_pretrained`` keyword arguments (device, dtype, image_size, ...).
        references: normal reference images (paths) for few-shot, or None.
        coreset: keep this fraction of the reference patches, or None.
        thresholds: ``{"image": ..., "pixel": ...}`` to set on the model, None to keep its own,
            or ``{}`` to drop them.
    """

    model: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    references: tuple[str, ...] | None = None
    coreset: float | None = None
    thresholds: dict[str, float | None] | None = None


def load_engine(spec: ModelSpec, *, warm_up: bool = True) -> Engine:
    """Load the model of ``spec`` (with its references and thresholds) behind an :class:`Engine`.

    With ``warm_up`` (default), one blank image is scored before the engine is returned
    (:meth:`Engine.warm_up`), so a service reports ready only once its first request runs at
    full speed.
    """
    from ..model import AnomalyCLIP
    from ..predict_io import collect_images

    model = AnomalyCLIP.from_pretrained(spec.model, **{k: v for k, v in spec.options.items() if v is not None})
    if spec.references:
        model.add_references(collect_images(list(spec.references)), coreset=spec.coreset)
    if spec.thresholds is not None:
        model.thresholds = spec.thresholds or None
    engine = Engine(model)
    if warm_up:
        logger.info("Model warmed up in %.1f s", engine.warm_up())
    return engine
