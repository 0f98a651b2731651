"""``benchmarks/device_check.sh --dry-run``: the GPU device check's own CPU rehearsal (tiny model,
small sizes, one thread), so the script is known to work before a GPU runs it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOGS = {"summary.md", "env.txt", "pytest.log", "bench.log", "bench.md", "bench.json", "profile.txt", "precision.log"}


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_device_check_dry_run(tmp_path):
    results = tmp_path.parent / f"{tmp_path.name}-results"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "RESULTS_DIR": str(results)}
    proc = subprocess.run(
        ["bash", "benchmarks/device_check.sh", "--dry-run"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "all steps succeeded" in proc.stdout
    assert {p.name for p in tmp_path.iterdir()} == LOGS  # what a remote run brings back: at most 8 files

    summary = (tmp_path / "summary.md").read_text()
    assert summary.count(": exit 0 in ") == 4  # the four steps
    assert re.search(r"\b\d+ skipped\b", summary) and " failed" not in summary  # the CUDA tests, without a GPU
    for dtype in ("float32", "bfloat16"):
        for forward in ("anomalyclip", "official-style"):
            for batch in (1, 2):
                assert f"| {dtype} | {forward} | {batch} |" in summary, (dtype, forward, batch)
    assert "| predict, num_workers=0 |" in summary
    assert "golden tiny CLIP" in summary and "bfloat16 vs float32" in summary

    figures = json.loads((tmp_path / "bench.json").read_text())
    assert len(figures["rows"]) == 8
    for row in figures["rows"]:
        assert row["images_per_s"] > 0 and row["flops"] > 0 and 0 < row["of_gemm"]
        assert (row["speedup"] > 0) if row["mode"] == "ours" else ("speedup" not in row)
    assert figures["predict"]["rows"][0]["images_per_s"] > 0
    for fmt in ("png", "jpeg"):  # bench_pipeline's end-to-end figures, added to bench.json
        assert set(figures["pipeline"]["formats"][fmt]) == {"forward", "cli --no-overlays", "cli"}
    assert summary.count("% of the forward") == 6
    assert "CPU ops" in (tmp_path / "profile.txt").read_text()

    # the machine-readable record (issue 23): one file, the headline fields, nulls for what a CPU
    # dry run cannot measure, the forwards it did measure
    (record_path,) = results.iterdir()
    assert record_path.name.endswith("-cpu-dry-run.json")
    record = json.loads(record_path.read_text())
    assert record["dry_run"] is True and record["gpu"] == "cpu-dry-run" and record["torch"]
    assert record["forward_bf16_b32_images_per_s"] is None and record["serve_requests_per_s"] is None
    assert set(record["forward_images_per_s"]) == {"float32", "bfloat16"}
    assert record["predict_png_images_per_s"] > 0 and record["gemm_bf16_tflops"] > 0
    assert "## results record" in summary and '"gpu": "cpu-dry-run"' in summary


def test_device_results_record_from_a_gpu_bench_json(tmp_path):
    """device_results.py on a bench.json shaped like a GPU run's: the figures land in the right fields."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import device_results
    finally:
        sys.path.pop(0)

    def row(dtype, mode, batch, ips):
        return dict(dtype=dtype, mode=mode, label="anomalyclip", batch=batch, images_per_s=ips)

    bench = {
        "machine": "NVIDIA H100 80GB HBM3 (79 GiB, 132 SMs, compute capability 9.0); CUDA 13.0",
        "torch": "2.11.0+cu130",
        "image_size": 518,
        "command": "python benchmarks/bench_inference.py --device cuda",
        "gemm_flops_per_s": {"bfloat16": {"8192^3": 7.2e14, "MLP": 6.3e14}, "float8": {"8192^3": 1.4e15}},
        "rows": [row("bfloat16", "ours", 32, 372.04), row("bfloat16", "official", 32, 96.4), row("float8", "ours", 32, 512.5),
                 row("float8", "ours", 8, 400.0)],
        "predict": {"rows": [{"label": "predict, num_workers=None (8 threads)", "images_per_s": 210.3},
                             {"label": "predict, num_workers=0", "images_per_s": 90.1}]},
    }
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    assert device_results.main(["--bench-json", str(tmp_path / "bench.json"), "--results-dir", str(tmp_path / "out")]) == 0
    (path,) = (tmp_path / "out").iterdir()
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}-nvidia-h100-80gb-hbm3\.json", path.name)
    record = json.loads(path.read_text())
    assert tuple(record)[: len(device_results.FIELDS)] == device_results.FIELDS
    assert record["gpu"] == "NVIDIA H100 80GB HBM3" and record["torch"] == "2.11.0+cu130" and record["dry_run"] is False
    assert record["forward_bf16_b32_images_per_s"] == 372.04 and record["forward_float8_b32_images_per_s"] == 512.5
    assert record["gemm_bf16_tflops"] == 720.0 and record["predict_png_images_per_s"] == 210.3
    assert record["predict_jpeg_images_per_s"] is None and record["serve_requests_per_s"] is None
    assert record["forward_images_per_s"] == {"bfloat16": {"32": 372.04}, "float8": {"32": 512.5, "8": 400.0}}
    assert record["commit"] is None or re.match(r"[0-9a-f]{40}", record["commit"])
