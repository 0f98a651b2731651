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
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
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
