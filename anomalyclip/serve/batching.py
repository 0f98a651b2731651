"""Dynamic batching on one machine: concurrent requests share one forward pass.

:class:`Batcher` gathers the items submitted while a batch forms (up to ``max_batch_size``, for
at most ``batch_wait_ms`` after the first) and runs them with one call of a blocking function in
a worker thread, so the event loop keeps accepting requests. The queue is bounded: when it is
full, :meth:`Batcher.submit` raises :class:`QueueFullError` at once (the service answers 503 with
``Retry-After``) instead of letting the backlog grow. An exception of a batch fails only the
requests of that batch. (On Ray Serve, ``@serve.batch`` takes this role: see
:mod:`anomalyclip.serve.ray_serve`.)
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Generic, Sequence, TypeVar

from ..errors import AnomalyCLIPError

__all__ = ["Batcher", "QueueFullError"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class QueueFullError(AnomalyCLIPError, RuntimeError):
    """The batching queue is full; the request was not queued (HTTP 503, retry later)."""


class BatchError(AnomalyCLIPError, RuntimeError):
    """The batch function broke its contract (not one result per item)."""


class Batcher(Generic[T, R]):
    """Gathers submitted items into batches for ``run`` (a blocking ``list[T] -> list[R]``).

    Args:
        run: scores a batch; called in one worker thread, one batch at a time; returns one result
            per item, in order.
        max_batch_size: most items per call of ``run``.
        batch_wait_ms: how long the first item of a batch waits for more, in milliseconds.
        max_queue: most items waiting (not counting the batch being run).
        on_batch: called with the size of each batch before it runs (metrics).

    Use inside a running event loop: ``start()``, ``await submit(item)``, ``await stop()``.
    """

    def __init__(
        self,
        run: Callable[[list[T]], Sequence[R]],
        *,
        max_batch_size: int = 8,
        batch_wait_ms: float = 5.0,
        max_queue: int = 128,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._run = run
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.max_queue = max_queue
        self._on_batch = on_batch
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def depth(self) -> int:
        """Items waiting for a batch now."""
        return 0 if self._queue is None else self._queue.qsize()

    def start(self) -> None:
        """Start the batching task on the running event loop."""
        if self._task is not None:
            return
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="anomalyclip-forward")
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="anomalyclip-batcher")

    async def stop(self) -> None:
        """Stop the task; items still waiting fail with :class:`QueueFullError`."""
        if self._task is None:
            return
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        if self._queue is None or self._executor is None:
            return
        while not self._queue.empty():
            _, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(QueueFullError("The service is shutting down."))
        self._executor.shutdown(wait=True)
        self._task = self._queue = self._executor = None

    async def submit(self, item: T) -> R:
        """Queue ``item`` and wait for its result.

        Raises:
            QueueFullError: the queue is full (nothing was queued).
            Exception: whatever ``run`` raised for this item's batch.
        """
        if self._queue is None:
            raise QueueFullError("The batcher is not running (the service is starting or stopping).")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((item, future))
        except asyncio.QueueFull:
            raise QueueFullError(f"{self.max_queue} requests are already waiting; retry later.") from None
        return await future

    async def _next_batch(self) -> list[tuple[T, asyncio.Future[R]]]:
        queue = self._queue
        if queue is None:  # stopped between two batches
            return []
        batch = [await queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.batch_wait_s
        while len(batch) < self.max_batch_size:
            if not queue.empty():
                batch.append(queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            # asyncio.wait, not wait_for: a get that completes as the wait times out keeps its item.
            getter = asyncio.ensure_future(queue.get())
            await asyncio.wait({getter}, timeout=left)
            if getter.done() or not getter.cancel():
                batch.append(getter.result())
            else:
                break
        return [(item, future) for item, future in batch if not future.cancelled()]

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue is not None:
            batch = await self._next_batch()
            if not batch:
                continue
            if self._on_batch is not None:
                self._on_batch(len(batch))
            items = [item for item, _ in batch]
            try:
                results: Any = await loop.run_in_executor(self._executor, self._run, items)
                if len(results) != len(items):
                    raise BatchError(f"batch function returned {len(results)} results for {len(items)} items")
            except Exception as exc:  # noqa: BLE001 -- only this batch's requests fail
                logger.warning("A batch of %d failed: %s", len(items), exc)
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
