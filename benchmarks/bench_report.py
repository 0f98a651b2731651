"""Time that ``--report`` adds to ``anomalyclip evaluate``: details + ``report.html`` vs metrics only.

Writes the synthetic MVTec-AD-layout set of ``bench_evaluate.py`` (``anomalyclip.data.synthetic``,
half of each class anomalous with masks, 256 x 256 PNGs; fewer images by default) and evaluates
the tiny test CLIP on it, alternating in one process

* plain: ``evaluate(model, dataset)`` + ``write_reports(report, out)`` (metrics.json/csv), and
* report: ``evaluate(model, dataset, details=True)`` + ``write_reports(report, out, html=True)``,

``--repeats`` times each, plain first then report, so that load from other processes on a shared
machine hits both alike. Each run is timed in wall-clock seconds and in CPU seconds of this
process (``time.process_time``, all threads: much less sensitive than the wall clock to other
processes competing for the cores). It prints each pair, the median ratios report / plain, and
the CPU time of a first ``import matplotlib`` measured in a fresh interpreter (paid once per CLI
run, not by the in-process repeats; it is added to the report median for the reported ratio).

Usage::

    python benchmarks/bench_report.py                                   # 5 classes x 20 images, S = 224
    python benchmarks/bench_report.py --image-size 518 --images 200     # the paper's map size
    python benchmarks/bench_report.py --threads 2 --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from anomalyclip import AnomalyCLIP, evaluate, load_dataset
from anomalyclip.data.synthetic import make_synthetic_dataset
from anomalyclip.eval.protocol import write_reports

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "golden"


def _matplotlib_import_seconds() -> float:
    code = "import time; t = time.process_time(); import matplotlib.figure, matplotlib.backends.backend_agg; print(time.process_time() - t)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100, help="images in total (default 100)")
    parser.add_argument("--classes", type=int, default=5, help="classes (default 5)")
    parser.add_argument("--image-size", type=int, default=224, help="processing size S (default 224)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="pairs of runs (default 3)")
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
            make_synthetic_dataset(
                root, layout="mvtec", classes=names, n_normal=per_class - per_class // 2,
                n_anomalous=per_class // 2, size=(256, 256), seed=0,
            )
        model = AnomalyCLIP.from_official_checkpoint(
            GOLDEN / "official_prompt_learner.pth", clip=f"local-dir:{GOLDEN / 'tiny-clip'}",
            device="cpu", image_size=args.image_size,
        )
        dataset = load_dataset(root, "mvtec")
        with torch.inference_mode():
            model.encode_text()
        evaluate(model, dataset.subset(names[:1]), batch_size=args.batch_size, progress=False)  # warm-up
        times: dict[str, list[tuple[float, float]]] = {"plain": [], "report": []}  # (wall, cpu) seconds
        page_kib = 0.0
        for repeat in range(args.repeats):
            for kind in ("plain", "report"):
                wall, cpu = time.perf_counter(), time.process_time()
                result = evaluate(model, dataset, batch_size=args.batch_size, progress=False, details=kind == "report")
                write_reports(result, Path(tmp) / kind, html=kind == "report")
                times[kind].append((time.perf_counter() - wall, time.process_time() - cpu))
            page_kib = (Path(tmp) / "report" / "report.html").stat().st_size / 1024
            (pw, pc), (rw, rc) = times["plain"][-1], times["report"][-1]
            print(f"pair {repeat + 1}: plain {pw:.1f} s wall / {pc:.1f} s CPU, report {rw:.1f} s wall / {rc:.1f} s CPU, "
                  f"ratio {rw / pw:.3f} wall / {rc / pc:.3f} CPU", flush=True)
    mpl = _matplotlib_import_seconds()
    print(f"\n{len(dataset)} images, {args.classes} classes, S = {args.image_size}, batch {args.batch_size}, "
          f"threads {torch.get_num_threads()}, report.html {page_kib:.0f} KiB, first matplotlib import {mpl:.2f} s CPU")
    for i, clock in enumerate(("wall", "CPU")):
        plain = statistics.median(t[i] for t in times["plain"])
        report = statistics.median(t[i] for t in times["report"])
        pairs = statistics.median(r[i] / p[i] for p, r in zip(times["plain"], times["report"]))
        print(f"{clock}: median plain {plain:.1f} s, report {report:.1f} s, median pair ratio {pairs:.3f}; "
              f"with the import {(report + mpl) / plain:.3f} (added {100 * ((report + mpl) / plain - 1):.1f} %)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(dict(images=len(dataset), classes=args.classes, image_size=args.image_size, times=times,
                           matplotlib_import_cpu=mpl, page_kib=page_kib), handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
