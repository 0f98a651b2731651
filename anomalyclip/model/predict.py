"""The torch model as a backend of the predictor core: batching with CUDA staging, tiling,
calibration, and the model's decision mode.

``AnomalyCLIP.predict`` / ``predict_iter`` / ``calibrate`` run :func:`anomalyclip.predictor.predict_stream`
over :class:`TorchBackend` (or :class:`TiledTorchBackend`); the thresholds are resolved by
:func:`anomalyclip.predictor.resolve_thresholds`, as in the ONNX runtime and the Ray actor.
"""

from __future__ import annotations

import logging
import numbers
from typing import Any, Iterable, Iterator, cast

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InvalidInputError
from ..eval.thresholds import Thresholds
from ..options import PredictOptions
from ..outputs import AnomalyOutput, AnomalyResult
from ..prefetch import default_num_workers, stack_batch
from ..predictor.stream import predict_stream
from ..predictor.thresholds import DecisionMode, resolve_thresholds
from ..references import fuse_scores
from ..tiling import TileStitcher, crop_prepared, tile_grid

__all__ = ["TorchBackend", "TiledTorchBackend", "predict_iter", "calibrate", "decision_mode", "decision_thresholds"]

logger = logging.getLogger(__name__)


def references_fingerprint(model: Any) -> str | None:
    """:meth:`ReferenceMemory.fingerprint <anomalyclip.references.ReferenceMemory.fingerprint>`
    of the model's memory (None when zero-shot): its tokens, settings, fusion rule and fusion
    statistics, so thresholds chosen with other references or another fusion do not apply.
    Cached per memory state."""
    memory = model.references
    if memory is None:
        return None
    stats = memory.statistics
    key = (id(memory), memory.num_images, len(memory), memory.fusion, None if stats is None else tuple(stats.to_tensor().tolist()))
    cached = getattr(model, "_fingerprint_cache", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    value = memory.fingerprint()
    model._fingerprint_cache = (key, value)
    return value


def decision_mode(model: Any, tile_size: int | None = None, tile_overlap: float | None = None) -> DecisionMode:
    """The :class:`DecisionMode` of the model's outputs with this tiling."""
    c = model.config
    return DecisionMode(
        image_size=c.image_size,
        feature_layers=c.feature_layers,
        dpam_layers=c.dpam_layers,
        dpam_mode=c.dpam_mode,
        sigma=c.sigma,
        tile_size=tile_size,
        tile_overlap=tile_overlap if tile_size is not None else None,
        references=references_fingerprint(model),
        backbone=c.backbone,
    )


def decision_thresholds(
    model: Any,
    thresholds: Any,
    image_threshold: float | None,
    pixel_threshold: float | None,
    tile_size: int | None = None,
    tile_overlap: float | None = None,
) -> tuple[float | None, float | None]:
    """The ``(image, pixel)`` thresholds ``predict`` applies (see its docstring)."""
    if not hasattr(model, "_threshold_warnings"):
        model._threshold_warnings = set()
    return resolve_thresholds(
        own=model.thresholds,
        thresholds=thresholds,
        image_threshold=image_threshold,
        pixel_threshold=pixel_threshold,
        map_range=model.map_range,
        mode=decision_mode(model, tile_size, tile_overlap),
        warned=model._threshold_warnings,
    )


def num_workers(model: Any, value: int | None) -> int:
    """The prefetch workers: ``value``, or the device's default when None."""
    return default_num_workers(model.device) if value is None else value


def _to_pinned_host(x: torch.Tensor) -> torch.Tensor:
    """An asynchronous device-to-host copy of ``x`` into pinned memory (read it after a sync)."""
    out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    return out.copy_(x, non_blocking=True)


class _StagedBatch:
    """One batch's results on their way to the host: maps resized to each image's size on the
    model's device, then scores and maps copied back in one transfer (on CUDA, asynchronously into
    pinned memory, ordered before the next batch's forward on the stream); :meth:`collect` waits
    for the copy and splits it."""

    def __init__(self, flat: torch.Tensor, sizes: list[tuple[int, int]], event: Any) -> None:
        self.flat, self.sizes, self.event = flat, sizes, event

    @classmethod
    def stage(cls, out: AnomalyOutput, sizes: list[tuple[int, int]]) -> "_StagedBatch | _Done":
        maps = [
            F.interpolate(out.anomaly_maps[i][None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
            for i, size in enumerate(sizes)
        ]
        if out.scores.device.type == "cpu":  # nothing to transfer: each map its own array
            return _Done(out.scores.float().numpy().astype(np.float64), [m.float().numpy() for m in maps])  # type: ignore[return-value]
        # maps, then the B scores, in one float32 buffer: a single device-to-host copy per batch
        flat = torch.cat([m.float().reshape(-1) for m in maps] + [out.scores.float().reshape(-1)])
        if flat.device.type != "cuda":
            return cls(flat.cpu(), sizes, None)
        flat = _to_pinned_host(flat)
        event = torch.cuda.Event()
        event.record()
        return cls(flat, sizes, event)

    def collect(self) -> tuple[np.ndarray, list[np.ndarray]]:
        if self.event is not None:
            self.event.synchronize()
        host = self.flat.numpy()
        copy = self.event is not None  # the copy is in pinned memory: hand out ordinary arrays
        maps, offset = [], 0
        for h, w in self.sizes:
            view = host[offset : offset + h * w].reshape(h, w)
            maps.append(np.array(view, copy=True) if copy else view)
            offset += h * w
        return host[offset:].astype(np.float64), maps


class _Done:
    def __init__(self, scores: np.ndarray, maps: list[np.ndarray]) -> None:
        self.scores, self.maps = scores, maps

    def collect(self) -> tuple[np.ndarray, list[np.ndarray]]:
        return self.scores, self.maps


class TorchBackend:
    """The torch model for :func:`~anomalyclip.predictor.predict_stream`: whole images at S x S."""

    def __init__(self, model: Any, read_options: Any = None) -> None:
        self.model, self.read_options = model, read_options

    def load(self, image: Any) -> tuple[tuple[int, int], torch.Tensor]:
        prepared = self.model._prepare(image, self.read_options)
        return prepared.size, self.model._preprocess_prepared(prepared)

    def submit(self, pixels: list[torch.Tensor], sizes: list[tuple[int, int]]) -> _StagedBatch:
        with torch.inference_mode():
            batch = stack_batch(pixels, pin_memory=self.model.device.type == "cuda")
            return _StagedBatch.stage(self.model(batch), sizes)


class TiledTorchBackend:
    """The torch model with tiles: each image cut into tiles run at S x S, the maps blended."""

    def __init__(self, model: Any, tile_size: int, tile_overlap: float, batch_size: int, read_options: Any = None) -> None:
        self.model, self.tile_size, self.tile_overlap, self.batch_size = model, tile_size, tile_overlap, batch_size
        self.read_options = read_options

    def load(self, image: Any) -> tuple[tuple[int, int], Any]:
        prepared = self.model._prepare(image, self.read_options)
        return prepared.size, prepared

    def submit(self, pixels: list[Any], sizes: list[tuple[int, int]]) -> _Done:
        scores, maps = zip(*(self._one(prepared) for prepared in pixels))
        return _Done(np.asarray(scores, dtype=np.float64), list(maps))

    def _one(self, prepared: Any) -> tuple[float, np.ndarray]:
        model = self.model
        grid = tile_grid(*prepared.size, self.tile_size, self.tile_overlap)
        stitcher = TileStitcher(grid)
        zero_shot, reference = [], []
        tiles = grid.tiles
        with torch.inference_mode():
            for start in range(0, len(tiles), self.batch_size):
                chunk = tiles[start : start + self.batch_size]
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
                score = fuse_scores(score, torch.cat(reference).max(), model.references.fusion_statistics())
        return float(score), stitcher.result().numpy().astype(np.float32, copy=False)


def _warn_reference_scale(model: Any, tile_size: int | None) -> None:
    """Warn (once per model and tiling) when the references were taken at another scale than ``predict`` runs."""
    memory = model.references
    if memory is None or memory.tile_size == tile_size:
        return
    key = ("scale", memory.tile_size, tile_size)
    warned = model.__dict__.setdefault("_threshold_warnings", set())
    if key in warned:
        return
    warned.add(key)
    logger.warning(
        "The references were taken with tile_size=%s but predict runs with tile_size=%s: test and reference patches then "
        "have different scales (pixels per patch) and the reference distances mean little. Add the references with "
        "the same tile_size as predict.",
        memory.tile_size,
        tile_size,
    )


def predict_iter(
    model: Any,
    images: Iterable[Any],
    options: PredictOptions,
    thresholds: tuple[float | None, float | None],
    total: int | None = None,
) -> Iterator[AnomalyResult]:
    """``model.predict_iter`` (documented there), thresholds already resolved."""
    if options.tile_size is not None:
        model._check_tile_size(options.tile_size)
        backend: Any = TiledTorchBackend(
            model, options.tile_size, options.tile_overlap, options.batch_size, options.read_options
        )
        batch_size = 1
    else:
        backend, batch_size = TorchBackend(model, options.read_options), options.batch_size
    _warn_reference_scale(model, options.tile_size)
    return predict_stream(
        backend,
        images,
        batch_size=batch_size,
        num_workers=num_workers(model, options.num_workers),
        thresholds=thresholds,
        on_error=options.on_error,
        progress=options.progress,
        total=total,
    )


def calibrate(model: Any, items: list[Any], *, quantile: float, options: PredictOptions) -> Thresholds:
    """``model.calibrate`` (documented there): the thresholds, also set on the model.

    Untiled, the pixel threshold is the quantile of the maps at the processing size S (as
    before); tiled, of the blended maps at each image's size, as ``predict`` gives them.
    """
    if isinstance(quantile, bool) or not isinstance(quantile, numbers.Real) or not 0 <= quantile <= 1:
        raise InvalidInputError(f"quantile must be a number in [0, 1] (e.g. 0.99), got {quantile!r}.")
    scores = np.empty(len(items), dtype=np.float32)
    if options.tile_size is None:
        size = model.config.image_size
        maps = np.empty((len(items), size, size), dtype=np.float32)
        backend = TorchBackend(model, options.read_options)
        for start in range(0, len(items), options.batch_size):
            chunk = [backend.load(item) for item in items[start : start + options.batch_size]]
            with torch.inference_mode():
                out = model(stack_batch([t for _, t in chunk], pin_memory=model.device.type == "cuda"))
            end = start + len(chunk)
            scores[start:end] = out.scores.float().cpu().numpy()
            maps[start:end] = out.anomaly_maps.float().cpu().numpy()
        pixel_values: Any = maps
    else:
        results = list(predict_iter(model, items, options, (None, None)))
        scores[:] = [r.score for r in results]
        pixel_values = np.concatenate([r.anomaly_map.ravel() for r in results])[None, None, :]
    found = Thresholds.from_normal(scores, pixel_values, quantile=quantile)
    mode = decision_mode(model, options.tile_size, options.tile_overlap)
    model._set_thresholds(found, mode)
    return model.thresholds
