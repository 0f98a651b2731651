"""``anomalyclip serve MODEL``: the inspection service under uvicorn, or on Ray Serve with ``--ray``."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any, Callable

from ..errors import InvalidInputError
from ..predict_io import model_options

__all__ = ["add_serve_parser", "settings_from_args", "spec_from_args"]

logger = logging.getLogger("anomalyclip.serve")

#: The environment variable read when ``--token`` is not given.
TOKEN_ENV = "ANOMALYCLIP_TOKEN"
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_serve_parser(sub: Any, add_model_options: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    """Add the ``serve`` command to the CLI's subparsers (``add_model_options`` adds the shared model options)."""
    p = sub.add_parser(
        "serve",
        help="an HTTP inspection service with a web inspector (pip install \"anomalyclip[serve]\")",
        description="Serve a model over HTTP: POST /v1/predict, GET /v1/health, /v1/model, /metrics, the web "
        "inspector at / (docs/serving.md).",
    )
    p.add_argument("model_ref", nargs="?", default=None, metavar="MODEL", help="preset, profile folder or Hub id (same as --model)")
    add_model_options(p)
    p.add_argument("--references", nargs="+", default=None, metavar="DIR_OR_FILE", help="normal reference images (few-shot)")
    p.add_argument("--coreset", type=float, default=None, help="keep this fraction of the reference patches")
    p.add_argument("--threshold", type=float, default=None, help="default image threshold (else the model's own)")
    p.add_argument("--pixel-threshold", type=float, default=None, help="default pixel threshold (else the model's own)")
    p.add_argument("--no-thresholds", action="store_true", help="ignore the thresholds saved with the model")
    net = p.add_argument_group("network and safety")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    net.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    net.add_argument("--token", default=None, help=f"require 'Authorization: Bearer TOKEN' on /v1/* (default: ${TOKEN_ENV})")
    net.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN", help="allow this origin (CORS); repeatable")
    net.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body in MiB (default 20)")
    net.add_argument("--max-pixels", type=int, default=25_000_000, help="largest image, width x height (default 25e6)")
    batch = p.add_argument_group("batching")
    batch.add_argument("--max-batch-size", type=int, default=8, help="most images per forward pass (default 8)")
    batch.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits to fill, ms (default 5)")
    batch.add_argument("--max-queue", type=int, default=128, help="waiting requests before 503 (default 128)")
    batch.add_argument("--decode-workers", type=int, default=4, help="image-decoding threads (default 4)")
    log = p.add_argument_group("inspection log")
    log.add_argument("--store", default=None, metavar="FILE.db", help="record each inspection in this SQLite file")
    log.add_argument("--keep-maps", action="store_true", help="with --store: keep each map as a 16-bit PNG in FILE.db.maps/")
    ray = p.add_argument_group("scale-out on Ray Serve (pip install \"anomalyclip[serve,ray]\")")
    ray.add_argument("--ray", action="store_true", help="deploy the app on Ray Serve (serve.ingress, @serve.batch)")
    ray.add_argument("--replicas", type=int, default=None, help="model replicas (default 1)")
    ray.add_argument("--gpus-per-replica", type=float, default=None, help="GPUs per replica (default 0)")
    ray.add_argument("--cpus-per-replica", type=float, default=None, help="CPUs per replica (default 1)")
    ray.add_argument("--ray-address", default=None, help="cluster to join (default: start a local Ray)")
    p.set_defaults(handler=run_serve)
    return p


def settings_from_args(args: argparse.Namespace) -> Any:
    """The :class:`ServeSettings` of the parsed options (the token from ``--token`` or ``$ANOMALYCLIP_TOKEN``)."""
    from .settings import ServeSettings

    if not args.max_body_mb > 0:
        raise InvalidInputError(f"--max-body-mb must be > 0, got {args.max_body_mb}.")
    return ServeSettings(
        max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms,
        max_queue=args.max_queue,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        max_pixels=args.max_pixels,
        token=args.token if args.token is not None else (os.environ.get(TOKEN_ENV) or None),
        cors_origins=tuple(args.cors_origin or ()),
        store=args.store,
        keep_maps=args.keep_maps,
        decode_workers=args.decode_workers,
    )


def spec_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~anomalyclip.serve.loading.ModelSpec` of the parsed options."""
    from .loading import ModelSpec

    if args.model_ref is not None and args.model is not None and args.model_ref != args.model:
        raise InvalidInputError(f"Give the model once: MODEL '{args.model_ref}' or --model '{args.model}'.")
    thresholds: dict[str, float | None] | None = None
    if args.no_thresholds:
        thresholds = {}
    if args.threshold is not None or args.pixel_threshold is not None:
        thresholds = {"image": args.threshold, "pixel": args.pixel_threshold}
    return ModelSpec(
        model=args.model_ref or args.model,
        options=model_options(args),
        references=None if args.references is None else tuple(args.references),
        coreset=args.coreset,
        thresholds=thresholds,
    )


def run_serve(args: argparse.Namespace) -> int:
    """Run the service until interrupted (the ``serve`` command)."""
    settings = settings_from_args(args)
    spec = spec_from_args(args)
    if settings.token is None and args.host not in _LOOPBACK:
        logger.warning("Serving on %s without a token: anyone who reaches this address can use it (--token).", args.host)
    if args.ray:
        from .ray_serve import run_on_ray

        return run_on_ray(
            spec,
            settings,
            host=args.host,
            port=args.port,
            replicas=args.replicas or 1,
            cpus_per_replica=args.cpus_per_replica,
            gpus_per_replica=args.gpus_per_replica,
            address=args.ray_address,
        )
    ray_only = ("replicas", "gpus_per_replica", "cpus_per_replica", "ray_address")
    if any(getattr(args, name) is not None for name in ray_only):
        raise InvalidInputError(f"{', '.join('--' + n.replace('_', '-') for n in ray_only)} need --ray.")
    from ._deps import require
    from .app import create_app
    from .loading import load_engine

    uvicorn = require("uvicorn")
    app = create_app(lambda: load_engine(spec), settings)  # loads in the background: /v1/health is 503 until done
    logger.info("Serving on http://%s:%d (web inspector at /, API docs at /docs)", args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info", access_log=args.verbose)
    return 0
