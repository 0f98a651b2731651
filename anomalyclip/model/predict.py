"""Prediction and calibration of the torch model: batching, CUDA staging, tiling, thresholds.

``AnomalyCLIP.predict`` and ``AnomalyCLIP.calibrate`` are :func:`predict` and :func:`calibrate`.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from typing import Any, Literal, cast

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InvalidInputError
from ..eval.thresholds import Thresholds
from ..options import PredictOptions
from ..outputs import AnomalyOutput, AnomalyResult
from ..prefetch import default_num_workers, prefetch_batches, stack_batch
from ..preprocessing import ImageInput
from ..references import fuse_scores
from ..tiling import TileStitcher, crop_prepared, tile_grid

__all__ = ["predict", "calibrate", "decision_thresholds"]

logger = logging.getLogger(__name__)


def predict(
    model: Any,
    items: list[ImageInput],
    options: PredictOptions,
    image_threshold: float | None,
    pixel_threshold: float | None,
) -> list[AnomalyResult]:
    """``model.predict`` on a list of images (documented there)."""
    if options.tile_size is not None:
        return _predict_tiled(model, items, options, image_threshold, pixel_threshold)
    batch_size = options.batch_size
    workers = num_workers(model, options.num_workers)
    results: list[AnomalyResult] = []
    batches = prefetch_batches(items, model._load_and_preprocess, batch_size, num_workers=workers)
    bar = None
    if options.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=(len(items) + batch_size - 1) // batch_size, desc="AnomalyCLIP", unit="batch")
    pending: _StagedBatch | None = None
    try:
        with torch.inference_mode():
            start = 0
            for batch in batches:
                chunk, start = items[start : start + len(batch)], start + len(batch)
                paths = [os.fspath(x) if isinstance(x, (str, os.PathLike)) else None for x in chunk]
                pixel_values = stack_batch([t for _, t in batch], pin_memory=model.device.type == "cuda")
                staged = _StagedBatch.stage(model(pixel_values), [size for size, _ in batch], paths)
                if pending is not None:  # the GPU already runs this batch while we read the last one
                    results.extend(pending.results(image_threshold, pixel_threshold))
                pending = staged
                if bar is not None:
                    bar.update(1)
            if pending is not None:
                results.extend(pending.results(image_threshold, pixel_threshold))
    finally:
        batches.close()
        if bar is not None:
            bar.close()
    return results


def num_workers(model: Any, value: int | None) -> int:
    """The prefetch workers: ``value``, or the device's default when None."""
    if value is None:
        return default_num_workers(model.device)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInputError(f"num_workers must be an int >= 0 or None, got {value!r}.")
    return value


def decision_thresholds(
    model: Any,
    thresholds: Thresholds | Literal[False] | None,
    image_threshold: float | None,
    pixel_threshold: float | None,
) -> tuple[float | None, float | None]:
    """The ``(image, pixel)`` thresholds ``predict`` applies (see its docstring)."""
    for name, value in (("image_threshold", image_threshold), ("pixel_threshold", pixel_threshold)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
        ):
            raise InvalidInputError(f"{name} must be a finite number or None, got {value!r}.")
    if thresholds is None:
        thresholds = model.thresholds
    elif thresholds is False:
        thresholds = None
    elif not isinstance(thresholds, Thresholds):
        raise InvalidInputError(
            "thresholds must be an anomalyclip.Thresholds, None (the model's own thresholds) or False "
            f"(none), got {thresholds!r}."
        )
    if thresholds is not None:
        image_threshold = thresholds.image if image_threshold is None else image_threshold
        pixel_threshold = thresholds.pixel if pixel_threshold is None else pixel_threshold
    return (
        None if image_threshold is None else float(image_threshold),
        None if pixel_threshold is None else float(pixel_threshold),
    )


def _predict_tiled(
    model: Any,
    items: list[ImageInput],
    options: PredictOptions,
    image_threshold: float | None,
    pixel_threshold: float | None,
) -> list[AnomalyResult]:
    """``predict`` with tiles: each tile through ``preprocess``/``forward``, maps blended."""
    from tqdm.auto import tqdm

    tile_size, tile_overlap, batch_size = cast(int, options.tile_size), options.tile_overlap, options.batch_size
    model._check_tile_size(tile_size)
    memory = model.references
    warn_scale = memory is not None and memory.tile_size != tile_size
    results: list[AnomalyResult] = []
    with torch.inference_mode():
        for item in tqdm(items, desc="AnomalyCLIP", unit="img", disable=not options.progress):
            prepared = model._prepare(item)
            grid = tile_grid(*prepared.size, tile_size, tile_overlap)
            if warn_scale and (len(grid) > 1 or memory.tile_size is not None):
                logger.warning(
                    "The references were taken with tile_size=%s but predict tiles with %s: test and reference "
                    "patches then have different scales. Add the references with the same tile_size.",
                    memory.tile_size,
                    tile_size,
                )
                warn_scale = False
            stitcher = TileStitcher(grid)
            zero_shot, reference = [], []
            tiles = grid.tiles
            for start in range(0, len(tiles), batch_size):
                chunk = tiles[start : start + batch_size]
                out = model(torch.stack([model._preprocess_prepared(crop_prepared(prepared, t)) for t in chunk]))
                for i, tile in enumerate(chunk):
                    tile_map = F.interpolate(
                        out.anomaly_maps[i][None, None], size=(tile.height, tile.width), mode="bilinear", align_corners=False
                    )
                    stitcher.add(tile, tile_map[0, 0])
                zero_shot.append(cast(torch.Tensor, out.zero_shot_scores).float())
                if out.reference_scores is not None:
                    reference.append(out.reference_scores.float())
            score = torch.cat(zero_shot).max()
            if reference:
                score = fuse_scores(score, torch.cat(reference).max())
            results.append(
                AnomalyResult(
                    score=float(score),
                    anomaly_map=stitcher.result().numpy(),
                    image_threshold=image_threshold,
                    pixel_threshold=pixel_threshold,
                    path=os.fspath(item) if isinstance(item, (str, os.PathLike)) else None,
                )
            )
    return results


def calibrate(model: Any, items: list[ImageInput], *, quantile: float, options: PredictOptions) -> Thresholds:
    """``model.calibrate`` (documented there): the thresholds, also set on the model."""
    if isinstance(quantile, bool) or not isinstance(quantile, numbers.Real) or not 0 <= quantile <= 1:
        raise InvalidInputError(f"quantile must be a number in [0, 1] (e.g. 0.99), got {quantile!r}.")
    workers = num_workers(model, options.num_workers)
    size = model.config.image_size
    scores = np.empty(len(items), dtype=np.float32)
    maps = np.empty((len(items), size, size), dtype=np.float32)
    batches = prefetch_batches(items, model._load_and_preprocess, options.batch_size, num_workers=workers)
    start = 0
    try:
        with torch.inference_mode():
            for batch in batches:
                out = model(stack_batch([t for _, t in batch], pin_memory=model.device.type == "cuda"))
                end = start + len(out.scores)
                scores[start:end] = out.scores.float().cpu().numpy()
                maps[start:end] = out.anomaly_maps.float().cpu().numpy()
                start = end
    finally:
        batches.close()
    thresholds = Thresholds.from_normal(scores, maps, quantile=quantile)
    model.thresholds = thresholds
    return thresholds


def _to_pinned_host(x: torch.Tensor) -> torch.Tensor:
    """An asynchronous device-to-host copy of ``x`` into pinned memory (read it after a sync)."""
    out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    return out.copy_(x, non_blocking=True)


class _StagedBatch:
    """One batch's results on their way to the host: maps resized to each image's size and
    copied back asynchronously (on CUDA, into pinned memory, ordered before the next batch's
    forward on the stream); :meth:`results` waits for the copies and builds the results."""

    def __init__(self, scores: torch.Tensor, maps: list[torch.Tensor], paths: list[str | None], event: Any) -> None:
        self.scores, self.maps, self.paths, self.event = scores, maps, paths, event

    @classmethod
    def stage(cls, out: AnomalyOutput, sizes: list[tuple[int, int]], paths: list[str | None]) -> "_StagedBatch":
        maps = [
            F.interpolate(out.anomaly_maps[i][None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
            for i, size in enumerate(sizes)
        ]
        scores = out.scores.float()
        if scores.device.type != "cuda":
            return cls(scores.cpu(), [m.float().cpu() for m in maps], paths, None)
        scores, maps = _to_pinned_host(scores), [_to_pinned_host(m.float()) for m in maps]
        event = torch.cuda.Event()
        event.record()
        return cls(scores, maps, paths, event)

    def results(self, image_threshold: float | None, pixel_threshold: float | None) -> list[AnomalyResult]:
        if self.event is not None:
            self.event.synchronize()
        copy = self.event is not None  # the copies are in pinned memory: hand out ordinary arrays
        return [
            AnomalyResult(
                score=float(score),
                anomaly_map=np.array(m.numpy(), dtype=np.float32, copy=True) if copy else m.numpy().astype(np.float32, copy=False),
                image_threshold=image_threshold,
                pixel_threshold=pixel_threshold,
                path=path,
            )
            for score, m, path in zip(self.scores.tolist(), self.maps, self.paths)
        ]
