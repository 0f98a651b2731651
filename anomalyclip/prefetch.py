"""Prepare input batches on CPU worker threads while the model runs the previous batch.

On a GPU the vision forward of a batch takes tens of milliseconds, while decoding and resizing
one image on a CPU core takes about as long: done in the main thread, between forwards, the
preprocessing leaves the GPU idle most of the time. :func:`prefetch_batches` runs a function
(e.g. load + preprocess) over the items on a pool of threads, up to a few batches ahead, and
yields the results batch by batch, in order. Pillow's decoders and resampling, numpy and torch
release the GIL, so threads run in parallel for this work; inputs need not be picklable (PIL
images, arrays, tensors), unlike with worker processes.

:func:`stack_batch` stacks a batch into page-locked (pinned) memory when the model is on CUDA,
so that the model's host-to-device copy is asynchronous.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator, Sequence, TypeVar

import torch

__all__ = ["default_num_workers", "prefetch_batches", "stack_batch"]

T = TypeVar("T")
R = TypeVar("R")

#: Most worker threads :func:`default_num_workers` picks.
MAX_DEFAULT_WORKERS = 8


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_num_workers(device: torch.device | str) -> int:
    """Worker count for ``num_workers=None``: 0 on the CPU, else ``min(8, CPUs - 1)``.

    On the CPU the forward itself uses every core, so preprocessing stays in the calling thread
    (the behaviour and the results are the same either way). With an accelerator the CPUs are
    free for preprocessing; one core is left to the thread that drives the device.
    """
    if torch.device(device).type == "cpu":
        return 0
    return max(1, min(MAX_DEFAULT_WORKERS, _cpu_count() - 1))


def prefetch_batches(
    items: Sequence[T],
    fn: Callable[[T], R],
    batch_size: int,
    *,
    num_workers: int = 0,
    prefetch: int = 2,
) -> Iterator[list[R]]:
    """``[fn(x) for x in batch]`` for consecutive batches of ``items``, in order.

    Args:
        items: the inputs.
        fn: the work per item (e.g. decode and preprocess an image); must be thread-safe.
        batch_size: items per batch (the last batch may be smaller).
        num_workers: worker threads; 0 runs ``fn`` in the calling thread, batch by batch, only
            when the batch is requested (no work ahead).
        prefetch: with workers, how many batches beyond the one being consumed are in progress.

    An exception raised by ``fn`` is raised again, unchanged, when the batch of its item is
    reached (earlier batches are yielded first, as without workers). Closing the iterator early
    cancels the work not yet started and waits for the rest.
    """
    n = len(items)
    starts = range(0, n, batch_size)
    if num_workers <= 0:
        for start in starts:
            yield [fn(x) for x in items[start : start + batch_size]]
        return
    pool = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="anomalyclip-prefetch")
    pending: deque[list[Future]] = deque()
    upcoming = iter(starts)

    def submit_next() -> None:
        start = next(upcoming, None)
        if start is not None:
            pending.append([pool.submit(fn, x) for x in items[start : start + batch_size]])

    try:
        for _ in range(1 + max(0, prefetch)):
            submit_next()
        while pending:
            futures = pending.popleft()
            submit_next()
            yield [f.result() for f in futures]
    finally:
        for futures in pending:
            for f in futures:
                f.cancel()
        pool.shutdown(wait=True)


def stack_batch(tensors: Sequence[torch.Tensor], *, pin_memory: bool = False) -> torch.Tensor:
    """``torch.stack(tensors)``, into page-locked memory if ``pin_memory`` (for CUDA).

    A pinned batch is copied to the GPU asynchronously (``non_blocking=True``); PyTorch's
    pinned-memory cache does not reuse its block before that copy has completed.
    """
    if not pin_memory:
        return torch.stack(list(tensors))
    first = tensors[0]
    out = torch.empty((len(tensors), *first.shape), dtype=first.dtype, pin_memory=True)
    return torch.stack(list(tensors), out=out)
