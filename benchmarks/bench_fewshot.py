"""Cost of few-shot references over zero-shot inference, on the ViT-L/14@336-sized random model.

Builds the same random ViT-L-14-336 CLIP as ``bench_inference.py`` (no download; the cost does
not depend on the weights), wrapped at S = 518 (37 x 37 patches, 1,369 patch tokens of 768
dimensions per output layer), and measures:

1. **base**: the zero-shot ``model(pixel_values)`` forward at batch 1 (best of ``--repeats``
   after ``--warmup``), for the default output layer (24) and once for four layers
   (6, 12, 18, 24);
2. **fusion**: what references add to that forward, ``AnomalyCLIP._fuse_references`` (the exact
   code ``forward`` runs: chunked nearest-neighbour search of every patch token, reference map,
   blur, fused score) on the real output of that forward, against memories of 4, 16 and 100
   reference images (1,369 rows each per layer). The memories hold random unit vectors: the
   search costs the same for any values. A coreset row keeps 10 % of the 100 images' patches;
   its build time (PatchCore's greedy k-center with a 128-d random projection) is measured on one
   layer, where ``--coreset-build`` is given;
3. **end to end**: full forwards with the 4-reference memory, alternating with zero-shot ones
   (``--repeats`` pairs, so that drift and other load hit both alike), as a check of 1 + 2.

Overhead = fusion / base. The issue's bar: at most 15 % with 4 references.
Peak memory of the fusion step is the rise of the resident-set high-water mark (CPU) or of
``torch.cuda.max_memory_allocated`` (CUDA), as in ``bench_inference.py``.

Usage::

    flock /work/coord/bench.lock python benchmarks/bench_fewshot.py --threads 2 --coreset-build
    python benchmarks/bench_fewshot.py --device cuda --coreset-build
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from bench_inference import OtherLoad, PeakMemory, build_model, machine_description, time_call  # benchmarks/ is on sys.path

from anomalyclip.references import DEFAULT_CHUNK_ELEMENTS, ReferenceMemory

LAYERS = {"24": (24,), "6,12,18,24": (6, 12, 18, 24)}


def random_memory(
    n_images: int,
    layers: tuple[int, ...],
    *,
    grid: int,
    dim: int,
    device: torch.device,
    storage: str,
    keep: float | None,
    image_size: int,
    seed: int = 0,
) -> ReferenceMemory:
    """A memory of ``n_images`` images' worth of random unit patch tokens per layer; with ``keep``,
    a random subset of that size (the size a coreset of that fraction keeps; same search cost)."""
    g = torch.Generator().manual_seed(seed)
    rows = n_images * grid * grid
    if keep is not None:
        rows = int(torch.ceil(torch.tensor(keep * rows)).item())
    memory = ReferenceMemory(image_size=image_size, feature_layers=layers, storage_dtype=storage)
    tokens = {layer: F.normalize(torch.randn(rows, dim, generator=g), dim=-1).to(device) for layer in layers}
    memory.add(tokens, num_images=n_images)
    return memory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--repeats", type=int, default=2, help="timed base forwards (default 2)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--fusion-repeats", type=int, default=3, help="timed fusion steps per row (default 3)")
    parser.add_argument("--coreset-build", action="store_true", help="also time building the 10 %% coreset of 100 images (one layer)")
    parser.add_argument("--chunk-elements", type=int, default=DEFAULT_CHUNK_ELEMENTS)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine_description(device)}; device {device}; torch {torch.__version__}; "
          f"threads {torch.get_num_threads()}; float32; S = {args.image_size}; chunk {args.chunk_elements} elements")
    try:
        print(f"load average before: {open('/proc/loadavg').read().split()[:3]}")
    except OSError:
        pass

    model = build_model(args.image_size, device, torch.float32)
    grid = args.image_size // model.patch_size
    dim = model.config.embed_dim
    pixel_values = torch.randn(1, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(1))
    rows: list[dict] = []
    base: dict[str, float] = {}
    outputs = {}
    with torch.inference_mode():
        model.encode_text()
        for name, layers in LAYERS.items():
            model.reconfigure(feature_layers=layers)
            repeats = args.repeats if name == "24" else 1
            warmup = args.warmup if name == "24" else 0
            for _ in range(warmup):
                model(pixel_values)
            with OtherLoad() as other:
                times, outputs[name] = time_call(lambda: model(pixel_values), device, repeats)
            base[name] = min(times)
            print(f"base zero-shot forward, layers {name}: best {min(times):.2f} s of {[round(t, 2) for t in times]} "
                  f"(other CPU s {other.seconds if other.seconds is None else round(other.seconds, 1)})")

        def fusion_row(name: str, n_images: int, storage: str, keep: float | None, built: float | None = None) -> None:
            layers = LAYERS[name]
            model.reconfigure(feature_layers=layers)
            memory = random_memory(n_images, layers, grid=grid, dim=dim, device=device, storage=storage, keep=keep,
                                   image_size=args.image_size)
            memory.chunk_elements = args.chunk_elements
            model.references = memory
            out = outputs[name]
            model._fuse_references(out, args.image_size)  # warm-up
            with PeakMemory(device) as mem:
                times, _ = time_call(lambda: model._fuse_references(out, args.image_size), device, args.fusion_repeats)
            model.clear_references()
            best = min(times)
            row = dict(layers=name, references=n_images, storage=storage, coreset=keep, memory_rows=len(memory),
                       memory_mib=memory.nbytes() / 2**20, fusion_s=best, fusion_median_s=statistics.median(times),
                       base_s=base[name], overhead=best / base[name], peak_mib=mem.mib, coreset_build_s=built)
            rows.append(row)
            peak = f"{mem.mib:.0f}" if mem.mib is not None else "n/a"
            print(f"  layers {name:<11} refs {n_images:>3} {storage:<7} coreset {str(keep):<4} rows {len(memory):>7} "
                  f"({row['memory_mib']:.0f} MiB): fusion {best * 1e3:.2f} ms = {row['overhead']:.1%} of the base "
                  f"forward; peak +{peak} MiB")

        for n in (4, 16, 100):
            fusion_row("24", n, "float32", None)
        fusion_row("24", 4, "float16", None)
        fusion_row("24", 100, "float16", None)

        built = None
        if args.coreset_build:
            g = torch.Generator().manual_seed(0)
            tokens = F.normalize(torch.randn(100 * grid * grid, dim, generator=g), dim=-1).to(device)
            memory = ReferenceMemory(image_size=args.image_size, feature_layers=(24,))
            start = time.perf_counter()
            memory.add({24: tokens}, num_images=100, coreset=0.1)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            built = time.perf_counter() - start
            print(f"coreset build: 10 % of 100 images x {grid * grid} patches = {len(memory)} rows in {built:.1f} s (one layer)")
            del tokens, memory
        fusion_row("24", 100, "float32", 0.1, built)
        for n in (4, 16):
            fusion_row("6,12,18,24", n, "float32", None)
        fusion_row("6,12,18,24", 100, "float32", 0.1)

        # End to end: full fused forwards with a 4-reference memory, alternating with zero-shot ones.
        model.reconfigure(feature_layers=(24,))
        memory = random_memory(4, (24,), grid=grid, dim=dim, device=device, storage="float32", keep=None,
                               image_size=args.image_size)
        pairs = []
        with OtherLoad() as other:
            for _ in range(args.repeats):
                model.clear_references()
                zero, _ = time_call(lambda: model(pixel_values), device, 1)
                model.references = memory
                fused_t, fused = time_call(lambda: model(pixel_values), device, 1)
                pairs.append((zero[0], fused_t[0]))
        model.clear_references()
        e2e = {"zero_shot_s": min(z for z, _ in pairs), "fused_s": min(f for _, f in pairs),
               "median_ratio": statistics.median(f / z for z, f in pairs), "pairs": pairs, "other_cpu_s": other.seconds}
        print(f"end to end, 4 references, layer 24, {len(pairs)} alternating pairs: fused best {e2e['fused_s']:.4f} s, "
              f"zero-shot best {e2e['zero_shot_s']:.4f} s ({e2e['fused_s'] / e2e['zero_shot_s'] - 1:+.1%}; median of "
              f"the pairs' ratios {e2e['median_ratio'] - 1:+.1%}; other CPU s {other.seconds if other.seconds is None else round(other.seconds, 1)})")
        assert torch.equal(fused.zero_shot_scores, outputs["24"].zero_shot_scores)

    print()
    print("| output layers | references | storage | coreset | memory rows per layer | memory (MiB) | fusion (ms) | overhead | peak (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "n/a"
        coreset = "-" if r["coreset"] is None else f"{r['coreset']:.0%}"
        print(f"| {r['layers']} | {r['references']} | {r['storage']} | {coreset} | {r['memory_rows']:,} | "
              f"{r['memory_mib']:.0f} | {r['fusion_s'] * 1e3:.2f} | {r['overhead']:.1%} | {peak} |")
    try:
        print(f"load average after: {open('/proc/loadavg').read().split()[:3]}")
    except OSError:
        pass
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(machine=machine_description(device), torch=torch.__version__, threads=torch.get_num_threads(),
                           base=base, end_to_end_4=e2e, coreset_build_s=built, rows=rows), fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
