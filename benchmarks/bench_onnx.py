"""ONNX deployment speed and deviation: onnxruntime against the torch path, in one run.

1. **Speed.** A ViT-L-14-336-sized CLIP with random weights (``bench_inference.build_model``; the
   cost does not depend on the values) at S = 518 is exported with ``AnomalyCLIP.export_onnx``
   (float32) and, with ``--int8``, quantized with ``anomalyclip.onnx.quantize_int8``. For each
   batch size, on the same random inputs, with the same number of threads (``torch.set_num_threads``
   and onnxruntime's ``intra_op_num_threads``), it times the torch forward ``model(pixel_values)``
   under ``torch.inference_mode()`` and ``session.run`` of each ONNX file (both: vision forward,
   scores, maps, blur; torch's text features cached as in normal use), and compares the outputs.
   With ``--references N`` it also exports the model with N few-shot reference images (random
   pixels; the search costs the same for any values) and times torch and onnxruntime float32
   with them, in the same interleaving.
   ``--model tiny`` times the golden tiny CLIP instead (the test model; seconds, not minutes).
   With ``--openvino`` the same float32 file also runs on OpenVINO's CPU plugin
   (``OnnxAnomalyCLIP(..., backend="openvino")``) in float32 and in bfloat16 (its
   ``INFERENCE_PRECISION_HINT``), with the same thread count, in the same interleaving.
2. **Deviation on the golden images** (``--golden``): the golden prompts on the tiny test CLIP,
   ``image_a`` / ``image_b`` at 518 px, layers 24 and 6, 12, 18, 24: onnxruntime float32 and int8
   against the torch model and against the official golden outputs; then the same with one
   few-shot reference (``image_b`` mirrored) in the graph. With ``--openvino``, also OpenVINO
   float32 and bfloat16 against onnxruntime float32 and against torch.

Usage::

    python benchmarks/bench_onnx.py --threads 2 --batch-sizes 1,8 --repeats 2 --int8 --golden
    python benchmarks/bench_onnx.py --golden --no-speed             # deviation only (seconds)
    python benchmarks/bench_onnx.py --batch-sizes 1,8 --references 4  # + few-shot references in the graph
    python benchmarks/bench_onnx.py --openvino --golden --model tiny --batch-sizes 1,8 --repeats 5

Times are the best of ``--repeats`` after ``--warmup`` untimed runs; the timed runs alternate
between the backends (torch, onnxruntime float32, int8, torch, ...) so that load from other
processes falls on all alike. "other CPU s" is the CPU time other processes used during a
backend's timed runs (contention check: well above 0 means the machine was shared).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from bench_inference import OtherLoad, _use_forward, build_model, machine_description  # noqa: E402  (benchmarks/ is on sys.path)

from anomalyclip import AnomalyCLIP, cpu_attention, cpu_linear  # noqa: E402
from anomalyclip.onnx import OnnxAnomalyCLIP, quantize_int8  # noqa: E402

GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "golden"
LAYERS = {"top": (24,), "multi": (6, 12, 18, 24)}


def _max_abs(a: Any, b: Any) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def _interleaved(
    backends: dict[str, Callable[[], Any]], warmup: int, repeats: int, pause: float = 1.0
) -> dict[str, tuple[list[float], Any, float | None, float | None]]:
    """Per backend: (times, last result, other-process CPU s).

    The warm-up runs backend after backend; the timed runs alternate between backends, repeat
    after repeat, so that load from other processes on a shared machine falls on all of them alike.
    Each timed run starts ``pause`` seconds after the previous one ended: the previous backend's
    worker threads (onnxruntime's and OpenVINO's pools, OpenMP's) spin for a while after a run
    and would otherwise take CPU from the next backend.
    """
    for fn in backends.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {label: [] for label in backends}
    other: dict[str, float | None] = {label: 0.0 for label in backends}
    last: dict[str, Any] = {}
    for _ in range(repeats):
        for label, fn in backends.items():
            time.sleep(pause)
            with OtherLoad() as load:
                start = time.perf_counter()
                last[label] = fn()
                times[label].append(time.perf_counter() - start)
            if load.seconds is None or other[label] is None:
                other[label] = None
            else:
                other[label] += load.seconds
    return {label: (times[label], last[label], other[label]) for label in backends}


def _golden_model() -> AnomalyCLIP:
    return AnomalyCLIP.from_official_checkpoint(
        GOLDEN / "official_prompt_learner.pth", clip=f"local-dir:{GOLDEN / 'tiny-clip'}", device="cpu"
    )


def _openvino_sessions(path: Path, threads: int) -> dict[str, OnnxAnomalyCLIP]:
    """The float32 file on OpenVINO's CPU plugin, float32 and bfloat16 (where the CPU has it)."""
    import openvino

    precisions = ["f32"] + (["bf16"] if "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES") else [])
    names = {"f32": "float32", "bf16": "bfloat16"}
    return {f"openvino {names[p]}": OnnxAnomalyCLIP(path, backend="openvino", precision=p, threads=threads) for p in precisions}


def speed(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    if args.model == "tiny":
        model = _golden_model()
        model.reconfigure(image_size=args.image_size)
    else:
        model = build_model(args.image_size, torch.device("cpu"), torch.float32)
    if args.feature_layers:
        model.reconfigure(feature_layers=args.feature_layers)
    print(f"output layers: {list(model.config.feature_layers)}")
    files = {}
    start = time.perf_counter()
    export_dir = Path(args.export_dir) if args.export_dir else workdir
    reuse = export_dir / "vitl.onnx"
    if args.onnx:  # an existing float32 export of this model (the outputs are checked against torch below)
        files["onnxruntime float32"], export_s = Path(args.onnx), None
    elif args.export_dir and reuse.exists() and not args.references and not args.feature_layers:
        # the random model is seeded (bench_inference.build_vit_l_clip): the same weights as the
        # earlier export; the output comparison below would show any mismatch
        files["onnxruntime float32"] = reuse
        export_s = None
        print(f"export (float32): reusing {reuse} ({reuse.stat().st_size / 1e6:.0f} MB)")
    else:
        export_dir.mkdir(parents=True, exist_ok=True)
        files["onnxruntime float32"] = model.export_onnx(export_dir / "vitl.onnx")
        export_s = time.perf_counter() - start
        print(f"export (float32): {export_s:.1f} s, {files['onnxruntime float32'].stat().st_size / 1e6:.0f} MB")
    quantize_s = None
    if args.int8:
        start = time.perf_counter()
        files["onnxruntime int8"] = quantize_int8(files["onnxruntime float32"], workdir / "vitl-int8.onnx")
        quantize_s = time.perf_counter() - start
        print(f"quantize (dynamic int8): {quantize_s:.1f} s, {files['onnxruntime int8'].stat().st_size / 1e6:.0f} MB")
    memory = None
    if args.references:
        # Reference images of random pixels: the search's cost depends on the memory's size only.
        rng = np.random.default_rng(0)
        size = args.image_size
        images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(args.references)]
        model.add_references(images)
        memory = model.references
        start = time.perf_counter()
        files[f"onnxruntime float32 + {args.references} refs"] = model.export_onnx(workdir / "vitl-refs.onnx")
        print(f"export (float32, {args.references} references, {len(memory)} patches x {len(memory.feature_layers)} layers): "
              f"{time.perf_counter() - start:.1f} s, {files[f'onnxruntime float32 + {args.references} refs'].stat().st_size / 1e6:.0f} MB")
        model.clear_references()
    sessions = {}
    for label, path in files.items():
        start = time.perf_counter()
        sessions[label] = OnnxAnomalyCLIP(path, providers=["CPUExecutionProvider"], threads=args.threads)
        print(f"session ({label}): {time.perf_counter() - start:.1f} s")
    if args.openvino:
        start = time.perf_counter()
        sessions.update(_openvino_sessions(files["onnxruntime float32"], args.threads))
        print(f"OpenVINO compile (float32 and bfloat16): {time.perf_counter() - start:.1f} s")
    with torch.inference_mode():
        model.encode_text()  # cached: outside the timings, as in normal use

    rows = []
    for b in args.batch_sizes:
        pixel_values = torch.randn(b, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(b))
        array = pixel_values.numpy()

        def torch_forward(
            references: Any = None, linear: str | None = None, mode: str = "ours", attention: str | None = None
        ) -> tuple[np.ndarray, np.ndarray]:
            model.references = references
            previous = cpu_linear.set_cpu_linear_backend(linear) if linear else None
            previous_attention = cpu_attention.set_cpu_attention_backend(attention) if attention else None
            _use_forward(model, mode)
            try:
                with torch.inference_mode():
                    out = model(pixel_values)
            finally:
                _use_forward(model, "ours")
                if previous is not None:
                    cpu_linear.set_cpu_linear_backend(previous)
                if previous_attention is not None:
                    cpu_attention.set_cpu_attention_backend(previous_attention)
            return out.scores.numpy(), out.anomaly_maps.numpy()

        backends: dict[str, Callable[[], Any]] = {"torch": torch_forward}
        for linear in args.torch_linear:  # the library's forward with each CPU linear kernel
            backends[f"torch ({linear})"] = lambda linear=linear: torch_forward(linear=linear)
        for attention in args.torch_attention:  # ... and with each CPU attention kernel
            backends[f"torch (attention {attention})"] = lambda attention=attention: torch_forward(attention=attention)
        if args.official:
            backends["torch official-style"] = lambda: torch_forward(linear="mkl", mode="official")
        if memory is not None:
            backends[f"torch + {args.references} refs"] = lambda: torch_forward(memory)
        for label, session in sessions.items():
            backends[label] = lambda s=session: s.run(array)
        outputs = {}
        for label, (times, outputs[label], other) in _interleaved(backends, args.warmup, args.repeats).items():
            best = min(times)
            rows.append(dict(backend=label, batch=b, best_s=best, median_s=statistics.median(times), images_per_s=b / best,
                             s_per_image=best / b, other_cpu_s=other, times=times))
            print(f"  B={b} {label:<20} best {best:8.2f} s ({best / b:.2f} s/image), median {statistics.median(times):.2f} s, "
                  f"times {[round(t, 2) for t in times]}, other CPU {other if other is not None else float('nan'):.1f} s")
        for label in sessions:
            ref = outputs[f"torch + {args.references} refs" if label.endswith(" refs") else "torch"]
            s, m = outputs[label]
            rows.append(dict(backend=label, batch=b, vs_torch_score=_max_abs(s, ref[0]), vs_torch_map=_max_abs(m, ref[1])))
            print(f"  B={b} {label} vs torch: max |score diff| {_max_abs(s, ref[0]):.2e}, max |map diff| {_max_abs(m, ref[1]):.2e}")
    return dict(export_s=export_s, quantize_s=quantize_s, rows=rows,
                file_mb={k: v.stat().st_size / 1e6 for k, v in files.items()})


def golden(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    expected = load_file(str(GOLDEN / "expected.safetensors"))
    model = _golden_model()
    images = [GOLDEN / "image_a.png", GOLDEN / "image_b.png"]
    out: dict[str, Any] = {}
    print("golden images (tiny CLIP, S = 518), max |difference| (score; map):")
    for variant, layers in LAYERS.items():
        f32 = model.export_onnx(workdir / f"golden-{variant}.onnx", feature_layers=layers)
        i8 = quantize_int8(f32, workdir / f"golden-{variant}-int8.onnx")
        rt32, rt8 = OnnxAnomalyCLIP(f32, threads=args.threads), OnnxAnomalyCLIP(i8, threads=args.threads)
        pixel_values = rt32.preprocess(images)
        model.reconfigure(feature_layers=layers)
        with torch.inference_mode():
            ref = model(torch.from_numpy(pixel_values))
        model.reconfigure(feature_layers=(24,))
        official_s = np.array([float(expected[f"{n}.{variant}.score"]) for n in "ab"])
        official_m = np.stack([expected[f"{n}.{variant}.anomaly_map"][0].numpy() for n in "ab"])
        s32, m32 = rt32.run(pixel_values)
        s8, m8 = rt8.run(pixel_values)
        comparisons = {
            "onnxruntime float32 vs torch": (s32, m32, ref.scores.numpy(), ref.anomaly_maps.numpy()),
            "onnxruntime float32 vs official golden": (s32, m32, official_s, official_m),
            "onnxruntime int8 vs onnxruntime float32": (s8, m8, s32, m32),
            "onnxruntime int8 vs torch float32": (s8, m8, ref.scores.numpy(), ref.anomaly_maps.numpy()),
        }
        if args.openvino:
            for label, session in _openvino_sessions(f32, args.threads).items():
                s, m = session.run(pixel_values)
                comparisons[f"{label} vs onnxruntime float32"] = (s, m, s32, m32)
                comparisons[f"{label} vs torch"] = (s, m, ref.scores.numpy(), ref.anomaly_maps.numpy())
        for label, (s, m, rs, rm) in comparisons.items():
            out[f"{variant}: {label}"] = (_max_abs(s, rs), _max_abs(m, rm))
            print(f"  layers {','.join(map(str, layers)):<12} {label:<42} {_max_abs(s, rs):.2e}; {_max_abs(m, rm):.2e}")
        # With one few-shot reference (image_b mirrored; image_a, the defective one, is not in it).
        model.reconfigure(feature_layers=layers)
        model.add_references([np.asarray(Image.open(images[1]))[:, ::-1].copy()])
        f32r = model.export_onnx(workdir / f"golden-{variant}-refs.onnx")
        i8r = quantize_int8(f32r, workdir / f"golden-{variant}-refs-int8.onnx")
        with torch.inference_mode():
            ref_r = model(torch.from_numpy(pixel_values))
        model.clear_references()
        model.reconfigure(feature_layers=(24,))
        s32r, m32r = OnnxAnomalyCLIP(f32r, threads=args.threads).run(pixel_values)
        s8r, m8r = OnnxAnomalyCLIP(i8r, threads=args.threads).run(pixel_values)
        with_reference = {
            "+ 1 reference: onnxruntime float32 vs torch": (s32r, m32r, ref_r.scores.numpy(), ref_r.anomaly_maps.numpy()),
            "+ 1 reference: onnxruntime int8 vs float32": (s8r, m8r, s32r, m32r),
        }
        if args.openvino:
            for label, session in _openvino_sessions(f32r, args.threads).items():
                s, m = session.run(pixel_values)
                with_reference[f"+ 1 reference: {label} vs onnxruntime float32"] = (s, m, s32r, m32r)
        for label, (s, m, rs, rm) in with_reference.items():
            out[f"{variant}: {label}"] = (_max_abs(s, rs), _max_abs(m, rm))
            print(f"  layers {','.join(map(str, layers)):<12} {label:<42} {_max_abs(s, rs):.2e}; {_max_abs(m, rm):.2e}")
        # Also the mean absolute map difference and the scale of the maps, to put int8 in context.
        print(f"  layers {','.join(map(str, layers)):<12} int8 vs float32: mean |map diff| {np.abs(m8 - m32).mean():.2e}; "
              f"map range [{m32.min():.3f}, {m32.max():.3f}]; scores float32 {np.round(s32, 4).tolist()} int8 {np.round(s8, 4).tolist()}")
    return out


def _int8_flags() -> str:
    """The CPU's int8 dot-product extensions (they decide the int8 speed), e.g. '; int8: avx512_vnni, amx_int8'."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return ""
    found = [f for f in ("avx_vnni", "avx512_vnni", "amx_int8") if f in flags]
    return f"; int8: {', '.join(found)}" if found else "; no int8 dot-product extensions"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated (default 1,8)")
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads (default 2)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--int8", action="store_true", help="also time onnxruntime's dynamic int8 quantization")
    parser.add_argument("--golden", action="store_true", help="deviation of float32 / int8 exports on the golden images")
    parser.add_argument("--no-speed", action="store_true", help="skip the ViT-L speed comparison")
    parser.add_argument("--feature-layers", default=None, help="output layers of the speed model, e.g. 6,12,18,24 (default: 24)")
    parser.add_argument("--references", type=int, default=0, help="also time torch and onnxruntime float32 with N few-shot references")
    parser.add_argument("--openvino", action="store_true", help="also run the float32 export on OpenVINO, float32 and bfloat16")
    parser.add_argument("--model", choices=("vitl", "tiny"), default="vitl",
                        help="speed model: the ViT-L/14@336-sized random CLIP (default) or the golden tiny CLIP")
    parser.add_argument("--onnx", default=None, help="time this float32 export of the speed model instead of exporting one")
    parser.add_argument("--workdir", default=None, help="where to write the exports (default: a temporary directory)")
    parser.add_argument("--torch-linear", default="",
                        help="also time the torch forward with these CPU linear backends, e.g. onednn,mkl "
                             "(anomalyclip.cpu_linear; 'torch' alone uses the current one, ANOMALYCLIP_CPU_LINEAR or auto)")
    parser.add_argument("--torch-attention", default="",
                        help="also time the torch forward with these CPU attention backends, e.g. sdpa,onednn "
                             "(anomalyclip.cpu_attention)")
    parser.add_argument("--official", action="store_true",
                        help="also time the official-style forward (bench_inference; F.linear as the release runs it)")
    parser.add_argument("--export-dir", default=None,
                        help="keep the float32 export here and reuse it in later runs (the model is seeded; default: "
                             "a temporary directory, exported every run)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    args.feature_layers = [int(x) for x in args.feature_layers.split(",")] if args.feature_layers else None
    args.torch_linear = [x.strip() for x in args.torch_linear.split(",") if x.strip()]
    for linear in args.torch_linear:
        if linear not in cpu_linear.CPU_LINEAR_BACKENDS:
            parser.error(f"--torch-linear: unknown backend {linear!r}; use {', '.join(cpu_linear.CPU_LINEAR_BACKENDS)}")
    args.torch_attention = [x.strip() for x in args.torch_attention.split(",") if x.strip()]
    for attention in args.torch_attention:
        if attention not in cpu_attention.CPU_ATTENTION_BACKENDS:
            parser.error(f"--torch-attention: unknown backend {attention!r}; "
                         f"use {', '.join(cpu_attention.CPU_ATTENTION_BACKENDS)}")
    torch.set_num_threads(args.threads)
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime's quantizer logs every node at INFO

    import onnxruntime

    print(f"machine: {machine_description(torch.device('cpu'))}{_int8_flags()}; torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"onnxruntime {onnxruntime.__version__} ({args.threads} intra-op threads); S = {args.image_size}; "
          f"CPU linear backend {cpu_linear.get_cpu_linear_backend()!r}; "
          f"CPU attention backend {cpu_attention.get_cpu_attention_backend()!r}")
    if args.openvino:
        import openvino

        print(f"openvino {openvino.__version__} ({args.threads} inference threads)")
    print(f"load average before: {open('/proc/loadavg').read().split()[:3]}")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        workdir = Path(tmp)
        if args.golden:
            results["golden"] = golden(args, workdir)
        if not args.no_speed:
            results["speed"] = speed(args, workdir)
    print(f"auto's CPU kernel choices: linear {cpu_linear.auto_choices()}; "
          f"attention {cpu_attention.auto_choices()}")
    print(f"load average after: {open('/proc/loadavg').read().split()[:3]}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
