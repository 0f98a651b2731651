"""The optional dependencies of :mod:`anomalyclip.distributed`, imported on first use."""

from __future__ import annotations

from types import ModuleType

from ..errors import MissingDependencyError

__all__ = ["INSTALL_HINT", "require_ray", "require_pyarrow"]

#: How to install what :mod:`anomalyclip.distributed` needs.
INSTALL_HINT = 'pip install "anomalyclip[ray]"'


def require_ray() -> ModuleType:
    """Import and return ``ray`` (with ``ray.data`` loaded).

    Raises:
        MissingDependencyError: (an ``ImportError``) Ray Data is missing; the message names the extra.
    """
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            f"anomalyclip.distributed needs Ray Data, which is not installed ({exc}). "
            f"Install it with: {INSTALL_HINT}"
        ) from exc
    return ray


def require_pyarrow() -> ModuleType:
    """Import and return ``pyarrow`` (installed with ``ray[data]``), or raise :class:`MissingDependencyError`."""
    try:
        import pyarrow
        import pyarrow.fs  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            f"anomalyclip.distributed needs pyarrow, which is not installed ({exc}). Install it with: {INSTALL_HINT}"
        ) from exc
    return pyarrow
