"""The service's settings: one flat, frozen record (what ``anomalyclip serve`` options become)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..errors import InvalidInputError

__all__ = ["ServeSettings"]


@dataclass(frozen=True)
class ServeSettings:
    """How the service batches, guards and logs requests. Every field has a safe default.

    Attributes:
        max_batch_size: most images in one forward pass.
        batch_wait_ms: how long the first request of a batch waits for others, in milliseconds.
        max_queue: requests waiting for a batch; more are answered 503 with ``Retry-After``.
        max_body_bytes: largest request body in bytes (413 above).
        max_pixels: largest decoded image, width x height (413 above); also Pillow's
            decompression-bomb guard is kept on.
        token: when set, every ``/v1/*`` route but ``/v1/health`` needs
            ``Authorization: Bearer <token>`` (401 otherwise).
        cors_origins: origins allowed by CORS; empty: CORS off.
        store: SQLite file of the inspection log (``GET /v1/results``); None: no log.
        keep_maps: with ``store``, also keep each map as a 16-bit PNG in ``<store>.maps/``.
        decode_workers: threads that decode and preprocess images off the event loop.
        retry_after_s: the ``Retry-After`` of a 503 answer, in seconds.
    """

    max_batch_size: int = 8
    batch_wait_ms: float = 5.0
    max_queue: int = 128
    max_body_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 25_000_000
    token: str | None = None
    cors_origins: tuple[str, ...] = ()
    store: str | None = None
    keep_maps: bool = False
    decode_workers: int = 4
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_body_bytes", "max_pixels", "decode_workers", "retry_after_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"ServeSettings.{name} must be an integer >= 1, got {value!r}.")
        wait = self.batch_wait_ms
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not math.isfinite(wait) or wait < 0:
            raise InvalidInputError(f"ServeSettings.batch_wait_ms must be a number >= 0, got {wait!r}.")
        if self.token is not None and (not isinstance(self.token, str) or not self.token.strip()):
            raise InvalidInputError("ServeSettings.token must be a non-empty string or None.")
        object.__setattr__(self, "cors_origins", tuple(self.cors_origins))
        if self.keep_maps and self.store is None:
            raise InvalidInputError("ServeSettings.keep_maps needs store (the maps are kept beside the log).")

    def replace(self, **changes: object) -> "ServeSettings":
        """A copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)
