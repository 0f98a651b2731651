"""The inspection service (``pip install "anomalyclip[serve]"``): ``anomalyclip serve MODEL``.

- :func:`create_app`: the FastAPI app (routes ``/v1/health``, ``/v1/model``, ``/v1/predict``,
  ``/v1/results``, ``/metrics``, the web inspector at ``/``);
- :class:`ServeSettings`: batching, limits, token, CORS, store;
- :class:`Engine`: the one adapter between the HTTP layer and the model;
- :class:`Client`: a small httpx client for scripts;
- :mod:`anomalyclip.serve.ray_serve`: the same app as a Ray Serve deployment.

Names load on first use, so ``import anomalyclip.serve`` needs neither FastAPI nor torch.
See ``docs/serving.md``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "create_app": ".app",
    "ServeSettings": ".settings",
    "Engine": ".engine",
    "Batcher": ".batching",
    "Client": ".client",
    "ResultStore": ".store",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'anomalyclip.serve' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from .app import create_app
    from .batching import Batcher
    from .client import Client
    from .engine import Engine
    from .settings import ServeSettings
    from .store import ResultStore
