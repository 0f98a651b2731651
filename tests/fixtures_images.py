"""Image files people have, each with a twin that must score the same (shared by the input and
pipeline tests).

:func:`make_input_folder` writes a small folder of real-world kinds of files made from the golden
``image_a.png``: 16-bit PNG and TIFF (grayscale, and RGB TIFF), a JPEG stored rotated with an
EXIF orientation, a palette PNG and a truncated PNG; :data:`TWINS` names, for each, the 8-bit /
RGB / upright file that it must score like, and within what bound.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .conftest import IMAGE_A

#: Size of the folder's images (width, height): small, and not square, so a rotation shows.
SIZE = (96, 64)

#: file -> (its twin, what the test allows between their scores). "exact": the same decoded
#: pixels; "1e-3": the 16-bit float path against the 8-bit PIL path (PIL rounds the 8-bit resize).
TWINS: dict[str, tuple[str, str]] = {
    "gray16.png": ("gray8.png", "1e-3"),
    "gray16.tif": ("gray8.png", "1e-3"),
    "rgb16.tif": ("rgb8.png", "1e-3"),
    "rotated.jpg": ("upright.png", "exact"),
    "palette.png": ("palette_as_rgb.png", "exact"),
}

#: Files that cannot be read (an error row in a pipeline run).
UNREADABLE = ("truncated.png",)


def rgb8() -> Image.Image:
    """The 8-bit RGB picture every file of the folder is made from."""
    with Image.open(IMAGE_A) as img:
        return img.convert("RGB").resize(SIZE, Image.BICUBIC)


def exif_rotated_jpeg(path: Path, picture: Image.Image) -> np.ndarray:
    """Save ``picture`` as a JPEG whose pixels are stored turned 90 degrees counter-clockwise, with
    EXIF orientation 6 ("rotate 90 clockwise to display"). Returns the stored pixels, decoded."""
    stored = picture.transpose(Image.Transpose.ROTATE_90)  # counter-clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, quality=95, exif=exif.tobytes())
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def write_png16(path: Path, samples: np.ndarray) -> None:
    """Write ``uint16 HxWx2`` (gray + alpha), ``HxWx3`` or ``HxWx4`` samples as a 16-bit colour PNG
    (Pillow cannot write one), the rows filtered with each of PNG's five filter types in turn
    (none, sub, up, average, Paeth), so a decoder's unfiltering of every type is exercised."""
    import struct
    import zlib

    height, width, channels = samples.shape
    bpp = 2 * channels
    rows = np.frombuffer(samples.astype(">u2").tobytes(), np.uint8).reshape(height, width * bpp).astype(np.int32)
    data, above = bytearray(), np.zeros(width * bpp, np.int32)
    for y, row in enumerate(rows):
        left = np.concatenate([np.zeros(bpp, np.int32), row[:-bpp]])
        upper_left = np.concatenate([np.zeros(bpp, np.int32), above[:-bpp]])
        guess = left + above - upper_left
        d_left, d_up, d_ul = np.abs(guess - left), np.abs(guess - above), np.abs(guess - upper_left)
        paeth = np.where((d_left <= d_up) & (d_left <= d_ul), left, np.where(d_up <= d_ul, above, upper_left))
        kind = y % 5
        predicted = [np.zeros_like(row), left, above, (left + above) // 2, paeth][kind]
        data += bytes([kind]) + ((row - predicted) % 256).astype(np.uint8).tobytes()
        above = row

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, {2: 4, 3: 2, 4: 6}[channels], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(data))) + chunk(b"IEND", b""))


def make_input_folder(folder: Path) -> dict[str, Path]:
    """Write the folder (see the module docstring); returns name -> path of every file in it.

    The upright twin of ``rotated.jpg`` is its own decoded pixels turned back with numpy (an
    independent reference for the EXIF transpose), saved losslessly as ``upright.png``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    picture = rgb8()
    gray = picture.convert("L")
    files: dict[str, Path] = {}

    def put(name: str) -> Path:
        files[name] = folder / name
        return files[name]

    picture.save(put("rgb8.png"))
    gray.save(put("gray8.png"))
    gray16 = np.asarray(gray).astype(np.uint16) * 257  # 8-bit x 257: the same values at full range
    Image.fromarray(gray16).save(put("gray16.png"))
    Image.fromarray(gray16).save(put("gray16.tif"))
    try:
        import tifffile
    except ImportError:  # the 16-bit RGB TIFF needs tifffile to write (and to read)
        pass
    else:
        tifffile.imwrite(put("rgb16.tif"), np.asarray(picture).astype(np.uint16) * 257, photometric="rgb")
    stored = exif_rotated_jpeg(put("rotated.jpg"), picture)
    Image.fromarray(np.ascontiguousarray(np.rot90(stored, k=-1))).save(put("upright.png"))  # clockwise
    palette = picture.quantize(colors=64)
    palette.save(put("palette.png"))
    palette.convert("RGB").save(put("palette_as_rgb.png"))
    encoded = (folder / "rgb8.png").read_bytes()
    put("truncated.png").write_bytes(encoded[: len(encoded) // 2])
    return files
