"""OpenVINO as a backend of :class:`~anomalyclip.onnx.OnnxAnomalyCLIP`: the same ``.onnx`` file, no torch.

OpenVINO reads the project's ONNX export unchanged (metadata included: its ONNX reader keeps the
file's ``metadata_props`` under the model's ``framework`` runtime info). :class:`OpenVINOSession`
compiles it for a device and answers the few calls :class:`~anomalyclip.onnx.OnnxAnomalyCLIP`
makes of an onnxruntime ``InferenceSession`` (``get_modelmeta``, ``get_inputs``,
``get_outputs``, ``get_providers``, ``run``), so the runtime's preprocessing, checks and
results are the same code for both backends.

Precision is always set explicitly: OpenVINO's CPU plugin otherwise computes in bfloat16 on
CPUs that have it (AVX512-BF16, AMX), which moves the tiny golden CLIP's scores by ~6e-3 and
its maps by ~3e-2. ``"f32"`` (default) matches onnxruntime and torch within the golden bounds;
``"bf16"`` is faster on such CPUs and its deviation is in docs/deployment.md.

Needs the optional dependency: ``pip install "anomalyclip[openvino]"``.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import CheckpointError, InvalidInputError, MissingDependencyError

__all__ = ["OpenVINOSession", "PRECISIONS", "import_openvino"]

#: Accepted precision names -> OpenVINO's ``INFERENCE_PRECISION_HINT`` value.
PRECISIONS = {"f32": "f32", "float32": "f32", "bf16": "bf16", "bfloat16": "bf16"}
#: The device the session compiles for (the CPU plugin; the only one this library tests).
DEVICE = "CPU"


def import_openvino() -> Any:
    """``import openvino``, or a :class:`~anomalyclip.errors.MissingDependencyError` naming the extra."""
    try:
        import openvino
    except ImportError as exc:
        raise MissingDependencyError(
            'The OpenVINO backend (backend="openvino") needs OpenVINO: pip install "anomalyclip[openvino]". '
            'Without it, use the default backend="onnxruntime" (pip install "anomalyclip[onnx]").'
        ) from exc
    return openvino


def resolve_precision(precision: str | None) -> str:
    """``"f32"`` (for None) or ``"bf16"`` from the accepted names; anything else is refused."""
    if precision is None:
        return "f32"
    key = precision.lower() if isinstance(precision, str) else precision
    if key not in PRECISIONS:
        raise InvalidInputError(
            f"precision must be one of {sorted(set(PRECISIONS))} for the OpenVINO backend, got {precision!r} "
            "(default 'f32': the golden float32 numerics)."
        )
    return PRECISIONS[key]


@dataclass(frozen=True)
class _Port:
    """An input or output as onnxruntime describes it: name, and shape with dynamic axes as strings."""

    name: str
    shape: list = field(default_factory=list)


@dataclass(frozen=True)
class _ModelMeta:
    custom_metadata_map: dict[str, str]


def _port(port: Any) -> _Port:
    shape = [int(d.get_length()) if d.is_static else str(d) for d in port.get_partial_shape()]
    return _Port(port.get_any_name(), shape)


def _metadata(model: Any) -> dict[str, str]:
    """The ONNX file's ``metadata_props`` as OpenVINO's ONNX reader kept them (empty if none)."""
    info = model.get_rt_info()
    if "framework" not in info:
        return {}
    props = info["framework"]
    props = props.astype(dict) if hasattr(props, "astype") else props
    return {str(k): (v.astype(str) if hasattr(v, "astype") else str(v)) for k, v in dict(props).items()}


class OpenVINOSession:
    """An ONNX export compiled by OpenVINO, behind the part of onnxruntime's session interface that
    :class:`~anomalyclip.onnx.OnnxAnomalyCLIP` uses.

    Args:
        path: the ``.onnx`` file (with its ``.onnx.data``, if it has one).
        precision: ``"f32"`` (default) or ``"bf16"`` (also ``"float32"`` / ``"bfloat16"``), set as
            OpenVINO's ``INFERENCE_PRECISION_HINT``. ``"bf16"`` needs a CPU with bfloat16
            arithmetic (AVX512-BF16 or AMX); elsewhere it is refused rather than silently run in
            float32.
        threads: OpenVINO's ``INFERENCE_NUM_THREADS`` (default: OpenVINO's, all cores).

    Raises:
        MissingDependencyError: openvino is not installed.
        InvalidInputError: an unknown precision, bf16 on a CPU without it, a bad thread count.
        CheckpointError: OpenVINO cannot read or compile the file.

    ``run`` may be called from several threads: the calls take turns on one infer request (each
    one already uses all the threads it was given).
    """

    def __init__(self, path: str | os.PathLike, *, precision: str | None = None, threads: int | None = None) -> None:
        ov = import_openvino()
        self.path = Path(path)
        self.precision = resolve_precision(precision)
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise InvalidInputError(f"threads must be a positive int, got {threads!r}.")
        core = ov.Core()
        if self.precision == "bf16":
            capabilities = core.get_property(DEVICE, "OPTIMIZATION_CAPABILITIES")
            if "BF16" not in capabilities:
                raise InvalidInputError(
                    f"precision='bf16' needs a CPU with bfloat16 arithmetic (AVX512-BF16 or AMX); this one offers "
                    f"{', '.join(capabilities)}. Use precision='f32'."
                )
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": "LATENCY"}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            model = core.read_model(str(self.path))
            self._compiled = core.compile_model(model, DEVICE, config)
        except Exception as exc:  # OpenVINO raises its own (RuntimeError-based) exception types
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(
                f"OpenVINO cannot load '{self.path}': {reason}. Expected an ONNX file written by `anomalyclip export` "
                "(a damaged or partial copy fails like this: copy it again, with its .onnx.data file if it has one)."
            ) from exc
        self._meta = _ModelMeta(_metadata(model))
        self._inputs = [_port(p) for p in self._compiled.inputs]
        self._outputs = [_port(p) for p in self._compiled.outputs]
        self._request = self._compiled.create_infer_request()
        self._lock = threading.Lock()

    def get_modelmeta(self) -> _ModelMeta:
        """The file's metadata (``.custom_metadata_map``: the ONNX ``metadata_props``)."""
        return self._meta

    def get_inputs(self) -> list[_Port]:
        return list(self._inputs)

    def get_outputs(self) -> list[_Port]:
        return list(self._outputs)

    def get_providers(self) -> list[str]:
        """What runs the graph, e.g. ``["OpenVINO CPU (f32)"]``."""
        return [f"OpenVINO {DEVICE} ({self.precision})"]

    def get_property(self, name: str) -> Any:
        """A property of the compiled model, e.g. ``"INFERENCE_PRECISION_HINT"``."""
        return self._compiled.get_property(name)

    def run(self, output_names: Sequence[str], feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs ``output_names`` for the inputs ``feed`` (name -> array), as onnxruntime's ``run``."""
        with self._lock:
            results = self._request.infer(dict(feed))
            # The request's output buffers are reused by the next call: copy them out.
            return [np.array(results[self._compiled.output(name)], copy=True) for name in output_names]
