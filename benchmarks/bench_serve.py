"""The inspection service against calling ``predict`` one image at a time: requests/s, p50/p99.

Starts ``anomalyclip serve`` (a real uvicorn process on 127.0.0.1, a free port) with the tiny
random CLIP of the test fixtures (no download) at the processing size S (default 224), then in
each repeat, alternating (so that a changing background load on a shared machine hits them alike):

1. **predict, one at a time**: ``model.predict(image)`` in this process, image after image (the
   latency of a call and the rate of a loop of calls);
2. **service at concurrency C** for C in ``--concurrency`` (default 1, 8, 32): C client tasks
   (httpx, asyncio) post PNG bytes to ``/v1/predict`` until ``--requests`` answers; the latency
   of a request is from sending to the complete answer.

Figures: requests (images) per second, p50 and p99 latency in ms, and the mean batch size the
service ran (from its ``/metrics``); each is the median over ``--repeats``. The load is bounded
(``--requests`` per run, a ``--time-limit`` per run) and everything stops by itself.

Usage::

    python benchmarks/bench_serve.py                          # S = 224, 64 requests, 3 repeats
    python benchmarks/bench_serve.py --image-size 112 --requests 128 --json serve.json
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "fixtures" / "golden"


def make_images(count: int, seed: int = 0) -> list[bytes]:
    """``count`` PNGs of mixed sizes (160 to 480 px a side) cut from the fixture images."""
    rng = np.random.default_rng(seed)
    sources = [Image.open(GOLDEN / "image_a.png").convert("RGB"), Image.open(GOLDEN / "image_b.png").convert("RGB")]
    out = []
    for i in range(count):
        w, h = (int(x) for x in rng.integers(160, 481, size=2))
        buffer = io.BytesIO()
        sources[i % 2].resize((w, h), Image.BICUBIC).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def bench_predict(model, images: list[bytes], requests: int, time_limit: float, worker: ThreadPoolExecutor) -> dict:
    """``model.predict`` one decoded image at a time (decoding included, as the service does).

    The calls run one after the other on one worker thread, as the service's forward passes do:
    on the shared development machine, torch's CPU forward ran 10-40x slower on a fresh process's
    main thread (before any other thread had run one) than on a worker thread, an artifact of
    the oversubscribed cores that would flatter the service.
    """
    latencies = []
    start = time.perf_counter()
    for i in range(requests):
        t = time.perf_counter()
        worker.submit(model.predict, Image.open(io.BytesIO(images[i % len(images)]))).result()
        latencies.append(time.perf_counter() - t)
        if time.perf_counter() - start > time_limit:
            break
    wall = time.perf_counter() - start
    return {"rps": len(latencies) / wall, "p50_ms": 1e3 * percentile(latencies, 50), "p99_ms": 1e3 * percentile(latencies, 99), "n": len(latencies)}


def _batch_stats(url: str) -> tuple[float, float]:
    import httpx

    text = httpx.get(url + "/metrics", timeout=10).text
    get = lambda name: float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name)))  # noqa: E731
    return get("anomalyclip_batch_size_count"), get("anomalyclip_batch_size_sum")


async def _load(url: str, images: list[bytes], requests: int, concurrency: int, time_limit: float) -> tuple[list[float], float]:
    import httpx

    latencies: list[float] = []
    counter = iter(range(requests))
    deadline = time.perf_counter() + time_limit

    async def worker(client: httpx.AsyncClient) -> None:
        for i in counter:
            if time.perf_counter() > deadline:
                return
            t = time.perf_counter()
            r = await client.post("/v1/predict", content=images[i % len(images)], headers={"content-type": "image/png"})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*[worker(client) for _ in range(concurrency)])
        return latencies, time.perf_counter() - start


def bench_service(url: str, images: list[bytes], requests: int, concurrency: int, time_limit: float) -> dict:
    before = _batch_stats(url)
    latencies, wall = asyncio.run(_load(url, images, requests, concurrency, time_limit))
    after = _batch_stats(url)
    batches, served = after[0] - before[0], after[1] - before[1]
    return {
        "rps": len(latencies) / wall,
        "p50_ms": 1e3 * percentile(latencies, 50),
        "p99_ms": 1e3 * percentile(latencies, 99),
        "n": len(latencies),
        "mean_batch": served / batches if batches else float("nan"),
    }


def start_server(model_dir: Path, port: int, args: argparse.Namespace) -> subprocess.Popen:
    import httpx

    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "anomalyclip.cli", "-q", "serve", str(model_dir), "--device", "cpu", "--port", str(port)]
    cmd += ["--max-batch-size", str(args.max_batch_size), "--batch-wait-ms", str(args.batch_wait_ms)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("anomalyclip serve exited before it was healthy")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.terminate()
    raise SystemExit("anomalyclip serve did not become healthy in 180 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--requests", type=int, default=64, help="answers per run (default 64)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--time-limit", type=float, default=120.0, help="seconds per run at most (default 120)")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()

    import torch

    from anomalyclip import AnomalyCLIP
    from anomalyclip.backbone import load_clip

    ref = f"local-dir:{GOLDEN / 'tiny-clip'}"
    model = AnomalyCLIP.from_official_checkpoint(GOLDEN / "official_prompt_learner.pth", clip=load_clip(ref), backbone=ref, device="cpu")
    model.reconfigure(image_size=args.image_size)
    images = make_images(16)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "model")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = start_server(Path(tmp) / "model", port, args)
        url = f"http://127.0.0.1:{port}"
        runs: dict[str, list[dict]] = {}
        try:
            worker = ThreadPoolExecutor(max_workers=1)
            bench_predict(model, images, 4, args.time_limit, worker)  # warm-up
            bench_service(url, images, 8, 4, args.time_limit)
            for _ in range(args.repeats):
                runs.setdefault("predict, one at a time", []).append(
                    bench_predict(model, images, args.requests, args.time_limit, worker)
                )
                for c in args.concurrency:
                    runs.setdefault(f"service, concurrency {c}", []).append(
                        bench_service(url, images, args.requests, c, args.time_limit)
                    )
        finally:
            proc.terminate()
            proc.wait(30)
    load_after = os.getloadavg()
    rows = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    base = rows["predict, one at a time"]["rps"]
    print(f"# bench_serve: S={args.image_size}, {args.requests} requests/run, median of {args.repeats}, "
          f"max_batch_size={args.max_batch_size}, batch_wait_ms={args.batch_wait_ms}")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average {load_before[0]:.1f} -> {load_after[0]:.1f}")
    print("| run | images/s | vs predict | p50 ms | p99 ms | mean batch |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        batch = f"{r['mean_batch']:.1f}" if "mean_batch" in r else "1"
        print(f"| {name} | {r['rps']:.2f} | {r['rps'] / base:.2f}x | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {batch} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
