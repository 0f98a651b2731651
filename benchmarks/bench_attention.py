"""CPU attention formulations on the ViT-L shape: fused SDPA against explicit per-head forms.

Times ``scaled_dot_product_attention`` on views of one qkv projection (as the library calls it)
against explicit ``softmax(q k^T / sqrt(d)) v``: per head with the products through oneDNN
(``torch.ops.mkldnn._linear_pointwise``) or MKL (``torch.mm``), whole or in blocks of query rows
(the score block stays in cache), and all heads at once (``torch.bmm``) in row blocks;
interleaved in one process, best of ``--repeats``; prints the largest difference from SDPA.
Used for docs/benchmarks.md ("CPU kernels"): SDPA stays the library's attention where it wins.

Usage::

    python benchmarks/bench_attention.py --threads 2 --heads 16 --tokens 1370 --repeats 3
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=1370, help="1370 = 1 + 37 x 37 (518 px, patch 14)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    h, n, d = args.heads, args.tokens, args.head_dim
    qkv = torch.randn(1, n, 3, h, d, generator=torch.Generator().manual_seed(0)).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # [1, H, N, d] views, as ops.qkv_heads returns them
    linear = torch.ops.mkldnn._linear_pointwise

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)

    def per_head(onednn: bool, rows: int = n) -> torch.Tensor:
        """softmax(q k^T / sqrt(d)) v head by head, in blocks of ``rows`` query rows (in-place softmax)."""
        qc, kc, vc = (q[0] * d**-0.5).contiguous(), k[0].contiguous(), v[0].contiguous()
        vt = vc.transpose(1, 2).contiguous()
        out = torch.empty(h, n, d)
        for i in range(h):
            for r in range(0, n, rows):
                s = linear(qc[i, r : r + rows], kc[i], None, "none", [], "") if onednn else torch.mm(qc[i, r : r + rows], kc[i].t())
                torch.softmax(s, -1, out=s)
                out[i, r : r + rows] = linear(s, vt[i], None, "none", [], "") if onednn else torch.mm(s, vc[i])
        return out[None]

    def all_heads(rows: int) -> torch.Tensor:
        """The same with all heads in one batched product (``torch.bmm``) per block of query rows."""
        qc, kt, vc = (q[0] * d**-0.5).contiguous(), k[0].transpose(1, 2).contiguous(), v[0].contiguous()
        out = torch.empty(h, n, d)
        for r in range(0, n, rows):
            s = torch.bmm(qc[:, r : r + rows], kt)
            torch.softmax(s, -1, out=s)
            torch.bmm(s, vc, out=out[:, r : r + rows])
        return out[None]

    forms = {
        "sdpa (fused)": sdpa,
        "per head, oneDNN": lambda: per_head(True),
        "per head, MKL": lambda: per_head(False),
        "oneDNN, 512 rows": lambda: per_head(True, 512),
        "bmm, 128 rows": lambda: all_heads(128),
        "bmm, 512 rows": lambda: all_heads(512),
    }
    flops = 4 * h * n * n * d
    with torch.inference_mode():
        ref = sdpa()
        for label, fn in forms.items():
            print(f"{label:<20} max |diff| from SDPA {float((fn() - ref).abs().max()):.1e}")
        best = {label: float("inf") for label in forms}
        for _ in range(args.repeats):
            for label, fn in forms.items():
                start = time.perf_counter()
                fn()
                best[label] = min(best[label], time.perf_counter() - start)
    print(f"load average: {open('/proc/loadavg').read().split()[:3]}")
    for label, seconds in best.items():
        print(f"{label:<20} {seconds * 1e3:8.1f} ms  {flops / seconds / 1e9:7.1f} GFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
