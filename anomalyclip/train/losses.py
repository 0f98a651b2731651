"""The losses of AnomalyCLIP's glocal context optimization, as the official release computes them.

See REFERENCE.md, "Training (glocal context optimization)":

- global loss: cross-entropy of ``normalize(global) . T^T / 0.07`` against the image label;
- local loss, per output layer, on the upsampled probability maps ``M = [p_normal, p_anomalous]``
  ``[B, 2, S, S]`` against the binary mask ``y`` ``[B, S, S]``:
  ``focal(M, y) + dice(p_anomalous, y) + dice(p_normal, 1 - y)``, summed over output layers;
- total: ``4 * local + global``.

Every function returns a float32 scalar tensor and is differentiable in its probability /
feature inputs. Nothing here reads the model: :func:`glocal_loss` takes features and text
features, so that cached features and freshly computed ones go through exactly the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F

from ..errors import InvalidInputError
from ..scoring import class_logits, patch_probability_maps

__all__ = ["focal_loss", "dice_loss", "local_loss", "image_loss", "glocal_loss", "GlocalLoss", "LOCAL_WEIGHT"]

#: Weight of the summed local losses in the total loss (as in the official release).
LOCAL_WEIGHT = 4.0
_FOCAL_SMOOTH = 1e-5
_DICE_SMOOTH = 1.0


def focal_loss(probabilities: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """The official ``FocalLoss`` (no class weighting, smoothing 1e-5) on class probabilities.

    Args:
        probabilities: ``[B, C, ...]`` per-pixel class probabilities (already softmaxed).
        target: ``[B, ...]`` integer-valued class indices in ``0 .. C-1`` (any dtype; a binary
            mask for C = 2).
        gamma: focusing exponent (2).

    Returns:
        Scalar: the mean over all pixels of ``-(1 - pt)^gamma * log(pt)`` where
        ``pt = sum_c clamp(one_hot, 1e-5, 1 - 1e-5)_c * p_c + 1e-5``.
    """
    num_classes = probabilities.shape[1]
    if target.shape != probabilities.shape[:1] + probabilities.shape[2:]:
        raise InvalidInputError(
            f"focal_loss: target of shape {list(target.shape)} does not match probabilities "
            f"{list(probabilities.shape)} (expected [B, ...] for probabilities [B, C, ...])."
        )
    probs = probabilities.float().flatten(2).transpose(1, 2).reshape(-1, num_classes)  # [P, C]
    one_hot = F.one_hot(target.reshape(-1).long(), num_classes).to(probs.dtype)
    one_hot = one_hot.clamp(_FOCAL_SMOOTH / (num_classes - 1), 1.0 - _FOCAL_SMOOTH)
    pt = (one_hot * probs).sum(dim=1) + _FOCAL_SMOOTH
    return (-((1.0 - pt) ** gamma) * pt.log()).mean()


def dice_loss(probability: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The official ``BinaryDiceLoss``: ``1 - mean_b (2 sum(p g) + 1) / (sum(p) + sum(g) + 1)``.

    Args:
        probability: ``[B, ...]`` probabilities of one class.
        target: ``[B, ...]`` binary ground truth of that class (same number of elements per item).

    Returns:
        Scalar float32.
    """
    n = probability.shape[0]
    p = probability.float().reshape(n, -1)
    g = target.to(p.dtype).reshape(n, -1)
    dice = (2.0 * (p * g).sum(dim=1) + _DICE_SMOOTH) / (p.sum(dim=1) + g.sum(dim=1) + _DICE_SMOOTH)
    return 1.0 - dice.sum() / n


def local_loss(probability_maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The local loss of one output layer: ``focal(M, y) + dice(M[:, 1], y) + dice(M[:, 0], 1 - y)``.

    Args:
        probability_maps: ``[B, 2, S, S]`` ``[p_normal, p_anomalous]`` (upsampled, before blur).
        masks: ``[B, S, S]`` binary ground truth (1 = anomalous pixel).
    """
    y = masks.float()
    return (
        focal_loss(probability_maps, y)
        + dice_loss(probability_maps[:, 1], y)
        + dice_loss(probability_maps[:, 0], 1.0 - y)
    )


def image_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Cross-entropy of ``normalize(image_features) . T^T / temperature`` against ``labels``.

    Args:
        image_features: ``[B, D]`` global features (not necessarily normalized).
        text_features: ``[2, D]`` normalized text features (normal, anomalous).
        labels: ``[B]`` 0 (normal) or 1 (anomalous).
    """
    logits = class_logits(image_features, text_features, temperature)
    return F.cross_entropy(logits, labels.to(device=logits.device, dtype=torch.long))


@dataclass
class GlocalLoss:
    """The losses of one batch (float32 scalars; ``total`` is the one to backpropagate).

    Attributes:
        total: ``LOCAL_WEIGHT * local + image``.
        image: the global (image-level) cross-entropy.
        local: the local losses summed over output layers.
    """

    total: torch.Tensor
    image: torch.Tensor
    local: torch.Tensor


def glocal_loss(
    text_features: torch.Tensor,
    image_features: torch.Tensor,
    patch_features: Mapping[int, torch.Tensor],
    masks: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 0.07,
    local_weight: float = LOCAL_WEIGHT,
) -> GlocalLoss:
    """The glocal training loss of a batch.

    Args:
        text_features: ``[2, D]`` normalized text features (differentiable in the prompts).
        image_features: ``[B, D]`` global image features (not normalized).
        patch_features: output layer -> ``[B, N, D]`` projected patch features, class token
            first (not normalized), N = 1 + G*G.
        masks: ``[B, S, S]`` binary masks (bool, uint8 or float) at the processing size S; the
            probability maps are upsampled to S x S.
        labels: ``[B]`` image labels, 0 normal, 1 anomalous.
        temperature: softmax temperature (0.07).
        local_weight: weight of the summed local losses (4, as the official release).

    Returns:
        :class:`GlocalLoss` with ``total``, ``image`` and ``local`` (float32 scalars).
    """
    if not patch_features:
        raise InvalidInputError("glocal_loss needs the patch features of at least one output layer.")
    if masks.ndim != 3 or masks.shape[1] != masks.shape[2] or masks.shape[0] != image_features.shape[0]:
        raise InvalidInputError(
            f"masks must be [B, S, S] with B = {image_features.shape[0]}, got {list(masks.shape)}."
        )
    size = int(masks.shape[-1])
    masks = masks.to(device=text_features.device)
    glob = image_loss(image_features, text_features, labels, temperature)
    terms = [local_loss(patch_probability_maps(tokens, text_features, temperature, size), masks) for tokens in patch_features.values()]
    local = terms[0]
    for term in terms[1:]:
        local = local + term
    return GlocalLoss(total=local_weight * local + glob, image=glob, local=local)
