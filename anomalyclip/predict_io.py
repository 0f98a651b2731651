"""The files of ``anomalyclip predict``: which images it reads, what its overlays are called, and
``scores.csv`` / ``scores.json``.

Shared by the single-process command and its Ray mode (:mod:`anomalyclip.distributed`), so both
read the same images in the same order and write the same files.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any, Mapping, Sequence

from .errors import InvalidInputError
from .files import IMAGE_SUFFIXES, atomic_write, find_images

__all__ = ["images_in", "collect_images", "overlay_names", "write_scores"]


def images_in(path: str | os.PathLike) -> list[Path]:
    """``[path]`` for a file; the image files under a directory (recursively, sorted, hidden files
    skipped: :func:`anomalyclip.files.find_images`); may be empty.

    Raises:
        InvalidInputError: ``path`` does not exist.
    """
    path = Path(path)
    if path.is_dir():
        return find_images(path)
    if path.exists():
        return [path]
    raise InvalidInputError(f"No such file or directory: '{path}'.")


def collect_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files as given, and image files found recursively in directories (sorted).

    Raises:
        InvalidInputError: an input does not exist, or no image was found.
    """
    found = [image for item in inputs for image in images_in(item)]
    if not found:
        raise InvalidInputError(f"No images found in {[str(i) for i in inputs]} (looked for {', '.join(IMAGE_SUFFIXES)}).")
    return found


def overlay_names(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Overlay file names: ``<stem>_overlay.png``, prefixed by the image's index where stems repeat.

    ``paths`` may be local paths or URIs (``s3://bucket/a/part.png`` has the stem ``part``).
    """
    stems = [PurePosixPath(os.fspath(p).replace("\\", "/")).stem for p in paths]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    return [f"{i:05d}_{s}_overlay.png" if counts[s] > 1 else f"{s}_overlay.png" for i, s in enumerate(stems)]


def write_scores(out_dir: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> tuple[Path, Path]:
    """Write ``rows`` (one dict per image, same keys in each) as ``scores.csv`` and ``scores.json``.

    Both files are written atomically. Returns their paths.
    """
    if not rows:
        raise InvalidInputError("write_scores needs at least one row.")
    out = Path(out_dir)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    csv_path, json_path = out / "scores.csv", out / "scores.json"
    with atomic_write(csv_path, "w") as handle:
        handle.write(buffer.getvalue())
    with atomic_write(json_path, "w") as handle:
        handle.write(json.dumps(list(rows), indent=2) + "\n")
    return csv_path, json_path


def read_options(args: Any):
    """The :class:`~anomalyclip.ImageReadOptions` of the CLI's ``--bit-depth``,
    ``--intensity-range``, ``--no-exif-transpose`` and ``--max-image-pixels`` (0: no limit)."""
    from .decoding import ImageReadOptions

    window = getattr(args, "intensity_range", None)
    return ImageReadOptions(
        exif_transpose=not getattr(args, "no_exif_transpose", False),
        bit_depth=getattr(args, "bit_depth", None),
        intensity_range=tuple(window) if window is not None else None,
        max_image_pixels=getattr(args, "max_image_pixels", None),
    )


def model_options(args: Any) -> dict[str, Any]:
    """The ``AnomalyCLIP.from_pretrained`` keyword arguments of the CLI's shared model options
    (``--device``, ``--dtype``, ``--image-size``, ``--feature-layers``, ``--dpam-layers``,
    ``--dpam-mode``, ``--sigma``, ``--cache-dir``), for the single-process and the Ray runs alike."""
    from .options import InferenceOptions

    inference = InferenceOptions.from_mapping(vars(args)).as_kwargs()
    return dict(device=args.device, dtype=args.dtype, cache_dir=args.cache_dir, **inference)
