"""``anomalyclip predict`` in one process: one streaming pass over all the images that never
loses a result.

The images go through one :meth:`AnomalyCLIP.predict_iter` pipeline (decoding and resizing on
worker threads, the map upsampling on the model's device); each finished image's outputs
(overlay, raw map, mask) are encoded by a small bounded thread pool, and its row is appended to
``scores.csv`` (flushed) once they are on disk, in input order. ``scores.json`` /
``scores.parquet`` are written from ``scores.csv`` at the end. ``--resume`` skips the images
already in ``scores.csv``. See ``docs/cli.md``.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import InvalidInputError
from .scores_log import ScoresLog, write_summaries

__all__ = ["run_predict", "OutputPool", "save_map", "EXIT_FAILED_IMAGES"]

logger = logging.getLogger("anomalyclip.cli")

EXIT_FAILED_IMAGES = 1
"""Exit status of a run that finished but could not score some images (their rows have an ``error``)."""


def save_map(path: Path, anomaly_map: np.ndarray, fmt: str, map_range: tuple[float, float]) -> Path:
    """Write a raw map ``[H, W]`` float32: ``npy`` as is, ``png16`` as a 16-bit grey PNG holding
    ``round((v - lo) / (hi - lo) * 65535)`` for ``map_range = (lo, hi)`` (recorded in ``run.json``)."""
    from PIL import Image

    from .files import atomic_write

    if fmt == "npy":
        with atomic_write(path, "wb") as handle:
            np.save(handle, np.asarray(anomaly_map, dtype=np.float32))
        return path
    lo, hi = map_range
    scaled = np.clip((np.asarray(anomaly_map, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)
    picture = Image.fromarray(np.round(scaled * 65535).astype(np.uint16))
    with atomic_write(path, "wb") as handle:
        picture.save(handle, format="PNG")
    return path


def save_mask(path: Path, mask: np.ndarray) -> Path:
    """Write a boolean mask ``[H, W]`` as an 8-bit PNG (0 or 255)."""
    from PIL import Image

    from .files import atomic_write

    with atomic_write(path, "wb") as handle:
        Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(handle, format="PNG")
    return path


class OutputPool:
    """Runs each image's output task on a few threads, at most ``depth`` in flight, and hands the
    rows back in submission order once their task is done (an error in a task is raised).

    ``workers=0`` runs the tasks inline.
    """

    def __init__(self, write_row: Callable[[dict], None], workers: int = 2, depth: int = 8) -> None:
        self.write_row, self.depth = write_row, max(depth, 1)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="anomalyclip-out") if workers > 0 else None
        self.pending: deque[tuple[dict, Future | None]] = deque()

    def submit(self, row: dict, task: Callable[[], None] | None) -> None:
        future = None
        if task is not None:
            if self.pool is None:
                task()
            else:
                future = self.pool.submit(task)
        self.pending.append((row, future))
        self._drain(block=len(self.pending) > self.depth)

    def _drain(self, block: bool) -> None:
        while self.pending:
            row, future = self.pending[0]
            if future is not None and not future.done() and not (block and len(self.pending) > self.depth):
                return
            if future is not None:
                future.result()  # raises the task's error
            self.pending.popleft()
            self.write_row(row)

    def close(self) -> None:
        """Wait for every task and write the remaining rows."""
        try:
            while self.pending:
                row, future = self.pending.popleft()
                if future is not None:
                    future.result()
                self.write_row(row)
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)


def _columns(image_threshold: Any, pixel_threshold: Any, args: argparse.Namespace) -> list[str]:
    columns = ["image", "score", "overlay"]
    if image_threshold is not None:
        columns.append("label")
    if pixel_threshold is not None:
        columns.append("anomalous_fraction")
    if args.save_maps:
        columns.append("map")
    if args.save_masks:
        columns.append("mask")
    return columns + ["error"]


def _run_options(args: argparse.Namespace, model: Any, columns: list[str]) -> dict[str, Any]:
    """What makes the rows of a run comparable: ``--resume`` refuses others."""
    from .predict_io import model_options

    options = {k: v for k, v in model_options(args).items() if k != "cache_dir"}
    options.update(
        model=args.model,
        threshold=args.threshold,
        pixel_threshold=args.pixel_threshold,
        no_thresholds=args.no_thresholds,
        references=args.references,
        coreset=args.coreset,
        tile_size=args.tile_size,
        tile_overlap=args.tile_overlap,
        bit_depth=args.bit_depth,
        intensity_range=args.intensity_range,
        no_exif_transpose=args.no_exif_transpose,
        max_image_pixels=args.max_image_pixels,
        overlays=not args.no_overlays,
        alpha=args.alpha,
        save_maps=args.save_maps,
        save_masks=args.save_masks,
        columns=columns,
    )
    if args.save_maps == "png16":
        options["map_scale"] = {"lo": float(model.map_range[0]), "hi": float(model.map_range[1]), "max_value": 65535}
    return options


def run_predict(args: argparse.Namespace, model: Any, images: list[Path]) -> int:
    """Score ``images`` with ``model`` as ``anomalyclip predict`` says (``args`` from its parser).

    ``model`` is an :class:`~anomalyclip.AnomalyCLIP` or an :class:`~anomalyclip.onnx.OnnxAnomalyCLIP`
    (torch-free): both offer ``decision_thresholds``, ``predict_iter`` and ``map_range``, and both
    stream through the predictor core; tiling applies to the torch model only.

    Returns the exit status: 0, or :data:`EXIT_FAILED_IMAGES` when some images could not be
    scored (``--strict`` raises at the first one instead).
    """
    from .predict_io import overlay_names, read_options
    from .visualize import save_overlay

    reading = read_options(args)
    thresholds = False if args.no_thresholds else None
    tiling = {"tile_size": args.tile_size, "tile_overlap": args.tile_overlap} if args.tile_size is not None else {}
    image_threshold, pixel_threshold = model.decision_thresholds(thresholds, args.threshold, args.pixel_threshold, **tiling)
    if args.save_masks and pixel_threshold is None:
        raise InvalidInputError(
            "--save-masks needs a pixel threshold: pass --pixel-threshold T or use a model with calibrated thresholds."
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    columns = _columns(image_threshold, pixel_threshold, args)
    log = ScoresLog(out / "scores.csv", columns, _run_options(args, model, columns), resume=args.resume)
    names = dict(zip(map(str, images), overlay_names(images)))
    todo = [p for p in images if str(p) not in log.done]
    if args.resume:
        logger.info("--resume: %d of %d images already in %s; scoring %d", len(images) - len(todo), len(images), log.path, len(todo))
    vmin, vmax = model.map_range
    failed = 0
    pool = OutputPool(log.append, workers=args.output_workers, depth=4 * max(args.output_workers, 1))
    try:
        results = model.predict_iter(
            todo,
            batch_size=args.batch_size,
            on_error="raise" if args.strict else "record",
            thresholds=thresholds,
            image_threshold=args.threshold,
            pixel_threshold=args.pixel_threshold,
            read_options=reading,
            num_workers=args.num_workers if args.num_workers is not None else default_input_workers(getattr(model, "device", None)),
            progress=not args.quiet,
            **tiling,
        )
        for result in results:
            name = names[result.path]
            row: dict[str, Any] = {"image": result.path, "score": result.score, "error": result.error}
            if result.error is not None:
                failed += 1
                logger.warning("%s: %s", result.path, result.error)
                pool.submit(row, None)
                continue
            if "label" in columns:
                row["label"] = int(result.label)
            if "anomalous_fraction" in columns:
                row["anomalous_fraction"] = float(np.mean(result.mask))
            tasks: list[Callable[[], Any]] = []
            if not args.no_overlays:
                row["overlay"] = name
                tasks.append(
                    lambda r=result, n=name: save_overlay(
                        out / n, r.path, r.anomaly_map, alpha=args.alpha, vmin=vmin, vmax=vmax, mask=r.mask, read_options=reading
                    )
                )
            if args.save_maps:
                map_name = "maps/" + name.replace("_overlay.png", "_map." + ("npy" if args.save_maps == "npy" else "png"))
                row["map"] = map_name
                tasks.append(lambda r=result, n=map_name: save_map(out / n, r.anomaly_map, args.save_maps, (vmin, vmax)))
            if args.save_masks:
                mask_name = "masks/" + name.replace("_overlay.png", "_mask.png")
                row["mask"] = mask_name
                tasks.append(lambda r=result, n=mask_name: save_mask(out / n, r.mask))
            pool.submit(row, (lambda ts=tasks: [t() for t in ts]) if tasks else None)
    finally:
        try:
            pool.close()  # the rows of every image already scored, also when stopping on an error
        finally:
            log.close()
    write_summaries(out, [str(p) for p in images])
    logger.info("Scored %d image(s) (%d already done); scores.csv and scores.json in %s", len(todo) - failed, len(images) - len(todo), out)
    if failed:
        logger.warning(
            "%d of %d image(s) could not be scored: see the 'error' column of %s (exit status %d)",
            failed, len(todo), out / "scores.csv", EXIT_FAILED_IMAGES,
        )
        return EXIT_FAILED_IMAGES
    return 0


def default_input_workers(device: Any) -> int:
    """Threads decoding and resizing the next images: the library's default on an accelerator
    (:func:`anomalyclip.prefetch.default_num_workers`), 2 on the CPU, so that decoding overlaps
    the forward pass (Pillow and the resize release the GIL). ``device`` None: a runtime without
    torch (an ONNX export), 2."""
    on_cpu = min(2, os.cpu_count() or 1)
    if device is None:
        return on_cpu
    from .prefetch import default_num_workers

    return max(default_num_workers(device), on_cpu)


def check_predict_args(args: argparse.Namespace) -> None:
    """Refuse option combinations that cannot work, before the model loads."""
    if args.save_maps not in (None, "npy", "png16"):
        raise InvalidInputError(f"--save-maps must be npy or png16, got {args.save_maps!r}.")
    for name in ("num_workers", "output_workers"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise InvalidInputError(f"--{name.replace('_', '-')} must be >= 0, got {value}.")
    if args.batch_size < 1:
        raise InvalidInputError(f"--batch-size must be >= 1, got {args.batch_size}.")
