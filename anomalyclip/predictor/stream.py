"""The streaming prediction loop every runtime shares. Torch-free.

A runtime implements :class:`Backend` (load one image, submit a batch); :func:`predict_stream`
does the rest: one ordered prefetch pipeline over the whole (possibly lazy) stream of inputs,
batches of ``batch_size`` images, the next batch submitted before the previous one is read (so
that an accelerator always has queued work), unreadable images raised or recorded, results
yielded in input order with bounded memory (at most ``2 * batch_size + workers`` images in flight).
"""

from __future__ import annotations

import math
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Protocol

import numpy as np

from ..errors import AnomalyCLIPError, InvalidInputError, ResourceError
from ..files import find_images
from ..outputs import AnomalyResult

__all__ = ["Backend", "PendingBatch", "predict_stream", "expand_inputs", "iter_inputs"]


class PendingBatch(Protocol):
    """A submitted batch whose results may still be computing (e.g. on a GPU stream)."""

    def collect(self) -> tuple[np.ndarray, list[np.ndarray]]:
        """Wait for the batch: ``(scores [B] float, maps)``, each map float32 ``[H, W]`` at its image's size."""
        ...


class Backend(Protocol):
    """What a runtime gives the predictor core (the torch model, ``OnnxAnomalyCLIP``)."""

    def load(self, image: Any) -> tuple[tuple[int, int], Any]:
        """Decode and preprocess one image (runs on a prefetch worker): ``((height, width), pixels [3, S, S])``
        with the one preprocessing of :mod:`anomalyclip.preprocessing`. Raises the library's errors."""
        ...

    def submit(self, pixels: list[Any], sizes: list[tuple[int, int]]) -> PendingBatch:
        """Run a batch of preprocessed images; maps are resized to ``sizes``."""
        ...


def _path_of(item: Any) -> str | None:
    return os.fspath(item) if isinstance(item, (str, os.PathLike)) else None


def iter_inputs(images: Iterable[Any]) -> Iterator[Any]:
    """The input rule of ``predict``, ``predict_iter``, ``calibrate`` and ``add_references``
    (torch and ONNX alike): each item is an image, or a folder that expands (recursively, sorted)
    to its image files. Lazy: a generator stays a generator."""
    for item in images:
        if isinstance(item, (str, os.PathLike)) and os.path.isdir(item):
            found = find_images(item)
            if not found:
                raise InvalidInputError(f"No image files in folder '{item}' (searched recursively).")
            yield from found
        else:
            yield item


def expand_inputs(images: Any, what: str = "predict") -> tuple[list[Any], bool]:
    """``(items, single)``: one image, a folder or a sequence of them, as a list of images
    (folders expanded); ``single`` is True for one image that is not a folder."""
    is_folder = isinstance(images, (str, os.PathLike)) and os.path.isdir(images)
    single = not isinstance(images, (list, tuple)) and not is_folder
    items = list(iter_inputs([images] if not isinstance(images, (list, tuple)) else images))
    if not items:
        raise InvalidInputError(f"{what} got no images (an empty list); pass at least one image (a path, a folder, an array...).")
    return items, single


def _ordered_prefetch(
    items: Iterable[Any], fn: Callable[[Any], Any], workers: int, depth: int
) -> Iterator[tuple[Any, Any, BaseException | None]]:
    """``(item, fn(item), None)`` or ``(item, None, error)`` in input order, at most ``depth`` ahead."""
    iterator = iter(items)
    if workers <= 0:
        for item in iterator:
            try:
                yield item, fn(item), None
            except Exception as exc:  # noqa: BLE001 - handed to the caller, who raises or records it
                yield item, None, exc
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="anomalyclip-load")
    queue: deque[tuple[Any, Future]] = deque()
    try:
        for item in iterator:
            queue.append((item, pool.submit(fn, item)))
            if len(queue) >= depth:
                yield _resolved(*queue.popleft())
        while queue:
            yield _resolved(*queue.popleft())
    finally:
        for _, future in queue:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _resolved(item: Any, future: Future) -> tuple[Any, Any, BaseException | None]:
    try:
        return item, future.result(), None
    except Exception as exc:  # noqa: BLE001
        return item, None, exc


def _error_result(item: Any, exc: BaseException, thresholds: tuple[float | None, float | None]) -> AnomalyResult:
    return AnomalyResult(
        score=math.nan,
        anomaly_map=None,
        image_threshold=thresholds[0],
        pixel_threshold=thresholds[1],
        path=_path_of(item),
        error=str(exc),
    )


def predict_stream(
    backend: Backend,
    images: Iterable[Any],
    *,
    batch_size: int,
    num_workers: int,
    thresholds: tuple[float | None, float | None],
    on_error: str = "raise",
    progress: bool = False,
    total: int | None = None,
) -> Iterator[AnomalyResult]:
    """Results of ``images`` in input order (see the module docstring).

    With ``on_error="record"``, an image that cannot be read or scored (:class:`AnomalyCLIPError`
    other than :class:`ResourceError`) gives a result with ``error`` set, score NaN and no map;
    running out of memory always raises. With ``"raise"`` the first such error is raised.
    """
    if on_error not in ("raise", "record"):
        raise InvalidInputError(f"on_error must be 'raise' or 'record', got {on_error!r}.")
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # an ONNX-only install (numpy, Pillow, onnxruntime): no bar
            tqdm = None
        if tqdm is not None:
            bar = tqdm(total=total, desc="AnomalyCLIP", unit="img")
    loaded = _ordered_prefetch(iter_inputs(images), backend.load, num_workers, depth=batch_size + max(num_workers, 1))
    # A group is one batch's inputs: each an error result already, or an image of the batch.
    previous: tuple[list[Any], PendingBatch | None] | None = None

    def emit(group: list[Any], pending: PendingBatch | None) -> Iterator[AnomalyResult]:
        scores: Any = None
        maps: list[np.ndarray] = []
        failure: AnomalyCLIPError | None = None
        if pending is not None:
            try:
                scores, maps = pending.collect()
            except ResourceError:
                raise
            except AnomalyCLIPError as exc:
                if on_error == "raise":
                    raise
                failure = exc
        k = 0
        for entry in group:
            if isinstance(entry, AnomalyResult):
                yield entry
                continue
            if failure is not None:
                yield _error_result(entry, failure, thresholds)
                continue
            yield AnomalyResult(
                score=float(scores[k]),
                anomaly_map=np.asarray(maps[k], dtype=np.float32),
                image_threshold=thresholds[0],
                pixel_threshold=thresholds[1],
                path=_path_of(entry),
            )
            k += 1
        if bar is not None:
            bar.update(len(group))

    try:
        while True:
            group: list[Any] = []
            pixels: list[Any] = []
            sizes: list[tuple[int, int]] = []
            for item, value, error in loaded:
                if error is not None:
                    if on_error == "raise" or not isinstance(error, AnomalyCLIPError) or isinstance(error, ResourceError):
                        raise error
                    group.append(_error_result(item, error, thresholds))
                else:
                    group.append(item)
                    sizes.append(value[0])
                    pixels.append(value[1])
                if len(group) >= batch_size:
                    break
            if not group:
                break
            pending = None
            if pixels:
                try:
                    pending = backend.submit(pixels, sizes)
                except ResourceError:
                    raise
                except AnomalyCLIPError as exc:
                    if on_error == "raise":
                        raise
                    group = [e if isinstance(e, AnomalyResult) else _error_result(e, exc, thresholds) for e in group]
            if previous is not None:  # the device already runs this batch while we read the last one
                yield from emit(*previous)
            previous = (group, pending)
            del pixels
        if previous is not None:
            yield from emit(*previous)
    finally:
        loaded.close()
        if bar is not None:
            bar.close()
