"""Scale-out: batch inference on a Ray cluster with Ray Data (``pip install "anomalyclip[ray]"``).

* :func:`predict_dataset` scores a folder, a list of paths or URIs (``s3://...``), or a
  ``ray.data.Dataset`` on a pool of actors (one model each) and returns a Ray Dataset with one row
  per image: ``index``, ``path``, ``score``, ``label``, ``error`` and the map in a compact form.
* :class:`AnomalyCLIPPredictor` is the callable class behind it, for your own
  ``ds.map_batches(AnomalyCLIPPredictor, ...)`` pipelines.
* :func:`decode_map` reads the maps back (16-bit PNG or ``.npy``, as bytes, a file or a URI).
* ``anomalyclip predict --ray`` is the command-line front end.

Nothing here imports Ray (or torch) until it is used: ``import anomalyclip.distributed`` is
cheap and works without the extra; calling :func:`predict_dataset` without Ray installed raises
:class:`~anomalyclip.errors.MissingDependencyError` (an ``ImportError``) naming the install
command. See ``docs/distributed.md``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "predict_dataset",
    "AnomalyCLIPPredictor",
    "list_images",
    "encode_map",
    "decode_map",
    "OUTPUT_COLUMNS",
    "MAP_FORMATS",
]

_EXPORTS = {
    "predict_dataset": ".ray_predict",
    "AnomalyCLIPPredictor": ".predictor",
    "OUTPUT_COLUMNS": ".predictor",
    "list_images": ".sources",
    "encode_map": ".maps",
    "decode_map": ".maps",
    "MAP_FORMATS": ".maps",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
