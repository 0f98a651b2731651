"""The image-level API of :class:`~anomalyclip.AnomalyCLIP` (a mixin of the module): few-shot
references, ``predict``, ``calibrate``, ONNX export and finetuning, each delegating to the module
that does the work."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from ..errors import InvalidInputError
from ..eval.thresholds import Thresholds
from ..options import PredictOptions
from ..outputs import AnomalyResult
from ..preprocessing import ImageInput
from .fewshot import add_references as _add_references
from .predict import calibrate as _calibrate
from .predict import decision_thresholds
from .predict import predict as _predict
from .training import finetune_in_place

__all__ = ["ImageAPI"]


def _is_image_list(images: Any) -> bool:
    return isinstance(images, (list, tuple))


class ImageAPI:
    """``add_references``, ``predict``, ``calibrate``, ``export_onnx`` and ``finetune``."""

    def add_references(
        self,
        images: ImageInput | str | os.PathLike | Sequence[ImageInput],
        *,
        batch_size: int = 8,
        tile_size: int | None = None,
        tile_overlap: float = 0.25,
        coreset: float | None = None,
        storage_dtype: str | torch.dtype | None = None,
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
        thresholds: Thresholds | Literal[False] | None = None,
        progress: bool = False,
        num_workers: int | None = None,
        tile_size: int | None = None,
        tile_overlap: float = 0.25,
    ) -> AnomalyResult | list[AnomalyResult]:
        """Score images and map anomalies at each image's original size.

        Scores lie in [0, 1]. Map values lie in :attr:`map_range`, [0, len(feature_layers)]: the
        official sum over the output layers of each layer's anomalous probability ([0, 1] with
        the default single layer). A pixel threshold is on that scale.

        Args:
            images: one image or a list: file paths, PIL images, numpy arrays (HxW, HxWx3, HxWx4;
                uint8 or float in [0, 1]) or CHW tensors.
            batch_size: images per forward pass.
            image_threshold: results carry ``label = score > image_threshold``.
            pixel_threshold: results carry ``mask = anomaly_map > pixel_threshold``.
            thresholds: ``None`` (default) applies the model's own :attr:`thresholds` (from
                :meth:`calibrate` or ``config.json``) when it has some; a
                :class:`~anomalyclip.Thresholds` applies those instead; ``False`` applies none.
                ``image_threshold`` / ``pixel_threshold`` take precedence over both.
            progress: show a tqdm progress bar.
            num_workers: threads that load and preprocess the next batches while the model runs
                (:func:`~anomalyclip.prefetch.prefetch_batches`); None: 0 on the CPU, up to 8 on
                an accelerator (:func:`~anomalyclip.prefetch.default_num_workers`). The results
                do not depend on it. Not used with ``tile_size``.
            tile_size: for high-resolution images: cut each image larger than this many pixels
                into overlapping tiles, run each tile at the processing size S and blend the tile
                maps into one map at the original size (see ``docs/tiling.md``). The score is the
                largest tile score (with references: the fused score of the largest zero-shot
                and the largest reference tile scores). ``batch_size`` then counts tiles.
            tile_overlap: fraction of a tile that neighbouring tiles share, in [0, 1).

        Returns:
            An :class:`AnomalyResult` for a single image, a list of them for a list. ``path`` is
            the image's file path when it was given as one.

        On CUDA, batches are stacked in pinned memory and copied asynchronously, and each batch's
        maps are resized and copied back before the next batch is started, so that the GPU
        always has queued work.
        """
        single = not _is_image_list(images)
        items = [images] if single else list(images)
        if not items:
            raise InvalidInputError("Got an empty list of images; pass at least one image.")
        options = PredictOptions(
            batch_size=batch_size, num_workers=num_workers, tile_size=tile_size, tile_overlap=tile_overlap, progress=progress
        )
        image_threshold, pixel_threshold = decision_thresholds(self, thresholds, image_threshold, pixel_threshold)
        results = _predict(self, items, options, image_threshold, pixel_threshold)
        return results[0] if single else results

    def _load_and_preprocess(self, image: ImageInput) -> tuple[tuple[int, int], torch.Tensor]:
        """(original (height, width), ``[3, S, S]`` float32): one image's work on a prefetch worker."""
        prepared = self._prepare(image)
        return prepared.size, self._preprocess_prepared(prepared)


    def calibrate(
        self,
        normal_images: Sequence[ImageInput],
        *,
        quantile: float = 0.99,
        batch_size: int = 8,
        num_workers: int | None = None,
    ) -> Thresholds:
        """Image and pixel thresholds from images known to be normal, kept on the model.

        The image threshold is the ``quantile`` of their scores (in [0, 1]), the pixel threshold
        the ``quantile`` of all their map values at the processing size S, on the map's scale
        [0, len(feature_layers)] (:attr:`map_range`). Anything above is flagged. The thresholds
        become :attr:`thresholds`: ``predict`` applies them from now on, and
        :meth:`save_pretrained` writes them to ``config.json``. For a labelled set use
        :meth:`anomalyclip.Thresholds.from_labelled` (F1-max) and assign ``model.thresholds``.
        ``num_workers`` is as for :meth:`predict`.

        Returns:
            the new :class:`~anomalyclip.Thresholds`.
        """
        items = list(normal_images) if _is_image_list(normal_images) else [normal_images]
        if not items:
            raise InvalidInputError("calibrate needs at least one normal image.")
        options = PredictOptions(batch_size=batch_size, num_workers=num_workers)
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
    ) -> Path:
        """Export the model for deployment as ONNX: one file, run by :class:`anomalyclip.onnx.OnnxAnomalyCLIP`
        with onnxruntime, numpy and Pillow (no torch).

        Input ``pixel_values [B, 3, S, S]`` (float32, dynamic batch), outputs ``scores [B]`` and
        ``anomaly_maps [B, S, S]`` (blurred, as :meth:`forward`). Few-shot references and the
        model's :attr:`thresholds` go into the file (``thresholds=False``: none; ``image_threshold``
        / ``pixel_threshold`` replace one of them, as in :meth:`predict`). Every option is
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

