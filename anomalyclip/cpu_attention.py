"""CPU attention head by head through oneDNN, where it beats fused SDPA, chosen per shape by measurement.

PyTorch's fused ``scaled_dot_product_attention`` on the CPU computes its blocks with the BLAS's
float32 GEMM (MKL), which on some CPUs (AMD EPYC) runs at about half of oneDNN's rate. There an
explicit form may win (not yet measured on such a CPU; with MKL held to its AVX2 code on an Intel
Xeon the two tie): per head, ``s = (q / sqrt(d)) k^T`` in one oneDNN product, the softmax in
place on ``s``, then ``s v`` through oneDNN. Where MKL is fast (Intel), the fused kernel wins
(docs/benchmarks.md, "CPU kernels"). So, like :mod:`anomalyclip.cpu_linear`, this is a process-wide
choice (:func:`set_cpu_attention_backend`, or the environment variable ``ANOMALYCLIP_CPU_ATTENTION``):

- ``"auto"`` (default): for each (dtype, heads, query rows, keys, head size) met, the first call
  times both forms on its own first sample (interleaved, best of 3 after a warm-up: about half a
  second for ViT-L at 518 px, once per process and thread count) and keeps the explicit form only
  where it is at least 5 % faster; :func:`clear_auto_choices` forgets the measurements;
- ``"sdpa"``: always the fused kernel;
- ``"onednn"``: always the explicit form where it applies.

The explicit form applies to float32 CPU inputs ``q [B, H, N, d]``, ``k, v [B, H, M, d]`` (same
batch, heads and head size, no broadcasting, at least one key) without a causal mask and with at
least :data:`MIN_QUERY_ROWS` query rows (a class-token query stays fused), for inference only: under
autograd (reverse or forward mode), autocast, tracing, compiling and ONNX export the fused kernel
runs. The two forms agree to float32 rounding (a few 1e-7 on unit-scale inputs). The explicit form
holds at most :data:`SCORE_BLOCK_ELEMENTS` scores at a time (16 MB: a whole head at 518 px, row
blocks on larger images).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .cpu_linear import onednn_linear_available
from .kernel_choice import KernelChoice, best_seconds
from .weight_cache import inference_only

__all__ = [
    "CPU_ATTENTION_BACKENDS",
    "MIN_QUERY_ROWS",
    "SCORE_BLOCK_ELEMENTS",
    "set_cpu_attention_backend",
    "get_cpu_attention_backend",
    "attention",
    "explicit_attention",
    "auto_choices",
    "clear_auto_choices",
]

logger = logging.getLogger(__name__)

CPU_ATTENTION_BACKENDS = ("auto", "sdpa", "onednn")
ENV_VAR = "ANOMALYCLIP_CPU_ATTENTION"
MIN_QUERY_ROWS = 64
#: Largest score block (query rows x keys) held at once: 16 MB in float32. A whole head up to
#: 2,048 tokens (518 px: 1,370), row blocks beyond, so memory stays bounded at any image size.
SCORE_BLOCK_ELEMENTS = 1 << 22
_MARGIN = 0.95  # "auto" keeps the explicit form only if it takes under 95 % of the fused kernel's time
_PROBE_REPEATS = 3


_SETTINGS = KernelChoice("CPU attention", ENV_VAR, CPU_ATTENTION_BACKENDS)  # choices: shape -> explicit faster


def set_cpu_attention_backend(backend: str) -> str:
    """Choose the CPU attention kernel (process-wide); returns the previous one.

    Args:
        backend: ``"auto"`` (measure both forms once per shape and keep the faster), ``"sdpa"``
            (always the fused kernel) or ``"onednn"`` (the explicit per-head form where it applies).
            Switching keeps what ``"auto"`` measured.
    """
    return _SETTINGS.set(backend)


def get_cpu_attention_backend() -> str:
    """The current backend (first read from ``ANOMALYCLIP_CPU_ATTENTION``, default ``"auto"``)."""
    return _SETTINGS.get()


def auto_choices() -> dict[str, str]:
    """What ``"auto"`` measured so far: ``"heads x rows x keys x head size (dtype, N threads)"`` ->
    ``"onednn"`` or ``"sdpa"``."""
    return {
        f"{h} x {n} x {m} x {d} ({str(dtype).removeprefix('torch.')}, {threads} threads)": "onednn" if explicit else "sdpa"
        for ((dtype, h, n, m, d), threads), explicit in _SETTINGS.choices.items()
    }


def clear_auto_choices() -> None:
    """Forget what ``"auto"`` measured: the next forward measures each shape again."""
    _SETTINGS.clear()


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) v`` head by head through oneDNN (CPU, float32, no autograd).

    Args:
        q: ``[B, H, N, d]`` queries (views with any strides).
        k, v: ``[B, H, M, d]`` keys and values.

    Returns:
        ``[B, H, N, d]``, laid out as ``[B, N, H, d]`` in memory (as the fused kernel returns it for
        views of one qkv projection), so that merging the heads is a view. Scores are held for at
        most :data:`SCORE_BLOCK_ELEMENTS` (query row, key) pairs at a time.
    """
    b, h, n, d = q.shape
    linear = torch.ops.mkldnn._linear_pointwise
    qs = (q * d**-0.5).contiguous()
    kc = k.contiguous()
    vt = v.transpose(-1, -2).contiguous()  # [B, H, d, M]: s @ v as a product with a [d, M] weight
    out = torch.empty(b, n, h, d, dtype=q.dtype)
    rows = max(1, min(n, SCORE_BLOCK_ELEMENTS // k.shape[-2]))  # query rows per score block
    for i in range(b):
        for j in range(h):
            for r in range(0, n, rows):
                s = linear(qs[i, j, r : r + rows], kc[i, j], None, "none", [], "")  # [rows, M] scores
                torch.softmax(s, -1, out=s)
                out[i, r : r + rows, j] = linear(s, vt[i, j], None, "none", [], "")
    return out.transpose(1, 2)


def _applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return (
        q.device.type == "cpu"
        and q.dtype == k.dtype == v.dtype == torch.float32
        and q.ndim == k.ndim == v.ndim == 4
        and inference_only(q, k)  # first: under a trace the shapes below are traced values
        and inference_only(v, k)
        and q.shape[:2] == k.shape[:2] == v.shape[:2]  # no broadcast batch or heads
        and q.shape[-1] == k.shape[-1] == v.shape[-1]
        and k.shape[-2] == v.shape[-2] >= 1
        and q.shape[-2] >= MIN_QUERY_ROWS
        and onednn_linear_available(torch.float32)
    )


def _explicit_is_faster(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Time both forms on the first sample of the batch (interleaved, best of 3 after a warm-up)."""
    q1, k1, v1 = q[:1], k[:1], v[:1]

    def fused() -> torch.Tensor:
        return F.scaled_dot_product_attention(q1, k1, v1)

    def explicit() -> torch.Tensor:
        return explicit_attention(q1, k1, v1)

    fused_s, explicit_s = best_seconds(fused, explicit, _PROBE_REPEATS)
    logger.debug(
        "CPU attention %s: fused SDPA %.2f ms, oneDNN per head %.2f ms", tuple(q1.shape), fused_s * 1e3, explicit_s * 1e3
    )
    return explicit_s < _MARGIN * fused_s


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal ``softmax(q k^T / sqrt(d)) v`` for ``q [B, H, N, d]``, ``k, v [B, H, M, d]``.

    The explicit oneDNN form where it applies and the backend picks it (see the module doc), else
    fused ``scaled_dot_product_attention``.
    """
    backend = get_cpu_attention_backend()
    if backend == "sdpa" or not _applies(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "auto":
        key = (q.dtype, q.shape[1], q.shape[2], k.shape[2], q.shape[3])
        if not _SETTINGS.choose(key, lambda: _explicit_is_faster(q, k, v)):
            return F.scaled_dot_product_attention(q, k, v)
    return explicit_attention(q, k, v)
