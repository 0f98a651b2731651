"""The image-level API of :class:`~anomalyclip.AnomalyCLIP` (a mixin of the module): few-shot
references, ``predict``, ``calibrate``, ONNX export and finetuning, each delegating to the module
that does the work."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping, Sequence

import torch

from ..decoding import ImageReadOptions
from ..errors import InvalidInputError
from ..eval.thresholds import Thresholds
from ..options import PredictOptions
from ..outputs import AnomalyResult
from ..preprocessing import ImageInput
from .fewshot import add_references as _add_references
from ..predictor.stream import expand_inputs
from .predict import calibrate as _calibrate
from .predict import decision_thresholds
from .predict import predict_iter as _predict_iter
from .training import finetune_in_place

__all__ = ["ImageAPI"]


class ImageAPI:
    """``add_references``, ``predict``, ``predict_iter``, ``calibrate``, ``export_onnx`` and ``finetune``."""

    def add_references(
        self,
        images: ImageInput | str | os.PathLike | Sequence[ImageInput],
        *,
        batch_size: int = 8,
        tile_size: int | None = None,
        tile_overlap: float = 0.25,
        coreset: float | None = None,
        storage_dtype: str | torch.dtype | None = None,
        fusion: str | None = None,
        seed: int = 0,
        progress: bool = False,
    ) -> int:
        """Add normal reference images: from now on, scores and maps fuse the zero-shot output
        with each patch's distance to the nearest normal patch (see ``docs/fewshot.md``).

        The patch tokens of each output layer (the same tokens as the zero-shot map) are kept in
        a memory on the model's device. Calls accumulate; :meth:`clear_references` forgets them;
        :meth:`save_pretrained` writes them beside the prompts. They change the outputs, so
        thresholds (:attr:`thresholds`) chosen before are dropped with a warning: calibrate
        after adding the references.

        Args:
            images: what :meth:`predict` takes (paths, PIL images, arrays, CHW tensors, or a list
                of them), or a folder (searched recursively for image files).
            batch_size: images (or tiles) per forward pass.
            tile_size: cut each image into overlapping tiles of this many pixels and take the
                references from the tiles (use the same tiling as in ``predict``).
            tile_overlap: overlap fraction of the tiles.
            coreset: keep only this fraction (0, 1] of the new patches per layer, chosen by
                PatchCore's greedy k-center coreset (for many references, e.g. 0.1 for 100+).
            storage_dtype: ``"float32"`` (default) or ``"float16"`` (half the memory; distances
                change by about 1e-3). Fixed by the first call.
            fusion: ``"standardized"`` (default) or ``"sum"``, how the reference part is fused
                with the zero-shot output (``docs/fewshot.md``). Fixed by the first call.
            seed: seed of the coreset.
            progress: show a tqdm progress bar.

        Returns:
            :attr:`num_references`, the number of reference images now in the memory.
        """
        return _add_references(
            self,
            images,
            batch_size=batch_size,
            tile_size=tile_size,
            tile_overlap=tile_overlap,
            coreset=coreset,
            storage_dtype=storage_dtype,
            fusion=fusion,
            seed=seed,
            progress=progress,
        )


    # ------------------------------------------------------------------ friendly API
    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        batch_size: int = 8,
        image_threshold: float | None = None,
        pixel_threshold: float | None = None,
        thresholds: Thresholds | Mapping[str, Any] | Literal[False] | None = None,
        progress: bool = False,
        num_workers: int | None = None,
        tile_size: int | None = None,
        tile_overlap: float | None = None,
        read_options: ImageReadOptions | None = None,
    ) -> AnomalyResult | list[AnomalyResult]:
        """Score images and map anomalies at each image's original size.

        Scores lie in [0, 1]. Map values lie in :attr:`map_range`, [0, len(feature_layers)]: the
        official sum over the output layers of each layer's anomalous probability ([0, 1] with
        the default single layer). A pixel threshold is on that scale.

        Args:
            images: one image, a folder (its image files, recursively, sorted) or a list of
                them: file paths (8, 16 or 32 bits, EXIF orientation applied: see
                ``read_options``), PIL images, numpy arrays (HxW, HxWx3, HxWx4; uint8, uint16
                scaled by 65535, or float in [0, 1]) or CHW tensors.
            batch_size: images per forward pass.
            image_threshold: results carry ``label = score > image_threshold`` (in [0, 1]).
            pixel_threshold: results carry ``mask = anomaly_map > pixel_threshold`` (in :attr:`map_range`).
            thresholds: ``None`` (default) applies the model's own :attr:`thresholds` when they
                were chosen in this mode (processing size, layers, DPAM, sigma, tiling,
                references, backbone; otherwise a warning and no labels or masks); a
                :class:`~anomalyclip.Thresholds` or a mapping applies those instead (refused
                when their recorded mode differs); ``False`` applies none.
                ``image_threshold`` / ``pixel_threshold`` take precedence over both.
            progress: show a tqdm progress bar.
            num_workers: threads that load and preprocess the next images while the model runs;
                None: 0 on the CPU, up to 8 on an accelerator
                (:func:`~anomalyclip.prefetch.default_num_workers`). The results do not depend on it.
            tile_size: for high-resolution images: cut each image larger than this many pixels
                into overlapping tiles, run each tile at the processing size S and blend the tile
                maps into one map at the original size (see ``docs/tiling.md``). The score is the
                largest tile score (with references: the fused score of the largest zero-shot
                and the largest reference tile scores). ``batch_size`` then counts tiles.
            tile_overlap: fraction of a tile that neighbouring tiles share, in [0, 1); default
                0.25. Only with ``tile_size`` (refused without: it would do nothing).
            read_options: how files are read (EXIF orientation, 16-bit scaling, pixel limit):
                an :class:`~anomalyclip.ImageReadOptions`; None: its defaults. Maps are at the
                size of the image as read (after EXIF orientation).

        Returns:
            An :class:`AnomalyResult` for a single image, a list of them for a list or a folder.
            ``path`` is the image's file path when it was given as one.

        Built on :meth:`predict_iter` (which streams); on CUDA, batches are stacked in pinned
        memory and copied asynchronously, and each batch's maps are resized and copied back
        before the next batch is started, so that the GPU always has queued work.
        """
        items, single = expand_inputs(images, "predict")
        results = list(
            self.predict_iter(
                items,
                batch_size=batch_size,
                image_threshold=image_threshold,
                pixel_threshold=pixel_threshold,
                thresholds=thresholds,
                progress=progress,
                num_workers=num_workers,
                tile_size=tile_size,
                tile_overlap=tile_overlap,
                read_options=read_options,
            )
        )
        return results[0] if single else results

    def predict_iter(
        self,
        images: Iterable[ImageInput],
        *,
        batch_size: int = 8,
        on_error: str = "raise",
        image_threshold: float | None = None,
        pixel_threshold: float | None = None,
        thresholds: Thresholds | Mapping[str, Any] | Literal[False] | None = None,
        progress: bool = False,
        num_workers: int | None = None,
        tile_size: int | None = None,
        tile_overlap: float | None = None,
        read_options: ImageReadOptions | None = None,
    ) -> Iterator[AnomalyResult]:
        """Stream results: an iterator of :class:`AnomalyResult`, one per image, in input order.

        ``images`` is any iterable (a generator too; folders expand to their images) read
        lazily through one prefetch pipeline: memory stays bounded (about ``2 * batch_size``
        images in flight) whatever the number of images. Options as :meth:`predict`, plus:

        Args:
            on_error: ``"raise"`` (default) stops at the first image that cannot be read or
                scored; ``"record"`` yields a result with ``error`` set to the message, ``score``
                NaN and ``anomaly_map`` / ``label`` / ``mask`` None, and goes on. Running out
                of memory (:class:`~anomalyclip.errors.ResourceError`) always raises.

        The options are checked and the thresholds resolved when this is called, before the
        first image is read.
        """
        if tile_overlap is not None and tile_size is None:
            raise InvalidInputError("tile_overlap only applies with tile_size; pass tile_size=... or leave tile_overlap unset.")
        options = PredictOptions(
            batch_size=batch_size,
            num_workers=num_workers,
            tile_size=tile_size,
            tile_overlap=0.25 if tile_overlap is None else tile_overlap,
            progress=progress,
            on_error=on_error,
            read_options=read_options,
        )
        if isinstance(images, (str, os.PathLike)) or not isinstance(images, Iterable) or hasattr(images, "shape"):
            images = [images]  # one image (or one folder)
        elif hasattr(images, "size") and hasattr(images, "mode"):
            images = [images]  # a PIL image
        resolved = decision_thresholds(
            self, thresholds, image_threshold, pixel_threshold, options.tile_size, options.tile_overlap
        )
        return _predict_iter(self, images, options, resolved, total=len(images) if hasattr(images, "__len__") else None)

    def decision_thresholds(
        self,
        thresholds: Thresholds | Mapping[str, Any] | Literal[False] | None = None,
        image_threshold: float | None = None,
        pixel_threshold: float | None = None,
        *,
        tile_size: int | None = None,
        tile_overlap: float | None = None,
    ) -> tuple[float | None, float | None]:
        """The ``(image, pixel)`` thresholds :meth:`predict` applies with these arguments.

        ``None`` for a field means no labels (image) or no masks (pixel). The model's own
        :attr:`thresholds` count only when they were chosen in the decision mode of the call
        (size, layers, DPAM, tiling, references, backbone); otherwise they are left out with one
        warning. Explicitly passed thresholds from another mode raise.

        Raises:
            InvalidInputError: a threshold out of range (image in [0, 1], pixel in
                :attr:`map_range`), or explicit thresholds chosen in another mode.
        """
        if tile_overlap is not None and tile_size is None:
            raise InvalidInputError("tile_overlap only applies with tile_size; pass tile_size=... or leave tile_overlap unset.")
        overlap = 0.25 if tile_overlap is None else tile_overlap  # predict's default
        return decision_thresholds(self, thresholds, image_threshold, pixel_threshold, tile_size, overlap)

    def calibrate(
        self,
        normal_images: ImageInput | Sequence[ImageInput],
        *,
        quantile: float = 0.99,
        batch_size: int = 8,
        num_workers: int | None = None,
        tile_size: int | None = None,
        tile_overlap: float | None = None,
        read_options: ImageReadOptions | None = None,
    ) -> Thresholds:
        """Image and pixel thresholds from images known to be normal, kept on the model.

        The image threshold is the ``quantile`` of their scores (in [0, 1]), the pixel threshold
        the ``quantile`` of all their map values (at the processing size S; with ``tile_size``, of
        the blended maps ``predict`` gives), on the map's scale (:attr:`map_range`). Anything
        above is flagged. The thresholds become :attr:`thresholds`, recorded with the decision
        mode they were chosen in (processing size, layers, DPAM, sigma, tiling, references,
        backbone): ``predict`` in that mode applies them, and :meth:`save_pretrained` writes
        both to ``config.json``. For a labelled set use
        :meth:`anomalyclip.Thresholds.from_labelled` (F1-max) and assign ``model.thresholds``.

        Args:
            normal_images: images, a folder or a list of them (as :meth:`predict`).
            quantile: in [0, 1].
            batch_size, num_workers: as :meth:`predict`.
            tile_size, tile_overlap: calibrate for tiled prediction (the same tiling as ``predict``).
            read_options: how files are read, as for :meth:`predict`.

        Returns:
            the new :class:`~anomalyclip.Thresholds`.
        """
        items, _ = expand_inputs(normal_images, "calibrate")
        if tile_overlap is not None and tile_size is None:
            raise InvalidInputError("tile_overlap only applies with tile_size; pass tile_size=... or leave tile_overlap unset.")
        if tile_size is not None:
            self._check_tile_size(tile_size)
        options = PredictOptions(
            batch_size=batch_size,
            num_workers=num_workers,
            tile_size=tile_size,
            tile_overlap=0.25 if tile_overlap is None else tile_overlap,
            read_options=read_options,
        )
        return _calibrate(self, items, quantile=quantile, options=options)

    def export_onnx(
        self,
        path: str | os.PathLike,
        *,
        image_size: int | None = None,
        feature_layers: Sequence[int] | None = None,
        dtype: str = "float32",
        opset: int | None = None,
        thresholds: Thresholds | Literal[False] | None = None,
        image_threshold: float | None = None,
        pixel_threshold: float | None = None,
        progress: bool = True,
    ) -> Path:
        """Export the model for deployment as ONNX: one file, run by :class:`anomalyclip.onnx.OnnxAnomalyCLIP`
        with onnxruntime, numpy and Pillow (no torch).

        Input ``pixel_values [B, 3, S, S]`` (float32, dynamic batch), outputs ``scores [B]`` and
        ``anomaly_maps [B, S, S]`` (blurred, as :meth:`forward`). Few-shot references and the
        model's :attr:`thresholds` go into the file (``thresholds=False``: none; ``image_threshold``
        / ``pixel_threshold`` replace one of them, as in :meth:`predict`; ``progress``: a tqdm bar
        over the export's steps). Every option is
        documented at :func:`anomalyclip.onnx.export_onnx`. Returns the path written. Needs
        ``anomalyclip[onnx]``.
        """
        from ..onnx.export import export_onnx

        return export_onnx(
            self,
            path,
            image_size=image_size,
            feature_layers=feature_layers,
            dtype=dtype,
            opset=opset,
            thresholds=thresholds,
            image_threshold=image_threshold,
            pixel_threshold=pixel_threshold,
            progress=progress,
        )

    def finetune(self, data: Any, **options: Any):
        """Learn new prompts on auxiliary data with the paper's glocal training, in place.

        ``model.finetune(data, output_dir=..., epochs=..., ...)`` runs
        :func:`anomalyclip.train.finetune.finetune` on this model; every option and its default is
        documented there. Returns a :class:`~anomalyclip.train.finetune.TrainingHistory`.

        The config records what the prompts were trained on (``trained_on``, from the data set's
        format and folder), and thresholds from an earlier :meth:`calibrate` are dropped with a
        warning: they do not hold for new prompts.
        """
        return finetune_in_place(self, data, options)

