"""End-to-end ``anomalyclip predict`` against the forward alone, in the same run.

Writes a folder of ``--images`` synthetic ``--image-px`` x ``--image-px`` files (PNG and/or JPEG,
smooth pictures with sensor-like noise, as :func:`bench_inference.write_predict_images`), builds
the model of ``benchmarks/bench_inference.py`` (a ViT-L/14@336-sized CLIP with random weights, or
the tests' tiny CLIP with ``--model tiny``) at ``--image-size`` (518), and times, interleaved
``--repeats`` times, on the same model, device, dtype and batch size:

- ``forward``: ``model(pixel_values)`` over the same number of images, the input already
  preprocessed and on the device (the ceiling);
- ``cli --no-overlays``: the whole ``anomalyclip predict`` run of :mod:`anomalyclip.predict_run`
  (the command's code after the model is loaded: one ``predict_iter`` stream, decoding on worker
  threads, maps resized on the device and copied once per batch, rows appended to
  ``scores.csv``, ``scores.json`` at the end);
- ``cli``: the same with the heat-map overlays (encoded on the output threads).

The figure is each pipeline's images/s as a fraction of the forward's (median over repeats).
The model is built in-process (a random ViT-L has no saved backbone for ``--model DIR``), so
model loading is not timed.

Usage::

    python benchmarks/bench_pipeline.py                                   # CPU, ViT-L, 518 px, 16 PNGs of 1024 px
    python benchmarks/bench_pipeline.py --model tiny --image-size 224 --images 8 --repeats 1   # dry run, seconds
    python benchmarks/bench_pipeline.py --device cuda --dtype bfloat16 --batch-size 32 --images 256 \\
        --formats png,jpeg --json pipeline.json
    python benchmarks/bench_pipeline.py ... --add-to-json bench.json     # as benchmarks/device_check.sh does
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import build_model, write_predict_images  # noqa: E402

from anomalyclip.cli import build_parser  # noqa: E402
from anomalyclip.predict_io import collect_images  # noqa: E402
from anomalyclip.predict_run import run_predict  # noqa: E402
from anomalyclip.runtime import resolve_dtype  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_images(directory: Path, count: int, size: int, fmt: str) -> list[Path]:
    """``count`` files in ``fmt`` (png or jpeg) under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = write_predict_images(directory, count, size, workers=os.cpu_count() or 1)
    if fmt == "png":
        return paths
    from PIL import Image

    out = []
    for p in paths:
        target = p.with_suffix(".jpg")
        with Image.open(p) as img:
            img.convert("RGB").save(target, quality=90)
        p.unlink()
        out.append(target)
    return out


def time_forward(model: Any, count: int, batch_size: int, device: torch.device) -> float:
    """Seconds of ``model(pixel_values)`` over ``count`` images (batches of ``batch_size``, input on the device)."""
    size = model.config.image_size
    batch = torch.randn(batch_size, 3, size, size, device=device)
    with torch.inference_mode():
        model(batch[:1])
        _sync(device)
        start = time.perf_counter()
        done = 0
        while done < count:
            n = min(batch_size, count - done)
            model(batch[:n])
            done += n
        _sync(device)
    return time.perf_counter() - start


def time_cli(model: Any, folder: Path, out: Path, batch_size: int, extra: list[str], device: torch.device) -> float:
    """Seconds of the ``anomalyclip predict`` run (after the model is loaded) over ``folder``."""
    args = build_parser().parse_args(["-q", "predict", str(folder), "--out", str(out), "--batch-size", str(batch_size), *extra])
    images = collect_images(args.inputs)
    _sync(device)
    start = time.perf_counter()
    code = run_predict(args, model, images)
    _sync(device)
    if code != 0:
        raise SystemExit(f"predict exited with {code}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="vit-l", choices=["vit-l", "tiny"])
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--image-px", type=int, default=1024)
    parser.add_argument("--formats", default="png", help="comma list of png, jpeg")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    parser.add_argument(
        "--add-to-json", default=None, metavar="FILE",
        help="add the figures as key 'pipeline' to this JSON file (e.g. bench_inference's --json output)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype)
    model = build_model(args.image_size, device, dtype, args.model)
    result: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
        + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": args.model,
        "image_size": args.image_size,
        "dtype": args.dtype,
        "batch": args.batch_size,
        "images": args.images,
        "image_px": args.image_px,
        "command": "python " + shlex.join(["benchmarks/bench_pipeline.py", *(argv if argv is not None else sys.argv[1:])]),
        "formats": {},
    }
    with tempfile.TemporaryDirectory(prefix="anomalyclip-bench-pipeline-") as tmp:
        for fmt in [f.strip() for f in args.formats.split(",") if f.strip()]:
            folder = Path(tmp) / fmt
            write_images(folder, args.images, args.image_px, fmt)
            times: dict[str, list[float]] = {"forward": [], "cli --no-overlays": [], "cli": []}
            time_cli(model, folder, Path(tmp) / "warm", args.batch_size, ["--no-overlays"], device)  # warm-up
            for r in range(args.repeats):
                times["forward"].append(time_forward(model, args.images, args.batch_size, device))
                times["cli --no-overlays"].append(
                    time_cli(model, folder, Path(tmp) / f"a{r}", args.batch_size, ["--no-overlays"], device)
                )
                times["cli"].append(time_cli(model, folder, Path(tmp) / f"b{r}", args.batch_size, [], device))
            rates = {k: args.images / statistics.median(v) for k, v in times.items()}
            rows = {k: {"images_per_s": v, "of_forward": v / rates["forward"]} for k, v in rates.items()}
            result["formats"][fmt] = rows
            for k, row in rows.items():
                print(
                    f"{fmt:5s} {k:18s} {row['images_per_s']:8.2f} images/s  {row['of_forward']:6.1%} of the forward"
                    f"  (times {', '.join(f'{t:.2f}' for t in times[k])} s)"
                )
    print(f"machine: {result['machine']}; torch {result['torch']}, {result['threads']} threads; command: {result['command']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.add_to_json:
        target = Path(args.add_to_json)
        figures = json.loads(target.read_text()) if target.is_file() else {}
        figures["pipeline"] = result
        target.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
