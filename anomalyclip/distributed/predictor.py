"""``AnomalyCLIPPredictor``: the callable class that Ray Data's ``map_batches`` runs on each actor.

Each actor loads the model once (``AnomalyCLIP.from_pretrained``) and turns batches of rows into
one output row per input row. It reuses the library's own path: images are decoded like
``anomalyclip predict`` does (:func:`anomalyclip.preprocessing.load_image`, with the same
:class:`~anomalyclip.ImageReadOptions`: EXIF orientation, 16-bit scaling), scored with :meth:`AnomalyCLIP.predict`
(one preprocessing, one forward, one :class:`~anomalyclip.AnomalyResult` per image), and the
overlays are those of :func:`anomalyclip.visualize.overlay`.

Input columns (a batch in Ray's ``"numpy"`` format):

``path`` (required)
    Local path or URI of the image; names the image in the output.
``bytes`` (optional; ``ray.data.read_binary_files(..., include_paths=True)``)
    The encoded file, decoded exactly as a file on disk would be.
``image`` (optional; ``ray.data.read_images(..., include_paths=True)``)
    Arrays already decoded by Ray, of any size (``HxW``, ``HxWx3``, ``HxWx4``, ``uint8``). Ray
    decodes with ``np.asarray(PIL image)``: palette (``P``) images become index arrays and EXIF
    orientation is not applied (``uint16`` arrays are scaled as the read options say), so prefer
    paths or bytes for numbers identical to the single-process run.
``index`` (optional)
    The input's position; carried to the output, names the map files, and lets you check that
    every input appears exactly once.
``overlay`` (optional)
    File name of the image's overlay in ``overlay_dir``.

Without ``bytes`` or ``image`` the actor reads ``path`` itself (local disk, or an object store
through :mod:`pyarrow.fs`), so image bytes never travel through Ray's object store.
"""

from __future__ import annotations

import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePosixPath
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import AnomalyCLIPError, InvalidInputError
from .maps import MAP_FORMATS, encode_map, map_suffix
from .sources import FileAccess

__all__ = ["AnomalyCLIPPredictor", "OUTPUT_COLUMNS", "output_schema"]

logger = logging.getLogger(__name__)

#: Output columns, always present: the input position (null when the input had no ``index``),
#: the path, the image score (null for error rows), the label (``score > image_threshold``;
#: null without a threshold or on error) and the error message (null when the image was scored).
OUTPUT_COLUMNS: tuple[str, ...] = ("index", "path", "score", "label", "anomalous_fraction", "error")


def output_schema(maps: str | None, map_dir: Any, overlays: bool):
    """The pyarrow schema of the predictor's output for these options (the same for every batch).

    Columns: :data:`OUTPUT_COLUMNS`, then ``map_path`` (string; maps written under ``map_dir``)
    or ``map_png`` / ``map_npy`` (binary; maps inline), then ``overlay`` (string) with overlays.
    """
    from ._deps import require_pyarrow

    pa = require_pyarrow()
    fields = [
        pa.field("index", pa.int64()),
        pa.field("path", pa.string()),
        pa.field("score", pa.float64()),
        pa.field("label", pa.int64()),
        pa.field("anomalous_fraction", pa.float64()),  # of the pixels above the pixel threshold
        pa.field("error", pa.string()),
    ]
    if maps is not None:
        fields.append(pa.field("map_path", pa.string()) if map_dir is not None else pa.field(f"map_{maps}", pa.binary()))
    if overlays:
        fields.append(pa.field("overlay", pa.string()))
    return pa.schema(fields)


def _decode_image(data: bytes, name: str, options: Any = None):
    """Decode an image file's bytes with :func:`anomalyclip.preprocessing.load_image` (the one decoder
    of every mode: EXIF orientation, 16-bit scaling, palette conversion, the pixel limit)."""
    from ..preprocessing import load_image

    return load_image(data, options, name=name)


def _read_options(value: Any):
    """An :class:`~anomalyclip.ImageReadOptions` from itself, its ``to_dict()`` form or None (defaults)."""
    from ..decoding import ImageReadOptions

    if value is None:
        return ImageReadOptions()
    if isinstance(value, ImageReadOptions):
        return value
    if isinstance(value, Mapping):
        return ImageReadOptions.from_dict(dict(value))
    raise InvalidInputError(f"read_options must be an ImageReadOptions, its to_dict() form or None, got {type(value).__name__}.")


def _stem(path: str) -> str:
    return PurePosixPath(path.replace("\\", "/")).stem


class AnomalyCLIPPredictor:
    """Callable class for ``ray.data.Dataset.map_batches``: one model per actor, one row per image.

    Usage::

        ds = ray.data.read_binary_files("s3://bucket/images/", include_paths=True)
        out = ds.map_batches(
            AnomalyCLIPPredictor,
            fn_constructor_args=("my-prompts",),
            fn_constructor_kwargs={"device": "cuda", "image_threshold": 0.5, "map_dir": "s3://bucket/maps"},
            batch_size=16, batch_format="numpy", num_gpus=1,
            compute=ray.data.ActorPoolStrategy(size=8),
        )
        out.write_parquet("s3://bucket/scores/")

    Args:
        model: what :meth:`AnomalyCLIP.from_pretrained` loads: a preset, a directory written by
            ``save_pretrained`` (on a file system every node sees), or a Hub repo id.
        batch_size: images per forward pass (``predict``'s ``batch_size``).
        image_threshold, pixel_threshold, thresholds: as in :meth:`AnomalyCLIP.predict`
            (``thresholds``: a :class:`~anomalyclip.Thresholds` or its ``to_dict()`` form, False to
            ignore the thresholds saved with the model, None to apply them; with ``references``
            the saved ones are dropped, as :meth:`AnomalyCLIP.add_references` drops them, so give
            thresholds chosen for the fused outputs). The image threshold fills ``label``; the
            pixel threshold outlines masks on overlays.
        maps: ``"png"`` (16-bit, quantized; default), ``"npy"`` (exact float32) or None (no maps).
            See :mod:`anomalyclip.distributed.maps` for the scale.
        map_dir: write maps as files ``<map_dir>/<index:08d>_<stem>.<png|npy>`` (local directory
            or URI) and return their paths in ``map_path``; None returns them inline in a binary
            column ``map_png`` / ``map_npy``.
        overlay_dir: write heat-map overlays (as ``anomalyclip predict`` does: jet, colour range
            ``model.map_range``) into this directory or URI, named by the ``overlay``
            column or ``<index:05d>_<stem>_overlay.png``; None writes none.
        overlay_alpha: heat-map opacity of the overlays.
        io_threads: threads per actor that read, decode and encode images (0 = in the caller).
        filesystem: a configured ``pyarrow.fs.FileSystem`` for URIs (see
            :mod:`anomalyclip.distributed.sources`).
        references: normal reference images (paths or URIs) that each actor adds with
            :meth:`AnomalyCLIP.add_references` after loading (few-shot); ``coreset`` as there.
        tile_size, tile_overlap: tiling of large images, as in :meth:`AnomalyCLIP.predict`.
        read_options: how image files (and ``image`` arrays wider than 8 bits) are read: an
            :class:`~anomalyclip.ImageReadOptions` or its ``to_dict()`` form; None: defaults.
            Decoding is :func:`anomalyclip.preprocessing.load_image`'s, so both modes give the
            same numbers for the same files.
        **from_pretrained_kwargs: any other :meth:`AnomalyCLIP.from_pretrained` option
            (``device``, ``dtype``, ``image_size``, ``feature_layers``, ``revision``, ``cache_dir``...).

    Each call returns a ``pyarrow.Table`` with :func:`output_schema`. An image that cannot be read
    or scored (missing, truncated, unsupported mode, smaller than a patch) becomes a row with
    ``error`` set and no score, instead of failing the job. Other errors (out of memory, a model
    that cannot load) raise and fail the job, as Ray Data does by default for errors in user
    code; a batch is retried when its actor dies (``max_task_retries``).
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        *,
        batch_size: int = 8,
        image_threshold: float | None = None,
        pixel_threshold: float | None = None,
        thresholds: Any = None,
        maps: str | None = "png",
        map_dir: str | os.PathLike | None = None,
        overlay_dir: str | os.PathLike | None = None,
        overlay_alpha: float = 0.5,
        io_threads: int = 4,
        filesystem: Any = None,
        references: Sequence[str] | None = None,
        coreset: float | None = None,
        tile_size: int | None = None,
        tile_overlap: float = 0.25,
        read_options: Any = None,
        **from_pretrained_kwargs: Any,
    ) -> None:
        from ..model import AnomalyCLIP

        check_predictor_options(batch_size=batch_size, maps=maps, io_threads=io_threads, overlay_alpha=overlay_alpha)
        self.image_threshold, self.pixel_threshold, self.thresholds = _check_thresholds(
            image_threshold, pixel_threshold, thresholds
        )
        self.read_options = _read_options(read_options)
        self.batch_size = batch_size
        self.maps = maps
        self.map_dir = os.fspath(map_dir) if map_dir is not None else None
        self.overlay_dir = os.fspath(overlay_dir) if overlay_dir is not None else None
        self.overlay_alpha = float(overlay_alpha)
        self.files = FileAccess(filesystem)
        self.schema = output_schema(maps, self.map_dir, self.overlay_dir is not None)
        self._map_column = None if maps is None else "map_path" if self.map_dir is not None else f"map_{maps}"
        self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix="anomalyclip-io") if io_threads > 0 else None
        # A model that cannot load (missing files, offline Hub...) fails the first batch with the
        # library's own error: Ray turns an error in an actor's constructor into an ActorDiedError
        # that keeps only a message, while an error in a call reaches the driver whole.
        self._load_error: AnomalyCLIPError | None = None
        try:
            self.model = AnomalyCLIP.from_pretrained(model, **from_pretrained_kwargs).eval()
            self.tiling = dict(tile_size=tile_size, tile_overlap=tile_overlap if tile_size is not None else None)
            if references:
                images = [self._reference(path) for path in references]
                self.model.add_references(images, batch_size=batch_size, coreset=coreset, **self.tiling)
        except AnomalyCLIPError as exc:
            logger.error("AnomalyCLIPPredictor could not load the model: %s", exc)
            self._load_error = exc
            return
        #: The maps' value range (0, number of output layers): the overlays' colour range, the PNG scale.
        self.map_range = self.model.map_range
        logger.info("AnomalyCLIPPredictor ready on pid %d: %s", os.getpid(), self.model.extra_repr())

    # ------------------------------------------------------------------ helpers
    def _map(self, fn, items: list) -> list:
        if self._pool is None or len(items) < 2:
            return [fn(item) for item in items]
        return list(self._pool.map(fn, items))

    def _load(self, row: tuple[str, Any, Any]) -> tuple[Any, str | None]:
        """``(image, None)`` or ``(None, reason)`` for one input row ``(path, bytes, image array)``."""
        from ..preprocessing import load_image, prepare_image

        path, data, array = row
        try:
            if array is not None:  # decoded by Ray: only the scaling of wide samples is left to do
                prepared = prepare_image(np.asarray(array), self.read_options)
                return (prepared.pil if prepared.pil is not None else prepared.array), None
            if data is not None:
                return _decode_image(bytes(data), path, self.read_options), None
            if self.files.is_remote(path):
                return _decode_image(self.files.read(path), path, self.read_options), None
            return load_image(path, self.read_options), None
        except AnomalyCLIPError as exc:
            return None, str(exc)

    def _score(self, images: list) -> list[tuple[Any, str | None]]:
        """``(AnomalyResult, None)`` or ``(None, reason)`` per image; a bad image fails alone."""
        options = dict(
            image_threshold=self.image_threshold, pixel_threshold=self.pixel_threshold, thresholds=self.thresholds, **self.tiling
        )
        # The core's streaming loop records an unreadable image as an error row and goes on;
        # running out of memory (ResourceError) raises and fails the job.
        results = self.model.predict_iter(images, batch_size=self.batch_size, on_error="record", **options)
        return [(None, r.error) if r.error is not None else (r, None) for r in results]

    def _reference(self, path: str):
        """A reference image (path or URI), decoded here with the read options."""
        from ..preprocessing import load_image

        return _decode_image(self.files.read(path), path, self.read_options) if self.files.is_remote(path) else load_image(path, self.read_options)

    def _map_name(self, index: int | None, path: str) -> str:
        if index is not None:
            return f"{index:08d}_{_stem(path)}{map_suffix(self.maps)}"
        import hashlib

        return f"{_stem(path)}_{hashlib.sha1(path.encode()).hexdigest()[:12]}{map_suffix(self.maps)}"

    def _overlay_name(self, index: int | None, path: str, given: str | None) -> str:
        if given:
            return given
        if index is not None:
            return f"{index:05d}_{_stem(path)}_overlay.png"
        import hashlib

        return f"{_stem(path)}_{hashlib.sha1(path.encode()).hexdigest()[:12]}_overlay.png"

    def _write_outputs(self, job: tuple) -> tuple[Any, str | None]:
        """Encode / write the map and the overlay of one scored image: ``(map value, overlay name)``."""
        index, path, image, result, overlay_name = job
        map_value = None
        if self.maps is not None:
            data = encode_map(result.anomaly_map, self.maps, scale=self.map_range[1])
            if self.map_dir is None:
                map_value = data
            else:
                map_value = self.files.join(self.map_dir, self._map_name(index, path))
                self.files.write(map_value, data)
        name = None
        if self.overlay_dir is not None:
            from ..visualize import overlay

            name = self._overlay_name(index, path, overlay_name)
            vmin, vmax = self.map_range
            picture = overlay(image, result.anomaly_map, alpha=self.overlay_alpha, vmin=vmin, vmax=vmax, mask=result.mask)
            buffer = io.BytesIO()
            picture.save(buffer, format="PNG")
            self.files.write(self.files.join(self.overlay_dir, name), buffer.getvalue())
        return map_value, name

    # ------------------------------------------------------------------ the batch
    def __call__(self, batch: Mapping[str, np.ndarray]):
        """Score one batch; returns a ``pyarrow.Table`` with one row per input row (see the class)."""
        from ._deps import require_pyarrow

        pa = require_pyarrow()
        if self._load_error is not None:
            raise self._load_error
        if "path" not in batch:
            raise InvalidInputError(
                f"AnomalyCLIPPredictor needs a 'path' column (got {sorted(batch)}); read with include_paths=True."
            )
        paths = [str(p) for p in batch["path"]]
        n = len(paths)
        indices = [int(i) for i in batch["index"]] if "index" in batch else [None] * n
        data = batch["bytes"] if "bytes" in batch else [None] * n
        arrays = batch["image"] if "image" in batch else [None] * n
        overlay_names = [str(x) if x is not None else None for x in batch["overlay"]] if "overlay" in batch else [None] * n

        loaded = self._map(self._load, list(zip(paths, data, arrays)))
        errors: list[str | None] = [reason for _, reason in loaded]
        ok = [i for i in range(n) if errors[i] is None]
        results: list[Any] = [None] * n
        if ok:
            for i, (result, reason) in zip(ok, self._score([loaded[i][0] for i in ok])):
                results[i], errors[i] = result, reason
        scored = [i for i in range(n) if results[i] is not None]
        written = self._map(
            self._write_outputs, [(indices[i], paths[i], loaded[i][0], results[i], overlay_names[i]) for i in scored]
        )
        map_values: list[Any] = [None] * n
        overlays: list[str | None] = [None] * n
        for i, (map_value, name) in zip(scored, written):
            map_values[i], overlays[i] = map_value, name
        for i in range(n):
            if errors[i] is not None:
                logger.warning("%s: %s", paths[i], errors[i])

        columns: dict[str, list] = {
            "index": indices,
            "path": paths,
            "score": [r.score if r is not None else None for r in results],
            "label": [r.label if r is not None else None for r in results],
            "anomalous_fraction": [float(np.mean(r.mask)) if r is not None and r.mask is not None else None for r in results],
            "error": errors,
        }
        if self._map_column is not None:
            columns[self._map_column] = map_values
        if self.overlay_dir is not None:
            columns["overlay"] = overlays
        return pa.Table.from_pydict(columns, schema=self.schema)


def _check_thresholds(image_threshold: Any, pixel_threshold: Any, thresholds: Any) -> tuple[float | None, float | None, Any]:
    """Validated ``(image_threshold, pixel_threshold, thresholds)`` for :meth:`AnomalyCLIP.predict`.

    ``thresholds`` may be a ``Thresholds``, its ``to_dict()`` form, ``False`` (ignore the model's
    own) or None (apply the model's own, if it has some); explicit thresholds take precedence.
    """
    if isinstance(thresholds, Mapping):
        from ..eval.thresholds import Thresholds

        thresholds = Thresholds.from_dict(thresholds)
    elif thresholds is not None and thresholds is not False:
        from ..eval.thresholds import Thresholds

        if not isinstance(thresholds, Thresholds):
            raise InvalidInputError(
                "thresholds must be a Thresholds, a dict {'image': ..., 'pixel': ...}, False (ignore the model's) "
                f"or None, got {type(thresholds).__name__}."
            )
    for name, value in (("image_threshold", image_threshold), ("pixel_threshold", pixel_threshold)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value)):
            raise InvalidInputError(f"{name} must be a finite number or None, got {value!r}.")
    return (
        float(image_threshold) if image_threshold is not None else None,
        float(pixel_threshold) if pixel_threshold is not None else None,
        thresholds,
    )


def check_predictor_options(*, batch_size: int, maps: str | None, io_threads: int, overlay_alpha: float) -> None:
    """Validate the options of :class:`AnomalyCLIPPredictor` (also run on the driver, before any actor starts)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive int, got {batch_size!r}.")
    if maps is not None and maps not in MAP_FORMATS:
        raise InvalidInputError(f"maps must be one of {', '.join(MAP_FORMATS)} or None, got {maps!r}.")
    if isinstance(io_threads, bool) or not isinstance(io_threads, int) or io_threads < 0:
        raise InvalidInputError(f"io_threads must be an int >= 0, got {io_threads!r}.")
    if isinstance(overlay_alpha, bool) or not isinstance(overlay_alpha, (int, float)) or not 0 <= overlay_alpha <= 1:
        raise InvalidInputError(f"overlay_alpha must be a number in [0, 1], got {overlay_alpha!r}.")
