"""The files of ``anomalyclip predict``: which images it reads, what its overlays are called, and
``scores.csv`` / ``scores.json``.

Shared by the single-process command and its Ray mode (:mod:`anomalyclip.distributed`), so both
read the same images in the same order and write the same files.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, Mapping, Sequence

from .errors import InvalidInputError
from .files import IMAGE_SUFFIXES, atomic_write, find_images

__all__ = ["images_in", "collect_images", "overlay_names", "write_predictions", "write_scores"]


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


def write_predictions(
    model: Any,
    images: Sequence[Path],
    out_dir: str | os.PathLike,
    *,
    batch_size: int,
    alpha: float,
    progress: bool,
    **predict_options: Any,
) -> list[dict[str, Any]]:
    """Score ``images`` with ``model`` and write an overlay per image and ``scores.csv`` /
    ``scores.json`` into ``out_dir``: the files of ``anomalyclip predict``.

    Args:
        model: an :class:`~anomalyclip.AnomalyCLIP` or an :class:`~anomalyclip.onnx.OnnxAnomalyCLIP`
            (anything with ``predict(images, batch_size=..., **predict_options)`` returning
            :class:`~anomalyclip.AnomalyResult` objects, and ``map_range``). Torch is imported only
            by such a model.
        images: the image files, in output order.
        batch_size: images per ``predict`` call.
        alpha: heat-map opacity of the overlays.
        progress: show a tqdm progress bar (none when tqdm is not installed).
        **predict_options: passed to ``model.predict`` (thresholds, tiling).

    Returns:
        the rows written (``image``, ``score``, ``overlay``, and ``label`` when thresholded).
    """
    from .visualize import save_overlay

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vmin, vmax = model.map_range  # a fixed colour scale: overlays of different images are comparable
    rows: list[dict[str, Any]] = []
    names = overlay_names(images)
    with _progress_bar(len(images), enabled=progress) as update:
        for start in range(0, len(images), batch_size):
            chunk = list(images[start : start + batch_size])
            results = model.predict(chunk, batch_size=batch_size, **predict_options)
            for name, result in zip(names[start : start + len(chunk)], results):
                save_overlay(out / name, result.path, result.anomaly_map, alpha=alpha, vmin=vmin, vmax=vmax, mask=result.mask)
                row = {"image": result.path, "score": round(result.score, 6), "overlay": name}
                if result.label is not None:
                    row["label"] = result.label
                rows.append(row)
            update(len(chunk))
    write_scores(out, rows)
    return rows


@contextlib.contextmanager
def _progress_bar(total: int, *, enabled: bool) -> Iterator[Callable[[int], Any]]:
    """``update(n)`` of a tqdm bar, or of nothing when disabled or tqdm is not installed (an
    ONNX-only install has numpy, Pillow and onnxruntime, not tqdm)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        enabled = False
    if not enabled:
        yield lambda n: None
        return
    with tqdm(total=total, desc="predict", unit="img") as bar:
        yield bar.update


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
