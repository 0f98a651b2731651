"""The optional dependencies of :mod:`anomalyclip.serve`, imported on first use."""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import MissingDependencyError

__all__ = ["SERVE_HINT", "RAY_HINT", "require"]

#: How to install what the service needs (FastAPI, uvicorn, python-multipart, prometheus-client, httpx).
SERVE_HINT = 'pip install "anomalyclip[serve]"'
#: How to install Ray Serve, for ``anomalyclip serve --ray``.
RAY_HINT = 'pip install "anomalyclip[serve,ray]"'


def require(module: str, hint: str = SERVE_HINT) -> ModuleType:
    """Import and return ``module``, or raise :class:`MissingDependencyError` naming the extra.

    Raises:
        MissingDependencyError: (an ``ImportError``) ``module`` is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"anomalyclip.serve needs {module.split('.')[0]}, which is not installed ({exc}). Install it with: {hint}"
        ) from exc
