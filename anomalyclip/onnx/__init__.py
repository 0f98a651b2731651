"""Deployment with ONNX: export an AnomalyCLIP model to one ``.onnx`` file, run it without torch.

At inference the prompts are fixed, so the text tower reduces to two constant vectors: the
exported graph is the DPAM vision forward, the similarity scores, the per-layer maps and the
Gaussian blur, with the text features (and anything else the model needs) as constants.

- :func:`export_onnx` (torch side; also ``AnomalyCLIP.export_onnx`` and ``anomalyclip export``)
  writes the file; the processing size, normalization, output layers, thresholds and library
  version go into its metadata.
- :class:`OnnxAnomalyCLIP` runs it with onnxruntime, numpy and Pillow (no torch, no open_clip):
  ``OnnxAnomalyCLIP("model.onnx").predict(images)`` returns the same ``AnomalyResult`` objects as
  ``AnomalyCLIP.predict``.
- :func:`quantize_int8` writes an onnxruntime dynamic-int8 copy of an export.

Importing this package imports neither torch nor onnxruntime; each is loaded on first use.
Needs the optional dependencies: ``pip install "anomalyclip[onnx]"``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "export_onnx": ".export",
    "OnnxAnomalyCLIP": ".runtime",
    "OnnxMetadata": ".metadata",
    "quantize_int8": ".quantize",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'anomalyclip.onnx' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from .export import export_onnx
    from .metadata import OnnxMetadata
    from .quantize import quantize_int8
    from .runtime import OnnxAnomalyCLIP
