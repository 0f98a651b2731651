"""``predict_dataset``: score a folder, a list of paths or URIs, or a Ray Dataset on a pool of actors."""

from __future__ import annotations

import inspect
import math
import os
from typing import Any, Sequence

from ..errors import AnomalyCLIPError, InvalidInputError
from ._deps import require_ray
from .predictor import AnomalyCLIPPredictor, _check_thresholds, _read_options, check_predictor_options
from .sources import list_images

__all__ = ["predict_dataset", "images_dataset", "find_library_error", "split_work"]

#: At most this many input blocks (a block is one actor task; a killed actor's task is redone whole).
_MAX_BLOCKS = 10_000


def images_dataset(paths: Sequence[str], *, batch_size: int = 8, overlay_names: Sequence[str] | None = None):
    """A Ray Dataset of rows ``index``, ``path`` (and ``overlay``), one block per ``batch_size`` rows.

    The dataset keeps its rows in input order through later operations
    (``execution_options.preserve_order`` on its own copy of the Data context), and an error
    raised in an actor reaches the driver as the original exception (``raise_original_map_exception``).
    """
    ray = require_ray()
    if not paths:
        raise InvalidInputError("Got an empty list of images; pass at least one image.")
    items: list[dict[str, Any]] = [{"index": i, "path": str(p)} for i, p in enumerate(paths)]
    if overlay_names is not None:
        for item, name in zip(items, overlay_names):
            item["overlay"] = name
    blocks = max(1, min(math.ceil(len(items) / batch_size), _MAX_BLOCKS))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    context = ds.context  # from_items gave this dataset its own copy of the Data context
    context.execution_options.preserve_order = True
    context.raise_original_map_exception = True  # an actor's AnomalyCLIPError reaches the driver as one
    return ds


def split_work(n_images: int, batch_size: int, workers: int) -> tuple[int, int]:
    """``(rows per actor call, actors)`` so that every actor asked for gets work.

    At most one actor per image; an actor call takes ``batch_size`` rows, fewer when the images
    would otherwise fill fewer calls than there are actors (6 images, batch 8, 2 actors: calls of
    3 rows, one per actor). The forward batch inside an actor stays ``batch_size``.
    """
    actors = max(1, min(workers, n_images))
    return max(1, min(batch_size, math.ceil(n_images / actors))), actors


def _actor_pool(ray: Any, concurrency: int | tuple[int, int]):
    if isinstance(concurrency, tuple) and len(concurrency) == 2 and all(isinstance(c, int) for c in concurrency):
        low, high = concurrency
        if 1 <= low <= high:
            return ray.data.ActorPoolStrategy(min_size=low, max_size=high)
    elif isinstance(concurrency, int) and not isinstance(concurrency, bool) and concurrency >= 1:
        return ray.data.ActorPoolStrategy(size=concurrency)
    raise InvalidInputError(
        f"concurrency must be a number of actors >= 1 or a (min, max) pair for autoscaling, got {concurrency!r}."
    )


def _check_model_options(model: Any, options: dict[str, Any]) -> None:
    """Fail on the driver, before any actor starts, for options ``from_pretrained`` does not take."""
    from ..config import CONFIG_NAME, WEIGHTS_NAME
    from ..model import AnomalyCLIP

    try:
        inspect.signature(AnomalyCLIP.from_pretrained).bind(model, **options)
    except TypeError as exc:
        raise InvalidInputError(f"Not an option of AnomalyCLIP.from_pretrained: {exc}.") from exc
    if model is not None and os.path.isdir(model):
        missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not os.path.isfile(os.path.join(model, n))]
        if missing:
            raise InvalidInputError(
                f"'{model}' has no {', '.join(missing)}; expected a directory written by save_pretrained."
            )


def predict_dataset(
    source: Any,
    model: str | os.PathLike | None = None,
    *,
    batch_size: int = 8,
    concurrency: int | tuple[int, int] = 1,
    num_gpus: float = 0.0,
    num_cpus: float = 1.0,
    image_threshold: float | None = None,
    pixel_threshold: float | None = None,
    thresholds: Any = None,
    maps: str | None = "png",
    map_dir: str | os.PathLike | None = None,
    overlay_dir: str | os.PathLike | None = None,
    overlay_alpha: float = 0.5,
    io_threads: int = 4,
    filesystem: Any = None,
    references: Any = None,
    coreset: float | None = None,
    tile_size: int | None = None,
    tile_overlap: float = 0.25,
    read_options: Any = None,
    map_batches_options: dict[str, Any] | None = None,
    **from_pretrained_kwargs: Any,
):
    """Score images on a pool of Ray actors, one model per actor; returns a lazy ``ray.data.Dataset``.

    Args:
        source: a local path or URI (``s3://bucket/images``; a directory is searched recursively
            for image files), a list of them, or a ``ray.data.Dataset`` with a ``path`` column and
            optionally ``bytes`` / ``image`` / ``index`` / ``overlay`` columns (see
            :class:`AnomalyCLIPPredictor`). Paths and lists are listed on the driver, like
            ``anomalyclip predict`` does, and numbered ``index`` 0..N-1 in that order; each actor
            reads its own files.
        model: preset, ``save_pretrained`` directory (visible to every node) or Hub repo id.
        batch_size: images per forward pass, and per actor call (for paths and lists, fewer
            per call when there are fewer batches than actors, so that every actor gets work:
            :func:`split_work`).
        concurrency: number of actors (models), or ``(min, max)`` to autoscale; for paths and
            lists at most one per image.
        num_gpus: GPUs per actor (e.g. 1: one model per GPU); 0 runs on CPUs.
        num_cpus: CPUs per actor (its torch threads and its reading threads share them).
        image_threshold, pixel_threshold, thresholds: decisions, as in :meth:`AnomalyCLIP.predict`
            (by default the thresholds saved with the model apply; ``thresholds=False`` ignores them).
        maps: ``"png"`` (16-bit, default), ``"npy"`` (float32) or None; never float arrays
            through the object store (see :mod:`anomalyclip.distributed.maps`).
        map_dir: directory or URI for one map file per image (column ``map_path``); None puts
            the encoded maps in a binary column (``map_png`` / ``map_npy``).
        overlay_dir: directory or URI for heat-map overlays (column ``overlay``).
        overlay_alpha: heat-map opacity of the overlays.
        io_threads: reading / encoding threads per actor.
        filesystem: a configured ``pyarrow.fs.FileSystem`` for the URIs.
        references: normal reference images (a path, URI or list; folders searched), listed on the
            driver and added by each actor after loading (few-shot; :meth:`AnomalyCLIP.add_references`,
            ``coreset`` as there). A model folder saved with references needs none.
        tile_size, tile_overlap: tiling of large images, as in :meth:`AnomalyCLIP.predict`.
        read_options: how the actors read image files (:class:`~anomalyclip.ImageReadOptions`,
            as in :meth:`AnomalyCLIP.predict`; EXIF orientation, 16-bit scaling, pixel limit).
        map_batches_options: more ``Dataset.map_batches`` options (``accelerator_type``,
            ``resources``, ``memory``, ``runtime_env``...). Ray Data's actor pool restarts an actor
            that dies and retries its batch, without limit, by default.
        **from_pretrained_kwargs: options of :meth:`AnomalyCLIP.from_pretrained` (``device``,
            ``dtype``, ``image_size``, ``feature_layers``, ``revision``, ``cache_dir``...).

    Returns:
        A lazy Dataset with one row per input image (columns: :func:`output_schema`). For paths and
        lists the rows come out in input order (``index`` 0..N-1); for a Dataset source, in the
        order its own context gives (set ``ds.context.execution_options.preserve_order = True``
        on it first, or sort by ``path``). Write it with ``.write_parquet("s3://...")`` or
        iterate it; nothing runs until then.

    Raises:
        MissingDependencyError: (an ``ImportError``) Ray Data is not installed
            (``pip install "anomalyclip[ray]"``).
        InvalidInputError: bad options, a missing input, no images found.
    """
    ray = require_ray()
    check_predictor_options(batch_size=batch_size, maps=maps, io_threads=io_threads, overlay_alpha=overlay_alpha)
    _check_thresholds(image_threshold, pixel_threshold, thresholds)
    read_options = _read_options(read_options)
    for name, value in (("num_gpus", num_gpus), ("num_cpus", num_cpus)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise InvalidInputError(f"{name} must be a number >= 0 (per actor), got {value!r}.")
    _actor_pool(ray, concurrency)
    _check_model_options(model, from_pretrained_kwargs)

    if isinstance(source, ray.data.Dataset):
        ds = source
        call_rows = batch_size
    else:
        from ..predict_io import overlay_names

        paths = list_images(source, filesystem=filesystem)
        # Every actor asked for gets work: calls of fewer rows when the batches are fewer than the
        # actors, and no more actors than images (an actor without work only loads a model).
        top = concurrency if isinstance(concurrency, int) else concurrency[1]
        call_rows, actors = split_work(len(paths), batch_size, top)
        if isinstance(concurrency, int):
            concurrency = actors
        else:
            concurrency = (min(concurrency[0], actors), actors)
        ds = images_dataset(paths, batch_size=call_rows, overlay_names=overlay_names(paths) if overlay_dir else None)
    options = dict(map_batches_options or {})
    if num_gpus:
        options["num_gpus"] = num_gpus
    constructor_kwargs = dict(
        batch_size=batch_size,
        image_threshold=image_threshold,
        pixel_threshold=pixel_threshold,
        thresholds=thresholds.to_dict() if hasattr(thresholds, "to_dict") else thresholds,
        maps=maps,
        map_dir=os.fspath(map_dir) if map_dir is not None else None,
        overlay_dir=os.fspath(overlay_dir) if overlay_dir is not None else None,
        overlay_alpha=overlay_alpha,
        io_threads=io_threads,
        filesystem=filesystem,
        references=list_images(references, filesystem=filesystem) if references else None,
        coreset=coreset,
        tile_size=tile_size,
        tile_overlap=tile_overlap,
        read_options=read_options.to_dict(),
        **from_pretrained_kwargs,
    )
    return ds.map_batches(
        AnomalyCLIPPredictor,
        fn_constructor_args=(os.fspath(model) if model is not None else None,),
        fn_constructor_kwargs=constructor_kwargs,
        batch_size=call_rows,
        batch_format="numpy",
        compute=_actor_pool(ray, concurrency),
        num_cpus=num_cpus,
        **options,
    )


def find_library_error(exc: BaseException) -> AnomalyCLIPError | None:
    """The :class:`AnomalyCLIPError` behind a Ray error (Ray wraps exceptions raised in actors), if any."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, AnomalyCLIPError) and type(current).__module__.startswith("anomalyclip"):
            return current  # the original, not Ray's wrapper class that also derives from it
        stack.extend([current.__cause__, current.__context__, getattr(current, "cause", None)])
    return None
