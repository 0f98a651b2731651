"""Image and mask loading and preprocessing, exactly as the official AnomalyCLIP release does it.

Images: PIL bicubic resize to ``(S, S)`` (the aspect ratio is NOT kept), then RGB, then
``[0, 1]`` floats normalized with CLIP's mean and std. Masks: binarized, PIL bilinear resize to
``(S, S)``, then thresholded at 0.5.

Accepted image inputs (:data:`ImageInput`): a file path, a PIL image, a numpy array (``HxW``,
``HxWx1``, ``HxWx3`` or ``HxWx4``; ``uint8`` in ``[0, 255]``, ``uint16`` / ``uint32`` / ``int32``
scaled by their full range, or float in ``[0, 1]``) or a torch tensor (``CHW`` with C in 1, 3,
4, or ``HW``; same dtypes and ranges). Files are decoded by :mod:`anomalyclip.decoding` (EXIF
orientation, palette and other modes, 16-bit and float files, the pixel limit;
:class:`~anomalyclip.decoding.ImageReadOptions`). 8-bit inputs go through PIL exactly as the
official pipeline does; high-bit-depth and float inputs are resized per channel with PIL's
32-bit float bicubic filter, so they are not quantized to 8 bits.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence, Union, cast

import numpy as np
from PIL import Image

from .config import OPENAI_MEAN, OPENAI_STD
from .decoding import DecodedImage, ImageReadOptions, load_image, normalize_pil, scale_to_unit
from .errors import InvalidInputError

__all__ = [
    "OPENAI_MEAN",
    "OPENAI_STD",
    "ImageInput",
    "ImageReadOptions",
    "PreparedImage",
    "load_image",
    "prepare_image",
    "check_image_size",
    "preprocess_array",
    "preprocess_image",
    "preprocess_images",
    "load_mask",
    "mask_array",
    "preprocess_mask",
]


if TYPE_CHECKING:
    import torch

#: What the library accepts as one image (torch is imported only where a tensor is given).
ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, "torch.Tensor"]

# Integer dtypes wider than 8 bits, scaled to [0, 1] by their full range (or the read options).
_HIGH_BIT_DTYPES = (np.dtype(np.uint16), np.dtype(np.uint32), np.dtype(np.int32), np.dtype(">u2"))


@dataclass(frozen=True)
class PreparedImage:
    """An input image brought to one of two canonical forms, before resizing.

    Exactly one of ``pil`` (an 8-bit PIL image, handled like the official pipeline) and
    ``array`` (float32 ``HxWxC`` with C in 1, 3 or 4, values in ``[0, 1]``) is set.
    """

    pil: Image.Image | None
    array: np.ndarray | None

    def __post_init__(self) -> None:
        if (self.pil is None) == (self.array is None):
            raise InvalidInputError(
                "PreparedImage needs exactly one of pil and array; build it with anomalyclip.preprocessing.prepare_image()."
            )

    @property
    def size(self) -> tuple[int, int]:
        """Original ``(height, width)`` in pixels."""
        if self.pil is not None:
            return (self.pil.height, self.pil.width)
        array = cast(np.ndarray, self.array)
        return (int(array.shape[0]), int(array.shape[1]))


def _describe(image: object) -> str:
    return f"{type(image).__module__}.{type(image).__qualname__}"


def _from_decoded(decoded: DecodedImage, origin: str) -> PreparedImage:
    if isinstance(decoded, Image.Image):
        return PreparedImage(pil=decoded, array=None)
    return _array_to_prepared(decoded, origin, None)


def _array_to_prepared(arr: np.ndarray, origin: str, options: ImageReadOptions | None) -> PreparedImage:
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise InvalidInputError(
            f"Expected an image array of shape HxW, HxWx1, HxWx3 or HxWx4 ({origin}), got shape "
            f"{tuple(arr.shape)}."
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InvalidInputError(f"Image has zero size {tuple(arr.shape[:2])} ({origin}).")
    if arr.dtype == np.uint8:
        channels = arr.shape[2]
        mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels]
        data = arr[:, :, 0] if channels == 1 else arr
        return PreparedImage(pil=Image.fromarray(np.ascontiguousarray(data), mode=mode), array=None)
    if arr.dtype == bool:
        return _array_to_prepared(arr.astype(np.uint8) * 255, origin, options)
    if np.issubdtype(arr.dtype, np.floating) or arr.dtype in _HIGH_BIT_DTYPES:
        return PreparedImage(pil=None, array=scale_to_unit(arr, options, origin))
    raise InvalidInputError(
        f"Unsupported image dtype {arr.dtype} ({origin}). Pass uint8 in [0, 255], uint16 / uint32 / int32 "
        "(scaled by their full range, or as ImageReadOptions say) or float in [0, 1]."
    )


def prepare_image(image: ImageInput, options: ImageReadOptions | None = None) -> PreparedImage:
    """Bring any supported image input to a :class:`PreparedImage` (validated, not resized).

    Args:
        image: a file path, PIL image, numpy array or CHW torch tensor (see :data:`ImageInput`).
        options: how files are read and high-bit-depth samples scaled
            (:class:`~anomalyclip.decoding.ImageReadOptions`); None: the defaults.

    Raises:
        ImageLoadError: a path that is missing or cannot be decoded, or is above the pixel limit.
        InvalidInputError: an unsupported type, mode, shape, dtype, range or non-finite values.
    """
    if isinstance(image, (str, os.PathLike)):
        return _from_decoded(load_image(image, options), f"file '{image}'")
    if isinstance(image, Image.Image):
        return _from_decoded(normalize_pil(image, options), "PIL image")
    torch = sys.modules.get("torch")  # an input can only be a tensor if torch is already imported
    if torch is not None and isinstance(image, torch.Tensor):
        t = image.detach()
        if t.ndim == 3:
            if t.shape[0] not in (1, 3, 4):
                raise InvalidInputError(
                    f"Expected a CHW image tensor with 1, 3 or 4 channels, got shape {tuple(t.shape)}. "
                    "For HWC data use a numpy array; for a batch pass a list of tensors."
                )
            t = t.permute(1, 2, 0)
        elif t.ndim != 2:
            raise InvalidInputError(
                f"Expected a CHW (or HW) image tensor, got shape {tuple(t.shape)}. "
                "For a batch pass a list of CHW tensors, or use model.preprocess / model(...) directly."
            )
        if t.dtype in (torch.float16, torch.bfloat16):
            t = t.float()
        return _array_to_prepared(t.cpu().numpy(), "tensor", options)
    if isinstance(image, np.ndarray):
        return _array_to_prepared(image, "numpy array", options)
    raise InvalidInputError(
        f"Unsupported image type {_describe(image)}. Pass a file path, a PIL image, a numpy array "
        "(HxW[xC]) or a CHW torch tensor."
    )


def _resize_float_channels(arr: np.ndarray, size: int) -> np.ndarray:
    """Bicubic-resize float ``HxWxC`` to ``size x size`` per channel with PIL's 'F' mode."""
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(arr[:, :, c]), mode="F").resize((size, size), Image.BICUBIC))
        for c in range(arr.shape[2])
    ]
    return np.stack(channels, axis=2)


def _to_rgb_float(prepared: PreparedImage, size: int) -> np.ndarray:
    """Resize to ``(size, size)`` and convert to RGB; returns float32 ``SxSx3`` in ``[0, 1]``."""
    if prepared.pil is not None:
        resized = prepared.pil.resize((size, size), Image.BICUBIC).convert("RGB")
        return np.asarray(resized, dtype=np.float32) / 255.0
    arr = cast(np.ndarray, prepared.array)  # PreparedImage holds an array when it holds no PIL image
    if arr.shape[2] == 4:
        # PIL resizes RGBA with premultiplied alpha; do the same so float and 8-bit inputs agree.
        alpha = arr[:, :, 3:4]
        premult = np.concatenate([arr[:, :, :3] * alpha, alpha], axis=2)
        out = _resize_float_channels(premult, size)
        a = out[:, :, 3:4]
        rgb = np.where(a > 0, out[:, :, :3] / np.where(a > 0, a, 1.0), 0.0)
    else:
        rgb = _resize_float_channels(arr, size)
        if rgb.shape[2] == 1:
            rgb = np.repeat(rgb, 3, axis=2)
    return np.clip(rgb, 0.0, 1.0).astype(np.float32)


def check_image_size(prepared: PreparedImage, patch_size: int) -> PreparedImage:
    """Raise :class:`InvalidInputError` if the image is smaller than one patch on a side; else return it."""
    h, w = prepared.size
    if min(h, w) < patch_size:
        raise InvalidInputError(
            f"Image of {w}x{h} px is smaller than one {patch_size}x{patch_size} patch; "
            "AnomalyCLIP needs images of at least one patch per side."
        )
    return prepared


def preprocess_array(
    image: ImageInput | PreparedImage,
    size: int,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
) -> np.ndarray:
    """Preprocess one image to a normalized float32 numpy array ``[3, size, size]`` (no torch).

    The one implementation of the official preprocessing: :func:`preprocess_image` wraps it for
    torch, and the ONNX runtime uses it as it is.
    """
    prepared = image if isinstance(image, PreparedImage) else prepare_image(image)
    rgb = _to_rgb_float(prepared, size).transpose(2, 0, 1)  # [3, S, S]
    mean_a = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    std_a = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    return np.ascontiguousarray((rgb - mean_a) / std_a, dtype=np.float32)


def preprocess_image(
    image: ImageInput | PreparedImage,
    size: int,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
) -> "torch.Tensor":
    """Preprocess one image to a normalized float32 tensor of shape ``[3, size, size]``."""
    import torch

    return torch.from_numpy(preprocess_array(image, size, mean, std))


def preprocess_images(
    images: Sequence[ImageInput | PreparedImage],
    size: int,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
) -> "torch.Tensor":
    """Preprocess a non-empty sequence of images to a float32 tensor ``[B, 3, size, size]``."""
    import torch

    if len(images) == 0:
        raise InvalidInputError("Got an empty list of images; pass at least one image.")
    return torch.stack([preprocess_image(img, size, mean, std) for img in images])


def load_mask(path: str | os.PathLike) -> Image.Image | np.ndarray:
    """Open a ground-truth mask file as :func:`load_image` does (a PIL image, or a float array for
    16-bit masks); raise :class:`ImageLoadError` naming it on failure."""
    return load_image(path)


def mask_array(mask: str | os.PathLike | Image.Image | np.ndarray, size: int) -> np.ndarray:
    """Preprocess a ground-truth mask as the official evaluation does (numpy, no torch).

    Any non-zero pixel is anomalous. The binary mask is scaled to 255 as an 8-bit 'L' image,
    PIL-resized to ``(size, size)`` with bilinear filtering, scaled to ``[0, 1]`` and thresholded
    at 0.5.

    Returns:
        float32 ``[size, size]`` with values in {0, 1}.
    """
    if isinstance(mask, (str, os.PathLike)):
        mask = load_mask(mask)
    if isinstance(mask, Image.Image):
        binary = np.asarray(mask.convert("L")) > 0
    elif isinstance(mask, np.ndarray):
        if mask.ndim == 3:
            mask = mask.max(axis=2)
        if mask.ndim != 2:
            raise InvalidInputError(f"Expected a mask of shape HxW, got {tuple(mask.shape)}.")
        binary = mask > 0
    else:
        raise InvalidInputError(f"Unsupported mask type {_describe(mask)}; pass a path, PIL image or numpy array.")
    img = Image.fromarray(binary.astype(np.uint8) * 255, mode="L").resize((size, size), Image.BILINEAR)
    scaled = np.asarray(img, dtype=np.float32) / 255.0
    return (scaled > 0.5).astype(np.float32)


def preprocess_mask(mask: str | os.PathLike | Image.Image | np.ndarray, size: int) -> "torch.Tensor":
    """:func:`mask_array` as a float32 tensor ``[size, size]`` with values in {0, 1}."""
    import torch

    return torch.from_numpy(mask_array(mask, size))
