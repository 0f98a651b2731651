"""AnomalyCLIP: zero-shot anomaly detection and segmentation with CLIP and learned prompts.

Quick start::

    from anomalyclip import AnomalyCLIP
    model = AnomalyCLIP.from_pretrained()      # official prompts (trained on VisA)
    result = model.predict("image.png")        # result.score, result.anomaly_map

``import anomalyclip`` is cheap: the names below are imported from their modules on first use
(PEP 562), so torch, open_clip and scipy load only when something needs them.

Layout: numerics (``scoring``, ``ops``, ``vision``, ``prompts``, ``references``, ``tiling``) ->
the model (``model``, ``backbone``, ``official``, ``presets``) -> on top, ``data`` (data sets),
``train`` (glocal finetune, feature cache, losses), ``eval`` (metrics, thresholds, the evaluation
protocol), ``visualize`` and ``cli``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

# Public name -> module that defines it.
_EXPORTS = {
    "AnomalyCLIP": ".model",
    "AnomalyCLIPConfig": ".config",
    "AnomalyOutput": ".outputs",
    "AnomalyResult": ".outputs",
    "ImageReadOptions": ".decoding",
    "Thresholds": ".eval.thresholds",
    "evaluate": ".eval.protocol",
    "load_dataset": ".data.datasets",
    "AnomalyDataset": ".data.datasets",
    "Sample": ".data.datasets",
    "PRESETS": ".presets",
    "DEFAULT_PRESET": ".presets",
    "AnomalyCLIPError": ".errors",
    "BackboneError": ".errors",
    "CheckpointError": ".errors",
    "DatasetError": ".errors",
    "ImageLoadError": ".errors",
    "InvalidInputError": ".errors",
    "ResourceError": ".errors",
    "TrainingError": ".errors",
    "WeightsNotFoundError": ".errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'anomalyclip' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .config import AnomalyCLIPConfig
    from .data.datasets import AnomalyDataset, Sample, load_dataset
    from .decoding import ImageReadOptions
    from .errors import (
        AnomalyCLIPError,
        BackboneError,
        CheckpointError,
        DatasetError,
        ImageLoadError,
        InvalidInputError,
        ResourceError,
        TrainingError,
        WeightsNotFoundError,
    )
    from .eval.protocol import evaluate
    from .eval.thresholds import Thresholds
    from .model import AnomalyCLIP
    from .outputs import AnomalyOutput, AnomalyResult
    from .presets import DEFAULT_PRESET, PRESETS
