"""Device and dtype selection, and telling when a device ran out of memory."""

from __future__ import annotations

import torch

from .errors import AnomalyCLIPError, InvalidInputError, ResourceError

__all__ = ["resolve_device", "resolve_dtype", "is_out_of_memory", "out_of_memory_error"]

# What torch's allocators say when they fail: CUDA / MPS ("... out of memory ...") and the CPU
# ("DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes").
_OOM_MESSAGES = ("out of memory", "can't allocate memory", "DefaultCPUAllocator")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` picks ``cuda`` if available, else ``mps`` (Apple), else ``cpu``."""
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidInputError(f"Unknown device {device!r}; use 'cpu', 'cuda', 'cuda:1' or 'mps'.") from exc


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``None`` means float32; also accepts 'float16'/'fp16'/'bfloat16'/'bf16' and torch dtypes."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise InvalidInputError(f"Unsupported dtype {dtype}; use torch.float32, torch.float16 or torch.bfloat16.")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise InvalidInputError(f"Unknown dtype {dtype!r}; use one of {sorted(set(_DTYPES))}.")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a device running out of memory (CUDA, MPS or CPU allocator, or Python)."""
    if isinstance(exc, AnomalyCLIPError):
        return False
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if isinstance(exc, MemoryError) or (oom is not None and isinstance(exc, oom)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _OOM_MESSAGES)


def out_of_memory_error(exc: BaseException, what: str, advice: str) -> ResourceError:
    """A :class:`ResourceError` for ``exc``: what ran out of memory, torch's own words, the fix.

    Raise it ``from exc``.
    """
    detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return ResourceError(f"Out of memory while {what} ({detail[:300]}). {advice}")
