"""onnxruntime dynamic int8 quantization of an export (smaller file; speed depends on the CPU).

Weights of the matrix products become int8 (per output channel); activations are quantized on
the fly per tensor. The few-shot references' nearest-neighbour products stay float32. The deviation from float32 is measured, not assumed: see
``benchmarks/bench_onnx.py`` and docs/benchmarks.md. No torch needed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, InvalidInputError
from ..files import give_default_mode
from .metadata import REFERENCE_BUFFER_PREFIX, OnnxMetadata

__all__ = ["quantize_int8", "QUANTIZATION"]

#: The ``quantization`` metadata value of a :func:`quantize_int8` copy.
QUANTIZATION = "int8-dynamic"


def _gemm_to_matmul(model: Any) -> int:
    """Rewrite ``Gemm(A, W, b)`` with a constant ``W`` as ``MatMul(A, W') + b`` (in place); returns the count.

    onnxruntime's dynamic quantization handles ``MatMul`` (and ``Conv``) only, while PyTorch
    exports linear layers on 2-D inputs as ``Gemm``. Only plain ``Gemm`` nodes (alpha = beta = 1,
    A not transposed) are rewritten; the result is the same arithmetic.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    nodes = list(graph.node)
    rewritten = 0
    new_nodes = []
    for node in nodes:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = (
            node.op_type == "Gemm"
            and node.domain in ("", "ai.onnx")
            and attrs.get("transA", 0) == 0
            and attrs.get("alpha", 1.0) == 1.0
            and attrs.get("beta", 1.0) == 1.0
            and len(node.input) >= 2
            and node.input[1] in initializers
        )
        if not plain:
            new_nodes.append(node)
            continue
        a, w = node.input[0], node.input[1]
        if attrs.get("transB", 0):
            weight = numpy_helper.to_array(initializers[w]).T.copy()
            w_name = f"{w}__transposed_{rewritten}"
            graph.initializer.append(numpy_helper.from_array(weight, w_name))
        else:
            w_name = w
        has_bias = len(node.input) >= 3 and node.input[2] != ""
        out = node.output[0]
        product = f"{out}__matmul" if has_bias else out
        new_nodes.append(helper.make_node("MatMul", [a, w_name], [product], name=f"{node.name}__matmul"))
        if has_bias:
            new_nodes.append(helper.make_node("Add", [product, node.input[2]], [out], name=f"{node.name}__bias"))
        rewritten += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    used = {name for node in graph.node for name in node.input}
    unused = [init for init in graph.initializer if init.name not in used]
    for init in unused:  # weights only the rewritten Gemms read, now transposed copies
        graph.initializer.remove(init)
    return rewritten


def _reference_products(model: Any, metadata: OnnxMetadata, source: str) -> list[str]:
    """Names of the ``MatMul`` nodes of the few-shot nearest-neighbour search, kept in float32.

    Their "weights" are the reference memory: quantizing it to int8 would move cosine
    similarities near 1 by about 1e-2, the size of the distances that make the reference map.
    """
    names = [
        node.name
        for node in model.graph.node
        if node.op_type == "MatMul" and any(name.startswith(REFERENCE_BUFFER_PREFIX) for name in node.input)
    ]
    if metadata.references and (len(names) < len(metadata.feature_layers) or not all(names)):
        raise CheckpointError(
            f"'{source}' holds {metadata.references} reference image(s), but its nearest-neighbour products were not "
            "found in the graph (renamed by another tool?). Quantize the file written by anomalyclip export."
        )
    return names


def quantize_int8(source: str | os.PathLike, destination: str | os.PathLike, *, per_channel: bool = True) -> Path:
    """Write an onnxruntime dynamic-int8 copy of the anomalyclip export ``source`` to ``destination``.

    Args:
        source: a float32 export (``anomalyclip export`` / ``AnomalyCLIP.export_onnx``).
        destination: the ``.onnx`` file to write (its metadata is the source's, plus
            ``quantization = "int8-dynamic"``).
        per_channel: int8 scales per output channel of each weight (default) rather than per
            tensor; per-channel deviates less from float32.

    Returns:
        ``destination``.

    Raises:
        CheckpointError: ``source`` is not an anomalyclip export, or is already quantized.
        InvalidInputError: ``source`` is a float16 export (quantize the float32 one).
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source, destination = Path(source), Path(destination)
    if not source.is_file():
        raise CheckpointError(f"No ONNX file at '{source}'; export one first (anomalyclip export --format onnx).")
    try:
        model = onnx.load(str(source), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others
        raise CheckpointError(f"Cannot read '{source}' as ONNX: {exc}") from exc
    props = {p.key: p.value for p in model.metadata_props}
    metadata = OnnxMetadata.from_props(props, str(source))
    if metadata.quantization is not None:
        raise CheckpointError(f"'{source}' is already quantized ({metadata.quantization}); quantize the float32 export.")
    if metadata.dtype != "float32":
        raise InvalidInputError(f"'{source}' is a {metadata.dtype} export; int8 quantization starts from a float32 export.")
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        tmp = tmp_dir / destination.name
        # onnxruntime's basic graph optimizations fold the weight slices and transposes into
        # constants (only constant weights are quantized), with shape inference for the quantizer.
        prepared = tmp_dir / "prepared.onnx"
        external = source.with_name(source.name + ".data").exists()
        quant_pre_process(
            str(source), str(prepared), skip_symbolic_shape=True, save_as_external_data=external, all_tensors_to_one_file=True
        )
        model = onnx.load(str(prepared))
        _gemm_to_matmul(model)
        exclude = _reference_products(model, metadata, str(source))
        quantize_dynamic(
            model,
            tmp,
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
            nodes_to_exclude=exclude,
        )
        quantized = onnx.load(str(tmp))
        entries = {p.key: p.value for p in quantized.metadata_props}
        entries.update(props)  # the source's metadata, whatever the quantizer kept
        entries["anomalyclip.quantization"] = json.dumps(QUANTIZATION)
        del quantized.metadata_props[:]
        for key, value in sorted(entries.items()):
            quantized.metadata_props.add(key=key, value=value)
        onnx.save(quantized, str(tmp))
        give_default_mode(tmp)
        os.replace(tmp, destination)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return destination
