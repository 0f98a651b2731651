"""``anomalyclip predict --ray``: the predict command on Ray actors.

Writes the files of the single-process command (``scores.csv``, ``scores.json``, one overlay per
image, same names and columns, rows in the same order) plus ``scores.parquet``. The overlays are
written by the actors, so no map travels to the driver. An image that cannot be read or scored
becomes a row with an ``error`` column (added to the CSV and JSON only when some image failed),
counted in the summary, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any

from ..errors import AnomalyCLIPError, InvalidInputError
from ._deps import require_pyarrow, require_ray

__all__ = ["predict_with_ray", "start_ray", "default_workers", "quiet_ray_logs"]

logger = logging.getLogger("anomalyclip.cli")


class _DropRayNotices(logging.Filter):
    """Drops Ray's start-up notices that say nothing about this run (``-v`` shows them)."""

    NOTICES = ("Token authentication is enabled for this Ray cluster", "Progress bars disabled")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOTICES)


def quiet_ray_logs() -> None:
    """Keep Ray's own log lines out of a normal run's output: Ray Data's INFO lines (its plan,
    and a progress line every 10 s when the output is not a terminal) and start-up notices that
    say nothing about the run. Ray Data's progress bars still show on a terminal, and warnings
    and errors still show. Call before ``ray.init``; ``-v`` skips it."""
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    for name in ("ray._private.authentication.authentication_token_setup", "ray.data._internal.progress"):
        notices = logging.getLogger(name)
        if not any(isinstance(f, _DropRayNotices) for f in notices.filters):
            notices.addFilter(_DropRayNotices())


def start_ray(ray: Any, address: str | None, *, quiet: bool = False, verbose: bool = False) -> bool:
    """Connect to ``address``, or start a local Ray on this machine's cores; reuse a running one.

    Ray logs at WARNING (INFO with ``verbose``); the workers' log lines reach the driver unless
    ``quiet``. Returns True when this call started (or connected) Ray and should shut it down.
    """
    if ray.is_initialized():
        if address is not None:
            logger.warning("Ray is already initialized in this process; ignoring --ray-address %s.", address)
        return False
    options: dict[str, Any] = dict(
        include_dashboard=False,
        logging_level=logging.INFO if verbose else logging.WARNING,
        log_to_driver=not quiet,  # the workers' own log lines (error rows are in scores.csv anyway)
    )
    if address is None:
        ray.init(address="local", num_cpus=os.cpu_count() or 1, **options)
    else:
        ray.init(address=address, **options)
    return True


def default_workers(ray: Any, *, cpus_per_worker: float, gpus_per_worker: float, n_batches: int) -> int:
    """As many actors as the cluster fits (by GPUs when actors take GPUs), at most one per batch."""
    resources = ray.cluster_resources()
    if gpus_per_worker > 0:
        fit = int(resources.get("GPU", 0) // gpus_per_worker)
        if fit == 0:
            raise InvalidInputError(f"--gpus-per-worker {gpus_per_worker}: the Ray cluster has no GPU.")
    else:
        fit = int(resources.get("CPU", 1) // max(cpus_per_worker, 1e-9))
    return max(1, min(fit, n_batches))


def _rows(table: Any) -> tuple[list[dict], list[dict]]:
    """CSV/JSON rows (the single-process format) and typed Parquet rows, in input order."""
    rows, typed = [], []
    has_labels = table.column("label").null_count < table.num_rows  # when an image threshold applies
    has_fractions = table.column("anomalous_fraction").null_count < table.num_rows  # a pixel threshold
    for r in table.to_pylist():
        ok = r["error"] is None
        row: dict[str, Any] = {"image": r["path"], "score": round(r["score"], 6) if ok else None, "overlay": r["overlay"]}
        if has_labels:
            row["label"] = r["label"]
        if has_fractions:
            row["anomalous_fraction"] = round(r["anomalous_fraction"], 6) if ok else None
        row["error"] = r["error"]  # always, as the single-process run (empty when scored)
        rows.append(row)
        typed.append({**row, "score": r["score"], "error": r["error"]})
        if has_fractions:
            typed[-1]["anomalous_fraction"] = r["anomalous_fraction"]
    return rows, typed


def _write_parquet(path: Path, typed_rows: list[dict]) -> None:
    pa = require_pyarrow()
    import pyarrow.parquet as pq

    from ..files import atomic_path

    fields = [pa.field("image", pa.string()), pa.field("score", pa.float64()), pa.field("overlay", pa.string())]
    if "label" in typed_rows[0]:
        fields.append(pa.field("label", pa.int64()))
    if "anomalous_fraction" in typed_rows[0]:
        fields.append(pa.field("anomalous_fraction", pa.float64()))
    fields.append(pa.field("error", pa.string()))
    schema = pa.schema(fields)
    table = pa.Table.from_pylist([{f.name: r.get(f.name) for f in fields} for r in typed_rows], schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def predict_with_ray(args: argparse.Namespace) -> int:
    """Run ``anomalyclip predict --ray`` (``args`` from :func:`anomalyclip.cli.build_parser`)."""
    from ..predict_io import model_options, read_options, write_scores
    from .ray_predict import find_library_error, predict_dataset, split_work
    from .sources import list_images

    ray = require_ray()
    for name in ("workers", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InvalidInputError(f"--{name.replace('_', '-')} must be >= 1, got {value}.")
    cpus = 1.0 if args.cpus_per_worker is None else args.cpus_per_worker
    gpus = 0.0 if args.gpus_per_worker is None else args.gpus_per_worker
    reading = read_options(args)
    images = list_images(args.inputs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    verbose = bool(getattr(args, "verbose", False))
    if not verbose:
        quiet_ray_logs()
    ray.data.DataContext.get_current().enable_progress_bars = not args.quiet
    started_at = time.perf_counter()
    started = start_ray(ray, args.ray_address, quiet=args.quiet, verbose=verbose)
    try:
        n_batches = -(-len(images) // args.batch_size)
        if args.workers:
            call_rows, workers = split_work(len(images), args.batch_size, args.workers)
            if workers < args.workers:
                logger.info("Only %d images: %d Ray workers instead of %d", len(images), workers, args.workers)
            elif call_rows < args.batch_size:
                logger.info(
                    "%d images fill %d batch(es) of %d: calls of %d images so that all %d workers get work",
                    len(images), n_batches, args.batch_size, call_rows, workers,
                )
        else:
            fit = default_workers(ray, cpus_per_worker=cpus, gpus_per_worker=gpus, n_batches=len(images))
            workers = min(fit, n_batches)
            if workers < fit:
                logger.info(
                    "%d images fill %d batch(es) of %d: %d Ray worker(s), one per batch (--workers N splits them further)",
                    len(images), n_batches, args.batch_size, workers,
                )
        logger.info("Scoring %d images on %d Ray workers", len(images), workers)
        ds = predict_dataset(
            images,
            args.model,
            batch_size=args.batch_size,
            concurrency=workers,
            num_cpus=cpus,
            num_gpus=gpus,
            image_threshold=args.threshold,
            pixel_threshold=args.pixel_threshold,
            thresholds=False if args.no_thresholds else None,
            references=args.references,
            coreset=args.coreset,
            tile_size=args.tile_size,
            tile_overlap=0.25 if args.tile_overlap is None else args.tile_overlap,
            read_options=reading,
            maps=None,
            overlay_dir=out,
            overlay_alpha=args.alpha,
            **model_options(args),
        )
        try:
            batches = list(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
        except Exception as exc:  # Ray wraps errors raised in actors; show ours as one line
            cause = find_library_error(exc)
            if cause is not None:
                raise cause from None
            raise
    finally:
        if started:
            ray.shutdown()
    pa = require_pyarrow()
    table = pa.concat_tables(batches).sort_by("index")
    if table.column("index").to_pylist() != list(range(len(images))):
        raise AnomalyCLIPError(f"Ray returned {table.num_rows} rows for {len(images)} images (not each exactly once).")
    rows, typed = _rows(table)
    write_scores(out, rows)
    _write_parquet(out / "scores.parquet", typed)
    seconds = time.perf_counter() - started_at
    errors = sum(r["error"] is not None for r in typed)
    logger.info(
        "Scored %d of %d images on %d workers in %.1f s (%.2f images/s, Ray start-up included); "
        "wrote %d overlays, scores.csv, scores.json and scores.parquet to %s",
        len(images) - errors, len(images), workers, seconds, len(images) / seconds, len(images) - errors, out,
    )
    if errors:
        logger.warning("%d of %d images could not be scored; see the 'error' column of scores.csv", errors, len(images))
        return 1
    return 0
