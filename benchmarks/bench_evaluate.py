"""Peak memory and time of ``anomalyclip.evaluate`` on a large data set.

Writes a synthetic MVTec-AD-layout data set (``anomalyclip.data.synthetic``, half the images anomalous
with masks) and evaluates the tiny random CLIP of the test fixtures on it at S = 518 (the paper's
size: the maps and masks the protocol holds have the same size for every backbone, so the
memory of the evaluation itself is that of a real run; only the model's own memory differs).

Reports the wall time, the images/s, and the peak resident memory of the process above the
resident memory after the model is loaded and the data set is read (``VmHWM`` after a reset
through ``/proc/self/clear_refs``, Linux). For comparison it prints the size of one class's float32
maps and boolean masks (what ``evaluate`` holds at a time) and of float64 copies of all maps (what
a straightforward implementation that collects every map before computing metrics would hold).

Usage::

    python benchmarks/bench_evaluate.py                                 # 1,000 images: 5 classes x 200
    python benchmarks/bench_evaluate.py --classes 1 --images 1000        # one class of 1,000 images
    python benchmarks/bench_evaluate.py --threads 2 --image-size 518 --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from bench_inference import PeakMemory  # same peak-RSS measurement (benchmarks/ is on sys.path)

from anomalyclip import AnomalyCLIP, evaluate, load_dataset
from anomalyclip.eval.protocol import format_table
from anomalyclip.data.synthetic import make_synthetic_dataset

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "golden"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000, help="images in total (default 1000)")
    parser.add_argument("--classes", type=int, default=5, help="classes (default 5)")
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--data", default=None, help="reuse (or create) the synthetic data set here")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    warnings.simplefilter("ignore")

    per_class = args.images // args.classes
    names = [f"texture_{chr(ord('a') + i)}" for i in range(args.classes)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data) if args.data else Path(tmp) / "data"
        if not root.exists():
            start = time.perf_counter()
            make_synthetic_dataset(
                root, layout="mvtec", classes=names, n_normal=per_class - per_class // 2,
                n_anomalous=per_class // 2, size=(256, 256), seed=0,
            )
            print(f"wrote {per_class * args.classes} images in {time.perf_counter() - start:.0f} s")
        model = AnomalyCLIP.from_official_checkpoint(
            GOLDEN / "official_prompt_learner.pth", clip=f"local-dir:{GOLDEN / 'tiny-clip'}",
            device="cpu", image_size=args.image_size,
        )
        dataset = load_dataset(root, "mvtec")
        with torch.inference_mode():  # text features cached before the measurement
            model.encode_text()
        with PeakMemory(torch.device("cpu")) as memory:
            start = time.perf_counter()
            report = evaluate(model, dataset, batch_size=args.batch_size, progress=False)
            seconds = time.perf_counter() - start
        if memory.mib is None:
            raise SystemExit("peak memory needs Linux's /proc/self/status and /proc/self/clear_refs")
        peak_mib = memory.mib

    s = args.image_size
    n = len(dataset)
    one_class_mib = per_class * s * s * (4 + 1) / 2**20
    all_f64_mib = n * s * s * 8 / 2**20
    print(format_table(report))
    print(f"\n{n} images, {args.classes} classes of {per_class}, S = {s}, batch {args.batch_size}, "
          f"threads {torch.get_num_threads()}")
    print(f"time {seconds:.0f} s ({n / seconds:.1f} images/s, tiny CLIP)")
    print(f"peak memory above the loaded model and data set: {peak_mib:.0f} MiB")
    print(f"  one class's float32 maps + bool masks: {one_class_mib:.0f} MiB; "
          f"float64 copies of all {n} maps: {all_f64_mib:.0f} MiB")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(dict(images=n, classes=args.classes, image_size=s, seconds=seconds, peak_mib=peak_mib,
                           one_class_mib=one_class_mib, all_float64_mib=all_f64_mib,
                           threads=torch.get_num_threads(), pid=os.getpid()), handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
