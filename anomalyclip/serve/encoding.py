"""Pictures in answers: the anomaly map as a 16-bit PNG and the overlay PNG, base64-encoded."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

__all__ = ["map_scale", "encode_map_png", "decode_map_png", "png_base64"]

_LEVELS = 65535


def map_scale(hi: float) -> float:
    """Map units per PNG level for maps in ``[0, hi]``: ``value = level * map_scale``."""
    return float(hi) / _LEVELS


def encode_map_png(anomaly_map: np.ndarray, scale: float) -> bytes:
    """A float ``[H, W]`` map as a grayscale 16-bit PNG: ``level = round(value / scale)``, clipped to
    ``[0, 65535]``; reading it back (:func:`decode_map_png`) is within ``scale / 2`` of the map."""
    levels = np.clip(np.rint(np.asarray(anomaly_map, np.float64) / scale), 0, _LEVELS).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(levels).save(buffer, format="PNG")  # mode I;16
    return buffer.getvalue()


def decode_map_png(data: bytes, scale: float) -> np.ndarray:
    """Float32 ``[H, W]`` map from :func:`encode_map_png`'s bytes and its ``scale``."""
    with Image.open(io.BytesIO(data)) as img:
        levels = np.asarray(img, dtype=np.float64)
    return (levels * scale).astype(np.float32)


def png_base64(image: Image.Image | bytes) -> str:
    """Base64 text of a PNG (a PIL image is encoded to PNG first)."""
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        image = buffer.getvalue()
    return base64.b64encode(image).decode("ascii")
