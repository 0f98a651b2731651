"""The inspection service on Ray Serve: the same FastAPI app, one model per replica.

:func:`build_deployment` wraps :func:`~anomalyclip.serve.app.create_app` with ``serve.ingress``
(built on each replica, after the replica has loaded its model) and batches with
``@serve.batch`` instead of the single-machine :class:`~anomalyclip.serve.batching.Batcher`.
Ray Serve's own queue bound (``max_queued_requests``) answers 503 when the replicas are full.
Routes and answers are those of ``anomalyclip serve`` without ``--ray``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Sequence

from ..outputs import AnomalyResult
from ._deps import RAY_HINT, require
from .loading import ModelSpec, load_engine
from .settings import ServeSettings

__all__ = ["build_deployment", "run_on_ray", "APP_NAME"]

logger = logging.getLogger(__name__)

#: The Ray Serve application name of the service.
APP_NAME = "anomalyclip"


def _batch_runner(serve: Any, max_batch_size: int, batch_wait_s: float) -> Callable[[Callable], Any]:
    """A runner class (see :class:`anomalyclip.serve.app.Runner`) whose ``submit`` is ``@serve.batch``."""

    class ServeBatchRunner:
        depth = 0  # Ray Serve queues the requests (max_queued_requests); nothing waits here

        def __init__(self, run: Callable[[list], Sequence[AnomalyResult]]) -> None:
            self._run = run

        def start(self) -> None:
            pass

        async def stop(self) -> None:
            pass

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_s)
        async def submit(self, jobs: list) -> list[AnomalyResult]:
            # The forward pass runs in a thread: the replica's event loop keeps taking requests.
            return list(await asyncio.to_thread(self._run, jobs))

    return ServeBatchRunner


def build_deployment(
    spec: ModelSpec,
    settings: ServeSettings,
    *,
    replicas: int = 1,
    cpus_per_replica: float | None = None,
    gpus_per_replica: float | None = None,
) -> Any:
    """The bound Ray Serve application of the service (pass it to ``serve.run``).

    Args:
        spec: the model each replica loads (:func:`~anomalyclip.serve.loading.load_engine`).
        settings: the service settings; ``max_batch_size`` and ``batch_wait_ms`` configure
            ``@serve.batch``, ``max_queue`` becomes ``max_queued_requests`` (503 beyond).
        replicas: number of model replicas.
        cpus_per_replica, gpus_per_replica: Ray resources per replica (default 1 CPU, 0 GPU).
    """
    serve = require("ray.serve", RAY_HINT)
    from .app import create_app

    runner = _batch_runner(serve, settings.max_batch_size, settings.batch_wait_ms / 1000.0)

    @serve.ingress()
    class AnomalyCLIPService:
        def __init__(self, spec: ModelSpec, settings: ServeSettings) -> None:
            started = time.perf_counter()
            self.engine = load_engine(spec)  # once per replica
            self.settings = settings
            logger.info("Replica loaded the model in %.1f s", time.perf_counter() - started)

        def __serve_build_asgi_app__(self) -> Any:
            return create_app(self.engine, self.settings, runner=runner)

    options: dict[str, Any] = {"num_cpus": 1.0 if cpus_per_replica is None else cpus_per_replica}
    if gpus_per_replica:
        options["num_gpus"] = gpus_per_replica
    deployment = serve.deployment(
        AnomalyCLIPService,
        name="AnomalyCLIPService",
        num_replicas=replicas,
        ray_actor_options=options,
        max_ongoing_requests=max(2 * settings.max_batch_size, 16),
        max_queued_requests=settings.max_queue,
    )
    return deployment.bind(spec, settings)


def run_on_ray(
    spec: ModelSpec,
    settings: ServeSettings,
    *,
    host: str,
    port: int,
    replicas: int = 1,
    cpus_per_replica: float | None = None,
    gpus_per_replica: float | None = None,
    address: str | None = None,
) -> int:
    """``anomalyclip serve --ray``: start (or join) Ray, deploy, and serve until interrupted."""
    ray = require("ray", RAY_HINT)
    serve = require("ray.serve", RAY_HINT)
    ray.init(address=address or "local", include_dashboard=False, logging_level="WARNING")
    try:
        serve.start(http_options={"host": host, "port": port})
        app = build_deployment(
            spec, settings, replicas=replicas, cpus_per_replica=cpus_per_replica, gpus_per_replica=gpus_per_replica
        )
        logger.info("Deploying %d replica(s) on Ray Serve at http://%s:%d", replicas, host, port)
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
