"""The one torch ``Dataset`` that reads a data set's images and masks for a model.

Evaluation, finetuning (the feature cache and the masks) and anything else that feeds samples to
a model read them through :class:`SampleReader`, so they preprocess exactly as
``AnomalyCLIP.preprocess`` / ``predict`` do: the official preprocessing
(:func:`~anomalyclip.preprocessing.preprocess_image`, :func:`~anomalyclip.preprocessing.preprocess_mask`)
at the model's processing size with the model's normalization (build the reader with
:meth:`SampleReader.for_config` from ``model.config``).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Sequence

import torch
from PIL import Image

from ..config import OPENAI_MEAN, OPENAI_STD
from ..errors import DatasetError, ImageLoadError, InvalidInputError
from ..preprocessing import load_mask, prepare_image, preprocess_image, preprocess_mask

if TYPE_CHECKING:
    from ..config import AnomalyCLIPConfig

__all__ = ["SampleReader", "check_mask_size", "image_size_of"]

_SAMPLE_FIELDS = ("image_path", "mask_path", "label")


def image_size_of(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` of an image file, from its header (the pixels are not decoded).

    Raises:
        ImageLoadError: a missing file or one Pillow cannot identify (named).
    """
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(f"Cannot read image '{path}': {exc}") from exc


def check_mask_size(sample: Any, mask_size: tuple[int, int], image_size: tuple[int, int]) -> None:
    """Raise :class:`DatasetError` unless a mask has its image's ``(width, height)``.

    The one check of mask sizes: the reader applies it before any resizing, whatever reads the
    masks (evaluation or training).
    """
    if tuple(mask_size) != tuple(image_size):
        raise DatasetError(
            f"Mask '{sample.mask_path}' is {mask_size[0]}x{mask_size[1]} px (width x height) but its image "
            f"'{sample.image_path}' is {image_size[0]}x{image_size[1]} px. A mask must have its image's size; "
            "check that the mask belongs to this image."
        )


class SampleReader(torch.utils.data.Dataset):
    """Reads and preprocesses the samples of a data set (for a ``DataLoader``).

    Item ``i`` is a dict (the default collate function batches it):

    - ``index``: int, ``i``;
    - ``label``: int, 0 normal / 1 anomalous;
    - ``pixel_values`` (with ``images=True``): float32 ``[3, S, S]``, normalized with ``mean`` / ``std``;
    - ``mask`` (with ``masks=True``): float32 ``[S, S]`` in {0, 1}; all zeros for normal images (any
      ``mask_path`` of a normal sample is ignored) and for anomalous images without a mask;
    - ``has_mask`` (with ``masks=True``): bool, whether ``mask`` is ground truth (True for normal
      images and for anomalous images with a mask).

    A mask must have its image's size (:func:`check_mask_size`); reading masks only, the image's
    size comes from its file header, without decoding it.

    Args:
        samples: anything with ``image_path``, ``mask_path`` and ``label`` per item (an
            :class:`~anomalyclip.data.datasets.AnomalyDataset`, a list of
            :class:`~anomalyclip.data.datasets.Sample`).
        image_size: the processing size S in pixels.
        mean, std: per-channel normalization (the model's ``config.mean`` / ``config.std``; see
            :meth:`for_config`).
        images: read and preprocess the images.
        masks: read and preprocess the masks.

    Raises (from ``__getitem__``):
        ImageLoadError: an image or mask file that is missing or cannot be decoded (named).
        DatasetError: a mask whose size differs from its image's (both files and sizes named).
    """

    def __init__(
        self,
        samples: Sequence[Any],
        image_size: int,
        mean: Sequence[float] = OPENAI_MEAN,
        std: Sequence[float] = OPENAI_STD,
        *,
        images: bool = True,
        masks: bool = True,
    ) -> None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
            raise InvalidInputError(f"SampleReader: image_size must be a positive int, got {image_size!r}.")
        items = tuple(samples)
        if not items:
            raise DatasetError("SampleReader got no samples; pass a non-empty data set.")
        wrong = [item for item in items if not all(hasattr(item, f) for f in _SAMPLE_FIELDS)]
        if wrong:
            raise InvalidInputError(
                f"SampleReader takes samples with image_path, mask_path and label "
                f"(anomalyclip.data.datasets.Sample), got {type(wrong[0]).__qualname__}."
            )
        if len(mean) != 3 or len(std) != 3:
            raise InvalidInputError(f"SampleReader: mean and std must be 3 numbers each, got {mean!r}, {std!r}.")
        if not (images or masks):
            raise InvalidInputError("SampleReader: read images, masks or both (images=False and masks=False).")
        self.samples = items
        self.image_size = image_size
        self.mean, self.std = tuple(float(x) for x in mean), tuple(float(x) for x in std)
        self.images, self.masks = bool(images), bool(masks)

    @classmethod
    def for_config(
        cls, samples: Sequence[Any], config: "AnomalyCLIPConfig", *, images: bool = True, masks: bool = True
    ) -> "SampleReader":
        """A reader that preprocesses as a model with this config does (its ``image_size``,
        ``mean`` and ``std``): the same pixels as ``model.preprocess``."""
        return cls(samples, config.image_size, config.mean, config.std, images=images, masks=masks)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += len(self.samples)
        sample = self.samples[index]
        item: dict[str, Any] = {"index": int(index), "label": int(sample.label)}
        image_size = None
        if self.images:
            prepared = prepare_image(sample.image_path)
            item["pixel_values"] = preprocess_image(prepared, self.image_size, self.mean, self.std)
            image_size = (prepared.size[1], prepared.size[0])
        if self.masks:
            item["mask"], item["has_mask"] = self._mask(sample, image_size)
        return item

    def _mask(self, sample: Any, image_size: tuple[int, int] | None) -> tuple[torch.Tensor, bool]:
        size = self.image_size
        if sample.label != 1 or sample.mask_path is None:
            return torch.zeros(size, size, dtype=torch.float32), sample.label != 1
        mask = load_mask(sample.mask_path)
        check_mask_size(sample, mask.size, image_size if image_size is not None else image_size_of(sample.image_path))
        return preprocess_mask(mask, size), True

    def __repr__(self) -> str:
        parts = [p for p, on in (("images", self.images), ("masks", self.masks)) if on]
        return f"SampleReader({len(self)} samples, {' + '.join(parts)} at {self.image_size} px)"

