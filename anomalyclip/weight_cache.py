"""Derived copies of weights (packed for a CPU kernel, quantized to float8), kept beside the model.

A :class:`WeightCache` maps a weight tensor to ``make(weight)``, computed once. It is never part of
the model: not a parameter or buffer (``state_dict`` and saved files are unchanged), keyed on the
weight's root tensor and its storage address, version counter, dtype and device (so
``model.to(...)``, ``load_state_dict`` and in-place updates rebuild it), separately for each view
of one weight (e.g. slices of an attention's packed in-projection), and dropped when the weight is.
"""

from __future__ import annotations

import weakref
from typing import Callable, Generic, TypeVar

import torch
from torch.autograd.forward_ad import unpack_dual

__all__ = ["WeightCache", "inference_only"]

T = TypeVar("T")


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return 0


class WeightCache(Generic[T]):
    """``get(weight, scale)`` returns ``make(weight * scale)``, computed once per weight and scale (see the module doc)."""

    def __init__(self, make: Callable[[torch.Tensor], T]) -> None:
        self._make = make
        # id(root) -> (weak reference to root, (address, version, dtype, device), {view: derived})
        self._entries: dict[int, tuple[weakref.ref, tuple, dict[tuple, T]]] = {}

    def _drop(self, key: int, ref: weakref.ref) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry[0] is ref:
            del self._entries[key]

    def get(self, weight: torch.Tensor, scale: float = 1.0) -> T:
        root = weight._base if weight._base is not None else weight
        generation = (root.data_ptr(), _version(root), root.dtype, root.device)
        entry = self._entries.get(id(root))
        if entry is None or entry[0]() is not root or entry[1] != generation:
            ref = weakref.ref(root, lambda r, k=id(root): self._drop(k, r))
            entry = (ref, generation, {})
            self._entries[id(root)] = entry
        view = (weight.data_ptr(), tuple(weight.shape), weight.stride(), scale)
        derived = entry[2].get(view)
        if derived is None:
            source = weight.detach()
            derived = entry[2][view] = self._make(source * scale if scale != 1.0 else source)
        return derived

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return sum(len(entry[2]) for entry in self._entries.values())


def _autocast_enabled(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # torch < 2.4: no device argument
        return bool(torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled())


def inference_only(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight^T`` may use a derived kernel: no autograd recording (reverse or forward
    mode), autocast, tracing or compiling.

    Derived kernels (oneDNN's packed op, float8 ``_scaled_mm``) have no derivatives and keep their
    inputs' dtype (autocast would change it), and a trace or an ONNX export must record the plain
    operator.
    """
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    if unpack_dual(x).tangent is not None or unpack_dual(weight).tangent is not None:
        return False  # forward-mode AD (torch.func.jvp, forward_ad.dual_level)
    if _autocast_enabled(x.device.type):
        return False
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return False
    return not torch.onnx.is_in_onnx_export()
