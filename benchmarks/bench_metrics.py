"""Benchmark anomalyclip.eval.metrics against the straightforward official evaluation code.

Builds synthetic float32 anomaly maps and masks (one class of a data set: by default 200 maps of
518 x 518, half of them with anomalous blobs), then times:

* ``pixel_aupro`` vs. the official AnomalyCLIP ``cal_pro_score`` loop (scikit-image, 200
  thresholds). The official loop is slow, so by default it runs on the first ``--reference-maps``
  maps only; ``pixel_aupro`` is timed on the same subset too, and the table says so.
* ``pixel_auroc`` / ``pixel_ap`` / ``pixel_f1_max`` vs. scikit-learn on all pixels.

Usage::

    python benchmarks/bench_metrics.py                       # 200 maps of 518 x 518
    python benchmarks/bench_metrics.py --reference-maps 200  # official loop on every map (minutes)
    python benchmarks/bench_metrics.py --skip-reference      # anomalyclip only, no sklearn/skimage

The references need scikit-learn and scikit-image (``pip install anomalyclip[test]``).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from anomalyclip.eval import metrics


def synthetic_class(n_maps: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``([n, size, size] float32 maps, [n, size, size] uint8 masks)``.

    Every other map has 1-4 elliptic anomalous blobs; maps are smooth noise (bilinearly upsampled
    from a 37 x 37 grid, like ViT patch maps) plus a blurred bump over the blobs.
    """
    rng = np.random.default_rng(seed)
    maps = np.empty((n_maps, size, size), dtype=np.float32)
    masks = np.zeros((n_maps, size, size), dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    grid = 37
    for i in range(n_maps):
        if i % 2:
            for _ in range(rng.integers(1, 5)):
                cy, cx = rng.uniform(0.1, 0.9, 2) * size
                ry, rx = rng.uniform(0.02, 0.12, 2) * size
                masks[i] |= (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8)
        noise = ndimage.zoom(rng.random((grid, grid)), size / grid, order=1)[:size, :size]
        bump = ndimage.uniform_filter(masks[i].astype(np.float32), size=9)
        maps[i] = 0.6 * noise + 0.5 * bump
    return maps, masks


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), wall-clock seconds)``."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def official_aupro(masks: np.ndarray, amaps: np.ndarray, max_step: int = 200, expect_fpr: float = 0.3) -> float:
    """The official AnomalyCLIP ``cal_pro_score``, verbatim."""
    from skimage import measure
    from sklearn.metrics import auc

    binary_amaps = np.zeros_like(amaps, dtype=bool)
    min_th, max_th = amaps.min(), amaps.max()
    delta = (max_th - min_th) / max_step
    pros, fprs, ths = [], [], []
    for th in np.arange(min_th, max_th, delta):
        binary_amaps[amaps <= th], binary_amaps[amaps > th] = 0, 1
        pro = []
        for binary_amap, mask in zip(binary_amaps, masks):
            for region in measure.regionprops(measure.label(mask)):
                tp_pixels = binary_amap[region.coords[:, 0], region.coords[:, 1]].sum()
                pro.append(tp_pixels / region.area)
        inverse_masks = 1 - masks
        fp_pixels = np.logical_and(inverse_masks, binary_amaps).sum()
        fpr = fp_pixels / inverse_masks.sum()
        pros.append(np.array(pro).mean())
        fprs.append(fpr)
        ths.append(th)
    pros, fprs, ths = np.array(pros), np.array(fprs), np.array(ths)
    idxes = fprs < expect_fpr
    fprs = fprs[idxes]
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    return auc(fprs, pros[idxes])


def official_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """The official F1-max on sklearn's precision-recall curve."""
    from sklearn.metrics import precision_recall_curve

    precisions, recalls, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore"):
        f1 = 2 * precisions * recalls / (precisions + recalls)
    return float(np.max(f1[np.isfinite(f1)]))


@dataclass
class Row:
    """One line of the table: a metric, the maps it ran on, our value/time and the reference's."""

    metric: str
    subset: str
    value: float
    seconds: float
    ref_value: float | None = None
    ref_seconds: float | None = None


def bench(metric: str, subset: str, ours: Callable[[], float], reference: Callable[[], float] | None) -> Row:
    """Time ``ours()`` and, if given, ``reference()``."""
    value, seconds = timed(ours)
    row = Row(metric, subset, value, seconds)
    if reference is not None:
        row.ref_value, row.ref_seconds = timed(reference)
    return row


def format_table(rows: list[Row]) -> str:
    """A fixed-width text table."""
    header = (
        f"{'metric':<24} {'maps':<10} {'anomalyclip':>12} {'time s':>8} "
        f"{'reference':>12} {'ref time s':>10} {'speed-up':>8} {'|diff|':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        line = f"{r.metric:<24} {r.subset:<10} {r.value:>12.6f} {r.seconds:>8.3f}"
        if r.ref_value is not None and r.ref_seconds is not None:
            line += (
                f" {r.ref_value:>12.6f} {r.ref_seconds:>10.2f} {r.ref_seconds / r.seconds:>7.1f}x"
                f" {abs(r.value - r.ref_value):>8.1e}"
            )
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--maps", type=int, default=200, help="number of maps (default 200)")
    parser.add_argument("--size", type=int, default=518, help="map side in pixels (default 518)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--reference-maps",
        type=int,
        default=10,
        help="run the official AUPRO loop on the first N maps only (default 10; it is slow)",
    )
    parser.add_argument("--skip-reference", action="store_true", help="time anomalyclip only (no sklearn/skimage)")
    args = parser.parse_args(argv)
    if args.maps < 2 or args.size < 8 or args.reference_maps < 1:
        parser.error("--maps must be >= 2, --size >= 8 and --reference-maps >= 1")

    maps, masks = synthetic_class(args.maps, args.size, args.seed)
    print(
        f"data: {args.maps} float32 maps of {args.size}x{args.size} = {maps.size / 1e6:.1f} M pixels, "
        f"{masks.mean() * 100:.2f} % anomalous pixels, seed {args.seed}; "
        f"numpy {np.__version__}, {platform.machine()}, {os.cpu_count()} CPU(s)"
    )
    everything = f"all {args.maps}"
    flat_maps, flat_masks = maps.reshape(-1), masks.reshape(-1)
    reference = not args.skip_reference
    if reference:
        from sklearn.metrics import average_precision_score, roc_auc_score

    rows: list[Row] = []
    k = min(args.reference_maps, args.maps)
    if reference and k < args.maps:  # like-for-like on the subset the official loop can afford
        sub_maps, sub_masks = maps[:k], masks[:k]
        rows.append(
            bench(
                "pixel_aupro",
                f"first {k}",
                lambda: metrics.pixel_aupro(sub_maps, sub_masks),
                lambda: official_aupro(sub_masks, sub_maps),
            )
        )
    official_all = reference and k >= args.maps
    rows.append(
        bench(
            "pixel_aupro",
            everything,
            lambda: metrics.pixel_aupro(maps, masks),
            (lambda: official_aupro(masks, maps)) if official_all else None,
        )
    )
    rows.append(
        bench(
            "pixel_auroc",
            everything,
            lambda: metrics.pixel_auroc(maps, masks),
            (lambda: roc_auc_score(flat_masks, flat_maps)) if reference else None,
        )
    )
    rows.append(
        bench(
            "pixel_ap",
            everything,
            lambda: metrics.pixel_ap(maps, masks),
            (lambda: average_precision_score(flat_masks, flat_maps)) if reference else None,
        )
    )
    rows.append(
        bench(
            "pixel_f1_max",
            everything,
            lambda: metrics.pixel_f1_max(maps, masks),
            (lambda: official_f1_max(flat_masks, flat_maps)) if reference else None,
        )
    )
    scores, labels = maps.max(axis=(1, 2)), masks.max(axis=(1, 2))
    all_metrics, seconds = timed(lambda: metrics.compute_metrics(scores, labels, maps, masks))
    rows.append(Row("compute_metrics (7 keys)", everything, all_metrics["pixel_aupro"], seconds))

    print(format_table(rows))
    if reference and k < args.maps:
        print(
            f"note: the official AUPRO loop ran on the first {k} of {args.maps} maps only "
            "(--reference-maps); compare with the anomalyclip row on the same maps."
        )


if __name__ == "__main__":
    main()
