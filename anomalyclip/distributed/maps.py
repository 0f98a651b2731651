"""Compact anomaly maps for scale-out: 16-bit PNG (quantized) or ``.npy`` (exact float32).

A map from :meth:`AnomalyCLIP.predict` is float32 ``[H, W]`` at the image's size, with values in
``[0, scale]`` where ``scale`` is the number of output layers (1 for the default model). Shipping
such maps through Ray's object store costs 4 bytes per pixel; these encodings are what the actors
write instead:

* ``"png"``: a 16-bit grayscale PNG. Pixel value ``v`` (0..65535) stands for the map value
  ``v / 65535 * scale``; encoding rounds to the nearest level, so the error is at most
  ``scale / 131070`` (7.6e-6 for one layer). ``scale`` is stored in the PNG's ``tEXt`` chunk
  ``anomalyclip.scale`` and :func:`decode_map` applies it. Smooth maps compress well (often
  5 to 20 times smaller than float32).
* ``"npy"``: the float32 array itself in NumPy's ``.npy`` format (exact, 4 bytes per pixel).

numpy and Pillow only; no Ray or torch.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..errors import ImageLoadError, InvalidInputError

__all__ = ["MAP_FORMATS", "PNG_LEVELS", "SCALE_KEY", "encode_map", "decode_map", "map_suffix"]

#: Map encodings: 16-bit PNG (quantized, compact) or .npy (exact float32).
MAP_FORMATS: tuple[str, ...] = ("png", "npy")
#: Largest 16-bit PNG value; ``v / PNG_LEVELS * scale`` is the map value.
PNG_LEVELS = 65535
#: PNG text key holding the scale of a 16-bit map.
SCALE_KEY = "anomalyclip.scale"

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_NPY_MAGIC = b"\x93NUMPY"


def _check_format(fmt: str) -> str:
    if fmt not in MAP_FORMATS:
        raise InvalidInputError(f"Unknown map format {fmt!r}; use one of {', '.join(MAP_FORMATS)}.")
    return fmt


def map_suffix(fmt: str) -> str:
    """File suffix of a map format: ``.png`` or ``.npy``."""
    return "." + _check_format(fmt)


def encode_map(anomaly_map: np.ndarray, fmt: str = "png", *, scale: float = 1.0) -> bytes:
    """Encode a float ``[H, W]`` map as 16-bit PNG bytes (values in ``[0, scale]``) or ``.npy`` bytes.

    Args:
        anomaly_map: float ``[H, W]`` map (e.g. ``AnomalyResult.anomaly_map``).
        fmt: ``"png"`` (quantized to 65536 levels over ``[0, scale]``, values outside clipped) or
            ``"npy"`` (exact float32).
        scale: the top of the PNG's value range: the number of output layers of the model.

    Returns:
        The encoded file contents.
    """
    _check_format(fmt)
    values = np.asarray(anomaly_map)
    if values.ndim != 2 or not np.issubdtype(values.dtype, np.floating):
        raise InvalidInputError(f"encode_map expects a float [H, W] map, got {values.dtype} {list(values.shape)}.")
    buffer = io.BytesIO()
    if fmt == "npy":
        np.save(buffer, values.astype(np.float32, copy=False), allow_pickle=False)
        return buffer.getvalue()
    if not (isinstance(scale, (int, float, np.number)) and np.isfinite(scale) and scale > 0):
        raise InvalidInputError(f"scale must be a positive finite number (the map's maximum), got {scale!r}.")
    levels = np.rint(np.clip(values.astype(np.float64) / float(scale), 0.0, 1.0) * PNG_LEVELS).astype(np.uint16)
    info = PngInfo()
    info.add_text(SCALE_KEY, repr(float(scale)))
    Image.fromarray(levels).save(buffer, format="PNG", pnginfo=info, compress_level=1)
    return buffer.getvalue()


def decode_map(data: bytes | str | os.PathLike, *, filesystem: Any = None) -> np.ndarray:
    """Decode a map written by :func:`encode_map`: bytes, a local file or a URI (``s3://...``).

    Returns:
        float32 ``[H, W]``: exact for ``.npy``, ``v / 65535 * scale`` for 16-bit PNG.

    Raises:
        ImageLoadError: the data is neither such a PNG nor a ``.npy`` file.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        from .sources import FileAccess

        data = FileAccess(filesystem).read(data)
    raw = bytes(data)
    if raw.startswith(_NPY_MAGIC):
        values = np.load(io.BytesIO(raw), allow_pickle=False)
        return np.asarray(values, dtype=np.float32)
    if raw.startswith(_PNG_MAGIC):
        with Image.open(io.BytesIO(raw)) as img:
            img.load()
            scale = img.text.get(SCALE_KEY) if hasattr(img, "text") else None
            if scale is None or img.mode not in ("I;16", "I;16B", "I;16L", "I"):
                raise ImageLoadError(
                    f"This PNG is not an anomalyclip map (mode {img.mode}, no '{SCALE_KEY}' text chunk)."
                )
            levels = np.asarray(img).astype(np.float64)
        return (levels * (float(scale) / PNG_LEVELS)).astype(np.float32)
    raise ImageLoadError("Not an anomalyclip map: expected a 16-bit PNG or a .npy file.")
