"""What training needs of a model: a small ``Protocol``, so that :mod:`anomalyclip.train` works on
:class:`~anomalyclip.AnomalyCLIP` without importing it (the model imports training for
``model.finetune``, never the other way round)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..config import AnomalyCLIPConfig
from ..vision import VisionFeatures

__all__ = ["TrainableModel"]


class TrainableModel(Protocol):
    """A model whose prompts :func:`anomalyclip.train.finetune.finetune` can learn.

    Attributes:
        config: the model's settings (processing size, output layers, normalization,
            temperature...); training replaces it to record what it did (``config.extra``).
        prompts: the trainable module (float32 parameters); everything else is frozen.
        clip: the frozen open_clip CLIP (its vision weights key the disk feature cache).
    """

    config: AnomalyCLIPConfig
    prompts: nn.Module
    clip: nn.Module
    training: bool

    @property
    def device(self) -> torch.device:
        """Where the frozen CLIP runs."""
        ...

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype of the frozen CLIP."""
        ...

    @property
    def patch_size(self) -> int:
        """The vision patch size in pixels."""
        ...

    def encode_text(self) -> torch.Tensor:
        """``[2, D]`` text features of the current prompts, differentiable while they require grad."""
        ...

    def encode_image(self, pixel_values: torch.Tensor) -> VisionFeatures:
        """Global ``[B, D]`` and per-layer patch features ``{layer: [B, N, D]}`` of ``[B, 3, S, S]`` pixels."""
        ...

    def load_prompts(self, tensors: dict[str, torch.Tensor], source: str = "prompts") -> None:
        """Replace the prompts (validated)."""
        ...

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write the config and the prompts."""
        ...

    def train(self, mode: bool = True) -> Any:
        """Training mode for the prompts (the frozen CLIP stays in eval mode)."""
        ...
