"""Synthetic anomaly-detection data, for tests, demos and benchmarks (not for measuring accuracy).

Each class is a random texture family (smoothed noise, stripes, wood-like grain or a soft
checker pattern, in class-specific colours); every image is a new random draw of its class's
texture. Anomalous images carry one clearly visible defect with its exact binary mask:

- ``scratch``: a thick dark (on light textures) or bright (on dark textures) polyline;
- ``blob``: an irregular patch of a saturated colour far from the texture's colours, filled with
  fine noise (a different colour and texture).

Everything is deterministic: image ``k`` of a class depends only on ``(seed, class name, role,
k)``, so adding images or classes does not change the others, and :func:`make_synthetic_arrays`
returns exactly the pixels that :func:`make_synthetic_dataset` writes for the same class and seed.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from ..errors import InvalidInputError

__all__ = ["LAYOUTS", "DEFECT_TYPES", "make_synthetic_arrays", "make_synthetic_dataset"]

logger = logging.getLogger(__name__)

#: Layouts :func:`make_synthetic_dataset` writes (the formats of :func:`anomalyclip.data.datasets.load_dataset`).
LAYOUTS: tuple[str, ...] = ("mvtec", "folder", "visa", "meta")
#: Defect types; anomalous image ``j`` gets ``DEFECT_TYPES[j % 2]``.
DEFECT_TYPES: tuple[str, ...] = ("scratch", "blob")

_TEXTURES = ("noise", "stripes", "grain", "checker")
# Roles of an image, part of its random stream.
_TEST_NORMAL, _TEST_ANOMALOUS, _TRAIN_NORMAL = 0, 1, 2
_BLOB_COLOURS = np.array(
    [[220, 30, 30], [30, 190, 40], [40, 70, 230], [240, 210, 20], [210, 40, 210], [20, 210, 210]], dtype=np.float32
)
_MIN_SIDE = 16


@dataclass(frozen=True)
class _Style:
    """A class's texture family: kind, two colours (float RGB in [0, 255]) and a scale."""

    kind: str
    colour_a: np.ndarray
    colour_b: np.ndarray
    period: float  # stripes / checker period in pixels at 96 px
    angle: float  # radians


def _class_key(class_name: str) -> int:
    return zlib.crc32(class_name.encode("utf-8"))


def _style(class_name: str, seed: int) -> _Style:
    rng = np.random.default_rng([seed, _class_key(class_name), 99])
    kind = _TEXTURES[_class_key(class_name) % len(_TEXTURES)]
    colour_a = rng.uniform(75, 180, size=3).astype(np.float32)
    offset = rng.choice([-1.0, 1.0], size=3) * rng.uniform(25, 45, size=3)
    colour_b = np.clip(colour_a + offset, 40, 215).astype(np.float32)
    return _Style(kind, colour_a, colour_b, float(rng.uniform(8, 14)), float(rng.uniform(0, np.pi)))


def _unit(x: np.ndarray) -> np.ndarray:
    x = x - x.mean()
    return x / (x.std() + 1e-6)


def _texture(style: _Style, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A float32 ``[h, w, 3]`` texture in about ``[0, 255]``."""
    scale = min(h, w) / 96.0
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    fine = rng.standard_normal((h, w, 3)).astype(np.float32)
    if style.kind == "noise":
        t = _unit(gaussian_filter(rng.standard_normal((h, w)), sigma=2.5 * scale))
        mix = np.clip(0.5 + 0.3 * t, 0.0, 1.0)
    elif style.kind == "grain":
        field = gaussian_filter(rng.standard_normal((h, w)), sigma=(0.8 * scale, 9.0 * scale))
        mix = np.clip(0.5 + 0.35 * _unit(field), 0.0, 1.0)
    else:
        angle = style.angle + rng.uniform(-0.1, 0.1)
        period = style.period * scale
        u = xx * np.cos(angle) + yy * np.sin(angle)
        if style.kind == "stripes":
            wave = np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi))
        else:  # checker
            v = -xx * np.sin(angle) + yy * np.cos(angle)
            wave = np.tanh(
                3.0
                * np.sin(2 * np.pi * u / (2 * period) + rng.uniform(0, 2 * np.pi))
                * np.sin(2 * np.pi * v / (2 * period) + rng.uniform(0, 2 * np.pi))
            )
        mix = 0.5 + 0.5 * wave
    mix = mix.astype(np.float32)[:, :, None]
    return style.colour_a * (1 - mix) + style.colour_b * mix + 6.0 * fine


def _segment_distance(yy: np.ndarray, xx: np.ndarray, p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    """Distance in pixels from each pixel centre to the segment ``p0 -> p1`` (points as (y, x))."""
    d = p1 - p0
    length2 = float(d @ d) or 1e-6
    t = np.clip(((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / length2, 0.0, 1.0)
    return np.hypot(yy - (p0[0] + t * d[0]), xx - (p0[1] + t * d[1]))


def _scratch(image: np.ndarray, style: _Style, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    side = min(h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    margin = 0.2 * np.array([h, w], dtype=np.float32)
    point = rng.uniform(margin, np.array([h, w], dtype=np.float32) - margin)
    angle = rng.uniform(0, 2 * np.pi)
    width = max(2.0, rng.uniform(0.025, 0.045) * side)
    n_segments = int(rng.integers(2, 4))
    seg_len = rng.uniform(0.35, 0.6) * side / n_segments
    mask = np.zeros((h, w), dtype=bool)
    for _ in range(n_segments):
        angle += rng.uniform(-0.5, 0.5)
        nxt = point + seg_len * np.array([np.sin(angle), np.cos(angle)], dtype=np.float32)
        mask |= _segment_distance(yy, xx, point, nxt) <= width / 2
        point = nxt
    luminance = float(style.colour_a.mean() + style.colour_b.mean()) / 2
    value = rng.uniform(10, 35) if luminance > 128 else rng.uniform(225, 250)
    shade = value + 6.0 * rng.standard_normal((h, w)).astype(np.float32)
    out = image.copy()
    out[mask] = shade[mask][:, None]
    return out, mask


def _blob(image: np.ndarray, style: _Style, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    side = min(h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    radius = rng.uniform(0.08, 0.15) * side
    cy = rng.uniform(radius + 2, h - radius - 2)
    cx = rng.uniform(radius + 2, w - radius - 2)
    rot, aspect = rng.uniform(0, np.pi), rng.uniform(0.6, 1.0)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(rot) + dy * np.sin(rot)
    v = (-dx * np.sin(rot) + dy * np.cos(rot)) / aspect
    theta = np.arctan2(v, u)
    k = int(rng.integers(2, 5))
    boundary = radius * (
        1
        + rng.uniform(0.1, 0.25) * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
        + 0.1 * np.sin((k + 2) * theta + rng.uniform(0, 2 * np.pi))
    )
    mask = np.hypot(u, v) <= boundary
    mask[int(round(cy)), int(round(cx))] = True  # never empty
    # A saturated colour far from both texture colours, then a coarse-grained noise texture.
    distance = np.minimum(
        np.linalg.norm(_BLOB_COLOURS - style.colour_a, axis=1), np.linalg.norm(_BLOB_COLOURS - style.colour_b, axis=1)
    )
    candidates = np.argsort(distance)[::-1][:2]
    colour = _BLOB_COLOURS[int(rng.choice(candidates))]
    speckle = 22.0 * rng.standard_normal((h, w, 1)).astype(np.float32)
    out = image.copy()
    out[mask] = (colour + speckle)[mask]
    return out, mask


def _render(
    class_name: str, seed: int, role: int, index: int, size: tuple[int, int], defect: str | None
) -> tuple[np.ndarray, np.ndarray]:
    """One image (uint8 ``[H, W, 3]``) and its mask (uint8 ``[H, W]``, 0 or 255)."""
    h, w = size
    style = _style(class_name, seed)
    rng = np.random.default_rng([seed, _class_key(class_name), role, index])
    image = _texture(style, rng, h, w)
    mask = np.zeros((h, w), dtype=bool)
    if defect == "scratch":
        image, mask = _scratch(image, style, rng)
    elif defect == "blob":
        image, mask = _blob(image, style, rng)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask.astype(np.uint8) * 255


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InvalidInputError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return int(value)


def _check_size(size: object) -> tuple[int, int]:
    if not isinstance(size, (tuple, list)) or len(size) != 2:
        raise InvalidInputError(f"size must be (height, width) in pixels, got {size!r}.")
    return (_check_int("size[0] (height)", size[0], _MIN_SIDE), _check_int("size[1] (width)", size[1], _MIN_SIDE))


def make_synthetic_arrays(
    n_normal: int,
    n_anomalous: int,
    size: tuple[int, int] = (96, 96),
    seed: int = 0,
    *,
    class_name: str = "texture_a",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic images of one class, in memory.

    Args:
        n_normal: number of normal images (first in the outputs).
        n_anomalous: number of anomalous images (after the normal ones); image ``j`` of them
            has the defect ``DEFECT_TYPES[j % 2]``.
        size: ``(height, width)`` in pixels, each at least 16.
        seed: random seed.
        class_name: selects the texture family (as in :func:`make_synthetic_dataset`).

    Returns:
        ``images`` uint8 ``[N, H, W, 3]`` (RGB), ``masks`` uint8 ``[N, H, W]`` with values 0 and
        255 (all 0 for normal images), ``labels`` int64 ``[N]`` (0 normal, 1 anomalous), with
        ``N = n_normal + n_anomalous``. These are the pixels ``make_synthetic_dataset`` writes
        for the test split of ``class_name`` with the same seed.
    """
    n_normal = _check_int("n_normal", n_normal, 0)
    n_anomalous = _check_int("n_anomalous", n_anomalous, 0)
    h, w = _check_size(size)
    n = n_normal + n_anomalous
    images = np.empty((n, h, w, 3), dtype=np.uint8)
    masks = np.zeros((n, h, w), dtype=np.uint8)
    for i in range(n_normal):
        images[i], masks[i] = _render(class_name, seed, _TEST_NORMAL, i, (h, w), None)
    for j in range(n_anomalous):
        defect = DEFECT_TYPES[j % len(DEFECT_TYPES)]
        images[n_normal + j], masks[n_normal + j] = _render(class_name, seed, _TEST_ANOMALOUS, j, (h, w), defect)
    labels = np.concatenate([np.zeros(n_normal, np.int64), np.ones(n_anomalous, np.int64)])
    return images, masks, labels


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode="RGB" if array.ndim == 3 else "L").save(path, compress_level=1)


def _check_classes(classes: str | Sequence[str]) -> list[str]:
    names = [classes] if isinstance(classes, str) else list(classes)
    if not names:
        raise InvalidInputError("classes must name at least one class.")
    for name in names:
        if not isinstance(name, str) or not name or name.startswith(".") or "/" in name or "\\" in name:
            raise InvalidInputError(f"Invalid class name {name!r}: use a non-empty folder name without '/' or a leading '.'.")
        if name in ("good", "ground_truth", "split_csv"):
            raise InvalidInputError(f"Class name {name!r} is reserved by the data layouts; choose another name.")
    if len(set(names)) != len(names):
        raise InvalidInputError(f"Duplicate class names in {names}.")
    return names


def make_synthetic_dataset(
    root: str | os.PathLike,
    *,
    layout: str = "mvtec",
    classes: str | Sequence[str] = ("texture_a",),
    n_normal: int = 8,
    n_anomalous: int = 8,
    size: tuple[int, int] = (96, 96),
    seed: int = 0,
    n_train: int = 0,
) -> Path:
    """Write a synthetic data set in one of the :data:`LAYOUTS` (PNG images and 0/255 'L' masks).

    Files, per class ``c`` (image indices ``i`` for normal, ``j`` per defect type for anomalous):

    - ``"mvtec"``: ``c/test/good/{i:03d}.png``, ``c/test/<defect>/{j:03d}.png``,
      ``c/ground_truth/<defect>/{j:03d}_mask.png``, and ``c/train/good/{k:03d}.png`` for the
      ``n_train`` training images;
    - ``"meta"``: the ``"mvtec"`` files plus ``meta.json`` (official AnomalyCLIP format, with
      ``"train"`` and ``"test"`` splits);
    - ``"folder"``: ``c/good/{i:03d}.png``, ``c/<defect>/{j:03d}.png``,
      ``c/ground_truth/<defect>/{j:03d}_mask.png`` (``n_train`` is ignored);
    - ``"visa"``: ``c/Data/Images/Normal/{i:04d}.png`` (test normals, then train normals),
      ``c/Data/Images/Anomaly/{j:03d}.png``, ``c/Data/Masks/Anomaly/{j:03d}.png`` and
      ``split_csv/1cls.csv``.

    Args:
        root: a new or empty folder (created if needed).
        layout: one of :data:`LAYOUTS`.
        classes: class names (each a texture family chosen from the name).
        n_normal: normal test images per class.
        n_anomalous: anomalous test images per class (defects alternate scratch, blob).
        size: ``(height, width)`` of every image in pixels, each at least 16.
        seed: random seed; the same arguments write byte-identical files.
        n_train: normal training images per class (``train`` split; not for ``"folder"``).

    Returns:
        ``root`` as a :class:`~pathlib.Path`.

    Raises:
        InvalidInputError: a bad argument, or ``root`` exists and is not an empty folder.
    """
    if layout not in LAYOUTS:
        raise InvalidInputError(f"Unknown layout {layout!r}. Valid layouts: {', '.join(LAYOUTS)}.")
    names = _check_classes(classes)
    n_normal = _check_int("n_normal", n_normal, 0)
    n_anomalous = _check_int("n_anomalous", n_anomalous, 0)
    n_train = _check_int("n_train", n_train, 0)
    if n_normal + n_anomalous == 0:
        raise InvalidInputError("n_normal + n_anomalous must be at least 1.")
    h, w = _check_size(size)
    out = Path(root)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidInputError(f"'{out}' exists and is not an empty folder; pass a new or empty folder as root.")
    out.mkdir(parents=True, exist_ok=True)

    meta: dict[str, dict[str, list[dict[str, object]]]] = {"train": {}, "test": {}}
    rows: list[list[str]] = []
    for name in names:
        meta["train"][name], meta["test"][name] = [], []
        images, masks, labels = make_synthetic_arrays(n_normal, n_anomalous, (h, w), seed, class_name=name)
        train = [_render(name, seed, _TRAIN_NORMAL, k, (h, w), None)[0] for k in range(n_train)]
        for i in range(n_normal):
            if layout == "visa":
                rel = f"{name}/Data/Images/Normal/{i:04d}.png"
                rows.append([name, "test", "normal", rel, ""])
            else:
                rel = f"{name}/{'' if layout == 'folder' else 'test/'}good/{i:03d}.png"
                meta["test"][name].append(_meta_entry(rel, "", name, "good", 0))
            _save_png(images[i], out / rel)
        for j in range(n_anomalous):
            defect, index = DEFECT_TYPES[j % len(DEFECT_TYPES)], j // len(DEFECT_TYPES)
            if layout == "visa":
                rel = f"{name}/Data/Images/Anomaly/{j:03d}.png"
                mask_rel = f"{name}/Data/Masks/Anomaly/{j:03d}.png"
                rows.append([name, "test", "anomaly", rel, mask_rel])
            else:
                rel = f"{name}/{'' if layout == 'folder' else 'test/'}{defect}/{index:03d}.png"
                mask_rel = f"{name}/ground_truth/{defect}/{index:03d}_mask.png"
                meta["test"][name].append(_meta_entry(rel, mask_rel, name, defect, 1))
            _save_png(images[n_normal + j], out / rel)
            _save_png(masks[n_normal + j], out / mask_rel)
        if layout == "folder":
            continue
        for k, image in enumerate(train):
            if layout == "visa":
                rel = f"{name}/Data/Images/Normal/{n_normal + k:04d}.png"
                rows.append([name, "train", "normal", rel, ""])
            else:
                rel = f"{name}/train/good/{k:03d}.png"
                meta["train"][name].append(_meta_entry(rel, "", name, "good", 0))
            _save_png(image, out / rel)

    if layout == "meta":
        (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    elif layout == "visa":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows(rows)
        (out / "split_csv").mkdir()
        (out / "split_csv" / "1cls.csv").write_text(buffer.getvalue(), encoding="utf-8")
    logger.debug("Wrote a synthetic %s data set (%d classes) to %s", layout, len(names), out)
    return out


def _meta_entry(img_path: str, mask_path: str, cls_name: str, specie_name: str, anomaly: int) -> dict[str, object]:
    return {
        "img_path": img_path,
        "mask_path": mask_path,
        "cls_name": cls_name,
        "specie_name": specie_name,
        "anomaly": anomaly,
    }
