"""float8 (e4m3) matrix products for the frozen vision tower on GPUs with float8 tensor cores.

``x @ W^T + b`` with both operands in ``torch.float8_e4m3fn`` and dynamic scaling, through
``torch._scaled_mm`` (cuBLASLt): each weight row (output feature) has its own scale, computed once
and cached beside the model (:class:`anomalyclip.weight_cache.WeightCache`, never saved); each
activation row (token) is scaled on the fly from its largest magnitude, so no calibration is
needed. On compute capability 9.0 and newer (H100, H200, B200) the scales are per row; on 8.9
(L4, L40, RTX 4090), whose cuBLASLt takes one scale per operand, per tensor. The product
accumulates in float32 and is written in bfloat16; attention, norms and everything else stay
bfloat16, the prompts and the scoring float32 (``dtype="float8"`` of the model).

Numerics: e4m3 keeps 3 mantissa bits (relative rounding 2^-4 = 6.25 % at worst, 1/32 on average
per element before accumulation); the per-row scale maps each row's largest magnitude to 448 (the
largest finite e4m3 value), so nothing overflows and no row loses its small values to another
row's large ones. :func:`reference_linear` computes the same product by dequantizing in float32,
the CPU test oracle of :func:`linear`.
"""

from __future__ import annotations

import functools

import torch

from .errors import InvalidInputError
from .weight_cache import WeightCache

__all__ = [
    "E4M3_MAX",
    "MIN_CAPABILITY",
    "float8_supported",
    "check_float8_supported",
    "eligible",
    "quantize_rows",
    "linear",
    "reference_linear",
]

E4M3_MAX = 448.0
MIN_CAPABILITY = (8, 9)
ROWWISE_CAPABILITY = (9, 0)
_EPS = 1e-12


def _has_float8_ops() -> bool:
    return hasattr(torch, "float8_e4m3fn") and hasattr(torch, "_scaled_mm")


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))  # type: ignore[return-value]


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def float8_supported(device: str | torch.device) -> bool:
    """Whether ``device`` is a CUDA GPU with float8 tensor cores (compute capability >= 8.9)."""
    device = torch.device(device)
    if device.type != "cuda" or not _has_float8_ops() or not torch.cuda.is_available():
        return False
    return _capability(_device_index(device)) >= MIN_CAPABILITY


def check_float8_supported(device: str | torch.device) -> None:
    """Raise :class:`InvalidInputError` naming the device and the fix unless ``device`` runs float8."""
    device = torch.device(device)
    if float8_supported(device):
        return
    if device.type != "cuda":
        what = f"the {device.type.upper()}"
    elif not torch.cuda.is_available():
        what = "a CUDA device, but CUDA is not available"
    elif not _has_float8_ops():
        what = f"a GPU, but PyTorch {torch.__version__} has no float8 matrix products (torch._scaled_mm)"
    else:
        major, minor = _capability(_device_index(device))
        what = f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    raise InvalidInputError(
        f"dtype='float8' needs a CUDA GPU with float8 tensor cores (compute capability "
        f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer: L4, L40, RTX 4090, H100, H200, B200); the model is on {what}. "
        "Use dtype='bfloat16' (or 'float16') on this device."
    )


def eligible(x2: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x2 @ weight^T`` can run in float8: 2-D weight, both dims multiples of 16 (cuBLASLt)."""
    return weight.ndim == 2 and weight.shape[0] % 16 == 0 and weight.shape[1] % 16 == 0 and x2.shape[-1] == weight.shape[1]


def quantize_rows(x: torch.Tensor, *, rowwise: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` -> (``float8_e4m3fn [M, K]``, float32 scale ``[M, 1]`` or ``[]``) with ``x ~ q * scale``.

    Each row's (or, with ``rowwise=False``, the tensor's) largest magnitude maps to :data:`E4M3_MAX`.
    """
    amax = x.abs().amax(dim=-1, keepdim=True) if rowwise else x.abs().amax()
    scale = amax.float().clamp(min=_EPS) / E4M3_MAX
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def _quantized_weight(weight: torch.Tensor, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    q, scale = quantize_rows(weight, rowwise=rowwise)  # [N, K], [N, 1] or []
    return q, (scale.t().contiguous() if rowwise else scale)  # scale as _scaled_mm's scale_b: [1, N]


_WEIGHTS = {True: WeightCache(lambda w: _quantized_weight(w, True)), False: WeightCache(lambda w: _quantized_weight(w, False))}


def _rowwise(device: torch.device) -> bool:
    if device.type != "cuda":
        return True  # the CPU emulation (tests)
    return _capability(_device_index(device)) >= ROWWISE_CAPABILITY


def linear(
    x2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    out_dtype: torch.dtype = torch.bfloat16,
    rowwise: bool | None = None,
) -> torch.Tensor:
    """``beta * bias + alpha * x2 @ weight^T`` with float8 operands: ``[M, K] x [N, K] -> [M, N]``.

    ``weight`` is quantized once (cached); ``x2`` on every call. ``alpha`` is folded into the
    weight scales (free); ``rowwise`` defaults to the device's capability (per-row scales on 9.0+).
    """
    rowwise = _rowwise(x2.device) if rowwise is None else rowwise
    wq, w_scale = _WEIGHTS[rowwise].get(weight)
    xq, x_scale = quantize_rows(x2, rowwise=rowwise)
    if bias is not None:
        bias = (bias * beta if beta != 1.0 else bias).to(out_dtype)
    scale_b = w_scale * alpha if alpha != 1.0 else w_scale
    try:
        return torch._scaled_mm(xq, wq.t(), scale_a=x_scale, scale_b=scale_b, bias=bias, out_dtype=out_dtype)
    except RuntimeError as exc:  # a PyTorch / cuBLASLt without a bias epilogue for this scaling
        if bias is None or "bias" not in str(exc).lower():
            raise
        return torch._scaled_mm(xq, wq.t(), scale_a=x_scale, scale_b=scale_b, out_dtype=out_dtype).add_(bias)


def reference_linear(
    x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, rowwise: bool = True
) -> torch.Tensor:
    """:func:`linear`'s arithmetic in float32 on dequantized operands (float32 out): the test oracle."""
    xq, xs = quantize_rows(x2, rowwise=rowwise)
    wq, ws = quantize_rows(weight, rowwise=rowwise)
    out = (xq.float() * xs) @ (wq.float() * ws).t()
    return out + bias.float() if bias is not None else out
