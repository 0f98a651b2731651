"""Device and dtype selection, and telling when a device ran out of memory."""

from __future__ import annotations

import torch

from .errors import AnomalyCLIPError, InvalidInputError, ResourceError

__all__ = [
    "resolve_device",
    "resolve_dtype",
    "resolve_precision",
    "auto_dtype",
    "place_model",
    "is_out_of_memory",
    "out_of_memory_error",
]

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
    raise InvalidInputError(
        f"Unknown dtype {dtype!r}; use one of {sorted(set(_DTYPES))} (and, when loading a model, "
        f"{' or '.join(repr(d) for d in _MODEL_ONLY_DTYPES)})."
    )


_FLOAT8_NAMES = ("float8", "fp8")
_MODEL_ONLY_DTYPES = ("auto", "float8")


def auto_dtype(device: torch.device) -> torch.dtype:
    """What ``dtype="auto"`` picks on ``device``.

    CUDA: bfloat16 where the GPU has it (compute capability 8.0+), else float16 (both within the
    bounds of docs/benchmarks.md, "Reduced precision on CUDA"). CPU (and MPS): float32, also on
    CPUs with fast bfloat16 (AVX512-BF16, AMX): bfloat16 runs the forward about 1.6x faster there
    but moves scores by up to 5e-3 and maps by 2e-2 to 9e-2 on the golden images (docs/benchmarks.md,
    "Deviation of reduced precision from float32"), far outside the float32 parity bounds (1e-4,
    1e-3); ask for ``dtype="bfloat16"`` to take that trade.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_precision(dtype: str | torch.dtype | None, device: torch.device) -> tuple[torch.dtype, bool]:
    """A model's ``dtype`` option -> (the frozen CLIP's dtype, whether its vision linears run in float8).

    Besides :func:`resolve_dtype`'s values: ``"auto"`` (:func:`auto_dtype`) and ``"float8"`` (a
    bfloat16 CLIP whose vision blocks' linear layers run in float8, :mod:`anomalyclip.float8`).
    """
    if isinstance(dtype, str) and dtype.lower() in _FLOAT8_NAMES:
        return torch.bfloat16, True
    if isinstance(dtype, str) and dtype.lower() == "auto":
        return auto_dtype(device), False
    return resolve_dtype(dtype), False


def place_model(model, device: str | torch.device | None, dtype: str | torch.dtype | None):
    """``model.to(device, dtype)`` for an AnomalyCLIP (``model.clip.visual``), with ``"auto"`` / ``"float8"``.

    ``"float8"`` is checked before anything moves: on a device without float8 tensor cores it
    raises :class:`InvalidInputError` naming the device and the fix.
    """
    from .float8 import check_float8_supported
    from .vision import set_float8

    device = resolve_device(device)
    torch_dtype, use_float8 = resolve_precision(dtype, device)
    if use_float8:
        check_float8_supported(device)
    model = model.to(device=device, dtype=torch_dtype)
    set_float8(model.clip.visual, use_float8)
    return model


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
