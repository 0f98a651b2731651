"""The inspection service as a FastAPI app: :func:`create_app`.

Routes: ``GET /`` (the web inspector), ``GET /v1/health``, ``GET /v1/model``,
``POST /v1/predict``, ``GET /v1/results`` (with a store), ``GET /metrics`` and the OpenAPI docs
at ``/docs``. The same app runs under uvicorn (``anomalyclip serve``) and, wrapped with
``serve.ingress``, as a Ray Serve deployment (:mod:`anomalyclip.serve.ray_serve`); only the
batching runner differs. See ``docs/serving.md``.
"""

# No `from __future__ import annotations`: FastAPI reads the route annotations (Request, Query) at runtime.

import asyncio
import hmac
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence, Union

from ..errors import ImageLoadError, InvalidInputError, ResourceError
from ..outputs import AnomalyResult
from ._deps import require
from .batching import Batcher, QueueFullError
from .encoding import encode_map_png, map_scale, png_base64
from .engine import DecodedImage, Engine, ImageTooLargeError
from .metrics import Metrics
from .settings import ServeSettings
from .store import ResultStore

if TYPE_CHECKING:
    from fastapi import FastAPI

    from ..model import AnomalyCLIP

__all__ = ["create_app", "Job", "Runner", "RunnerFactory"]

logger = logging.getLogger(__name__)

#: One request's work for a batch: the decoded image and its ``(image, pixel)`` thresholds.
Job = tuple[DecodedImage, tuple[Union[float, None], Union[float, None]]]
_ROUTES = ("/", "/v1/health", "/v1/model", "/v1/predict", "/v1/results", "/metrics", "/docs", "/openapi.json")


class Runner(Protocol):
    """What gathers jobs into batches: :class:`~anomalyclip.serve.batching.Batcher` on one
    machine, ``@serve.batch`` on Ray Serve."""

    depth: int

    def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def submit(self, job: Job) -> AnomalyResult: ...


#: Builds a runner around the blocking batch function ``list[Job] -> list[AnomalyResult]``.
RunnerFactory = Callable[[Callable[[list[Job]], Sequence[AnomalyResult]]], Runner]
#: What :func:`create_app` serves: a model, an engine, or a function that loads one (at startup).
Source = Union["AnomalyCLIP", Engine, Callable[[], Union["AnomalyCLIP", Engine]]]


class ApiError(Exception):
    """An answer other than 200: ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class _BodyTooLarge(Exception):
    pass


@dataclass
class _State:
    settings: ServeSettings
    metrics: Metrics
    runner_factory: RunnerFactory | None
    loader: Callable[[], Any] | None = None
    engine: Engine | None = None
    load_error: str | None = None
    runner: Any = None
    store: ResultStore | None = None
    pool: ThreadPoolExecutor | None = None
    tasks: list[Any] = field(default_factory=list)


def _as_engine(obj: Any) -> Engine:
    return obj if isinstance(obj, Engine) else Engine(obj)


def _inspector_html() -> str:
    return resources.files("anomalyclip.serve").joinpath("static/inspector.html").read_text(encoding="utf-8")


class _Guard:
    """ASGI middleware: the body-size limit (413 before or while reading) and request metrics."""

    def __init__(self, app: Any, state: _State) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, metrics = self.state.settings.max_body_bytes, self.state.metrics
        route = scope["path"] if scope["path"] in _ROUTES else "other"
        start, status = time.perf_counter(), [500]

        async def send_counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and not length.isdigit():
                metrics.errors.labels(kind="400").inc()
                await _send_json(send_counted, 400, {"error": "Bad Content-Length header."})
                return
            if length is not None and int(length) > limit:
                metrics.errors.labels(kind="413").inc()
                await _send_json(send_counted, 413, {"error": _too_large(limit)})
                return
            seen = [0]

            async def receive_limited() -> dict:
                message = await receive()
                if message["type"] == "http.request":
                    seen[0] += len(message.get("body", b""))
                    if seen[0] > limit:
                        raise _BodyTooLarge()
                return message

            await self.app(scope, receive_limited, send_counted)
        finally:
            metrics.requests.labels(route=route, status=str(status[0])).inc()
            metrics.latency.labels(route=route).observe(time.perf_counter() - start)


def _too_large(limit: int) -> str:
    return f"Request body over the limit of {limit} bytes; send a smaller image (or start the service with a larger --max-body)."


async def _send_json(send: Callable, status: int, body: dict) -> None:
    import json

    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def create_app(source: Source, settings: ServeSettings | None = None, *, runner: RunnerFactory | None = None) -> "FastAPI":
    """The inspection service as a FastAPI app.

    Args:
        source: an :class:`~anomalyclip.AnomalyCLIP`, an :class:`~anomalyclip.serve.engine.Engine`,
            or a function returning one; a function is called in a thread at startup, and
            ``/v1/health`` answers 503 until it has returned.
        settings: batching, limits, token, CORS and store (:class:`ServeSettings`); defaults if None.
        runner: builds the batching runner around the blocking batch function; default: a
            :class:`~anomalyclip.serve.batching.Batcher` with ``settings``' batch size, wait and queue.

    Returns:
        A FastAPI app; run it with uvicorn (``anomalyclip serve``) or mount it under Ray Serve.
    """
    fastapi = require("fastapi")
    require("python_multipart")  # python-multipart, for request.form()
    from fastapi import Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    settings = settings or ServeSettings()
    state = _State(settings=settings, metrics=Metrics(), runner_factory=runner)
    if callable(source) and not isinstance(source, Engine) and not hasattr(source, "preprocess"):
        state.loader = source
    else:
        state.engine = _as_engine(source)

    def run_batch(jobs: list[Job]) -> Sequence[AnomalyResult]:
        engine = state.engine
        if engine is None:  # batches only run after startup has loaded the model
            raise QueueFullError("The model is not loaded yet; retry when /v1/health answers 200.")
        state.metrics.batch_size.observe(len(jobs))
        started = time.perf_counter()
        try:
            return engine.run([image for image, _ in jobs], [thresholds for _, thresholds in jobs])
        finally:
            state.metrics.batch_seconds.observe(time.perf_counter() - started)

    async def load() -> None:
        try:
            state.engine = _as_engine(await asyncio.to_thread(state.loader))  # type: ignore[arg-type]
            logger.info("Model loaded; the service is ready")
        except Exception as exc:  # noqa: BLE001 -- reported by /v1/health
            state.load_error = f"{type(exc).__name__}: {exc}"
            logger.error("Loading the model failed: %s", state.load_error)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: Any):
        state.pool = ThreadPoolExecutor(max_workers=settings.decode_workers, thread_name_prefix="anomalyclip-decode")
        if settings.store is not None:
            state.store = ResultStore(settings.store, keep_maps=settings.keep_maps)
        if state.runner_factory is not None:
            state.runner = state.runner_factory(run_batch)
        else:
            state.runner = Batcher(
                run_batch,
                max_batch_size=settings.max_batch_size,
                batch_wait_ms=settings.batch_wait_ms,
                max_queue=settings.max_queue,
            )
        state.runner.start()
        if state.loader is not None and state.engine is None:
            state.tasks.append(asyncio.get_running_loop().create_task(load()))
        try:
            yield
        finally:
            for task in state.tasks:
                task.cancel()
            await state.runner.stop()
            state.pool.shutdown(wait=False, cancel_futures=True)
            if state.store is not None:
                state.store.close()

    app = fastapi.FastAPI(
        title="anomalyclip inspection service",
        description="AnomalyCLIP anomaly scores and maps over HTTP (docs/serving.md).",
        lifespan=lifespan,
    )
    app.state.anomalyclip = state
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(_Guard, state=state)

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        state.metrics.errors.labels(kind=str(status)).inc()
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    retry = {"Retry-After": str(settings.retry_after_s)}

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error(exc.status, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()]
        return error(422, "Invalid request: " + "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(_BodyTooLarge)
    async def _body(request: Request, exc: _BodyTooLarge) -> JSONResponse:
        return error(413, _too_large(settings.max_body_bytes))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("Unexpected error on %s", request.url.path)
        return error(500, f"Internal error ({type(exc).__name__}); the service logs the details.")

    def authorize(request: Request) -> None:
        token = settings.token
        if token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise ApiError(401, "Missing or wrong token: send 'Authorization: Bearer <token>'.", {"WWW-Authenticate": "Bearer"})

    def ready_engine() -> Engine:
        if state.engine is None:
            detail = f"loading the model failed: {state.load_error}" if state.load_error else "the model is loading"
            raise ApiError(503, f"Not ready: {detail}.", retry)
        return state.engine

    @app.get("/", include_in_schema=False)
    async def inspector() -> HTMLResponse:
        return HTMLResponse(
            _inspector_html(),
            headers={
                "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                "style-src 'unsafe-inline'; script-src 'unsafe-inline'",
                "X-Content-Type-Options": "nosniff",
            },
        )

    @app.get("/v1/health", summary="200 once the model is loaded, 503 before")
    async def health() -> JSONResponse:
        if state.engine is not None:
            return JSONResponse({"status": "ok"})
        if state.load_error is not None:
            return JSONResponse({"status": "error", "error": state.load_error}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503, headers=retry)

    @app.get("/v1/model", summary="What is loaded")
    async def model_info(request: Request) -> dict[str, Any]:
        authorize(request)
        engine = ready_engine()
        info = engine.info()
        info["map_scale"] = map_scale(engine.map_range[1])
        info["service"] = {
            "max_batch_size": settings.max_batch_size,
            "batch_wait_ms": settings.batch_wait_ms,
            "max_body_bytes": settings.max_body_bytes,
            "max_pixels": settings.max_pixels,
            "auth": settings.token is not None,
            "store": settings.store is not None,
        }
        return info

    async def read_image(request: Request) -> tuple[bytes, str | None]:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "multipart/form-data":
            try:
                form = await request.form(max_files=1, max_fields=8)
            except StarletteHTTPException as exc:
                raise ApiError(400, f"Bad multipart body: {exc.detail}") from exc
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise ApiError(422, "The multipart body has no file field 'file' (send the image as -F file=@image.png).")
            return await upload.read(), upload.filename
        if content_type.startswith("image/") or content_type == "application/octet-stream":
            return await request.body(), None
        raise ApiError(
            415,
            f"Unsupported content type '{content_type or 'none'}': send multipart/form-data with a field 'file', "
            "or the image itself with an image/* content type.",
        )

    def answer(
        decoded: DecodedImage,
        result: AnomalyResult,
        engine: Engine,
        name: str | None,
        want_map: bool,
        want_overlay: bool,
        alpha: float,
        outline: bool,
    ) -> dict[str, Any]:
        height, width = decoded.size
        body: dict[str, Any] = {
            "score": result.score,
            "label": result.label,
            "width": width,
            "height": height,
            "image_threshold": result.image_threshold,
            "pixel_threshold": result.pixel_threshold,
        }
        lo, hi = engine.map_range
        scale = map_scale(hi)
        map_png = encode_map_png(result.anomaly_map, scale) if want_map or settings.keep_maps else None
        if want_map:
            body["map_png"], body["map_scale"] = png_base64(map_png), scale  # type: ignore[arg-type]
        if want_overlay:
            from ..visualize import overlay

            picture = overlay(decoded.image, result.anomaly_map, alpha=alpha, vmin=lo, vmax=hi, mask=result.mask if outline else None)
            body["overlay_png"] = png_base64(picture)
        if state.store is not None:
            row = state.store.add(
                name=name,
                score=result.score,
                label=result.label,
                image_threshold=result.image_threshold,
                pixel_threshold=result.pixel_threshold,
                width=width,
                height=height,
                map_png=map_png,
            )
            body["id"] = row["id"]
        return body

    predict_body = {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}, "required": ["file"]}
                },
                "image/*": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    }

    @app.post("/v1/predict", summary="Score one image (multipart field 'file' or the raw image body)", openapi_extra=predict_body)
    async def predict(
        request: Request,
        map: bool = Query(False, description="add map_png: the map at the image's size as a base64 16-bit PNG, value = level * map_scale"),
        overlay: bool = Query(False, description="add overlay_png: the heat map blended on the image (base64 PNG)"),
        image_threshold: float | None = Query(None, description="override the image threshold (label = score > it)"),
        pixel_threshold: float | None = Query(None, description="override the pixel threshold (outlined on the overlay)"),
        alpha: float = Query(0.5, ge=0.0, le=1.0, description="heat-map opacity in the overlay"),
        outline: bool = Query(True, description="outline the pixel-threshold mask on the overlay"),
        name: str | None = Query(None, max_length=256, description="a name recorded in the inspection log"),
    ) -> dict[str, Any]:
        authorize(request)
        engine = ready_engine()
        try:
            thresholds = engine.thresholds(image_threshold, pixel_threshold)
        except InvalidInputError as exc:
            raise ApiError(422, str(exc)) from exc
        data, filename = await read_image(request)
        loop = asyncio.get_running_loop()
        try:
            decoded = await loop.run_in_executor(state.pool, engine.decode, data, settings.max_pixels)
        except ImageTooLargeError as exc:
            raise ApiError(413, str(exc)) from exc
        except ImageLoadError as exc:
            raise ApiError(400, str(exc)) from exc
        except InvalidInputError as exc:
            raise ApiError(422, str(exc)) from exc
        state.metrics.queue_depth.set(state.runner.depth)
        try:
            result = await state.runner.submit((decoded, thresholds))
        except QueueFullError as exc:
            raise ApiError(503, f"Busy: {exc}", retry) from exc
        except ResourceError as exc:
            raise ApiError(503, f"Out of memory on this batch: {exc}", retry) from exc
        work = (decoded, result, engine, name or filename, map, overlay, alpha, outline)
        if not (map or overlay or state.store is not None or settings.keep_maps):
            return answer(*work)  # only numbers: no PNG to encode, no file to write, no thread hop
        return await loop.run_in_executor(state.pool, answer, *work)

    @app.get("/v1/results", summary="Page through the inspection log (newest first)")
    async def results(
        request: Request,
        limit: int = Query(50, ge=1, le=500),
        offset: int = Query(0, ge=0),
    ) -> dict[str, Any]:
        authorize(request)
        if state.store is None:
            raise ApiError(404, "No inspection log: start the service with --store results.db.")
        return await asyncio.get_running_loop().run_in_executor(state.pool, state.store.page, limit, offset)

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        state.metrics.queue_depth.set(state.runner.depth if state.runner is not None else 0)
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    return app
