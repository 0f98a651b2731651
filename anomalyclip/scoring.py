"""Pure scoring math: image scores, per-layer probability maps, the final anomaly map.

All functions work on any device and return float32. See REFERENCE.md, "Scores and maps".
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .errors import InvalidInputError

__all__ = [
    "class_logits",
    "image_scores",
    "patch_probability_maps",
    "layer_anomaly_map",
    "gaussian_kernel1d",
    "gaussian_blur",
    "gaussian_blur_matmul",
    "anomaly_maps",
]


def class_logits(features: torch.Tensor, text_features: torch.Tensor, temperature: float) -> torch.Tensor:
    """``normalize(features) @ text_features.T / temperature``: ``[..., D] -> [..., 2]`` (float32)."""
    features = F.normalize(features.float(), dim=-1)
    return features @ text_features.float().T / temperature


def image_scores(image_features: torch.Tensor, text_features: torch.Tensor, temperature: float) -> torch.Tensor:
    """Anomalous-class probability of the global features: ``[B, D] -> [B]`` in [0, 1]."""
    return class_logits(image_features, text_features, temperature).softmax(dim=-1)[:, 1]


def patch_probability_maps(
    patch_features: torch.Tensor, text_features: torch.Tensor, temperature: float, image_size: int
) -> torch.Tensor:
    """Per-pixel class probabilities of one output layer.

    Args:
        patch_features: ``[B, N, D]`` projected tokens, class token first, N = 1 + G*G.
        text_features: ``[2, D]`` normalized, row 0 normal, row 1 anomalous.
        temperature: softmax temperature (0.07).
        image_size: S; the G x G probabilities are bilinearly upsampled to S x S.

    Returns:
        ``[B, 2, S, S]`` float32 probabilities ``[p_normal, p_anomalous]``.
    """
    probs = class_logits(patch_features[:, 1:], text_features, temperature).softmax(dim=-1)  # [B, G*G, 2]
    b, n, c = probs.shape
    grid = int(round(math.sqrt(n)))
    probs = probs.reshape(b, grid, grid, c).permute(0, 3, 1, 2)
    return F.interpolate(probs, size=(image_size, image_size), mode="bilinear", align_corners=False)


def layer_anomaly_map(probability_maps: torch.Tensor) -> torch.Tensor:
    """``(p_anomalous + 1 - p_normal) / 2``: ``[B, 2, S, S] -> [B, S, S]``."""
    return (probability_maps[:, 1] + 1.0 - probability_maps[:, 0]) / 2.0


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """The normalized 1-D kernel of ``scipy.ndimage.gaussian_filter`` (radius ``int(truncate*sigma+0.5)``)."""
    radius = int(truncate * float(sigma) + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 / (float(sigma) ** 2) * x**2)
    return (kernel / kernel.sum()).to(torch.float32)


def _reflect_indices(length: int, radius: int, device: torch.device) -> torch.Tensor:
    """Indices of scipy's 'reflect' extension (half-sample symmetric, ``d c b a | a b c d``)."""
    idx = torch.arange(-radius, length + radius, device=device) % (2 * length)
    return torch.where(idx >= length, 2 * length - 1 - idx, idx)


def gaussian_blur(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur per map, equal to ``scipy.ndimage.gaussian_filter(m, sigma)``
    (mode 'reflect', truncate 4.0) applied to each ``[H, W]`` map.

    On CUDA the blur runs as two matrix products with banded blur matrices
    (:func:`gaussian_blur_matmul`): cuBLAS keeps them in IEEE float32 unless TF32 matrix products
    were enabled (``torch.backends.cuda.matmul.allow_tf32``), whereas cuDNN convolutions use TF32
    by default; and the cached matrices need no host-to-device copy per call. Elsewhere it is a
    pair of 1-D convolutions.

    Args:
        maps: ``[B, H, W]``.
        sigma: standard deviation in pixels; 0 returns the maps unchanged.

    Returns:
        ``[B, H, W]`` float32.
    """
    maps = maps.float()
    if sigma == 0:
        return maps
    if maps.device.type == "cuda":
        return gaussian_blur_matmul(maps, sigma, truncate)
    kernel = gaussian_kernel1d(sigma, truncate).to(maps.device)
    radius = (kernel.numel() - 1) // 2
    b, h, w = maps.shape
    weight = kernel.view(1, 1, -1)
    # Along W: rows as a batch of 1-D signals.
    x = maps[:, :, _reflect_indices(w, radius, maps.device)].reshape(b * h, 1, -1)
    x = F.conv1d(x, weight).reshape(b, h, w)
    # Along H.
    x = x[:, _reflect_indices(h, radius, maps.device), :].transpose(1, 2).reshape(b * w, 1, -1)
    x = F.conv1d(x, weight).reshape(b, w, h).transpose(1, 2)
    return x.contiguous()


@functools.lru_cache(maxsize=16)
def _blur_matrix_cpu(length: int, sigma: float, truncate: float) -> torch.Tensor:
    """``[length, length]`` float32 ``M`` with ``M @ x`` = the 1-D scipy Gaussian filter of ``x``.

    Row ``i`` holds the kernel's taps at the (reflected) positions they read; taps that reflect
    onto the same position are summed (in float64, from the float32 kernel of the convolution).
    """
    kernel = gaussian_kernel1d(sigma, truncate).double()
    taps = kernel.numel()
    source = _reflect_indices(length, (taps - 1) // 2, torch.device("cpu"))  # [length + taps - 1]
    columns = source[torch.arange(length)[:, None] + torch.arange(taps)[None, :]]  # [length, taps]
    matrix = torch.zeros(length, length, dtype=torch.float64)
    matrix.scatter_add_(1, columns, kernel.expand(length, taps).contiguous())
    return matrix.float()


@functools.lru_cache(maxsize=16)
def _blur_matrix(length: int, sigma: float, truncate: float, device: torch.device) -> torch.Tensor:
    # Cached per device: after the first call, blurring needs no host-to-device copy (no sync).
    return _blur_matrix_cpu(length, sigma, truncate).to(device, non_blocking=True)


def gaussian_blur_matmul(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """:func:`gaussian_blur` as two matrix products, ``M_H @ maps @ M_W^T`` (any device).

    ``M_H`` and ``M_W`` (``[H, H]``, ``[W, W]``, float32, cached per size, sigma and device) hold
    the Gaussian taps with scipy's 'reflect' boundary folded in. The same result as the
    convolutions to float32 rounding; about ``4 * (H + W) * H * W`` FLOPs per map (0.56 GFLOP
    at 518 x 518), nothing next to the vision forward.

    Args:
        maps: ``[B, H, W]``.
        sigma: standard deviation in pixels; 0 returns the maps unchanged.

    Returns:
        ``[B, H, W]`` float32.
    """
    maps = maps.float()
    if sigma == 0:
        return maps
    _, h, w = maps.shape
    rows = _blur_matrix(h, float(sigma), float(truncate), maps.device)
    cols = rows if w == h else _blur_matrix(w, float(sigma), float(truncate), maps.device)
    return torch.matmul(rows, torch.matmul(maps, cols.t()))


def anomaly_maps(
    patch_features: dict[int, torch.Tensor],
    text_features: torch.Tensor,
    *,
    temperature: float,
    image_size: int,
    sigma: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw (layer sum) and final (blurred) anomaly maps, each ``[B, S, S]`` float32."""
    if not patch_features:
        raise InvalidInputError("patch_features is empty: pass the tokens of at least one output layer.")
    raw = sum(
        layer_anomaly_map(patch_probability_maps(tokens, text_features, temperature, image_size))
        for tokens in patch_features.values()
    )
    return raw, gaussian_blur(raw, sigma)
