"""Reading image files (and in-memory images) into one of the two forms preprocessing takes.

One decoder for every runtime (the torch model, the ONNX runtime, the Ray actors, the overlays):
:func:`load_image` turns a file, its bytes or a PIL image into

* an 8-bit PIL image in mode ``L``, ``LA``, ``RGB`` or ``RGBA``: resized and converted exactly as
  the official pipeline does (the golden fidelity tests run on this path), or
* a float32 ``HxWxC`` array (C in 1, 3, 4) with values in ``[0, 1]``: images with more than 8
  bits per sample (16-bit and 32-bit integer, 32-bit float), scaled as
  :class:`ImageReadOptions` says (by default by the full range of the stored type, so an 8-bit
  image times 257 saved as 16-bit gives the 8-bit values).

What happens on the way, each a deviation from the official pipeline (which only ever read the
8-bit RGB and grayscale images of its data sets), listed in ``docs/cli.md`` ("Image files"):

* EXIF orientation is applied (the transposition of ``ImageOps.exif_transpose``, as
  ``transformers`` does; read from the header, so it also holds for 16-bit TIFF read with
  ``tifffile``), so the anomaly map lies over the picture as a viewer shows it;
  ``exif_transpose=False`` turns it off.
* Palette (``P``, ``PA``), bilevel (``1``), ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGBX`` and
  premultiplied (``La``, ``RGBa``) images are converted to ``L``, ``RGB`` or ``RGBA`` *before*
  resizing (the official order resizes first, and Pillow resizes ``P`` and ``1`` images
  nearest-neighbour), so such an image scores as the same pixels saved as RGB.
* 16-bit RGB(A) TIFF files, which Pillow reduces to 8 bits, are read with ``tifffile`` (an
  optional package); 16-bit colour PNG files (RGB, RGBA, gray + alpha), which Pillow also
  reduces to 8 bits, are decoded by Pillow's PNG decoder at full depth (:func:`_read_png16`).
* Images above ``max_image_pixels`` are refused with :class:`~anomalyclip.errors.ImageLoadError`
  before they are decoded (Pillow's decompression-bomb guard, raised to its error limit).
"""

from __future__ import annotations

import io
import logging
import math
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImageLoadError, InvalidInputError, MissingDependencyError

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "ImageReadOptions",
    "DecodedImage",
    "load_image",
    "normalize_pil",
    "scale_to_unit",
]

logger = logging.getLogger(__name__)

#: Pillow's own decompression-bomb error limit, 2 x ``PIL.Image.MAX_IMAGE_PIXELS`` unless a program
#: changes that (about 179 M pixels): the default of :attr:`ImageReadOptions.max_image_pixels`.
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970

#: What :func:`load_image` returns: an 8-bit PIL image (``L``, ``LA``, ``RGB``, ``RGBA``) or a
#: float32 ``HxWxC`` array in ``[0, 1]``.
DecodedImage = Union[Image.Image, np.ndarray]

# 8-bit modes that go through the official resize-then-convert path unchanged.
_OFFICIAL_MODES = ("L", "LA", "RGB", "RGBA")
# 8-bit modes converted before resizing, and what they become.
_CONVERTED_MODES = {
    "1": "L",
    "PA": "RGBA",
    "La": "RGBA",
    "RGBa": "RGBA",
    "RGBX": "RGB",
    "CMYK": "RGB",
    "YCbCr": "RGB",
    "LAB": "RGB",
    "HSV": "RGB",
}
# Pillow modes with more than 8 bits per sample (one channel each).
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")

# Serializes the rare opens that lift Pillow's process-wide pixel limit (see _pillow_pixel_limit).
_PIXEL_LIMIT_LOCK = threading.Lock()


@dataclass(frozen=True)
class ImageReadOptions:
    """How image files (and high-bit-depth inputs) are read; a small, frozen, JSON-friendly record.

    Attributes:
        exif_transpose: apply the EXIF orientation of files (default True), so the map lies over
            the picture as viewers show it. False reads the stored pixel grid (the official way).
            PIL images and arrays passed in memory are taken as they are.
        bit_depth: significant bits of integer samples wider than 8 bits, e.g. 10 or 12 for
            Mono10/Mono12 camera data in 16-bit containers: samples are divided by
            ``2**bit_depth - 1`` instead of the container's full range (65535). A sample above
            that is an error. None (default): the container's full range. 8-bit images are
            never rescaled.
        intensity_range: ``(lo, hi)``: a window for high-bit-depth data (integer wider than 8
            bits, or float): ``(x - lo) / (hi - lo)`` clipped to ``[0, 1]``. Excludes
            ``bit_depth``.
        max_image_pixels: refuse files with more pixels than this before decoding them (a guard
            against decompression bombs). None (default): Pillow's own error limit as this
            process has it (2 x ``PIL.Image.MAX_IMAGE_PIXELS``, :data:`DEFAULT_MAX_IMAGE_PIXELS`
            = 178,956,970 unless changed; no limit if that is None). 0: no limit. Raise it for
            trusted line-scan images, and score those in tiles (``tile_size``).
    """

    exif_transpose: bool = True
    bit_depth: int | None = None
    intensity_range: tuple[float, float] | None = None
    max_image_pixels: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.exif_transpose, bool):
            raise InvalidInputError(f"exif_transpose must be True or False, got {self.exif_transpose!r}.")
        if self.bit_depth is not None and (
            isinstance(self.bit_depth, bool) or not isinstance(self.bit_depth, int) or not 1 <= self.bit_depth <= 32
        ):
            raise InvalidInputError(f"bit_depth must be an int in [1, 32] (e.g. 12 for Mono12) or None, got {self.bit_depth!r}.")
        if self.intensity_range is not None:
            window = tuple(self.intensity_range)
            if (
                len(window) != 2
                or not all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in window)
                or not all(math.isfinite(float(v)) for v in window)
                or not float(window[0]) < float(window[1])
            ):
                raise InvalidInputError(
                    f"intensity_range must be two finite numbers (lo, hi) with lo < hi, got {self.intensity_range!r}."
                )
            object.__setattr__(self, "intensity_range", (float(window[0]), float(window[1])))
            if self.bit_depth is not None:
                raise InvalidInputError("Give bit_depth or intensity_range, not both: the window sets the scale.")
        if self.max_image_pixels is not None and (
            isinstance(self.max_image_pixels, bool) or not isinstance(self.max_image_pixels, int) or self.max_image_pixels < 0
        ):
            raise InvalidInputError(
                f"max_image_pixels must be an int >= 0 (0: no limit) or None (Pillow's limit), got {self.max_image_pixels!r}."
            )

    def pixel_limit(self) -> int | None:
        """The limit in pixels that applies now (None: none), resolving the default against Pillow's."""
        if self.max_image_pixels is None:
            pillow = Image.MAX_IMAGE_PIXELS
            return None if pillow is None else 2 * int(pillow)
        return self.max_image_pixels or None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (``from_dict`` reads it back)."""
        return {
            "exif_transpose": self.exif_transpose,
            "bit_depth": self.bit_depth,
            "intensity_range": list(self.intensity_range) if self.intensity_range is not None else None,
            "max_image_pixels": self.max_image_pixels,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ImageReadOptions":
        unknown = sorted(set(data) - {"exif_transpose", "bit_depth", "intensity_range", "max_image_pixels"})
        if unknown:
            raise InvalidInputError(f"Unknown image read options {unknown}; expected exif_transpose, bit_depth, intensity_range, max_image_pixels.")
        window = data.get("intensity_range")
        return cls(**{**data, "intensity_range": tuple(window) if window is not None else None})


def _options(options: ImageReadOptions | None) -> ImageReadOptions:
    if options is None:
        return ImageReadOptions()
    if not isinstance(options, ImageReadOptions):
        raise InvalidInputError(f"read_options must be an anomalyclip.ImageReadOptions or None, got {type(options).__name__}.")
    return options


# ---------------------------------------------------------------------- scaling
def scale_to_unit(arr: np.ndarray, options: ImageReadOptions | None, origin: str, *, full_range: float | None = None) -> np.ndarray:
    """High-bit-depth samples -> float32 in ``[0, 1]`` as ``options`` says (same shape).

    Args:
        arr: integer samples wider than 8 bits (any shape), or floats.
        options: the window or bit depth; None: the type's full range (floats: ``[0, 1]``).
        origin: names the image in errors.
        full_range: the container's largest value when the dtype does not tell it (e.g. 65535
            for 16-bit samples that Pillow holds as int32).

    Raises:
        InvalidInputError: non-finite values, values outside the range the options allow.
    """
    opts = _options(options)
    if opts.intensity_range is not None:
        lo, hi = opts.intensity_range
        x = arr.astype(np.float64 if arr.dtype.itemsize > 2 else np.float32, copy=False)
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(x).all():
            raise InvalidInputError(f"Image contains NaN or infinite values ({origin}).")
        return np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    if np.issubdtype(arr.dtype, np.floating):
        x = arr.astype(np.float32, copy=False)
        if not np.isfinite(x).all():
            raise InvalidInputError(f"Image contains NaN or infinite values ({origin}).")
        lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
        if lo < 0.0 or hi > 1.0:
            raise InvalidInputError(
                f"Float images must have values in [0, 1] ({origin}); got range [{lo:.4g}, {hi:.4g}]. "
                "Give a window, e.g. ImageReadOptions(intensity_range=(lo, hi)) (CLI: --intensity-range LO HI)."
            )
        return x
    if not np.issubdtype(arr.dtype, np.integer):
        raise InvalidInputError(f"Unsupported image dtype {arr.dtype} ({origin}).")
    top = float(full_range if full_range is not None else np.iinfo(arr.dtype).max)
    if opts.bit_depth is not None:
        top = float(2**opts.bit_depth - 1)
    lo_v, hi_v = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    if lo_v < 0 or hi_v > top:
        what = f"bit_depth={opts.bit_depth} (largest value {int(top)})" if opts.bit_depth is not None else f"a range of [0, {int(top)}]"
        raise InvalidInputError(
            f"Image values [{lo_v}, {hi_v}] ({origin}) do not fit {what}. Give the right bit depth "
            "(ImageReadOptions(bit_depth=...), CLI --bit-depth) or a window (intensity_range, CLI --intensity-range LO HI)."
        )
    return (arr.astype(np.float64 if arr.dtype.itemsize > 2 else np.float32) / top).astype(np.float32)


def _to_hwc(arr: np.ndarray) -> np.ndarray:
    """``HxW``, ``HxWx1..4`` -> ``HxWxC`` with C in 1, 3, 4 (gray + alpha becomes RGBA)."""
    if arr.ndim == 2:
        return arr[:, :, None]
    if arr.ndim == 3 and arr.shape[2] == 2:
        gray, alpha = arr[:, :, :1], arr[:, :, 1:]
        return np.concatenate([gray, gray, gray, alpha], axis=2)
    return arr


# ---------------------------------------------------------------------- PIL images
def _high_bit_array(img: Image.Image, options: ImageReadOptions | None, origin: str, container_bits: int | None) -> np.ndarray:
    """A Pillow image of mode ``I;16*``, ``I`` or ``F`` -> float32 ``HxWx1`` in ``[0, 1]``."""
    if img.mode == "F":
        arr: np.ndarray = np.asarray(img, dtype=np.float32)
        full = None
    elif img.mode.startswith("I;16"):
        arr = np.asarray(img).astype(np.uint16, copy=False)
        full = None
    else:  # "I": int32 samples; the file told how wide they were stored
        arr = np.asarray(img, dtype=np.int32)
        if container_bits == 16:
            full = 65535.0
        elif container_bits == -32:  # stored unsigned: Pillow's int32 wraps values above 2**31 - 1
            arr, full = arr.view(np.uint32), None
        else:
            full = None
    return scale_to_unit(arr, options, origin, full_range=full)[:, :, None]


def normalize_pil(
    img: Image.Image, options: ImageReadOptions | None = None, origin: str = "PIL image", *, container_bits: int | None = None
) -> DecodedImage:
    """A PIL image of any supported mode -> :data:`DecodedImage` (no EXIF handling; see :func:`load_image`).

    8-bit modes other than ``L``, ``LA``, ``RGB``, ``RGBA`` are converted (``P`` to ``RGB``, or to
    ``RGBA`` when it has a transparent colour); 16-bit, 32-bit and float modes become float arrays.

    Raises:
        InvalidInputError: an unsupported mode, or values that do not fit the options.
    """
    if img.mode in _OFFICIAL_MODES:
        return img
    if img.mode == "P":
        return img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in _CONVERTED_MODES:
        return img.convert(_CONVERTED_MODES[img.mode])
    if img.mode in _HIGH_BIT_MODES:
        return _high_bit_array(img, options, origin, container_bits)
    supported = sorted({*_OFFICIAL_MODES, "P", *_CONVERTED_MODES, *_HIGH_BIT_MODES})
    raise InvalidInputError(f"Unsupported PIL image mode '{img.mode}' ({origin}). Supported: {', '.join(supported)}.")


def _rawmode(img: Image.Image) -> str:
    """The rawmode of an opened (not yet loaded) image's first tile, '' if none."""
    tile = getattr(img, "tile", None)
    if not tile:
        return ""
    args = tile[0][3] if len(tile[0]) > 3 else None
    if isinstance(args, str):
        return args
    if isinstance(args, tuple) and args and isinstance(args[0], str):
        return args[0]
    return ""


def _container_bits(img: Image.Image, rawmode: str) -> int | None:
    """16 or 32 (signed) / -32 (unsigned) for a mode-``I`` file, from how its samples are stored."""
    if img.mode != "I":
        return None
    if "16" in rawmode:
        return 16
    return 32 if rawmode.endswith("S") or rawmode in ("I", "I;32") else -32


def _reduced_by_pillow(img: Image.Image, rawmode: str) -> bool:
    """True when Pillow unpacks wider-than-8-bit multi-channel samples to 8 bits (e.g. ``RGB;16B``)."""
    return img.mode in ("RGB", "RGBA", "LA") and (";16" in rawmode or ";32" in rawmode)


# ---------------------------------------------------------------------- orientation
_ORIENTATION_METHOD = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # a malformed EXIF block: Pillow raises many kinds; read the pixels as stored
        return 1


def _orient_array(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation to an ``HxWxC`` array, exactly as ``Image.transpose`` would."""
    method = _ORIENTATION_METHOD.get(orientation)
    if method is None:
        return arr
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(arr[:, :, c], dtype=np.float32), mode="F").transpose(method))
        for c in range(arr.shape[2])
    ]
    return np.stack(channels, axis=2)


# ---------------------------------------------------------------------- files
def _limit_error(name: str, width: int, height: int, limit: int) -> ImageLoadError:
    return ImageLoadError(
        f"Image '{name}' has {width}x{height} = {width * height:,} pixels, more than max_image_pixels = {limit:,} "
        "(a guard against decompression bombs). If the file is trusted, raise the limit: "
        "ImageReadOptions(max_image_pixels=...) (CLI: --max-image-pixels N, 0 for none), and score an image "
        "that large in tiles (tile_size / --tile-size)."
    )


@contextmanager
def _pillow_pixel_limit(limit: int | None) -> Iterator[None]:
    """Lift Pillow's own pixel limit while opening a file whose limit the caller raised above it.

    Pillow keeps its limit in a process-wide variable; it is lifted only when ``limit`` exceeds
    Pillow's error limit, under a lock, for the time of one open and decode, and our own check
    (``limit``) runs on the header before any pixel is decoded.
    """
    pillow = Image.MAX_IMAGE_PIXELS
    if pillow is None or (limit is not None and limit <= 2 * pillow):
        yield
        return
    with _PIXEL_LIMIT_LOCK:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _is_tiff(head: bytes) -> bool:
    return head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _read_tiff(fp: BinaryIO, name: str, opts: ImageReadOptions, orientation: int | None, limit: int | None) -> np.ndarray:
    """A TIFF that Pillow cannot read at full depth, with ``tifffile``: float32 ``HxWxC`` in [0, 1]."""
    try:
        import tifffile
    except ImportError as exc:
        raise MissingDependencyError(
            f"'{name}' is a TIFF with more than 8 bits per colour sample, which Pillow reduces to 8 bits "
            "(or cannot read); reading it needs tifffile: pip install tifffile"
        ) from exc
    fp.seek(0)
    try:
        with tifffile.TiffFile(fp) as tif:
            page = tif.pages[0]
            axes, shape = page.axes, page.shape
            height, width = shape[axes.index("Y")], shape[axes.index("X")]
            if limit is not None and width * height > limit:
                raise _limit_error(name, width, height, limit)
            if orientation is None:
                tag = page.tags.get(274)
                orientation = int(tag.value) if tag is not None else 1
            arr = page.asarray()
    except ImageLoadError:
        raise
    except Exception as exc:  # tifffile raises many kinds for a damaged file
        raise ImageLoadError(f"Cannot read TIFF image '{name}': {exc}. The file may be truncated or damaged.") from exc
    kept = [a for a in axes if a in "YXS"]
    if len(kept) != len(axes):  # extra axes of size 1 (e.g. a sample axis of one plane)
        arr = arr.reshape([n for a, n in zip(axes, arr.shape) if a in "YXS"])
    arr = np.moveaxis(arr, [kept.index(a) for a in "YX" if a in kept], [0, 1]) if "S" in kept else arr
    if arr.dtype == np.uint8:  # 8-bit samples in a layout Pillow could not open: the 8-bit scale
        unit = arr.astype(np.float32) / 255.0
    else:
        unit = scale_to_unit(arr, opts, f"file '{name}'")
    unit = _to_hwc(unit)
    if unit.ndim != 3 or unit.shape[2] not in (1, 3, 4):
        raise ImageLoadError(f"TIFF image '{name}' has samples of shape {tuple(arr.shape)}; expected gray, RGB or RGBA.")
    return _orient_array(unit, orientation) if opts.exif_transpose else unit


#: 16-bit colour PNG rawmodes -> the rawmode of the same bits per pixel that yields the low bytes.
#: Pillow unpacks ``RGB;16B`` / ``RGBA;16B`` to the high byte of each sample; its little-endian
#: unpacker (``;16L``) takes the other byte of each pair, which in a (big-endian) PNG is the low
#: byte. ``LA;16B`` (16-bit gray + alpha) read as 8-bit ``RGBA`` gives all four bytes at once.
_PNG_FULL_DEPTH = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L", "LA;16B": "RGBA"}


def _decode_with_rawmode(fp: BinaryIO, rawmode: str) -> np.ndarray:
    """The PNG in ``fp`` decoded with its first tile's rawmode replaced: ``uint8 HxWxC``."""
    fp.seek(0)
    with Image.open(fp) as img:
        tile = img.tile[0]
        img.tile = [(tile[0], tile[1], tile[2], rawmode)]
        img.load()
        return np.asarray(img)


def _read_png16(fp: BinaryIO, name: str, opts: ImageReadOptions, orientation: int, rawmode: str) -> np.ndarray:
    """A 16-bit colour PNG at full depth: float32 ``HxWxC`` in [0, 1] (C = 3, or 4 with alpha).

    Pillow has no 16-bit colour mode and keeps only the high byte of each sample, so the data are
    decoded by Pillow's own PNG decoder a second time with an unpacker that keeps the other byte
    (:data:`_PNG_FULL_DEPTH`): the decompression and the row filters are the same (same bits per
    pixel), only the byte each sample is unpacked from differs.
    """
    try:
        if rawmode == "LA;16B":
            quad = _decode_with_rawmode(fp, "RGBA").astype(np.uint16)
            samples = np.stack([quad[:, :, 0] << 8 | quad[:, :, 1], quad[:, :, 2] << 8 | quad[:, :, 3]], axis=2)
        else:
            high = _decode_with_rawmode(fp, rawmode).astype(np.uint16)
            low = _decode_with_rawmode(fp, _PNG_FULL_DEPTH[rawmode]).astype(np.uint16)
            samples = high << 8 | low
    except (OSError, SyntaxError, ValueError) as exc:  # Pillow's errors for a damaged file
        raise ImageLoadError(f"Cannot read PNG image '{name}': {exc}. The file may be truncated or damaged.") from exc
    unit = _to_hwc(scale_to_unit(samples, opts, f"file '{name}'"))
    return _orient_array(unit, orientation) if opts.exif_transpose else unit


def _decode(fp: BinaryIO, name: str, opts: ImageReadOptions) -> DecodedImage:
    head = fp.read(4)
    fp.seek(0)
    limit = opts.pixel_limit()
    with _pillow_pixel_limit(limit):
        try:
            img_cm = Image.open(fp)
        except UnidentifiedImageError:
            if _is_tiff(head):  # e.g. float RGB TIFF: Pillow has no mode for it
                return _read_tiff(fp, name, opts, None, limit)
            raise
        with img_cm as img:
            width, height = img.size
            if limit is not None and width * height > limit:
                raise _limit_error(name, width, height, limit)
            rawmode = _rawmode(img)  # before anything loads the pixels (a PNG's EXIF may follow them)
            orientation = _orientation(img) if opts.exif_transpose else 1
            if _reduced_by_pillow(img, rawmode):
                if img.format == "TIFF":
                    return _read_tiff(fp, name, opts, orientation, limit)
                if img.format == "PNG" and rawmode in _PNG_FULL_DEPTH:
                    return _read_png16(fp, name, opts, orientation, rawmode)
                if opts.bit_depth is not None or opts.intensity_range is not None:
                    raise InvalidInputError(
                        f"'{name}' has {rawmode} colour samples, which Pillow reads as 8 bits (the high byte of each), "
                        "so bit_depth / intensity_range cannot apply. Save it as a 16-bit TIFF, or decode it yourself "
                        "and pass a float array in [0, 1]."
                    )
                logger.debug("%s: %s colour %s read by Pillow as 8 bits (the high byte of each sample)", name, rawmode, img.format)
            bits = _container_bits(img, rawmode)
            img.load()
            loaded = img.copy()
    if opts.exif_transpose and orientation in _ORIENTATION_METHOD:
        loaded = loaded.transpose(_ORIENTATION_METHOD[orientation])
    return normalize_pil(loaded, opts, f"file '{name}'", container_bits=bits)


def load_image(source: str | os.PathLike | bytes | bytearray | memoryview, options: ImageReadOptions | None = None, *, name: str | None = None) -> DecodedImage:
    """Open and decode an image file (a path, or its encoded bytes) as :class:`ImageReadOptions` say.

    Args:
        source: a file path, or the file's bytes (e.g. read from an object store).
        options: orientation, bit depth, window and pixel limit; None: the defaults.
        name: names the image in errors when ``source`` is bytes.

    Returns:
        An 8-bit PIL image (``L``, ``LA``, ``RGB``, ``RGBA``), or a float32 ``HxWxC`` array in
        ``[0, 1]`` for images with more than 8 bits per sample; EXIF orientation applied.

    Raises:
        ImageLoadError: a missing, truncated or undecodable file, or one above ``max_image_pixels``.
        InvalidInputError: values that do not fit the bit depth; an unsupported mode.
        MissingDependencyError: a 16-bit colour TIFF without ``tifffile`` installed.
    """
    opts = _options(options)
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "<bytes>"
        fp: BinaryIO = io.BytesIO(bytes(source))
    else:
        path = Path(source)
        label = name or str(path)
        if not path.exists():
            raise ImageLoadError(f"Image file not found: '{path}'. Check the path.")
        if path.is_dir():
            raise ImageLoadError(f"'{path}' is a directory, not an image file.")
        try:
            fp = open(path, "rb")
        except OSError as exc:
            raise ImageLoadError(f"Cannot open image '{path}': {exc}.") from exc
    try:
        with fp:
            return _decode(fp, label, opts)
    except Image.DecompressionBombError as exc:
        # Pillow's own check ran (it is lifted only when our limit is above it), so the image is
        # above Pillow's limit and therefore above ours too.
        raise ImageLoadError(
            f"Image '{label}' is too large: {exc} The limit is max_image_pixels = {opts.pixel_limit() or 0:,} "
            "(a guard against decompression bombs). If the file is trusted, raise it: "
            "ImageReadOptions(max_image_pixels=...) (CLI: --max-image-pixels N, 0 for none), and score an image "
            "that large in tiles (tile_size / --tile-size)."
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        if isinstance(exc, (ImageLoadError, InvalidInputError)):
            raise
        raise ImageLoadError(
            f"Cannot read image '{label}': {exc}. The file may be truncated or not an image "
            "format Pillow can decode (PNG, JPEG, BMP, TIFF, ...)."
        ) from exc
