"""The service's one link to the model: image bytes -> a preprocessed image; a batch -> results.

Everything the HTTP layer (:mod:`anomalyclip.serve.app`) knows about the model goes through
:class:`Engine`, so that another predictor can take its place by offering the same four members
(:meth:`Engine.decode`, :meth:`Engine.run`, :meth:`Engine.thresholds`, :meth:`Engine.info`).
Decoding uses the library's one image reader (:func:`anomalyclip.decoding.load_image`: EXIF
orientation, 16-bit and palette images as the CLI reads files) and preprocessing
(:meth:`AnomalyCLIP.preprocess`); the batch runs on the
predictor core's torch backend (:class:`anomalyclip.model.predict.TorchBackend`, as
:meth:`AnomalyCLIP.predict_iter`) and thresholds go through its one resolution, so a served
answer equals ``model.predict(image)``.
"""

from __future__ import annotations

import io
import math
import numbers
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from .._version import __version__
from ..decoding import DecodedImage as Picture
from ..decoding import ImageReadOptions, load_image
from ..errors import ImageLoadError, InvalidInputError
from ..outputs import AnomalyResult

if TYPE_CHECKING:
    import torch

    from ..model import AnomalyCLIP

__all__ = ["DecodedImage", "Engine", "ImageTooLargeError", "IMAGE_FORMATS"]

#: Image formats the service decodes (Pillow format names); others are refused before decoding.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF", "PPM")


class ImageTooLargeError(InvalidInputError):
    """The image has more pixels than the service accepts (HTTP 413)."""


@dataclass(frozen=True)
class DecodedImage:
    """One request's image, decoded and preprocessed.

    Attributes:
        pixel_values: float32 ``[3, S, S]``, normalized (the model's preprocessing).
        size: the image's ``(height, width)`` in pixels, upright (EXIF orientation applied).
        image: the decoded picture (for overlays): an 8-bit PIL image, or a float32 ``HxWxC``
            array in [0, 1] for images of more than 8 bits per sample.
    """

    pixel_values: "torch.Tensor"
    size: tuple[int, int]
    image: Picture


def _check_threshold(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise InvalidInputError(f"{name} must be a finite number, got {value!r}.")
    return float(value)


class Engine:
    """A loaded model behind the service (one per process or Ray replica).

    Args:
        model: an :class:`~anomalyclip.AnomalyCLIP`; it is put in eval mode and not changed.
    """

    def __init__(self, model: "AnomalyCLIP") -> None:
        self.model = model.eval()

    def decode(self, data: bytes, max_pixels: int) -> DecodedImage:
        """Decode image bytes and preprocess them for the model (thread-safe; run off the event loop).

        Args:
            data: the encoded image (PNG, JPEG, BMP, TIFF, WEBP, GIF or PPM).
            max_pixels: largest accepted ``width * height``, checked before the pixels are decoded.

        Raises:
            ImageLoadError: empty, not an image, truncated or corrupt.
            ImageTooLargeError: more than ``max_pixels`` pixels, or a Pillow decompression bomb.
            InvalidInputError: an image the model cannot take (unsupported mode, smaller than a patch).
        """
        if not data:
            raise ImageLoadError("The request holds no image (empty body or file).")
        try:
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        except Image.DecompressionBombError as exc:
            raise ImageTooLargeError(f"Image refused by Pillow's decompression-bomb guard: {exc}") from exc
        except UnidentifiedImageError as exc:
            raise ImageLoadError(f"Not an image this service decodes; send {', '.join(IMAGE_FORMATS)}.") from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageLoadError(f"Cannot read the image header (corrupt file?): {exc}") from exc
        width, height = img.size
        if width * height > max_pixels:
            raise ImageTooLargeError(
                f"Image of {width}x{height} = {width * height} pixels is over the limit of {max_pixels}; "
                "send a smaller image (or start the service with a larger --max-pixels)."
            )
        img.close()
        try:
            picture = load_image(data, ImageReadOptions(max_image_pixels=max_pixels), name="the request's image")
        except Image.DecompressionBombError as exc:
            raise ImageTooLargeError(f"Image refused by Pillow's decompression-bomb guard: {exc}") from exc
        pixel_values = self.model.preprocess(picture)[0]
        height, width = picture.shape[:2] if isinstance(picture, np.ndarray) else (picture.height, picture.width)
        return DecodedImage(pixel_values=pixel_values, size=(height, width), image=picture)

    def thresholds(self, image: float | None = None, pixel: float | None = None) -> tuple[float | None, float | None]:
        """The ``(image, pixel)`` thresholds of a request: each given value, else the model's own
        (when they were chosen in the mode the service runs), else None -- the predictor core's
        one resolution (:func:`anomalyclip.predictor.resolve_thresholds`), as ``model.predict``.

        Raises:
            InvalidInputError: a given value is not a finite number, or lies outside the score
                range [0, 1] / the model's map range.
        """
        from ..model.predict import decision_thresholds

        image, pixel = _check_threshold("image_threshold", image), _check_threshold("pixel_threshold", pixel)
        return decision_thresholds(self.model, None, image, pixel)

    def run(self, images: Sequence[DecodedImage], thresholds: Sequence[tuple[float | None, float | None]]) -> list[AnomalyResult]:
        """Score a batch in one forward pass (call from one thread at a time).

        Args:
            images: decoded images (any sizes; all are processed at S x S).
            thresholds: per image, the ``(image, pixel)`` thresholds from :meth:`thresholds`.

        Returns:
            One :class:`AnomalyResult` per image, its map resized to the image's size.

        Raises:
            ResourceError: the batch does not fit in memory (only this batch fails).
        """
        from ..model.predict import TorchBackend

        # the predictor core's torch backend: one forward, maps resized on the device, one staged copy back
        scores, maps = TorchBackend(self.model).submit(
            [item.pixel_values for item in images], [item.size for item in images]
        ).collect()
        return [
            AnomalyResult(score=float(score), anomaly_map=m, image_threshold=image_t, pixel_threshold=pixel_t)
            for score, m, (image_t, pixel_t) in zip(scores.tolist(), maps, thresholds)
        ]

    def warm_up(self) -> float:
        """Score one blank image, so that the first request does not pay the one-off costs.

        Those are the text features, the CPU kernels' measurements and packed weights
        (:mod:`anomalyclip.cpu_linear`, :mod:`anomalyclip.cpu_attention`) and the GPU's kernel
        selection: on a ViT-L at 518 px on a 2-core CPU the first forward took 5.4 s, later
        ones 4.1 s (docs/benchmarks.md).

        Returns:
            The seconds it took.
        """
        import torch

        started = time.perf_counter()
        size = self.model.config.image_size
        blank = DecodedImage(pixel_values=torch.zeros(3, size, size), size=(size, size), image=None)  # type: ignore[arg-type]
        self.run([blank], [(None, None)])
        return time.perf_counter() - started

    @property
    def map_range(self) -> tuple[float, float]:
        """``(lo, hi)``: the range of map values (:attr:`AnomalyCLIP.map_range`)."""
        lo, hi = self.model.map_range
        return float(lo), float(hi)

    def info(self) -> dict[str, Any]:
        """What is loaded (``GET /v1/model``): backbone, sizes, layers, references, thresholds, version."""
        model, config = self.model, self.model.config
        own = model.thresholds
        references = model.num_references
        return {
            "backbone": config.backbone,
            "image_size": config.image_size,
            "feature_layers": list(config.feature_layers),
            "references": references,
            "mode": "few-shot" if references else "zero-shot",
            "thresholds": None if own is None else {"image": own.image, "pixel": own.pixel},
            "map_range": list(self.map_range),
            "device": str(model.device),
            "dtype": str(model.dtype).replace("torch.", ""),
            "version": __version__,
        }
