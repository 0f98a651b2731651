"""CPU matrix products through oneDNN with weights packed once, chosen per weight shape by measurement.

PyTorch's ``F.linear`` on the CPU calls MKL's sgemm for float32. On AMD EPYC, oneDNN's GEMM on a
weight reordered once into its blocked layout (``torch.ops.mkldnn._linear_pointwise`` on
``torch.ops.mkldnn._reorder_linear_weight``) runs about 2x faster for the transformer's shapes (183
against 375 GFLOP/s, measured on a 2-core EPYC); on
the Intel Xeon measured here (AVX-512, AMX) the two tie, and elsewhere (small shapes, Arm) MKL or
the default path can be the faster one. So the backend is a process-wide choice
(:func:`set_cpu_linear_backend`, or the environment variable ``ANOMALYCLIP_CPU_LINEAR``):

- ``"auto"`` (default): for each (dtype, in_features, out_features) met, a micro-benchmark of
  both kernels on that shape (512 rows, interleaved, best of 3; a few milliseconds to a few
  hundred, once per process and thread count) picks the faster; :func:`clear_auto_choices`
  forgets the measurements;
- ``"onednn"``: always oneDNN with packed weights (where this PyTorch build has it);
- ``"mkl"``: always ``F.linear`` (MKL for float32; PyTorch's own choice for other dtypes).

Packed weights are a cache beside the model (:class:`anomalyclip.weight_cache.WeightCache`), never
part of it: not parameters or buffers (``state_dict`` and saved files are unchanged), rebuilt when
the weight changes (``model.to(...)``, ``load_state_dict``, in-place updates) and dropped with it.
They cost one extra copy of the packed weights in memory. The packed path is for inference only:
:func:`use_packed` refuses it whenever autograd records (training, fine-tuning; forward mode too),
under autocast, and while tracing, compiling or exporting.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from .kernel_choice import KernelChoice, best_seconds
from .weight_cache import WeightCache, inference_only

__all__ = [
    "CPU_LINEAR_BACKENDS",
    "set_cpu_linear_backend",
    "get_cpu_linear_backend",
    "onednn_linear_available",
    "use_packed",
    "packed_linear",
    "clear_packed_weights",
    "auto_choices",
    "clear_auto_choices",
]

logger = logging.getLogger(__name__)

CPU_LINEAR_BACKENDS = ("auto", "mkl", "onednn")
ENV_VAR = "ANOMALYCLIP_CPU_LINEAR"
_PROBE_ROWS = 512
_PROBE_REPEATS = 3


_SETTINGS = KernelChoice("CPU linear", ENV_VAR, CPU_LINEAR_BACKENDS)  # choices: (dtype, in, out) -> oneDNN faster


def set_cpu_linear_backend(backend: str) -> str:
    """Choose the CPU kernel of the models' matrix products (process-wide); returns the previous one.

    Args:
        backend: ``"auto"`` (measure both kernels once per weight shape and keep the faster),
            ``"onednn"`` (oneDNN with packed weights where available) or ``"mkl"`` (``F.linear``).
            Switching keeps what ``"auto"`` measured.
    """
    return _SETTINGS.set(backend)


def get_cpu_linear_backend() -> str:
    """The current backend of :func:`set_cpu_linear_backend` (first read from ``ANOMALYCLIP_CPU_LINEAR``)."""
    return _SETTINGS.get()


def auto_choices() -> dict[str, str]:
    """What ``"auto"`` measured so far: ``"in x out (dtype, N threads)"`` -> ``"onednn"`` or ``"mkl"``."""
    return {
        f"{k} x {n} ({str(dtype).removeprefix('torch.')}, {threads} threads)": "onednn" if packed else "mkl"
        for ((dtype, k, n), threads), packed in _SETTINGS.choices.items()
    }


def clear_auto_choices() -> None:
    """Forget what ``"auto"`` measured: the next forward measures each shape again."""
    _SETTINGS.clear()


@functools.lru_cache(maxsize=None)
def onednn_linear_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this PyTorch build has oneDNN's packed linear for ``dtype`` on this CPU."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        torch.ops.mkldnn._linear_pointwise  # noqa: B018 (raises where the op is missing)
        torch.ops.mkldnn._reorder_linear_weight  # noqa: B018
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
    return dtype == torch.float32


# ----------------------------------------------------------------------------- packed weights

_PACKS: WeightCache[torch.Tensor] = WeightCache(
    lambda weight: torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), _PROBE_ROWS)
)


def clear_packed_weights() -> None:
    """Free every packed weight (they are rebuilt on the next CPU forward)."""
    _PACKS.clear()


def _onednn(
    x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: float = 1.0, activation: str = "none"
) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x2, _PACKS.get(weight, scale), bias, activation, [], "")


def _measure(weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether oneDNN (packed) beats ``F.linear`` on ``weight``'s shape (512 random rows)."""
    x = torch.randn(_PROBE_ROWS, weight.shape[1], dtype=weight.dtype)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), _PROBE_ROWS)  # not cached: a probe

    def onednn_call() -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    def plain_call() -> torch.Tensor:
        return F.linear(x, weight, bias)

    onednn, plain = best_seconds(onednn_call, plain_call, _PROBE_REPEATS)
    logger.debug(
        "CPU linear %s x %s (%s): oneDNN packed %.2f ms, F.linear %.2f ms",
        tuple(weight.shape), _PROBE_ROWS, weight.dtype, onednn * 1e3, plain * 1e3,
    )
    return onednn < plain


def use_packed(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight^T`` should run through oneDNN with a packed weight (see the module doc)."""
    if x.device.type != "cpu" or weight.device.type != "cpu" or x.dtype != weight.dtype or weight.ndim != 2:
        return False
    if not inference_only(x, weight):
        return False  # autograd records (oneDNN's packed op has no backward), or a trace / export
    backend = get_cpu_linear_backend()
    if backend == "mkl" or not onednn_linear_available(x.dtype):
        return False
    if backend == "onednn":
        return True
    def measure() -> bool:
        with torch.no_grad():
            return _measure(weight, None)

    return _SETTINGS.choose((weight.dtype, weight.shape[1], weight.shape[0]), measure)


def packed_linear(
    x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, scale: float = 1.0, silu: bool = False
) -> torch.Tensor:
    """``act(x2 @ (scale * weight)^T + bias)`` for ``x2 [M, K]``, ``weight [N, K]`` through oneDNN.

    The weight is packed once per ``scale`` (the scale folded into the packed copy: no pass over
    the output); ``silu`` applies SiLU in the GEMM's epilogue (oneDNN's ``swish``).
    """
    return _onednn(x2, weight, bias, scale, "swish" if silu else "none")
