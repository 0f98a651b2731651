"""A small client of the inspection service, on httpx: ``Client("http://127.0.0.1:8000").predict("a.png")``."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path
from typing import Any

from ..errors import AnomalyCLIPError, InvalidInputError
from ._deps import require
from .encoding import decode_map_png

__all__ = ["Client", "ServiceError"]


class ServiceError(AnomalyCLIPError, RuntimeError):
    """The service answered with an error: ``status`` (HTTP code) and ``message`` (its ``error``)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


class Client:
    """Call an ``anomalyclip serve`` service from a script.

    Args:
        url: the service's base URL, e.g. ``"http://127.0.0.1:8000"``.
        token: the service's token, sent as ``Authorization: Bearer``; default ``$ANOMALYCLIP_TOKEN``.
        timeout: seconds per request.

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, url: str = "http://127.0.0.1:8000", *, token: str | None = None, timeout: float = 60.0) -> None:
        httpx = require("httpx")
        token = token if token is not None else os.environ.get("ANOMALYCLIP_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _json(self, response: Any) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            body = {"error": response.text[:200]}
        if response.status_code >= 400:
            raise ServiceError(response.status_code, str(body.get("error", body)))
        return body

    def health(self) -> bool:
        """True when the service is up and its model loaded."""
        return self._http.get("/v1/health").status_code == 200

    def model(self) -> dict[str, Any]:
        """``GET /v1/model``: what the service has loaded."""
        return self._json(self._http.get("/v1/model"))

    def predict(
        self,
        image: str | os.PathLike | bytes | Any,
        *,
        map: bool = False,
        overlay: bool = False,
        image_threshold: float | None = None,
        pixel_threshold: float | None = None,
        name: str | None = None,
    ) -> dict[str, Any]:
        """``POST /v1/predict`` one image.

        Args:
            image: a file path (read here, on the client), encoded image bytes, or a PIL image
                (sent as PNG).
            map: also return the map: ``anomaly_map``, float32 ``[H, W]`` decoded from ``map_png``
                (within ``map_scale / 2`` of the service's map).
            overlay: also return ``overlay``, the overlay as a PIL image.
            image_threshold, pixel_threshold: per-request thresholds.
            name: recorded in the service's inspection log (default: the file name).

        Returns:
            The service's JSON answer (``score``, ``label``, ``width``, ``height``, thresholds, ...),
            plus ``anomaly_map`` / ``overlay`` when asked.

        Raises:
            ServiceError: the service answered 4xx or 5xx (``status``, ``message``).
        """
        filename = "image"
        if isinstance(image, (str, os.PathLike)):
            path = Path(image)
            data, filename = path.read_bytes(), path.name
        elif isinstance(image, (bytes, bytearray)):
            data = bytes(image)
        elif hasattr(image, "save"):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            data, filename = buffer.getvalue(), "image.png"
        else:
            raise InvalidInputError(f"Client.predict takes a path, image bytes or a PIL image, got {type(image).__name__}.")
        params: dict[str, Any] = {"map": int(map), "overlay": int(overlay)}
        for key, value in (("image_threshold", image_threshold), ("pixel_threshold", pixel_threshold), ("name", name)):
            if value is not None:
                params[key] = value
        body = self._json(self._http.post("/v1/predict", params=params, files={"file": (filename, data)}))
        if "map_png" in body:
            body["anomaly_map"] = decode_map_png(base64.b64decode(body["map_png"]), body["map_scale"])
        if "overlay_png" in body:
            from PIL import Image

            body["overlay"] = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
        return body

    def results(self, limit: int = 50, offset: int = 0) -> dict[str, Any]:
        """``GET /v1/results``: a page of the inspection log, newest first."""
        return self._json(self._http.get("/v1/results", params={"limit": limit, "offset": offset}))

    def metrics(self) -> str:
        """``GET /metrics``: the Prometheus text."""
        return self._http.get("/metrics").text
