"""Batch inference on a local Ray cluster: images/s with 1 and 2 workers, scaling, start-up cost.

Scores the same images four ways on this machine, with the tiny random CLIP of the test fixtures
(ViT width 128, 24 blocks; no download) at the processing size S (default 518):

1. **single process, 1 thread**: ``model.predict`` over the image paths, what one actor does;
2. **single process, all threads**: the same with torch using every core (the usual CLI run);
3. **Ray, 1 worker** and 4. **Ray, 2 workers**: :func:`anomalyclip.distributed.predict_dataset`
   on a local Ray (``num_cpus`` = the core count), one CPU per actor, 16-bit PNG maps written to
   files, results pulled to the driver.

For each Ray run it reports the wall time (actor start, model load and all batches: what a user
waits for), the time to the first result, and the steady-state rate (images after the first
result over the time after it), whose ratio between 2 and 1 workers gives the scaling
efficiency ``rate(2) / (2 * rate(1))``. Ray's own start-up (``ray.init`` of a local cluster) is
timed separately. The four kinds of run alternate within each repeat (so that a changing
background load on a shared machine hits them alike); each figure is the median of ``--repeats``.

Usage::

    python benchmarks/bench_ray.py                       # 48 images, S = 518, 3 repeats
    python benchmarks/bench_ray.py --images 96 --repeats 5 --json ray.json

Wrap it in ``flock /work/coord/bench.lock`` on a shared machine; the load average before and
after is printed so that a disturbed run shows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "golden"


def write_images(folder: Path, count: int, seed: int = 0) -> list[str]:
    """``count`` PNGs of mixed sizes (192 to 640 px a side) cut from the fixture images."""
    rng = np.random.default_rng(seed)
    sources = [Image.open(GOLDEN / "image_a.png").convert("RGB"), Image.open(GOLDEN / "image_b.png").convert("RGB")]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        w, h = (int(x) for x in rng.integers(192, 641, size=2))
        image = sources[i % 2].resize((w, h), Image.BICUBIC)
        path = folder / f"img_{i:05d}.png"
        image.save(path)
        paths.append(str(path))
    return paths


def save_model(folder: Path) -> Path:
    from anomalyclip import AnomalyCLIP

    model = AnomalyCLIP.from_official_checkpoint(
        GOLDEN / "official_prompt_learner.pth", clip=f"local-dir:{GOLDEN / 'tiny-clip'}", device="cpu"
    )
    return model.save_pretrained(folder)


def single_process(model_dir: Path, paths: list[str], *, image_size: int, batch_size: int, threads: int) -> float:
    """Seconds for ``model.predict`` over ``paths`` in this process with ``threads`` torch threads."""
    import torch

    from anomalyclip import AnomalyCLIP

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = AnomalyCLIP.from_pretrained(model_dir, device="cpu", image_size=image_size)
        model.predict(paths[:1])  # warm-up: text features, allocator
        start = time.perf_counter()
        model.predict(paths, batch_size=batch_size)
        return time.perf_counter() - start
    finally:
        torch.set_num_threads(before)


def ray_run(model_dir: Path, paths: list[str], map_dir: Path, *, workers: int, image_size: int, batch_size: int) -> dict:
    """One ``predict_dataset`` run: wall time, time to the first result, steady-state rate."""
    from anomalyclip.distributed import predict_dataset

    start = time.perf_counter()
    ds = predict_dataset(
        paths, model_dir, batch_size=batch_size, concurrency=workers, num_cpus=1,
        maps="png", map_dir=map_dir, device="cpu", image_size=image_size,
    )
    rows = 0
    first_t = first_rows = None
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        rows += batch.num_rows
        if first_t is None:
            first_t, first_rows = time.perf_counter(), rows
    end = time.perf_counter()
    if rows != len(paths):
        raise RuntimeError(f"got {rows} rows for {len(paths)} images")
    return dict(
        wall_s=end - start,
        first_result_s=first_t - start,
        steady_images_per_s=(rows - first_rows) / (end - first_t) if end > first_t else float("nan"),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    import ray
    import torch

    cores = os.cpu_count() or 1
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_images(tmp / "images", args.images)
        model_dir = save_model(tmp / "model")
        n = len(paths)
        options = dict(image_size=args.image_size, batch_size=args.batch_size)

        # Interleaved, so that every kind of run sees the same background load on a shared machine.
        single: dict[int, list[float]] = {t: [] for t in sorted({1, cores})}
        init_s = []
        runs: dict[int, list[dict]] = {1: [], 2: []}
        actor_threads = None
        for repeat in range(args.repeats):
            single[1].append(single_process(model_dir, paths, threads=1, **options))
            start = time.perf_counter()
            ray.init(address="local", num_cpus=cores, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
            init_s.append(time.perf_counter() - start)
            ray.data.DataContext.get_current().enable_progress_bars = False
            try:
                if actor_threads is None:
                    actor_threads = ray.get(ray.remote(num_cpus=1)(lambda: __import__("torch").get_num_threads()).remote())
                for workers in runs:
                    runs[workers].append(
                        ray_run(model_dir, paths, tmp / f"maps-{workers}-{repeat}", workers=workers, **options)
                    )
            finally:
                ray.shutdown()
            if cores > 1:
                single[cores].append(single_process(model_dir, paths, threads=cores, **options))
        single_raw = dict(single)
        single = {t: statistics.median(v) for t, v in single.items()}
    load_after = os.getloadavg()

    def med(workers: int, key: str) -> float:
        return statistics.median(r[key] for r in runs[workers])

    result = dict(
        machine=f"{platform.processor() or platform.machine()}, {cores} logical CPUs",
        python=platform.python_version(), torch_version=torch.__version__, ray_version=ray.__version__,
        images=n, image_size=args.image_size, batch_size=args.batch_size, repeats=args.repeats,
        torch_threads_in_actor=actor_threads,
        single_process={f"{t}_threads": dict(seconds=s, images_per_s=n / s) for t, s in single.items()},
        ray_init_s=statistics.median(init_s),
        ray={
            w: dict(
                wall_s=med(w, "wall_s"), images_per_s=n / med(w, "wall_s"), first_result_s=med(w, "first_result_s"),
                steady_images_per_s=med(w, "steady_images_per_s"),
            )
            for w in runs
        },
        load_average_before=load_before, load_average_after=load_after,
        raw=dict(single_process_1_thread_s=single_raw[1], ray_init_s=init_s, ray_runs={w: r for w, r in runs.items()}),
    )
    r1, r2 = result["ray"][1], result["ray"][2]
    result["scaling_efficiency_steady"] = r2["steady_images_per_s"] / (2 * r1["steady_images_per_s"])
    result["scaling_efficiency_wall"] = r2["images_per_s"] / (2 * r1["images_per_s"])
    result["per_run_overhead_s"] = {w: result["ray"][w]["wall_s"] - n / result["ray"][w]["steady_images_per_s"] for w in runs}

    print(f"{n} images (192-640 px), S = {args.image_size}, batch {args.batch_size}, tiny CLIP, "
          f"median of {args.repeats}; torch threads per actor: {actor_threads}")
    print("| run | wall (s) | images/s | first result (s) | steady images/s |")
    print("|---|---|---|---|---|")
    for t, s in single.items():
        print(f"| single process, {t} thread{'s' if t > 1 else ''} | {s:.1f} | {n / s:.2f} | | |")
    for w, r in result["ray"].items():
        print(f"| Ray, {w} worker{'s' if w > 1 else ''} | {r['wall_s']:.1f} | {r['images_per_s']:.2f} | "
              f"{r['first_result_s']:.1f} | {r['steady_images_per_s']:.2f} |")
    print(f"ray.init (local cluster): {result['ray_init_s']:.1f} s; per-run overhead (wall - n / steady): "
          + ", ".join(f"{w} worker(s) {v:.1f} s" for w, v in result["per_run_overhead_s"].items()))
    print(f"scaling efficiency 1 -> 2 workers: steady {result['scaling_efficiency_steady']:.2f}, "
          f"wall {result['scaling_efficiency_wall']:.2f}")
    print(f"load average before {load_before}, after {load_after}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
