"""Building and checking the frozen open_clip backbone.

A backbone reference is an open_clip model name with a schema: ``hf-hub:org/repo`` (config and
weights from the Hugging Face Hub, cached) or ``local-dir:/path`` (a folder in open_clip's Hub
layout: ``open_clip_config.json`` and ``open_clip_model.safetensors``). The model must be a CLIP
of the ViT family with a standard text tower (OpenAI-style CLIP and its open_clip relatives).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from .errors import BackboneError, WeightsNotFoundError
from .hub import hub_download

__all__ = [
    "load_clip",
    "check_clip",
    "uses_quick_gelu",
    "registry_quick_gelu",
    "resolve_quick_gelu",
    "clip_preprocess_cfg",
    "clip_summary",
    "backbone_fingerprint",
]

logger = logging.getLogger(__name__)

_SCHEMAS = ("hf-hub:", "local-dir:")


def uses_quick_gelu(clip: nn.Module) -> bool:
    """Whether the vision MLPs of an open_clip CLIP use QuickGELU (``x * sigmoid(1.702 x)``)."""
    act = clip.visual.transformer.resblocks[0].mlp.gelu
    return type(act).__name__ == "QuickGELU"


def registry_quick_gelu(reference: str) -> bool | None:
    """What open_clip's pretrained registry says about the activation of a backbone's weights.

    open_clip applies its QuickGELU rule only to pretrained *tags* (``create_model("ViT-L-14-336",
    pretrained="openai")``), not to ``hf-hub:`` ids, whose activation comes from the repo's
    ``open_clip_config.json`` alone (open_clip issue #771). This looks the Hub repo up among the
    registry's tags: True if it is listed with ``quick_gelu=True`` (OpenAI's weights, and others
    trained with QuickGELU), False if it is listed without, None if it is not listed. A repo the
    registry does not know whose name ends in ``.openai`` (timm's naming of OpenAI's weights) counts
    as QuickGELU. ``local-dir:`` references are unknown to the registry (None).
    """
    if not reference.startswith("hf-hub:"):
        return None
    repo_id = reference[len("hf-hub:") :].strip("/")
    from open_clip import get_pretrained_cfg, list_pretrained

    found: bool | None = None
    for model_name, tag in list_pretrained():
        cfg = get_pretrained_cfg(model_name, tag)
        if str(cfg.get("hf_hub", "")).strip("/") == repo_id:
            if cfg.get("quick_gelu", False):
                return True
            found = False
    if found is None and repo_id.rsplit("/", 1)[-1].endswith(".openai"):
        return True
    return found


def resolve_quick_gelu(reference: str, explicit: bool | None, config_flag: bool | None) -> bool:
    """The activation a backbone runs with, and a logged warning where the sources disagree.

    Rule: an explicit choice (an argument, or the ``quick_gelu`` a saved model recorded) wins;
    otherwise weights that open_clip's registry marks as QuickGELU (:func:`registry_quick_gelu`,
    e.g. every OpenAI CLIP) always run QuickGELU, whatever the backbone's own config says; otherwise
    the backbone's ``open_clip_config.json`` decides (GELU when it does not say).

    Args:
        reference: the ``hf-hub:`` / ``local-dir:`` reference.
        explicit: the caller's choice, or None.
        config_flag: ``model_cfg.quick_gelu`` of the backbone's open_clip config, None if absent.
    """
    registry = registry_quick_gelu(reference)
    name = {True: "QuickGELU", False: "GELU"}
    if explicit is not None:
        explicit = bool(explicit)
        if registry is not None and explicit != registry:
            logger.warning(
                "Backbone '%s' runs %s as asked, but open_clip's pretrained registry says its weights were "
                "trained with %s: features will differ from the original model's.",
                reference,
                name[explicit],
                name[registry],
            )
        return explicit
    if registry:
        if config_flag is False:
            logger.warning(
                "The open_clip config of '%s' says GELU, but open_clip's pretrained registry says its weights were "
                "trained with QuickGELU: using QuickGELU (pass quick_gelu=False to override).",
                reference,
            )
        elif config_flag is None:
            logger.info("'%s' has no quick_gelu in its open_clip config; its weights are QuickGELU's (registry).", reference)
        return True
    if registry is False and config_flag:
        logger.warning(
            "The open_clip config of '%s' says QuickGELU, but open_clip's pretrained registry lists its weights "
            "without it: using the config's QuickGELU (pass quick_gelu=False to override).",
            reference,
        )
    return bool(config_flag)


def clip_preprocess_cfg(clip: nn.Module) -> dict:
    """The image preprocessing an open_clip model was built with (``mean``, ``std``, ...), as open_clip
    records it on the model; ``{}`` when it records none (a CLIP built by hand)."""
    from open_clip import get_model_preprocess_cfg

    try:
        return dict(get_model_preprocess_cfg(clip))
    except AttributeError:
        return {}


def _read_open_clip_config(reference: str, cache_dir: str | os.PathLike | None) -> dict:
    """Fetch ``open_clip_config.json`` for a schema reference, mapping failures to our errors."""
    if reference.startswith("local-dir:"):
        folder = Path(reference[len("local-dir:") :]).expanduser()
        config_path = folder / "open_clip_config.json"
        if not folder.is_dir():
            raise BackboneError(f"Backbone folder not found: '{folder}' (from '{reference}').")
        if not config_path.is_file():
            raise BackboneError(
                f"'{folder}' has no open_clip_config.json; a 'local-dir:' backbone needs open_clip's Hub "
                "layout (open_clip_config.json + open_clip_model.safetensors)."
            )
        weights = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pth", ".pt")]
        if not weights:
            raise WeightsNotFoundError(f"Backbone folder '{folder}' has a config but no weights file.")
    else:
        repo_id = reference[len("hf-hub:") :]
        config_path = hub_download(repo_id, "open_clip_config.json", cache_dir=cache_dir, what="backbone config")
    try:
        return json.loads(Path(config_path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise BackboneError(f"Cannot parse the open_clip config of '{reference}': {exc}") from exc


def load_clip(
    reference: str,
    *,
    quick_gelu: bool | None = None,
    device: torch.device | str = "cpu",
    cache_dir: str | os.PathLike | None = None,
) -> nn.Module:
    """Build a frozen open_clip CLIP with its pretrained weights, in float32 and ``eval()`` mode.

    Args:
        reference: ``hf-hub:org/repo`` or ``local-dir:/path``.
        quick_gelu: force the MLP activation (True: QuickGELU, False: GELU). None: QuickGELU for
            weights open_clip's registry marks so (every OpenAI CLIP, also when the Hub config
            lacks the flag), else what the backbone's own config says (:func:`resolve_quick_gelu`;
            a disagreement is logged). Saved models always record it.
        device: where to put the weights.
        cache_dir: Hugging Face cache directory for ``hf-hub:`` downloads.

    Raises:
        BackboneError: unknown schema, missing folder, or a model this library cannot run.
        WeightsNotFoundError: the weights are not cached and cannot be downloaded.
    """
    import open_clip

    if not isinstance(reference, str) or not reference.startswith(_SCHEMAS):
        raise BackboneError(
            f"Unknown backbone reference {reference!r}. Use 'hf-hub:org/repo' (e.g. "
            "'hf-hub:timm/vit_large_patch14_clip_336.openai') or 'local-dir:/path/to/open_clip_folder'."
        )
    model_cfg = _read_open_clip_config(reference, cache_dir).get("model_cfg", {})
    if "timm_model_name" in model_cfg.get("vision_cfg", {}) or "hf_model_name" in model_cfg.get("text_cfg", {}):
        raise BackboneError(
            f"Backbone '{reference}' uses a timm vision tower or a Hugging Face text tower; AnomalyCLIP "
            "needs an open_clip CLIP of the ViT family with its native text transformer."
        )
    use_quick_gelu = resolve_quick_gelu(reference, quick_gelu, model_cfg.get("quick_gelu"))
    try:
        clip = open_clip.create_model(
            reference,
            device=device,
            precision="fp32",
            require_pretrained=True,
            cache_dir=cache_dir,
            quick_gelu=use_quick_gelu,
        )
    except (RuntimeError, FileNotFoundError) as exc:
        raise WeightsNotFoundError(
            f"Cannot load the weights of backbone '{reference}': {exc}. With no network, download the "
            "backbone once elsewhere into the Hugging Face cache or use a 'local-dir:' copy."
        ) from exc
    check_clip(clip, reference)
    if uses_quick_gelu(clip) != use_quick_gelu:  # pragma: no cover - open_clip ignored the override
        raise BackboneError(f"open_clip did not build '{reference}' with quick_gelu={use_quick_gelu}.")
    clip.eval()
    clip.requires_grad_(False)
    logger.info("Loaded backbone %s (%s)", reference, clip_summary(clip))
    return clip


def check_clip(clip: nn.Module, reference: str = "backbone") -> None:
    """Raise :class:`BackboneError` unless ``clip`` is an open_clip ViT CLIP this library can run."""
    from open_clip.model import CLIP
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    def fail(why: str) -> None:
        raise BackboneError(f"Unsupported backbone '{reference}': {why}. Use an OpenAI-style ViT CLIP.")

    if not isinstance(clip, CLIP):
        fail(f"expected an open_clip CLIP with the native text tower, got {type(clip).__name__}")
    visual = clip.visual
    if not isinstance(visual, VisionTransformer):
        fail(f"the vision tower is {type(visual).__name__}, not a VisionTransformer")
    if visual.attn_pool is not None or visual.proj is None:
        fail("attention pooling or a missing projection")
    if getattr(visual, "pool_type", "tok") != "tok":
        fail(f"vision pooling '{visual.pool_type}' (class-token pooling required)")
    for tower, blocks in (("vision", visual.transformer.resblocks), ("text", clip.transformer.resblocks)):
        for block in blocks:
            if not isinstance(block, ResidualAttentionBlock) or not isinstance(block.attn, nn.MultiheadAttention):
                fail(f"{tower} blocks of type {type(block).__name__} (standard residual attention blocks required)")
    if clip.text_pool_type != "argmax":
        fail(f"text pooling '{clip.text_pool_type}' (argmax / EOT pooling required)")
    if clip.token_embedding.num_embeddings != 49408:
        fail("a tokenizer other than CLIP's 49408-token BPE")


def clip_summary(clip: nn.Module) -> str:
    """A one-line description: depth, widths, patch size, activation."""
    v = clip.visual
    return (
        f"vision {len(v.transformer.resblocks)} blocks x {v.transformer.width}, patch {v.patch_size[0]}, "
        f"text {len(clip.transformer.resblocks)} blocks x {clip.transformer.width}, "
        f"embed {v.output_dim}, {'QuickGELU' if uses_quick_gelu(clip) else 'GELU'}"
    )


#: Elements sampled per tensor by :func:`backbone_fingerprint` (evenly strided over the flat tensor).
FINGERPRINT_SAMPLES = 4096


def backbone_fingerprint(clip: nn.Module) -> str:
    """A short, deterministic fingerprint of the weights of a CLIP's vision tower.

    ``sha256`` over every parameter of ``clip.visual`` in name order: its name, its shape and the
    sign bits of an evenly strided sample of at most :data:`FINGERPRINT_SAMPLES` elements of the
    flattened tensor; the first 16 hex digits. Sign bits survive a cast between float32, float16
    and bfloat16 and a move between devices (a tiny value that underflows keeps its sign as -0.0),
    so one backbone gives one fingerprint in every dtype and on every device; two independently
    trained or initialized backbones differ in thousands of sampled signs. It reads only the
    sample (about 4096 elements per tensor), so it is cheap on a ViT-L.

    Few-shot references record it (:class:`anomalyclip.references.ReferenceMemory`) so that patch
    tokens of one backbone are never compared with another's.
    """
    digest = hashlib.sha256(b"anomalyclip-backbone-v1")
    with torch.no_grad():
        for name, param in sorted(clip.visual.named_parameters(), key=lambda item: item[0]):
            flat = param.detach().reshape(-1)
            step = max(1, flat.numel() // FINGERPRINT_SAMPLES)
            signs = torch.signbit(flat[::step][:FINGERPRINT_SAMPLES]).cpu().numpy()
            digest.update(f"{name}:{tuple(param.shape)}:".encode())
            digest.update(signs.tobytes())
    return digest.hexdigest()[:16]
