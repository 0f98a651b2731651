"""Inference throughput of AnomalyCLIP against the machine's own matrix-product throughput.

Builds a ViT-L-14-336-sized CLIP with random weights (no download; the speed does not depend on
the values; on CUDA it is built directly on the GPU), wraps it with
``AnomalyCLIP.from_clip(..., image_size=518)`` and times the full ``model(pixel_values)`` forward
(DPAM vision forward, scores, maps, blur; the text features are computed once and cached, as in
normal use) for each dtype and batch size, with the input already on the device (the forward
alone; ``--predict`` measures the whole ``predict`` pipeline from image files). It prints
images/s, time per batch, peak memory, the matrix-product FLOPs per image
(:func:`anomalyclip.flops.count_inference_flops`), the achieved FLOP/s and, measured in the same
run with the same device, dtype and threads, the throughput of plain large matrix products.
Their ratio is the headline figure.

``--mode official`` (or ``both``) also times a straightforward "official-style" forward, written
like the official release: per-block materialized ``softmax(q k^T)`` / ``softmax(v v^T)`` attention
matrices, separate original and V-V passes, every token through every block (no class-token
shortcut in the last block). The two forwards run on the same inputs and their outputs are
compared, so the speed-up is measured, not claimed.

On CUDA: times come from CUDA events around each forward (after ``--warmup`` untimed ones);
the figures use the median of ``--repeats``. ``--cuda-graph 1,8`` also times the forward
captured in a CUDA graph (``torch.cuda.CUDAGraph``; the forward has no host synchronization,
so it can be captured) for those batch sizes; ``--profile 1,32`` runs ``torch.profiler`` over one
forward at those batch sizes (first dtype of ``--profile-dtype``) and prints the kernels that
take the time and how busy the GPU was.

Usage::

    python benchmarks/bench_inference.py                                  # batch 1 and 8, float32
    python benchmarks/bench_inference.py --batch-sizes 1 --mode both --threads 2 --repeats 3
    python benchmarks/bench_inference.py --dtype bfloat16 --batch-sizes 1
    python benchmarks/bench_inference.py --device cuda --dtype float32,float16,bfloat16 \\
        --batch-sizes 1,8,32 --mode both --cuda-graph 1,8 --profile 1,32 --predict 128 --markdown gpu.md
    python benchmarks/bench_inference.py --compile                        # torch.compile the vision blocks
    python benchmarks/bench_inference.py --model tiny --image-size 112 --batch-sizes 1,2   # seconds (dry run)

On CPU, peak memory is the rise of the process's resident-set high-water mark (``VmHWM`` in
``/proc/self/status``, reset through ``/proc/self/clear_refs`` before each measurement) over the
resident set before it; on CUDA it is ``torch.cuda.max_memory_allocated`` over the allocation
before it. "other CPU s" is the CPU time that other processes used during the timed forwards
(from ``/proc/stat``): anything well above 0 means the figures are not clean (shared machine).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from anomalyclip import AnomalyCLIP
from anomalyclip.flops import ModelDims, count_inference_flops
from anomalyclip.runtime import resolve_dtype
from anomalyclip import cpu_attention, cpu_linear, float8, ops, vision
from anomalyclip.vision import VisionFeatures, embed_patches

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "golden"

#: Issue 14's targets for ViT-L/14@336 at 518 px on an H100 (checked when they apply).
TARGET_FLOAT8_B32_IMAGES_PER_S = 500.0  # issue 23
TARGET_FLOAT8_OVER_BF16 = 1.3
TARGET_BF16_B32_IMAGES_PER_S = 400.0
TARGET_SPEEDUP_OVER_OFFICIAL = 5.0
TARGET_B1_LATENCY_MS = 15.0

# ---------------------------------------------------------------------------- official-style forward


def _official_attention(block: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The release's DPAM ``Attention``: both paths with materialized attention matrices."""
    attn = block.attn
    b, n, w = x.shape
    heads = attn.num_heads
    scale = (w // heads) ** -0.5
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).reshape(b, n, 3, heads, w // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn_ori = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
    attn_vv = ((v @ v.transpose(-2, -1)) * scale).softmax(dim=-1)
    x_ori = (attn_ori @ v).transpose(1, 2).reshape(b, n, w)
    x_vv = (attn_vv @ v).transpose(1, 2).reshape(b, n, w)
    return attn.out_proj(x_vv), attn.out_proj(x_ori)


def official_style_encode_image(
    visual: torch.nn.Module, pixel_values: torch.Tensor, *, feature_layers: tuple[int, ...], dpam_layers: int, **_: Any
) -> VisionFeatures:
    """The DPAM vision forward as the official release computes it (V-V only), for comparison.

    Blocks before DPAM use ``nn.MultiheadAttention`` as the release does; DPAM blocks materialize
    both ``[B, H, N, N]`` attention matrices; the original stream runs every token through every
    block, including the last.
    """
    blocks = visual.transformer.resblocks
    depth = len(blocks)
    first_dpam = depth - dpam_layers + 1
    h = embed_patches(visual, pixel_values)
    z = None
    patch_features: dict[int, torch.Tensor] = {}
    for index, block in enumerate(blocks, start=1):
        if index < first_dpam:
            x = block.ln_1(h)
            h = h + block.attn(x, x, x, need_weights=False)[0]
            h = h + block.mlp(block.ln_2(h))
            out = h
        else:
            if z is None:
                z = h
            vv, ori = _official_attention(block, block.ln_1(h))
            z = z + vv
            h = h + ori
            h = h + block.mlp(block.ln_2(h))
            out = z
        if index in feature_layers:
            patch_features[index] = visual.ln_post(out) @ visual.proj
    return VisionFeatures(image_features=h[:, 0] @ visual.proj, patch_features=patch_features)


# ---------------------------------------------------------------------------- measurement helpers


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current resident set (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory added by a block of code, in MiB (None if it cannot be measured here)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mib: float | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._ok = _reset_peak_rss()
            self._base = _proc_status_kib("VmRSS")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        else:
            peak = _proc_status_kib("VmHWM")
            if self._ok and peak is not None and self._base is not None:
                self.mib = (peak - self._base) / 1024


def _cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU-seconds of the whole machine, CPU-seconds of this process) so far (Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    usage = os.times()
    return (sum(fields[:8]) - idle) / tick, usage.user + usage.system


class OtherLoad:
    """CPU-seconds that OTHER processes used during a block of code (contention check; Linux)."""

    def __init__(self) -> None:
        self.seconds: float | None = None

    def __enter__(self) -> "OtherLoad":
        self._start = _cpu_seconds()
        return self

    def __exit__(self, *exc: Any) -> None:
        end = _cpu_seconds()
        if self._start is not None and end is not None:
            self.seconds = max(0.0, (end[0] - self._start[0]) - (end[1] - self._start[1]))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[list[float], Any]:
    """Seconds of each of ``repeats`` calls, and the last call's result.

    On CUDA each call is bracketed by CUDA events (the GPU's own clock, from the first queued
    kernel to the last; a GPU waiting for the CPU to launch work counts as busy time); elsewhere
    it is wall-clock time.
    """
    _sync(device)
    times, out = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            start_s = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - start_s)
    return times, out


def _ort_matmul(a: torch.Tensor, w: torch.Tensor) -> Callable[[], Any] | None:
    """``a @ w^T`` as a one-node onnxruntime ``MatMul`` graph (weight an initializer), or None without onnxruntime."""
    try:
        import onnxruntime
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    m, k = a.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "w"], ["y"])], "gemm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, w.shape[0]])],
        [numpy_helper.from_array(w.t().contiguous().numpy(), "w")],
    )
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {"a": a.numpy()}
    return lambda: session.run(None, feed)


def gemm_throughput(
    m: int,
    k: int,
    n: int,
    *,
    device: torch.device,
    dtype: torch.dtype,
    repeats: int = 5,
    min_seconds: float = 0.5,
    kernel: str = "torch",
) -> float:
    """Best FLOP/s of ``[m, k] @ [k, n]`` on ``device`` in ``dtype`` (each timing loops >= ``min_seconds``).

    The right operand is stored as ``[n, k]`` and transposed, as ``nn.Linear`` weights are (for
    float32 the layout makes no difference; PyTorch's generic bfloat16 CPU loop is much slower
    on the other one). On CUDA the loops are timed with CUDA events. ``kernel``: ``"torch"``
    (``torch.matmul``: MKL's sgemm for float32 on the CPU), ``"onednn"`` (CPU: oneDNN on a weight
    packed once, :mod:`anomalyclip.cpu_linear`), ``"onnxruntime"`` (CPU, float32: a ``MatMul``
    graph) or ``"float8"`` (CUDA, compute capability 8.9+: e4m3 operands with per-row scales,
    ``torch._scaled_mm``, bfloat16 out; the operands are quantized once, outside the timing).
    Returns 0.0 where the kernel is not available.
    """
    a = torch.randn(m, k, device=device).to(dtype)
    w = torch.randn(n, k, device=device).to(dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    if kernel == "torch":
        def one() -> Any:
            return torch.matmul(a, w.t(), out=out)
    elif kernel == "onednn" and device.type == "cpu" and cpu_linear.onednn_linear_available(dtype):
        def one() -> Any:
            return cpu_linear.packed_linear(a, w, None)
    elif kernel == "float8" and float8.float8_supported(device):
        aq, a_scale = float8.quantize_rows(a)
        wq, w_scale = float8.quantize_rows(w)
        w_scale = w_scale.t().contiguous()

        def one() -> Any:
            return torch._scaled_mm(aq, wq.t(), scale_a=a_scale, scale_b=w_scale, out_dtype=torch.bfloat16)
    elif kernel == "onnxruntime" and device.type == "cpu" and dtype == torch.float32:
        one = _ort_matmul(a, w)
        if one is None:
            return 0.0
    else:
        return 0.0

    def loop(count: int) -> float:
        times, _ = time_call(lambda: [one() for _ in range(count)], device, 1)
        return times[0]

    with torch.inference_mode():
        loop(1)  # warm-up (cuBLAS heuristics, clocks, weight packing)
        once = max(loop(1), 1e-6)
        loops = max(1, int(min_seconds / once))
        best = min(loop(loops) / loops for _ in range(repeats if once < 2 * min_seconds else 2))
    return 2 * m * k * n / best


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, "
                f"compute capability {props.major}.{props.minor}); CUDA {torch.version.cuda}")
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    # The vector extensions that decide GEMM speed (float32: AVX2 / AVX-512; bfloat16: AVX512-BF16 / AMX).
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_fp16") if f in flags]
    return f"{name} ({os.cpu_count()} logical CPUs{'; ' + ', '.join(isa) if isa else ''})"


# ---------------------------------------------------------------------------- the benchmark


def library_matmul_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype in which anomalyclip's vision GEMMs actually run for weights of ``dtype``."""
    up = ops.matmul_dtype(torch.empty(0, device=device, dtype=dtype))
    return up if up is not None else dtype


FLOAT8 = "float8"  # --dtype float8: a bfloat16 model whose vision linears run in float8 (CUDA, anomalyclip.float8)


def _dtype_name(dtype: torch.dtype | str) -> str:
    return dtype if isinstance(dtype, str) else str(dtype).replace("torch.", "")


def reference_gemms(
    dims: ModelDims, device: torch.device, dtype: torch.dtype, *, square: int = 4096, batch: int = 1
) -> dict[str, tuple[tuple[int, int, int], torch.dtype, str]]:
    """Plain matrix products to compare with: label -> ((m, k, n), dtype, kernel).

    A ``square``^3 product and the model's largest one (the MLP's first layer on ``batch``
    images' tokens, ``[batch N, W] x [W, 4 W]``), in ``dtype``; where anomalyclip runs
    ``dtype``'s GEMMs in float32 (a CPU without a fast kernel for it), the float32 products too
    (and no slow square one). On the CPU the model's product also through the best kernels
    available (oneDNN with a packed weight; onnxruntime's ``MatMul`` for float32): the reference
    is the fastest of them all, not only ``torch.matmul``.
    """
    tokens = 1 + (dims.image_size // dims.patch_size) ** 2
    model_shape = (batch * tokens, dims.width, dims.mlp_width)
    if dtype == FLOAT8:
        shape = f"{model_shape[0]}x{model_shape[1]}x{model_shape[2]}"
        return {
            f"{square}x{square}x{square} float8 e4m3 (_scaled_mm)": ((square, square, square), torch.bfloat16, "float8"),
            f"{shape} float8 e4m3 (MLP c_fc, _scaled_mm)": (model_shape, torch.bfloat16, "float8"),
        }
    name = _dtype_name(dtype)
    run_dtype = library_matmul_dtype(device, dtype)
    shape = f"{model_shape[0]}x{model_shape[1]}x{model_shape[2]}"
    out = {}
    if run_dtype == dtype:
        out[f"{square}x{square}x{square} {name}"] = ((square, square, square), dtype, "torch")
    out[f"{shape} {name} (MLP c_fc)"] = (model_shape, dtype, "torch")
    if run_dtype != dtype:
        out[f"{square}x{square}x{square} float32"] = ((square, square, square), run_dtype, "torch")
        out[f"{shape} float32 (MLP c_fc)"] = (model_shape, run_dtype, "torch")
    if device.type == "cpu":
        if cpu_linear.onednn_linear_available(run_dtype):
            out[f"{shape} {_dtype_name(run_dtype)} (MLP c_fc, oneDNN packed)"] = (model_shape, run_dtype, "onednn")
        if run_dtype == torch.float32:
            out[f"{shape} float32 (MLP c_fc, onnxruntime MatMul)"] = (model_shape, run_dtype, "onnxruntime")
    return out


def build_vit_l_clip(device: torch.device) -> torch.nn.Module:
    """open_clip's ViT-L-14-336 (QuickGELU) with random weights, float32, built on ``device``.

    On CUDA the parameters are created and initialized on the GPU (``torch.device`` as the
    default device), which takes a second instead of the CPU's ten or more.
    """
    import open_clip

    logging.getLogger().setLevel(logging.ERROR)  # "No pretrained weights loaded" is intended
    torch.manual_seed(0)
    if device.type == "cuda":
        try:
            with torch.device(device):
                return open_clip.create_model("ViT-L-14-336", pretrained=None, force_quick_gelu=True, device=device)
        except Exception as exc:  # noqa: BLE001 - fall back to building on the CPU
            print(f"(building on {device} failed: {exc!r}; building on the CPU)")
    clip = open_clip.create_model("ViT-L-14-336", pretrained=None, force_quick_gelu=True)
    return clip.to(device)


def build_model(image_size: int, device: torch.device, dtype: torch.dtype, model: str = "vit-l") -> AnomalyCLIP:
    """``vit-l``: a random ViT-L-14-336; ``tiny``: the tiny CLIP of the test fixtures (dry runs)."""
    if model == "tiny":
        from anomalyclip.backbone import load_clip

        clip, backbone = load_clip(f"local-dir:{GOLDEN / 'tiny-clip'}"), "tiny test CLIP"
    else:
        clip, backbone = build_vit_l_clip(device), "ViT-L-14-336 (random)"
    wrapped = AnomalyCLIP.from_clip(clip, backbone=backbone, image_size=image_size, seed=0)
    return wrapped.to(device=device, dtype=dtype).eval()


def _use_forward(model: AnomalyCLIP, mode: str) -> None:
    if mode == "official":
        c = model.config

        def encode(pv: torch.Tensor) -> VisionFeatures:
            return official_style_encode_image(
                model.clip.visual, pv, feature_layers=tuple(c.feature_layers), dpam_layers=c.dpam_layers
            )

        model.encode_image = encode  # instance attribute: this model only
    else:
        model.__dict__.pop("encode_image", None)


def run_mode(
    model: AnomalyCLIP, mode: str, pixel_values: torch.Tensor, args: argparse.Namespace, device: torch.device
) -> tuple[dict[str, Any], Any]:
    """Time one forward implementation on one batch; returns (figures, last output)."""
    _use_forward(model, mode)
    try:
        with torch.inference_mode():
            model.encode_text()  # cached: computed once, outside the timings
            with PeakMemory(device) as mem:  # over the warm-up too: its first call allocates from a clean state
                for i in range(args.warmup):
                    start = time.perf_counter()
                    model(pixel_values)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    if i == 0:  # one-off costs: CPU kernel measurements, packed weights, GPU kernel selection
                        print(f"  {mode} B={pixel_values.shape[0]}: first forward {time.perf_counter() - start:.2f} s (untimed)")
                with OtherLoad() as other:
                    times, out = time_call(lambda: model(pixel_values), device, max(1, args.repeats))
    finally:
        _use_forward(model, "ours")
    return {"times": times, "peak_mib": mem.mib, "other_cpu_s": other.seconds}, out


def run_cuda_graph(
    model: AnomalyCLIP, pixel_values: torch.Tensor, args: argparse.Namespace, device: torch.device
) -> tuple[dict[str, Any], Any]:
    """Capture ``model(pixel_values)`` in a CUDA graph and time its replays."""
    with torch.inference_mode():
        static_input = pixel_values.to(device).clone()
        model.encode_text()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
            for _ in range(2):
                model(static_input)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with PeakMemory(device) as mem:
            with torch.cuda.graph(graph):
                static_out = model(static_input)
            for _ in range(args.warmup):
                graph.replay()
            times, _ = time_call(graph.replay, device, max(1, args.repeats))
    return {"times": times, "peak_mib": mem.mib, "other_cpu_s": None}, static_out


_KERNEL_KINDS = (
    ("matrix products", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul", "s16816", "s1688", "sgemm")),
    ("attention", ("flash", "fmha", "attention", "attn")),
    ("layer norm", ("layer_norm", "layernorm")),
    ("memory copies", ("memcpy", "memset", "copy")),
)


def _kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, keys in _KERNEL_KINDS:
        if any(k in low for k in keys):
            return kind
    return "other (elementwise, softmax, reductions)"


def profile_forward(
    model: AnomalyCLIP, pixel_values: torch.Tensor, device: torch.device, rows: int = 10
) -> tuple[str, str]:
    """``torch.profiler`` over one forward: (short summary, full table).

    On CUDA the summary sums the GPU kernels (by kind and by name) and compares their total with
    the span from the first kernel's start to the last one's end: a GPU idle in between is
    waiting for the CPU to launch work.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode():
        model.encode_text()
        for _ in range(2):
            model(pixel_values)
        _sync(device)
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            model(pixel_values)
            _sync(device)
            wall_ms = (time.perf_counter() - start) * 1e3
    if device.type == "cuda":
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        by_name: dict[str, list[float]] = {}
        for e in kernels:
            entry = by_name.setdefault(e.name, [0.0, 0])
            entry[0] += e.time_range.elapsed_us() / 1e3
            entry[1] += 1
        busy_ms = sum(t for t, _ in by_name.values())
        span_ms = ((max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)) / 1e3) if kernels else 0.0
        lines = [f"GPU kernels {busy_ms:.2f} ms busy in a {span_ms:.2f} ms span from first to last kernel "
                 f"({busy_ms / max(span_ms, 1e-9):.0%} busy; {len(kernels)} kernels); {wall_ms:.2f} ms wall under the profiler"]
        kinds: dict[str, float] = {}
        for name, (t, _) in by_name.items():
            kinds[_kernel_kind(name)] = kinds.get(_kernel_kind(name), 0.0) + t
        lines.append("  by kind: " + "; ".join(f"{k} {t:.2f} ms ({t / max(busy_ms, 1e-9):.0%})"
                                             for k, t in sorted(kinds.items(), key=lambda kv: -kv[1])))
        top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:rows]
        lines += [f"  {t:9.3f} ms {t / max(busy_ms, 1e-9):6.1%}  x{n:<5} {name[:100]}" for name, (t, n) in top]
        sort_key = "self_device_time_total"
    else:
        events = prof.key_averages()
        busy_ms = sum(e.self_cpu_time_total for e in events) / 1e3
        lines = [f"CPU ops {busy_ms:.2f} ms (self time) in a {wall_ms:.2f} ms forward (wall, under the profiler)"]
        top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:rows]
        lines += [f"  {e.self_cpu_time_total / 1e3:9.3f} ms {e.self_cpu_time_total / 1e3 / max(busy_ms, 1e-9):6.1%}  "
                  f"x{e.count:<5} {e.key[:100]}" for e in top]
        sort_key = "self_cpu_time_total"
    try:
        table = prof.key_averages().table(sort_by=sort_key, row_limit=40, max_name_column_width=90)
    except Exception as exc:  # noqa: BLE001 - the table is a bonus
        table = f"(table not available: {exc!r})"
    return "\n".join(lines), table


def write_predict_images(directory: Path, count: int, size: int, workers: int) -> list[Path]:
    """``count`` smooth synthetic RGB PNGs of ``size`` x ``size`` (about as costly to decode as photos)."""
    import numpy as np
    from PIL import Image

    def write(i: int) -> Path:
        rng = np.random.default_rng(i)
        small = (rng.random((size // 16, size // 16, 3)) * 255).astype(np.uint8)
        image = Image.fromarray(small).resize((size, size), Image.BICUBIC)
        noise = rng.integers(0, 8, (size, size, 3), dtype=np.uint8)  # sensor-like noise: realistic PNG sizes
        image = Image.fromarray(np.asarray(image) + noise)
        path = directory / f"image_{i:04d}.png"
        image.save(path, compress_level=1)  # fast to write; decoding costs about the same at any level
        return path

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(write, range(count)))


def run_predict(
    model: AnomalyCLIP, paths: list[Path], batch_size: int, num_workers: int | None, device: torch.device
) -> float:
    """Seconds of ``model.predict(paths)`` (one run, after a warm-up on one batch)."""
    model.predict(paths[:batch_size], batch_size=batch_size, num_workers=num_workers)
    _sync(device)
    start = time.perf_counter()
    model.predict(paths, batch_size=batch_size, num_workers=num_workers)
    _sync(device)
    return time.perf_counter() - start


def _fmt_rate(flops_per_s: float) -> str:
    return f"{flops_per_s / 1e12:.1f}" if flops_per_s >= 1e12 else f"{flops_per_s / 1e12:.3f}"


def markdown_report(result: dict[str, Any]) -> str:
    """The tables for docs/benchmarks.md, from the figures of :func:`main`."""
    lines = [
        f"Machine: {result['machine']}; torch {result['torch']}; model {result['model']}, S = {result['image_size']}; "
        f"medians of {result['repeats']} forwards after {result['warmup']} warm-up, input already on the device.",
        f"Command: `{result['command']}`",
        "",
        "| dtype | forward | batch | images/s | ms per batch | ms per image | TFLOP/s | of GEMM | peak memory (MiB) | speed-up over official-style |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "n/a"
        speedup = f"{r['speedup']:.2f}x" if r.get("speedup") else ""
        lines.append(
            f"| {r['dtype']} | {r['label']} | {r['batch']} | {r['images_per_s']:.1f} | {r['median_s'] * 1e3:.2f} | "
            f"{r['median_s'] * 1e3 / r['batch']:.2f} | {_fmt_rate(r['flops_per_s'])} | {r['of_gemm']:.1%} | {peak} | {speedup} |"
        )
    lines += ["", "| dtype | reference GEMM | TFLOP/s |", "|---|---|---|"]
    for dtype, gemms in result["gemm_flops_per_s"].items():
        for label, value in gemms.items():
            lines.append(f"| {dtype} | {label} | {_fmt_rate(value)} |")
    if result.get("predict"):
        p = result["predict"]
        lines += [
            "",
            f"`predict` on {p['images']} PNG files of {p['image_px']} x {p['image_px']} px ({p['dtype']}, batch {p['batch']}; "
            f"results at the original size, as numpy):",
            "",
            "| pipeline | images/s | of the forward alone |",
            "|---|---|---|",
        ]
        for row in p["rows"]:
            lines.append(f"| {row['label']} | {row['images_per_s']:.1f} | {row['of_forward']:.0%} |")
        lines.append(f"| forward alone (table above) | {p['forward_images_per_s']:.1f} | 100% |")
        lines.append(f"| load + preprocess, one thread | {p['preprocess_images_per_s']:.1f} | |")
    if result.get("targets"):
        lines += ["", "Targets (issue 14, ViT-L/14@336 at 518 px on an H100):", ""]
        lines += [f"- {t}" for t in result["targets"]]
    return "\n".join(lines) + "\n"


def _batch_list(text: str | None) -> list[int]:
    return [int(b) for b in (text or "").split(",") if b.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes (default 1,8)")
    parser.add_argument("--dtype", default="float32", help="comma-separated: float32, float16, bfloat16, float8 (CUDA 8.9+; default float32)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="vit-l", choices=["vit-l", "tiny"],
                        help="vit-l: ViT-L-14-336 with random weights; tiny: the test fixtures' tiny CLIP (dry runs)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU; default: torch's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per batch size (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forwards first (default 1)")
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--mode", default="ours", choices=["ours", "official", "both"], help="which forward(s) to time")
    parser.add_argument("--official-batch-sizes", default=None,
                        help="with --mode both: batch sizes that also run the official-style forward (default: all)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the vision blocks (anomalyclip.vision.compile_blocks)")
    parser.add_argument("--cuda-graph", default="", help="CUDA: also time a CUDA-graph replay at these batch sizes, e.g. 1,8")
    parser.add_argument("--profile", default="", help="profile one forward at these batch sizes (torch.profiler)")
    parser.add_argument("--profile-dtype", default=None, help="dtype to profile (default: bfloat16 if timed, else the last)")
    parser.add_argument("--profile-out", default=None, help="write the full profiler tables to this file")
    parser.add_argument("--gemm-size", type=int, default=None, help="square reference GEMM side (default 8192 on CUDA, 4096 on CPU)")
    parser.add_argument("--gemm-seconds", type=float, default=None, help="seconds per reference GEMM timing (default 0.2 on CUDA, 0.5 on CPU)")
    parser.add_argument("--predict", type=int, default=0, help="also time model.predict on this many synthetic PNG files")
    parser.add_argument("--predict-image-size", type=int, default=1024, help="side of the synthetic PNG files (default 1024)")
    parser.add_argument("--predict-dtype", default=None, help="dtype for --predict (default: as --profile-dtype)")
    parser.add_argument("--predict-batch-size", type=int, default=None, help="batch size for --predict (default: the largest)")
    parser.add_argument("--cpu-low-precision-matmul", default=None, choices=["auto", "native", "float32"],
                        help="anomalyclip.vision.set_cpu_low_precision_matmul policy for bfloat16/float16 on the CPU (default: auto)")
    parser.add_argument("--cpu-linear", default=None, choices=list(cpu_linear.CPU_LINEAR_BACKENDS),
                        help="CPU kernel of the library's matrix products (anomalyclip.cpu_linear; default: ANOMALYCLIP_CPU_LINEAR or auto)")
    parser.add_argument("--cpu-attention", default=None, choices=list(cpu_attention.CPU_ATTENTION_BACKENDS),
                        help="CPU attention kernel (anomalyclip.cpu_attention; default: ANOMALYCLIP_CPU_ATTENTION or auto)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--markdown", default=None, help="also write the markdown tables to this file (and print them)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtypes = [FLOAT8 if d.strip() == FLOAT8 else resolve_dtype(d.strip()) for d in args.dtype.split(",") if d.strip()]
    if args.cpu_low_precision_matmul is not None:
        vision.set_cpu_low_precision_matmul(args.cpu_low_precision_matmul)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.cpu_linear is not None:
        cpu_linear.set_cpu_linear_backend(args.cpu_linear)
    if args.cpu_attention is not None:
        cpu_attention.set_cpu_attention_backend(args.cpu_attention)
    batch_sizes = _batch_list(args.batch_sizes)
    official_batches = set(_batch_list(args.official_batch_sizes)) if args.official_batch_sizes else set(batch_sizes)
    graph_batches = set(_batch_list(args.cuda_graph)) if cuda else set()
    profile_batches = _batch_list(args.profile)
    modes = ["ours", "official"] if args.mode == "both" else [args.mode]
    names = [_dtype_name(d) for d in dtypes]
    focus = args.profile_dtype or ("bfloat16" if "bfloat16" in names else names[-1])
    predict_dtype = args.predict_dtype or focus
    square = args.gemm_size or (8192 if cuda else 4096)
    gemm_seconds = args.gemm_seconds or (0.2 if cuda else 0.5)
    command = "python benchmarks/bench_inference.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))

    print(f"machine: {machine_description(device)}; device {device}; torch {torch.__version__}; "
          f"threads {torch.get_num_threads()}; dtypes {', '.join(names)}; S = {args.image_size}; model {args.model}; "
          f"compile {args.compile}; CPU low-precision matmul {vision.get_cpu_low_precision_matmul()!r}; "
          f"CPU linear {cpu_linear.get_cpu_linear_backend()!r}; CPU attention {cpu_attention.get_cpu_attention_backend()!r}")
    if cuda:
        print(f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}; cuDNN TF32 {torch.backends.cudnn.allow_tf32}; "
              f"flash SDPA {torch.backends.cuda.flash_sdp_enabled()}; mem-efficient SDPA {torch.backends.cuda.mem_efficient_sdp_enabled()}")
    with contextlib.suppress(OSError):
        print(f"load average before: {open('/proc/loadavg').read().split()[:3]}")

    started = time.perf_counter()
    master = build_model(args.image_size, device, torch.float32, args.model)
    print(f"model built in {time.perf_counter() - started:.1f} s")
    dims = ModelDims.from_model(master)
    flops = {m: count_inference_flops(dims, official_style=(m == "official")) for m in modes}
    f = flops[modes[0]]
    print("matrix-product GFLOP per image (" + modes[0] + "): " + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in f.items()))
    if "official" in modes and modes[0] != "official":
        print(f"  official-style forward: total {flops['official']['total'] / 1e9:.2f} GFLOP per image")

    rows: list[dict[str, Any]] = []
    gemm_all: dict[str, dict[str, float]] = {}
    peak_gemm: dict[str, float] = {}
    profiles: list[str] = []
    predict_result: dict[str, Any] | None = None
    for dtype in dtypes:
        name = _dtype_name(dtype)
        if dtype == FLOAT8 and not float8.float8_supported(device):
            print(f"float8: skipped ({device} has no float8 tensor cores; needs CUDA compute capability 8.9+)")
            continue
        model = master if dtype == torch.float32 else copy.deepcopy(master).to(torch.bfloat16 if dtype == FLOAT8 else dtype)
        if dtype == FLOAT8:
            vision.set_float8(model.clip.visual)
        if args.compile:
            vision.compile_blocks(model.clip.visual)
            args.warmup = max(args.warmup, 1)  # the first call compiles
        gemms = reference_gemms(dims, device, dtype, square=square, batch=max(batch_sizes) if cuda else 1)
        gemm = {label: 0.0 for label in gemms}

        def measure_gemms() -> None:  # before and after the model runs; the best of both counts
            for label, (shape, gemm_dtype, kernel) in gemms.items():
                gemm[label] = max(gemm[label], gemm_throughput(*shape, device=device, dtype=gemm_dtype, min_seconds=gemm_seconds,
                                                               repeats=3 if cuda else 5, kernel=kernel))

        measure_gemms()
        dtype_rows = []
        for b in batch_sizes:
            generator = torch.Generator().manual_seed(b)
            pixel_values = torch.randn(b, 3, args.image_size, args.image_size, generator=generator).to(device)
            outputs = {}
            for mode in modes:
                if mode == "official" and b not in official_batches:
                    continue
                figures, outputs[mode] = run_mode(model, mode, pixel_values, args, device)
                dtype_rows.append(dict(mode=mode, label="anomalyclip" if mode == "ours" else "official-style", batch=b,
                                       figures=figures, flops=flops[mode]["total"] * b))
            if b in graph_batches and "ours" in modes:
                try:
                    figures, graph_out = run_cuda_graph(model, pixel_values, args, device)
                    diff = float((graph_out.anomaly_maps - outputs["ours"].anomaly_maps).abs().max()) if "ours" in outputs else float("nan")
                    print(f"{name} B={b}: CUDA graph vs eager: max |map diff| {diff:.2e}")
                    dtype_rows.append(dict(mode="graph", label="anomalyclip, CUDA graph", batch=b, figures=figures,
                                           flops=flops["ours"]["total"] * b))
                except Exception as exc:  # noqa: BLE001 - report and go on
                    print(f"{name} B={b}: CUDA graph capture failed: {exc!r}")
            if len([m for m in ("ours", "official") if m in outputs]) == 2:
                a, o = outputs["ours"], outputs["official"]
                print(f"{name} B={b}: ours vs official-style: max |score diff| {float((a.scores - o.scores).abs().max()):.2e}, "
                      f"max |map diff| {float((a.anomaly_maps - o.anomaly_maps).abs().max()):.2e}")
            del outputs
        if name == focus:
            for b in profile_batches:
                pixel_values = torch.randn(b, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(b)).to(device)
                try:
                    summary, table = profile_forward(model, pixel_values, device)
                    profiles.append(f"profile {name} B={b}: {summary}")
                    print(f"\nprofile {name} B={b}: {summary}")
                    if args.profile_out:
                        with open(args.profile_out, "a") as fh:
                            fh.write(f"=== profile {name} B={b}\n{summary}\n\n{table}\n\n")
                except Exception as exc:  # noqa: BLE001 - report and go on
                    print(f"profile {name} B={b} failed: {exc!r}")
        if name == predict_dtype and args.predict > 0:
            predict_result = _measure_predict(model, args, device, batch_sizes, dtype_rows, name)
        measure_gemms()
        if dtype == FLOAT8:
            peak_gemm[name] = max(gemm.values())
        else:
            run_dtype = library_matmul_dtype(device, dtype)
            peak_gemm[name] = max(v for label, v in gemm.items() if gemms[label][1] == run_dtype)
        gemm_all[name] = dict(gemm)
        for r in dtype_rows:
            times = r.pop("figures")
            med, best = statistics.median(times["times"]), min(times["times"])
            r.update(dtype=name, best_s=best, median_s=med, images_per_s=r["batch"] / med, latency_s=med / r["batch"],
                     peak_mib=times["peak_mib"], flops_per_s=r["flops"] / med, of_gemm=r["flops"] / med / peak_gemm[name],
                     times=times["times"], other_cpu_s=times["other_cpu_s"])
        for r in dtype_rows:
            official = [o for o in dtype_rows if o["mode"] == "official" and o["batch"] == r["batch"]]
            if r["mode"] != "official" and official:
                r["speedup"] = official[0]["median_s"] / r["median_s"]
        rows += dtype_rows
        if args.compile:
            vision.compile_blocks(model.clip.visual, enable=False)  # keep the master copyable
        if model is not master:
            del model
        if cuda:
            torch.cuda.empty_cache()

    print("\nplain matrix products (same device and threads; best of before and after the model runs):")
    for name, gemm in gemm_all.items():
        for label, value in gemm.items():
            print(f"  {label:<44} {value / 1e9:10.1f} GFLOP/s")
        print(f"  reference for {name}: {peak_gemm[name] / 1e9:10.1f} GFLOP/s")
    print()
    header = (f"{'dtype':<9} {'forward':<24} {'B':>3} {'images/s':>9} {'ms/batch med':>12} {'ms/batch best':>13} "
              f"{'peak MiB':>9} {'GFLOP/img':>10} {'TFLOP/s':>8} {'of GEMM':>8} {'speed-up':>9} {'other CPU s':>12}")
    print(header)
    print("-" * len(header))
    for r in rows:
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "n/a"
        other = f"{r['other_cpu_s']:.1f}" if r["other_cpu_s"] is not None else "n/a"
        speedup = f"{r['speedup']:.2f}x" if r.get("speedup") else ""
        print(f"{r['dtype']:<9} {r['label']:<24} {r['batch']:>3} {r['images_per_s']:>9.2f} {r['median_s'] * 1e3:>12.2f} "
              f"{r['best_s'] * 1e3:>13.2f} {peak:>9} {r['flops'] / r['batch'] / 1e9:>10.1f} {r['flops_per_s'] / 1e12:>8.2f} "
              f"{r['of_gemm']:>8.1%} {speedup:>9} {other:>12}")
    if any(not isinstance(d, str) and library_matmul_dtype(device, d) != d for d in dtypes):
        print("(this PyTorch build has no fast kernel on this CPU for some dtype: anomalyclip computes its GEMMs in float32 "
              f"(get_cpu_low_precision_matmul() = {vision.get_cpu_low_precision_matmul()!r}); the float32 GEMM is the reference)")
    print(f"auto's CPU kernel choices: linear {cpu_linear.auto_choices()}; attention {cpu_attention.auto_choices()}")
    with contextlib.suppress(OSError):
        print(f"load average after: {open('/proc/loadavg').read().split()[:3]}")

    targets = _check_targets(rows, args, device) if cuda and args.model == "vit-l" and args.image_size == 518 else []
    for t in targets:
        print(t)
    result = dict(machine=machine_description(device), torch=torch.__version__, threads=torch.get_num_threads(),
                  dtypes=names, device=str(device), image_size=args.image_size, model=args.model, compile=args.compile,
                  repeats=args.repeats, warmup=args.warmup, command=command, flops=flops, gemm_flops_per_s=gemm_all,
                  rows=rows, predict=predict_result, profiles=profiles, targets=targets)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    if args.markdown:
        text = markdown_report(result)
        Path(args.markdown).write_text(text)
        print("\n" + text)
    return 0


def _measure_predict(
    model: AnomalyCLIP, args: argparse.Namespace, device: torch.device, batch_sizes: list[int],
    dtype_rows: list[dict[str, Any]], name: str,
) -> dict[str, Any]:
    """``predict`` from PNG files with the default workers and with none, against the forward alone."""
    from anomalyclip.prefetch import default_num_workers

    batch = args.predict_batch_size or max(batch_sizes)
    forward = [r for r in dtype_rows if r["mode"] == "ours" and r["batch"] == batch]
    if forward:
        forward_images_per_s = batch / statistics.median(forward[0]["figures"]["times"])
    else:  # not in the table: time it here
        pv = torch.randn(batch, 3, args.image_size, args.image_size).to(device)
        times, _ = time_call(lambda: model(pv), device, max(1, args.repeats))
        forward_images_per_s = batch / statistics.median(times)
    auto = default_num_workers(device)
    rows = []
    with tempfile.TemporaryDirectory(prefix="anomalyclip-bench-") as tmp:
        paths = write_predict_images(Path(tmp), args.predict, args.predict_image_size, workers=max(1, auto))
        start = time.perf_counter()
        for p in paths[:16]:
            model._preprocess_prepared(model._prepare(p))  # what a prefetch worker does per image
        preprocess_images_per_s = min(16, len(paths)) / (time.perf_counter() - start)
        with torch.inference_mode():
            for label, workers in ((f"predict, num_workers=None ({auto} threads)", None), ("predict, num_workers=0", 0)):
                seconds = run_predict(model, paths, batch, workers, device)
                rows.append(dict(label=label, images_per_s=len(paths) / seconds, of_forward=len(paths) / seconds / forward_images_per_s))
                print(f"{name} {label}: {len(paths) / seconds:.1f} images/s ({len(paths)} files, batch {batch})")
    return dict(images=args.predict, image_px=args.predict_image_size, dtype=name, batch=batch, rows=rows,
                forward_images_per_s=forward_images_per_s, preprocess_images_per_s=preprocess_images_per_s)


def _check_targets(rows: list[dict[str, Any]], args: argparse.Namespace, device: torch.device) -> list[str]:
    """Issue 14's targets, each as 'MET' / 'MISSED' / 'not measured' with the measured figure."""
    def find(dtype: str, label: str, batch: int) -> dict[str, Any] | None:
        return next((r for r in rows if r["dtype"] == dtype and r["label"] == label and r["batch"] == batch), None)

    out = []
    r = find("bfloat16", "anomalyclip", 32)
    if r is None:
        out.append("bfloat16, batch 32 >= 400 images/s: not measured")
    else:
        ok = r["images_per_s"] >= TARGET_BF16_B32_IMAGES_PER_S
        out.append(f"bfloat16, batch 32 >= {TARGET_BF16_B32_IMAGES_PER_S:.0f} images/s: {r['images_per_s']:.1f} "
                   f"({r['of_gemm']:.0%} of the bfloat16 GEMM) - {'MET' if ok else 'MISSED'}")
    speedups = [(r["dtype"], r["batch"], r["speedup"]) for r in rows if r["label"] == "anomalyclip" and r.get("speedup")]
    if speedups:
        best = max(speedups, key=lambda s: s[2])
        at32 = [s for s in speedups if s[0] == "bfloat16" and s[1] == 32]
        shown = at32[0] if at32 else best
        ok = shown[2] >= TARGET_SPEEDUP_OVER_OFFICIAL
        out.append(f">= {TARGET_SPEEDUP_OVER_OFFICIAL:.0f}x the official-style forward (same dtype and batch): {shown[2]:.2f}x "
                   f"({shown[0]}, batch {shown[1]}; best {best[2]:.2f}x at {best[0]}, batch {best[1]}) - {'MET' if ok else 'MISSED'}")
        ours, official = find("bfloat16", "anomalyclip", 32), find("float32", "official-style", 32)
        if ours is not None and official is not None:
            out.append(f"  (bfloat16 anomalyclip against the float32 official-style forward, batch 32: "
                       f"{official['median_s'] / ours['median_s']:.2f}x)")
    else:
        out.append(f">= {TARGET_SPEEDUP_OVER_OFFICIAL:.0f}x the official-style forward: not measured")
    latencies = [(r["median_s"] * 1e3, r["dtype"], r["label"]) for r in rows if r["batch"] == 1 and r["label"] != "official-style"]
    if latencies:
        best = min(latencies)
        ok = best[0] < TARGET_B1_LATENCY_MS
        out.append(f"batch-1 latency < {TARGET_B1_LATENCY_MS:.0f} ms: {best[0]:.2f} ms ({best[1]}, {best[2]}) - {'MET' if ok else 'MISSED'}")
    else:
        out.append(f"batch-1 latency < {TARGET_B1_LATENCY_MS:.0f} ms: not measured")
    r8, r16 = find("float8", "anomalyclip", 32), find("bfloat16", "anomalyclip", 32)
    if r8 is None:
        out.append(f"float8, batch 32 >= {TARGET_FLOAT8_B32_IMAGES_PER_S:.0f} images/s and >= {TARGET_FLOAT8_OVER_BF16}x bfloat16: not measured")
    else:
        ratio = r8["images_per_s"] / r16["images_per_s"] if r16 is not None else float("nan")
        ok = r8["images_per_s"] >= TARGET_FLOAT8_B32_IMAGES_PER_S and ratio >= TARGET_FLOAT8_OVER_BF16
        out.append(f"float8, batch 32 >= {TARGET_FLOAT8_B32_IMAGES_PER_S:.0f} images/s and >= {TARGET_FLOAT8_OVER_BF16}x bfloat16: "
                   f"{r8['images_per_s']:.1f} ({ratio:.2f}x bfloat16; {r8['of_gemm']:.0%} of the float8 GEMM) - {'MET' if ok else 'MISSED'}")
    name = torch.cuda.get_device_name(device)
    if "H100" not in name:
        out.append(f"(the targets are for an H100; this GPU is {name})")
    return out


if __name__ == "__main__":
    sys.exit(main())
