"""Write the headline GPU figures of a device check as one JSON record (issue 23).

``benchmarks/device_check.sh`` calls this after its steps: it reads the inference benchmark's
``bench.json`` and writes ``<results-dir>/<YYYY-MM-DD>-<gpu>.json`` with

- ``gpu``, ``commit`` (``git rev-parse HEAD``, ``+dirty`` with local changes), ``torch``, ``date``;
- ``forward_bf16_b32_images_per_s`` / ``forward_float8_b32_images_per_s``: the library's forward,
  batch 32, bfloat16 / ``dtype="float8"`` (median; null if not measured);
- ``gemm_bf16_tflops``: the best bfloat16 reference GEMM of the same run;
- ``predict_png_images_per_s`` / ``predict_jpeg_images_per_s``: the end-to-end CLI ``predict``
  (``--no-overlays``) from 1024 px PNG / JPEG folders (bench_pipeline), else ``predict`` from PNG
  files (bench_inference --predict), null if not run; ``serve_requests_per_s``: null until the
  device check measures it;
- ``forward_images_per_s``: every measured forward, ``{dtype: {batch: images/s}}``, and the
  bench command, so the history of GPU figures is data, not prose.

A figure that was not measured is null, never estimated. ``--dry-run`` (the CPU rehearsal) marks
the record ``"dry_run": true`` and names the device ``cpu-dry-run``.

Usage::

    python benchmarks/device_results.py --bench-json OUT/bench.json --results-dir benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FIELDS = (
    "gpu",
    "commit",
    "torch",
    "forward_bf16_b32_images_per_s",
    "forward_float8_b32_images_per_s",
    "gemm_bf16_tflops",
    "predict_png_images_per_s",
    "predict_jpeg_images_per_s",
    "serve_requests_per_s",
)


def _commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def _gpu_name(bench: dict[str, Any]) -> str:
    """The GPU's name as the benchmark recorded it ('NVIDIA H100 80GB HBM3 (80 GiB, ...)' -> its name)."""
    return str(bench.get("machine", "unknown")).split(" (")[0].strip() or "unknown"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def _forward(rows: list[dict[str, Any]], dtype: str, batch: int) -> float | None:
    for r in rows:
        if r.get("dtype") == dtype and r.get("mode") == "ours" and r.get("batch") == batch:
            return round(float(r["images_per_s"]), 2)
    return None


def summarize(bench: dict[str, Any], *, dry_run: bool = False, commit: str | None = None, date: str | None = None) -> dict[str, Any]:
    """The results record of one ``bench_inference.py --json`` output (see the module doc)."""
    rows = bench.get("rows", [])
    gemms = bench.get("gemm_flops_per_s", {}).get("bfloat16", {})
    predict = bench.get("predict") or {}
    png = [r["images_per_s"] for r in predict.get("rows", []) if "num_workers=None" in r.get("label", "")]
    pipeline = (bench.get("pipeline") or {}).get("formats", {})  # bench_pipeline --add-to-json: the CLI end to end

    def end_to_end(fmt: str) -> float | None:
        row = pipeline.get(fmt, {}).get("cli --no-overlays")
        return round(float(row["images_per_s"]), 2) if row else None
    forwards: dict[str, dict[str, float]] = {}
    for r in rows:
        if r.get("mode") == "ours":
            forwards.setdefault(r["dtype"], {})[str(r["batch"])] = round(float(r["images_per_s"]), 2)
    record = {
        "gpu": "cpu-dry-run" if dry_run else _gpu_name(bench),
        "commit": commit,
        "torch": bench.get("torch"),
        "forward_bf16_b32_images_per_s": _forward(rows, "bfloat16", 32),
        "forward_float8_b32_images_per_s": _forward(rows, "float8", 32),
        "gemm_bf16_tflops": round(max(gemms.values()) / 1e12, 2) if gemms else None,
        "predict_png_images_per_s": end_to_end("png") or (round(float(png[0]), 2) if png else None),
        "predict_jpeg_images_per_s": end_to_end("jpeg"),
        "serve_requests_per_s": None,
        "date": date or dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "dry_run": dry_run,
        "machine": bench.get("machine"),
        "image_size": bench.get("image_size"),
        "forward_images_per_s": forwards,
        "bench_command": bench.get("command"),
    }
    assert tuple(record)[: len(FIELDS)] == FIELDS
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench-json", required=True, help="bench_inference.py --json output")
    parser.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"), help="where to write the record")
    parser.add_argument("--dry-run", action="store_true", help="the CPU rehearsal: gpu 'cpu-dry-run', dry_run true")
    args = parser.parse_args(argv)
    try:
        bench = json.loads(Path(args.bench_json).read_text())
    except (OSError, ValueError) as exc:
        print(f"cannot read {args.bench_json}: {exc}", file=sys.stderr)
        return 1
    record = summarize(bench, dry_run=args.dry_run, commit=_commit())
    out_dir = Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{record['date'][:10]}-{_slug(record['gpu'])}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
    print(f"results record: {path}")
    print(json.dumps({k: record[k] for k in FIELDS}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
