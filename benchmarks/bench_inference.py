"""Inference throughput of AnomalyCLIP against the machine's own matrix-product throughput.

Builds a ViT-L-14-336-sized CLIP with random weights (no download; the speed does not depend on
the values), wraps it with ``AnomalyCLIP.from_clip(..., image_size=518)`` and times the full
``model(pixel_values)`` forward (DPAM vision forward, scores, maps, blur; the text features are
computed once and cached, as in normal use) for each batch size. It prints images/s, latency, peak
memory, the matrix-product FLOPs per image (:func:`anomalyclip.flops.count_inference_flops`), the
achieved FLOP/s, and, measured in the same run with the same device, dtype and threads, the
throughput of plain large matrix products. Their ratio is the headline figure.

``--mode official`` (or ``both``) also times a straightforward "official-style" forward, written
like the official release: per-block materialized ``softmax(q k^T)`` / ``softmax(v v^T)`` attention
matrices, separate original and V-V passes, every token through every block (no class-token
shortcut in the last block). The two forwards run on the same inputs and their outputs are
compared, so the speed-up is measured, not claimed.

Usage::

    python benchmarks/bench_inference.py                                  # batch 1 and 8, float32
    python benchmarks/bench_inference.py --batch-sizes 1 --mode both --threads 2 --repeats 3
    python benchmarks/bench_inference.py --dtype bfloat16 --batch-sizes 1
    python benchmarks/bench_inference.py --device cuda --dtype float16 --repeats 20 --warmup 3
    python benchmarks/bench_inference.py --compile                        # torch.compile the vision blocks

On CPU, peak memory is the rise of the process's resident-set high-water mark (``VmHWM`` in
``/proc/self/status``, reset through ``/proc/self/clear_refs`` before each measurement) over the
resident set before it; on CUDA it is ``torch.cuda.max_memory_allocated`` over the allocation
before it. "other CPU s" is the CPU time that other processes used during the timed forwards
(from ``/proc/stat``): anything well above 0 means the figures are not clean (shared machine).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from anomalyclip import AnomalyCLIP
from anomalyclip.flops import ModelDims, count_inference_flops
from anomalyclip.runtime import resolve_dtype
from anomalyclip import vision
from anomalyclip.vision import VisionFeatures, embed_patches

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
    """Wall-clock seconds of ``repeats`` calls, and the last call's result."""
    _sync(device)
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times, out


def gemm_throughput(
    m: int, k: int, n: int, *, device: torch.device, dtype: torch.dtype, repeats: int = 5, min_seconds: float = 0.5
) -> float:
    """Best FLOP/s of ``[m, k] @ [k, n]`` on ``device`` in ``dtype`` (each timing loops >= ``min_seconds``).

    The right operand is stored as ``[n, k]`` and transposed, as ``nn.Linear`` weights are (for
    float32 the layout makes no difference; PyTorch's generic bfloat16 CPU loop is much slower
    on the other one).
    """
    a = torch.randn(m, k, device=device).to(dtype)
    w = torch.randn(n, k, device=device).to(dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    torch.matmul(a, w.t(), out=out)
    _sync(device)
    start = time.perf_counter()
    torch.matmul(a, w.t(), out=out)
    _sync(device)
    once = max(time.perf_counter() - start, 1e-6)
    loops = max(1, int(min_seconds / once))
    best = float("inf")
    for _ in range(repeats if once < 2 * min_seconds else 2):
        start = time.perf_counter()
        for _ in range(loops):
            torch.matmul(a, w.t(), out=out)
        _sync(device)
        best = min(best, (time.perf_counter() - start) / loops)
    return 2 * m * k * n / best


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
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
    up = vision._matmul_dtype(torch.empty(0, device=device, dtype=dtype))
    return up if up is not None else dtype


def reference_gemms(dims: ModelDims, device: torch.device, dtype: torch.dtype) -> dict[str, tuple[tuple[int, int, int], torch.dtype]]:
    """Plain matrix products to compare with: label -> ((m, k, n), dtype).

    A 4096^3 product and the model's largest one (the MLP's first layer on one image's tokens,
    ``[N, W] x [W, 4 W]``), in ``dtype``; where anomalyclip runs ``dtype``'s GEMMs in float32
    (a CPU without a fast kernel for it), the float32 products too (and no slow 4096^3 one).
    """
    tokens = 1 + (dims.image_size // dims.patch_size) ** 2
    model_shape = (tokens, dims.width, dims.mlp_width)
    name = str(dtype).replace("torch.", "")
    run_dtype = library_matmul_dtype(device, dtype)
    out = {}
    if run_dtype == dtype:
        out[f"4096x4096x4096 {name}"] = ((4096, 4096, 4096), dtype)
    out[f"{model_shape[0]}x{model_shape[1]}x{model_shape[2]} {name} (MLP c_fc)"] = (model_shape, dtype)
    if run_dtype != dtype:
        out["4096x4096x4096 float32"] = ((4096, 4096, 4096), run_dtype)
        out[f"{model_shape[0]}x{model_shape[1]}x{model_shape[2]} float32 (MLP c_fc)"] = (model_shape, run_dtype)
    return out


def build_model(image_size: int, device: torch.device, dtype: torch.dtype) -> AnomalyCLIP:
    import open_clip

    logging.getLogger().setLevel(logging.ERROR)  # "No pretrained weights loaded" is intended
    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-L-14-336", pretrained=None, force_quick_gelu=True)
    model = AnomalyCLIP.from_clip(clip, backbone="ViT-L-14-336 (random)", image_size=image_size, seed=0)
    return model.to(device=device, dtype=dtype).eval()


def run_mode(
    model: AnomalyCLIP, mode: str, pixel_values: torch.Tensor, args: argparse.Namespace, device: torch.device
) -> tuple[dict[str, Any], Any]:
    """Time one forward implementation on one batch; returns (figures, last output)."""
    if mode == "official":
        c = model.config

        def encode(pv: torch.Tensor) -> VisionFeatures:
            return official_style_encode_image(
                model.clip.visual, pv, feature_layers=tuple(c.feature_layers), dpam_layers=c.dpam_layers
            )

        model.encode_image = encode  # instance attribute: this model only
    else:
        model.__dict__.pop("encode_image", None)
    with torch.inference_mode():
        model.encode_text()  # cached: computed once, outside the timings
        with PeakMemory(device) as mem:  # over the warm-up too: its first call allocates from a clean state
            for _ in range(args.warmup):
                model(pixel_values)
            with OtherLoad() as other:
                times, out = time_call(lambda: model(pixel_values), device, max(1, args.repeats))
    model.__dict__.pop("encode_image", None)
    return {"times": times, "peak_mib": mem.mib, "other_cpu_s": other.seconds}, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes (default 1,8)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU; default: torch's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per batch size (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forwards first (default 1)")
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--mode", default="ours", choices=["ours", "official", "both"], help="which forward(s) to time")
    parser.add_argument("--compile", action="store_true", help="torch.compile the vision blocks (anomalyclip.vision.compile_blocks)")
    parser.add_argument("--cpu-low-precision-matmul", default=None, choices=["auto", "native", "float32"],
                        help="anomalyclip.vision.set_cpu_low_precision_matmul policy for bfloat16/float16 on the CPU (default: auto)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype)
    if args.cpu_low_precision_matmul is not None:
        vision.set_cpu_low_precision_matmul(args.cpu_low_precision_matmul)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    modes = ["ours", "official"] if args.mode == "both" else [args.mode]

    print(f"machine: {machine_description(device)}; device {device}; torch {torch.__version__}; "
          f"threads {torch.get_num_threads()}; dtype {args.dtype}; S = {args.image_size}; "
          f"compile {args.compile}; CPU low-precision matmul {vision.get_cpu_low_precision_matmul()!r}")
    try:
        print(f"load average before: {open('/proc/loadavg').read().split()[:3]}")
    except OSError:
        pass

    model = build_model(args.image_size, device, dtype)
    if args.compile:
        from anomalyclip.vision import compile_blocks

        compile_blocks(model.clip.visual)
        args.warmup = max(args.warmup, 1)  # the first call compiles
    dims = ModelDims.from_model(model)
    flops = {m: count_inference_flops(dims, official_style=(m == "official")) for m in modes}
    f = flops[modes[0]]
    print("matrix-product GFLOP per image (" + modes[0] + "): " + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in f.items()))
    if "official" in modes and modes[0] != "official":
        print(f"  official-style forward: total {flops['official']['total'] / 1e9:.2f} GFLOP per image")

    gemms = reference_gemms(dims, device, dtype)
    gemm = {label: 0.0 for label in gemms}

    def measure_gemms() -> None:  # before and after the model runs; the best of both counts
        for label, (shape, gemm_dtype) in gemms.items():
            gemm[label] = max(gemm[label], gemm_throughput(*shape, device=device, dtype=gemm_dtype))

    measure_gemms()
    rows = []
    for b in batch_sizes:
        generator = torch.Generator().manual_seed(b)
        pixel_values = torch.randn(b, 3, args.image_size, args.image_size, generator=generator)
        outputs = {}
        for mode in modes:
            figures, outputs[mode] = run_mode(model, mode, pixel_values, args, device)
            best, med = min(figures["times"]), statistics.median(figures["times"])
            total = flops[mode]["total"] * b
            rows.append(dict(mode=mode, batch=b, best_s=best, median_s=med, images_per_s=b / best,
                             latency_s=best / b, peak_mib=figures["peak_mib"], flops=total, flops_per_s=total / best,
                             times=figures["times"], other_cpu_s=figures["other_cpu_s"]))
        if len(outputs) == 2:
            a, o = outputs["ours"], outputs["official"]
            print(f"B={b}: ours vs official-style: max |score diff| {float((a.scores - o.scores).abs().max()):.2e}, "
                  f"max |map diff| {float((a.anomaly_maps - o.anomaly_maps).abs().max()):.2e}")
    measure_gemms()
    run_dtype = library_matmul_dtype(device, dtype)
    peak_gemm = max(v for label, v in gemm.items() if gemms[label][1] == run_dtype)

    print("\nplain matrix products (same device and threads; best of before and after the model runs):")
    for label, value in gemm.items():
        print(f"  {label:<44} {value / 1e9:8.1f} GFLOP/s")
    print(f"  reference: best {str(run_dtype).replace('torch.', '')} GEMM above{'':<13} {peak_gemm / 1e9:8.1f} GFLOP/s")
    if run_dtype != dtype:
        print(f"  (this PyTorch build has no fast {args.dtype} matrix-product kernel on this CPU; anomalyclip computes "
              f"{args.dtype} GEMMs in float32 (anomalyclip.vision.get_cpu_low_precision_matmul() = "
              f"{vision.get_cpu_low_precision_matmul()!r}), so the float32 GEMM is the machine's best)")
    print()
    header = (f"{'forward':<9} {'B':>3} {'images/s':>9} {'latency s/img':>14} {'batch s (best/median)':>22} "
              f"{'peak MiB':>9} {'GFLOP/img':>10} {'GFLOP/s':>8} {'of GEMM':>8} {'other CPU s':>12}")
    print(header)
    print("-" * len(header))
    for r in rows:
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "n/a"
        other = f"{r['other_cpu_s']:.1f}" if r["other_cpu_s"] is not None else "n/a"
        print(f"{r['mode']:<9} {r['batch']:>3} {r['images_per_s']:>9.3f} {r['latency_s']:>14.2f} "
              f"{r['best_s']:>10.2f} / {r['median_s']:<9.2f} {peak:>9} {r['flops'] / r['batch'] / 1e9:>10.1f} "
              f"{r['flops_per_s'] / 1e9:>8.1f} {r['flops_per_s'] / peak_gemm:>8.1%} {other:>12}")
    for b in batch_sizes:
        pair = {r["mode"]: r for r in rows if r["batch"] == b}
        if len(pair) == 2:
            print(f"B={b}: speed-up over the official-style forward: {pair['official']['best_s'] / pair['ours']['best_s']:.2f}x")
    try:
        print(f"load average after: {open('/proc/loadavg').read().split()[:3]}")
    except OSError:
        pass
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(machine=machine_description(device), torch=torch.__version__, threads=torch.get_num_threads(),
                           dtype=args.dtype, device=str(device), image_size=args.image_size, compile=args.compile,
                           flops=flops, gemm_flops_per_s=gemm, rows=rows), fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
