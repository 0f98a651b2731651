"""Building models: from an open_clip CLIP, a backbone reference or an official checkpoint.

As open_clip's factory: the config for a backbone (the paper's defaults, scaled to its depth,
with the backbone's own normalization), and the checks that a config fits the CLIP it is put on.
``AnomalyCLIP.from_clip`` / ``from_backbone`` / ``from_official_checkpoint`` are these functions.
"""

from __future__ import annotations

import logging
import os
from typing import Any, TypeVar

import torch
from torch import nn

from ..backbone import check_clip, clip_preprocess_cfg, load_clip, uses_quick_gelu
from ..config import OPENAI_MEAN, OPENAI_STD, AnomalyCLIPConfig, default_dpam_layers
from ..errors import BackboneError, CheckpointError, InvalidInputError
from ..official import convert_official_state_dict, load_official_state_dict
from ..options import InferenceOptions
from ..presets import PRESETS, git_blob_sha1
from ..prompts import PromptLearner
from ..runtime import place_model

__all__ = [
    "build_from_clip",
    "build_from_backbone",
    "build_from_official_checkpoint",
    "config_for_clip", "check_config_matches_clip"]

logger = logging.getLogger(__name__)

#: The model class being built (``AnomalyCLIP``; this module does not import it).
M = TypeVar("M", bound=nn.Module)


def build_from_clip(
    cls: type[M], clip: nn.Module, *, backbone: str, options: InferenceOptions, seed: int | None
) -> M:
    """``cls`` around ``clip`` with freshly initialized prompts (normal(0, 0.02), seeded if asked)."""
    config = config_for_clip(clip, backbone, options)
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            prompts = PromptLearner.from_config(config)
    else:
        prompts = PromptLearner.from_config(config)
    return cls(clip, config, prompts.to(clip.token_embedding.weight.device))


def build_from_backbone(
    cls: type[M],
    backbone: str,
    *,
    device: Any,
    dtype: Any,
    options: InferenceOptions,
    cache_dir: str | os.PathLike | None,
    seed: int | None,
    quick_gelu: bool | None,
) -> M:
    """``cls`` on the open_clip backbone ``backbone``, with fresh prompts, on ``device`` / ``dtype``."""
    clip = load_clip(backbone, quick_gelu=quick_gelu, cache_dir=cache_dir)
    model = build_from_clip(cls, clip, backbone=backbone, options=options, seed=seed)
    return place_model(model, device, dtype)


def build_from_official_checkpoint(
    cls: type[M],
    path: str | os.PathLike,
    *,
    clip: str | nn.Module,
    backbone: str | None,
    device: Any,
    dtype: Any,
    options: InferenceOptions,
    cache_dir: str | os.PathLike | None,
) -> M:
    """``cls`` with the prompts of an official ``.pth`` (read with ``weights_only=True``)."""
    state = load_official_state_dict(path)
    if isinstance(clip, str):
        backbone, clip_model = clip, load_clip(clip, quick_gelu=True, cache_dir=cache_dir)
    else:
        backbone, clip_model = backbone or "custom", clip
    check_clip(clip_model, backbone)
    tensors = convert_official_state_dict(state, clip_model, source=str(path))
    n_ctx = tensors["ctx_normal"].shape[0]
    n_deep, deep_length = tensors["deep_prompts"].shape[:2]
    config = config_for_clip(clip_model, backbone, options)
    config = config.replace(n_ctx=n_ctx, deep_prompt_length=deep_length, deep_prompt_depth=n_deep + 1)
    preset = next((p for p in PRESETS.values() if p.git_blob_sha1 == git_blob_sha1(path)), None)
    if preset is not None:  # a published checkpoint: record what its prompts were trained on
        config = config.replace(trained_on=preset.trained_on)
    model = cls(clip_model, config)
    model.load_prompts(tensors, source=str(path))
    return place_model(model, device, dtype)


def config_for_clip(clip: nn.Module, backbone: str, options: InferenceOptions | None = None) -> AnomalyCLIPConfig:
    """The paper's defaults for ``clip`` (DPAM depth scaled to its depth), with ``options`` applied."""
    options = options or InferenceOptions()
    check_clip(clip, backbone)
    depth = len(clip.visual.transformer.resblocks)
    mean, std = normalization_of(clip, backbone)
    return AnomalyCLIPConfig(
        backbone=backbone,
        quick_gelu=uses_quick_gelu(clip),
        vision_layers=depth,
        text_width=clip.token_embedding.embedding_dim,
        embed_dim=clip.visual.output_dim,
        feature_layers=options.feature_layers if options.feature_layers is not None else (depth,),
        dpam_layers=default_dpam_layers(depth) if options.dpam_layers is None else options.dpam_layers,
        mean=mean,
        std=std,
    ).replace(image_size=options.image_size, dpam_mode=options.dpam_mode, sigma=options.sigma)


def normalization_of(clip: nn.Module, backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` of the backbone's own preprocessing (its open_clip ``preprocess_cfg``), per RGB
    channel; OpenAI's values when the model records none (a CLIP built by hand)."""
    cfg = clip_preprocess_cfg(clip)
    out = []
    for key, default in (("mean", OPENAI_MEAN), ("std", OPENAI_STD)):
        value = cfg.get(key)
        if value is None:
            out.append(tuple(default))
            continue
        values = (float(value),) * 3 if isinstance(value, (int, float)) else tuple(float(v) for v in value)
        if len(values) == 1:
            values = values * 3
        if len(values) != 3:
            raise BackboneError(f"Backbone '{backbone}' has a preprocessing {key} of {len(values)} values; expected 3 (RGB).")
        out.append(values)
    if (out[0], out[1]) != (tuple(OPENAI_MEAN), tuple(OPENAI_STD)):
        logger.info("Backbone %s normalizes images with mean %s, std %s (its preprocess_cfg).", backbone, out[0], out[1])
    return out[0], out[1]


def check_config_matches_clip(config: AnomalyCLIPConfig, clip: nn.Module) -> None:
    """Refuse a config whose backbone shape or activation differs from ``clip`` (:class:`CheckpointError`)."""
    actual = {
        "vision_layers": len(clip.visual.transformer.resblocks),
        "text_width": clip.token_embedding.embedding_dim,
        "embed_dim": clip.visual.output_dim,
        "quick_gelu": uses_quick_gelu(clip),
    }
    wrong = {k: (getattr(config, k), v) for k, v in actual.items() if getattr(config, k) != v}
    if wrong:
        details = ", ".join(f"{k}: config {a!r} vs backbone {b!r}" for k, (a, b) in wrong.items())
        raise CheckpointError(
            f"The prompts' config does not match backbone '{config.backbone}' ({details}). Load them with "
            "the backbone they were trained on."
        )
    if len(clip.transformer.resblocks) < config.deep_prompt_depth:
        raise CheckpointError(
            f"deep_prompt_depth={config.deep_prompt_depth} exceeds the backbone's {len(clip.transformer.resblocks)} text blocks."
        )
    patch = int(clip.visual.patch_size[0])
    if config.image_size % patch:
        raise InvalidInputError(
            f"image_size={config.image_size} is not a multiple of the patch size {patch} "
            f"(e.g. {round(config.image_size / patch) * patch})."
        )
