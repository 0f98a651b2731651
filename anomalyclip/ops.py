"""Transformer numerics shared by the vision and text towers: linear maps, fused attention.

Everything here works on open_clip's own modules and weights, in place. On the CPU, bfloat16 /
float16 inputs can have their matrix products computed in float32 (see
:func:`set_cpu_low_precision_matmul`); everywhere else the inputs' dtype is kept.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .cpu_attention import attention as cpu_attention
from .cpu_linear import packed_linear, use_packed
from .float8 import eligible as float8_eligible
from .float8 import linear as float8_linear
from .errors import InvalidInputError
from .weight_cache import inference_only

__all__ = [
    "linear",
    "linear_silu",
    "project",
    "sdpa",
    "qkv_heads",
    "split_heads",
    "merge_heads",
    "out_proj",
    "attention",
    "matmul_dtype",
    "get_cpu_low_precision_matmul",
    "set_cpu_low_precision_matmul",
    "float8_matmuls",
    "plain_matmuls",
]

_CPU_LOW_PRECISION_POLICIES = ("auto", "native", "float32")
_cpu_low_precision_matmul = "auto"  # process-wide, like torch.backends flags; see the setter

@functools.lru_cache(maxsize=None)
def _cpu_has_fast_kernel(dtype: torch.dtype) -> bool:
    """Whether PyTorch's CPU matrix products in ``dtype`` go to oneDNN (else: a slow generic loop)."""
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if dtype == torch.float16:
            return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):  # no oneDNN in this build: trust the native path
        return True
    return True


def set_cpu_low_precision_matmul(policy: str) -> str:
    """Choose how bfloat16 / float16 matrix products and attention run on the CPU (process-wide).

    Args:
        policy: ``"auto"`` (the default: in float32 when this PyTorch build has no fast oneDNN
            kernel for the dtype on this CPU, e.g. AVX2-only x86 where bfloat16 GEMMs run about
            15x slower than float32; natively otherwise), ``"native"`` (always in the dtype) or
            ``"float32"`` (always in float32). Inputs and results keep the model's dtype either
            way; only the arithmetic in between differs.

    Returns:
        The previous policy, to restore it later.
    """
    global _cpu_low_precision_matmul
    if policy not in _CPU_LOW_PRECISION_POLICIES:
        raise InvalidInputError(
            f"Unknown CPU low-precision matmul policy {policy!r}; use one of {', '.join(_CPU_LOW_PRECISION_POLICIES)}."
        )
    previous, _cpu_low_precision_matmul = _cpu_low_precision_matmul, policy
    return previous


def get_cpu_low_precision_matmul() -> str:
    """The current policy of :func:`set_cpu_low_precision_matmul`."""
    return _cpu_low_precision_matmul


def matmul_dtype(x: torch.Tensor) -> torch.dtype | None:
    """float32 if ``x``'s matrix products should be computed in float32 (see set_cpu_low_precision_matmul)."""
    if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float16):
        return None
    policy = _cpu_low_precision_matmul
    if policy == "native" or (policy == "auto" and _cpu_has_fast_kernel(x.dtype)):
        return None
    return torch.float32


# Whether linear() runs its CUDA products in float8 (anomalyclip.float8): set by the vision forward
# of a model with dtype="float8" for its own duration (a context variable: per thread and task).
_FLOAT8 = contextvars.ContextVar("anomalyclip_float8_matmuls", default=False)


# Set while a forward is traced for export (vision.encode_image(traceable=True)): the plain
# operators only, whatever the tracer (jit, dynamo, make_fx) reports about itself.
_PLAIN = contextvars.ContextVar("anomalyclip_plain_matmuls", default=False)


@contextlib.contextmanager
def plain_matmuls() -> Iterator[None]:
    """Within the block, :func:`linear` uses neither packed CPU weights nor float8 (for export)."""
    token = _PLAIN.set(True)
    try:
        yield
    finally:
        _PLAIN.reset(token)


@contextlib.contextmanager
def float8_matmuls(enable: bool = True) -> Iterator[None]:
    """Within the block, :func:`linear` runs eligible CUDA products in float8 (see :mod:`anomalyclip.float8`)."""
    token = _FLOAT8.set(enable)
    try:
        yield
    finally:
        _FLOAT8.reset(token)


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, alpha: float = 1.0, beta: float = 1.0
) -> torch.Tensor:
    """``beta * bias + alpha * x @ weight^T`` over the last dimension of ``x``, in ``x``'s dtype.

    On the CPU, outside autograd, the product runs through oneDNN with ``weight`` packed once where
    that is the faster kernel (see :mod:`anomalyclip.cpu_linear`); on CUDA within
    :func:`float8_matmuls`, in float8 (see :mod:`anomalyclip.float8`).
    """
    return _linear(x, weight, bias, alpha, beta, allow_float8=True)


def _linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, alpha: float, beta: float, allow_float8: bool
) -> torch.Tensor:
    dtype = x.dtype
    up = matmul_dtype(x)
    if up is not None:
        x, weight = x.to(up), weight.to(up)
        bias = bias.to(up) if bias is not None else None
    x2 = x.reshape(-1, x.shape[-1])
    plain = _PLAIN.get()
    if (
        allow_float8
        and not plain
        and x.device.type == "cuda"
        and _FLOAT8.get()
        and float8_eligible(x2, weight)
        and inference_only(x2, weight)
    ):
        out = float8_linear(x2, weight, bias, alpha=alpha, beta=beta, out_dtype=dtype)
        return out.view(*x.shape[:-1], weight.shape[0])
    if up is None and not plain and use_packed(x2, weight):
        # alpha is folded into the packed weight, beta into the (small) bias: no pass over the output.
        if bias is not None and beta != 1.0:
            bias = bias * beta
        return packed_linear(x2, weight, bias, scale=alpha).to(dtype).view(*x.shape[:-1], weight.shape[0])
    if bias is not None and beta != 1.0 and x.device.type == "cuda":
        # cuBLASLt adds a bias in the GEMM's epilogue only for beta == 1; otherwise PyTorch first
        # writes the broadcast bias into the whole output. Scaling the (small) bias is cheaper.
        bias, beta = bias * beta, 1.0
    if bias is None:
        out = torch.mm(x2, weight.t())
        if alpha != 1.0:
            out.mul_(alpha)
    elif alpha == 1.0 and beta == 1.0:
        out = F.linear(x2, weight, bias)
    else:
        out = torch.addmm(bias, x2, weight.t(), beta=beta, alpha=alpha)
    return out.to(dtype).view(*x.shape[:-1], weight.shape[0])


def linear_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """``silu(scale * (x @ weight^T + bias))`` for inference (no autograd: the SiLU may run in place).

    With QuickGELU's ``scale = 1.702`` this is ``1.702 * QuickGELU(x @ weight^T + bias)``. On the CPU's
    oneDNN path the scale sits in the packed weight and the SiLU in the GEMM's epilogue (one pass);
    elsewhere the GEMM applies the scale (alpha / beta) and one in-place SiLU follows.
    """
    x2 = x.reshape(-1, x.shape[-1])
    if matmul_dtype(x) is None and not _PLAIN.get() and use_packed(x2, weight):
        out = packed_linear(x2, weight, bias * scale, scale=scale, silu=True)
        return out.view(*x.shape[:-1], weight.shape[0])
    return F.silu(linear(x, weight, bias, alpha=scale, beta=scale), inplace=True)


def project(x: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """``x @ proj`` for a ``[W, D]`` projection matrix (never in float8: it feeds the scoring)."""
    return _linear(x, proj.t(), None, 1.0, 1.0, allow_float8=False)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
    """``scaled_dot_product_attention``; in float32 where :func:`_linear` would be.

    Non-causal float32 attention on the CPU may run head by head through oneDNN where that is
    faster (:mod:`anomalyclip.cpu_attention`); within :func:`plain_matmuls` it is always fused.
    """
    up = matmul_dtype(q)
    if up is None:
        if not causal and q.device.type == "cpu" and not _PLAIN.get():
            return cpu_attention(q, k, v)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return F.scaled_dot_product_attention(q.to(up), k.to(up), v.to(up), is_causal=causal).to(q.dtype)


def qkv_heads(attn: nn.MultiheadAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Project ``x [B, N, W]`` with the attention's packed in-projection to q, k, v ``[B, H, N, W/H]`` (views)."""
    b, n, w = x.shape
    heads = attn.num_heads
    qkv = linear(x, attn.in_proj_weight, attn.in_proj_bias)  # [B, N, 3W]
    qkv = qkv.view(b, n, 3, heads, w // heads).permute(2, 0, 3, 1, 4)  # [3, B, H, N, W/H]
    return qkv[0], qkv[1], qkv[2]


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[..., H, N, W/H] -> [..., N, W]``."""
    *lead, h, n, d = x.shape
    return x.transpose(-3, -2).reshape(*lead, n, h * d)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, N, W] -> [B, H, N, W/H]`` (a view)."""
    b, n, w = x.shape
    return x.view(b, n, heads, w // heads).transpose(1, 2)


def out_proj(attn: nn.MultiheadAttention, o: torch.Tensor) -> torch.Tensor:
    """The out-projection of per-head attention outputs ``[B, H, N, d] -> [B, N, W]``."""
    return linear(merge_heads(o), attn.out_proj.weight, attn.out_proj.bias)


def attention(block: nn.Module, x: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
    """Standard multi-head self-attention of an open_clip block on ``x [B, N, W]`` (already ln_1'd)."""
    q, k, v = qkv_heads(block.attn, x)
    return out_proj(block.attn, sdpa(q, k, v, causal=causal))


