"""``AnomalyCLIP``: the model, its tensor API (``preprocess`` -> ``forward``) and ``predict``."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import numbers
import os
import tempfile
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, cast

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .backbone import check_clip, clip_preprocess_cfg, load_clip, uses_quick_gelu
from .card import MODEL_CARD_NAME, is_generated_card, write_model_card
from .config import (
    CONFIG_NAME,
    DEFAULT_BACKBONE,
    INFERENCE_OPTIONS,
    OPENAI_MEAN,
    OPENAI_STD,
    WEIGHTS_NAME,
    AnomalyCLIPConfig,
    default_dpam_layers,
)
from .errors import BackboneError, CheckpointError, InvalidInputError
from .hub import hub_download, hub_download_if_present, is_repo_id
from .official import convert_official_state_dict, load_official_state_dict
from .outputs import AnomalyOutput, AnomalyResult
from .presets import DEFAULT_PRESET, PRESETS, OfficialPreset, fetch_official_checkpoint, get_preset, git_blob_sha1
from .prefetch import default_num_workers, prefetch_batches, stack_batch
from .decoding import ImageReadOptions
from .preprocessing import ImageInput, PreparedImage, check_image_size, prepare_image, preprocess_image
from .prompts import PROMPT_KEYS, PromptLearner, encode_prompts, tokenize_prompts
from .files import atomic_path, atomic_write, cache_root, find_images
from .references import (
    REFERENCES_NAME,
    ReferenceMemory,
    fuse_references,
    fuse_scores,
    normalize_patch_tokens,
    resolve_storage_dtype,
)
from .runtime import is_out_of_memory, out_of_memory_error, resolve_device, resolve_dtype
from .scoring import anomaly_maps, gaussian_blur, image_scores
from .tiling import TileStitcher, crop_prepared, tile_grid
from .eval.thresholds import Thresholds
from .vision import encode_image

__all__ = ["AnomalyCLIP", "CONFIG_NAME", "WEIGHTS_NAME"]

logger = logging.getLogger(__name__)



def _is_image_list(images: Any) -> bool:
    return isinstance(images, (list, tuple))


def _reports_out_of_memory(forward):
    """Decorate ``forward``: running out of memory becomes a :class:`ResourceError` naming the
    batch, size, dtype and device, and how to fit (not a deep torch stack trace)."""

    @functools.wraps(forward)
    def wrapper(self: "AnomalyCLIP", pixel_values: torch.Tensor, *args: Any, **kwargs: Any):
        try:
            return forward(self, pixel_values, *args, **kwargs)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            shape = "x".join(str(n) for n in pixel_values.shape)
            raise out_of_memory_error(
                exc,
                f"running AnomalyCLIP on pixel_values [{shape}] in {str(self.dtype).replace('torch.', '')} on "
                f"{self.device}",
                "Use a smaller batch_size (predict, calibrate, evaluate), a smaller image_size "
                "(model.reconfigure(image_size=...)), fewer feature_layers, or dtype='bfloat16' / 'float16' on a GPU.",
            ) from exc

    return wrapper


class AnomalyCLIP(nn.Module):
    """Zero-shot anomaly detection and segmentation with CLIP and learned object-agnostic prompts.

    The CLIP backbone is frozen and used in place (open_clip's own modules and weights); only the
    prompts (:class:`~anomalyclip.prompts.PromptLearner`) are learned.

    Typical use::

        model = AnomalyCLIP.from_pretrained()          # the official prompts (trained on VisA)
        result = model.predict("part.png")             # AnomalyResult(score, anomaly_map)

    Tensor use::

        pixel_values = model.preprocess(images)        # [B, 3, S, S]
        out = model(pixel_values)                       # AnomalyOutput(scores [B], anomaly_maps [B, S, S], ...)
    """

    def __init__(self, clip: nn.Module, config: AnomalyCLIPConfig, prompts: PromptLearner | None = None) -> None:
        super().__init__()
        check_clip(clip, config.backbone)
        _check_config_matches_clip(config, clip)
        self.config = config
        self.clip = clip.eval().requires_grad_(False)
        self.prompts = prompts if prompts is not None else PromptLearner.from_config(config)
        self._check_prompt_shapes(self.prompts.state_dict(), "prompts")
        self.register_buffer("token_ids", tokenize_prompts(config.n_ctx, clip.context_length), persistent=False)
        self._text_cache: tuple[tuple, torch.Tensor] | None = None
        self._references: ReferenceMemory | None = None
        self.eval()  # every constructor returns a model ready for inference; finetune switches modes itself

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_clip(
        cls,
        clip: nn.Module,
        *,
        backbone: str = "custom",
        image_size: int | None = None,
        feature_layers: Sequence[int] | None = None,
        dpam_layers: int | None = None,
        dpam_mode: str | None = None,
        sigma: float | None = None,
        seed: int | None = None,
    ) -> "AnomalyCLIP":
        """Wrap an already built open_clip CLIP, with freshly initialized prompts (normal(0, 0.02)).

        ``backbone`` is the reference recorded in the config (needed to reload a saved model).
        """
        config = _config_for_clip(
            clip,
            backbone,
            image_size=image_size,
            feature_layers=feature_layers,
            dpam_layers=dpam_layers,
            dpam_mode=dpam_mode,
            sigma=sigma,
        )
        if seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                prompts = PromptLearner.from_config(config)
        else:
            prompts = PromptLearner.from_config(config)
        return cls(clip, config, prompts.to(clip.token_embedding.weight.device))

    @classmethod
    def from_backbone(
        cls,
        backbone: str = DEFAULT_BACKBONE,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        image_size: int | None = None,
        feature_layers: Sequence[int] | None = None,
        dpam_layers: int | None = None,
        dpam_mode: str | None = None,
        sigma: float | None = None,
        cache_dir: str | os.PathLike | None = None,
        seed: int | None = None,
        quick_gelu: bool | None = None,
    ) -> "AnomalyCLIP":
        """A model on an open_clip backbone with freshly initialized prompts (the start of training).

        ``quick_gelu`` forces the backbone's MLP activation; None (default) applies the rule of
        :func:`anomalyclip.backbone.resolve_quick_gelu`: weights that open_clip's registry marks as
        QuickGELU (every OpenAI CLIP) run QuickGELU even when the Hub config lacks the flag. The
        config records the choice. The normalization (``config.mean`` / ``std``) is the backbone's own
        (its open_clip ``preprocess_cfg``).
        """
        clip = load_clip(backbone, quick_gelu=quick_gelu, cache_dir=cache_dir)
        model = cls.from_clip(
            clip,
            backbone=backbone,
            image_size=image_size,
            feature_layers=feature_layers,
            dpam_layers=dpam_layers,
            dpam_mode=dpam_mode,
            sigma=sigma,
            seed=seed,
        )
        return model.to(device=resolve_device(device), dtype=resolve_dtype(dtype))

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike | OfficialPreset | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        image_size: int | None = None,
        feature_layers: Sequence[int] | None = None,
        dpam_layers: int | None = None,
        dpam_mode: str | None = None,
        sigma: float | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        quick_gelu: bool | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
    ) -> "AnomalyCLIP":
        """Load a model, in eval mode: a preset name, a local directory, or a Hugging Face Hub repo id.

        Args:
            name_or_path: ``None`` (the default preset, the official prompts trained on VisA),
                a preset name (see :data:`anomalyclip.presets.PRESETS`), a directory written by
                :meth:`save_pretrained`, or a Hub repo id holding ``config.json`` and
                ``model.safetensors``.
            device: ``"cuda"``, ``"cpu"``, ``"mps"``...; None picks the best available.
            dtype: float32 (default), float16 or bfloat16 for the frozen CLIP.
            image_size, feature_layers, dpam_layers, dpam_mode, sigma: override the saved
                inference options (see :meth:`reconfigure`; None keeps the saved value).
            revision: Hub revision (branch, tag or commit) of a repo id.
            cache_dir: Hugging Face cache directory (also used for the backbone and presets).
            quick_gelu: override the backbone activation the saved config records (the one the
                prompts were trained with); a choice that disagrees with open_clip's pretrained
                registry is logged as a warning either way.
            token: Hub token for private or gated repos (None: the logged-in user's, if any;
                ``False``: none), as in ``huggingface_hub``.
            local_files_only: never download: use only the Hugging Face cache (a Hub repo id) or
                the preset cache; a missing file is a :class:`WeightsNotFoundError`.
            force_download: download the model's files again even when they are cached.

        ``token``, ``local_files_only`` and ``force_download`` apply to the prompts (Hub repo or
        preset). The CLIP backbone is fetched by open_clip, which follows the environment
        (``HF_TOKEN``, ``HF_HUB_OFFLINE=1``).

        Thresholds saved with the model (:meth:`calibrate`) are restored; an override that
        changes an inference option drops them with a warning (they were chosen for the saved
        options).
        """
        if name_or_path is None:
            name_or_path = DEFAULT_PRESET
        if not isinstance(local_files_only, bool) or not isinstance(force_download, bool):
            raise InvalidInputError(
                f"local_files_only and force_download must be True or False, got {local_files_only!r} and "
                f"{force_download!r}."
            )
        options = dict(
            image_size=image_size, feature_layers=feature_layers, dpam_layers=dpam_layers, dpam_mode=dpam_mode, sigma=sigma
        )
        load = dict(device=device, dtype=dtype, options=options, quick_gelu=quick_gelu, cache_dir=cache_dir)
        if isinstance(name_or_path, OfficialPreset):
            return cls._from_preset(name_or_path, local_files_only=local_files_only, force_download=force_download, **load)
        if not isinstance(name_or_path, (str, os.PathLike)):
            raise InvalidInputError(f"name_or_path must be a string or path, got {type(name_or_path).__name__}.")
        name = os.fspath(name_or_path)
        if name in PRESETS:
            return cls._from_preset(name, local_files_only=local_files_only, force_download=force_download, **load)
        path = Path(name).expanduser()
        references_file: Path | None
        if path.is_dir():
            files = {f: path / f for f in (CONFIG_NAME, WEIGHTS_NAME)}
            for f in files.values():
                if not f.is_file():
                    raise CheckpointError(
                        f"'{path}' has no {f.name}; expected a directory written by save_pretrained "
                        f"({CONFIG_NAME} + {WEIGHTS_NAME})."
                    )
            references_file = path / REFERENCES_NAME if (path / REFERENCES_NAME).is_file() else None
        elif is_repo_id(name) and not path.exists():
            hub = dict(
                revision=revision,
                cache_dir=cache_dir,
                token=token,
                local_files_only=local_files_only,
                force_download=force_download,
            )
            files = {
                CONFIG_NAME: hub_download(name, CONFIG_NAME, what="model config", **hub),
                WEIGHTS_NAME: hub_download(name, WEIGHTS_NAME, what="prompt weights", **hub),
            }
            references_file = hub_download_if_present(name, REFERENCES_NAME, what="few-shot references", **hub)
        else:
            raise InvalidInputError(
                f"'{name}' is not a directory, a preset ({', '.join(sorted(PRESETS))}) or a Hub repo id "
                "('org/name'). Check the path."
            )
        model = cls._from_files(files, **load)
        if references_file is not None:
            thresholds = model.thresholds  # a profile's thresholds were chosen with its references
            model.references = ReferenceMemory.load(references_file)
            model.thresholds = thresholds
        return model

    @classmethod
    def _from_preset(
        cls,
        preset: str | OfficialPreset,
        *,
        device: str | torch.device | None,
        dtype: str | torch.dtype | None,
        options: dict[str, Any],
        quick_gelu: bool | None,
        cache_dir: str | os.PathLike | None,
        local_files_only: bool = False,
        force_download: bool = False,
    ) -> "AnomalyCLIP":
        """A preset, converted from its verified official checkpoint on first use and cached."""
        preset = get_preset(preset)
        converted = cache_root(cache_dir) / "converted" / preset.name
        files = {f: converted / f for f in (CONFIG_NAME, WEIGHTS_NAME)}
        if force_download or not all(f.is_file() for f in files.values()):
            checkpoint = fetch_official_checkpoint(
                preset, cache_dir=cache_dir, local_files_only=local_files_only, force_download=force_download
            )
            official = cls.from_official_checkpoint(checkpoint, clip=preset.backbone, cache_dir=cache_dir, device="cpu")
            official.config = official.config.replace(trained_on=preset.trained_on)
            official.save_pretrained(converted, model_card=False)
        model = cls._from_files(
            files, device=device, dtype=dtype, options=options, quick_gelu=quick_gelu, cache_dir=cache_dir
        )
        if model.config.trained_on is None:  # converted by anomalyclip 0.1, before the field existed
            model.config = model.config.replace(trained_on=preset.trained_on)
        return model

    @classmethod
    def _from_files(
        cls,
        files: dict[str, Path],
        *,
        device: str | torch.device | None,
        dtype: str | torch.dtype | None,
        options: dict[str, Any],
        quick_gelu: bool | None,
        cache_dir: str | os.PathLike | None,
    ) -> "AnomalyCLIP":
        """Build a model from the local files of a saved model (name -> path), then apply ``options``."""
        config_file, weights_file = files[CONFIG_NAME], files[WEIGHTS_NAME]
        try:
            data = json.loads(Path(config_file).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"Cannot read {config_file}: {exc}") from exc
        config = AnomalyCLIPConfig.from_dict(data, source=str(config_file))
        config = config.replace(quick_gelu=quick_gelu)
        try:
            tensors = load_file(str(weights_file))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"Cannot read {weights_file} as safetensors: {exc}") from exc
        clip = load_clip(config.backbone, quick_gelu=config.quick_gelu, cache_dir=cache_dir)
        model = cls(clip, config)
        model.load_prompts(tensors, source=str(weights_file))
        model.reconfigure(**options)
        return model.to(device=resolve_device(device), dtype=resolve_dtype(dtype))

    @classmethod
    def from_official_checkpoint(
        cls,
        path: str | os.PathLike,
        *,
        clip: str | nn.Module = DEFAULT_BACKBONE,
        backbone: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        image_size: int | None = None,
        feature_layers: Sequence[int] | None = None,
        dpam_layers: int | None = None,
        dpam_mode: str | None = None,
        sigma: float | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> "AnomalyCLIP":
        """Load an official AnomalyCLIP ``.pth`` (``{"prompt_learner": ...}``), validated against ``clip``.

        ``clip`` is a backbone reference (default: the paper's ViT-L/14@336 on the Hub) or an
        open_clip model already built; with a built model, ``backbone`` is the reference to record
        in the config so that a saved copy can be reloaded. The checkpoint is read with
        ``weights_only=True``. A published checkpoint (one of :data:`~anomalyclip.presets.PRESETS`,
        recognized by its git blob id) records what its prompts were trained on
        (``config.trained_on``). The inference options are as in :meth:`reconfigure`.
        """
        state = load_official_state_dict(path)
        if isinstance(clip, str):
            backbone, clip_model = clip, load_clip(clip, quick_gelu=True, cache_dir=cache_dir)
        else:
            backbone, clip_model = backbone or "custom", clip
        check_clip(clip_model, backbone)
        tensors = convert_official_state_dict(state, clip_model, source=str(path))
        n_ctx = tensors["ctx_normal"].shape[0]
        n_deep, deep_length = tensors["deep_prompts"].shape[:2]
        config = _config_for_clip(
            clip_model,
            backbone,
            image_size=image_size,
            feature_layers=feature_layers,
            dpam_layers=dpam_layers,
            dpam_mode=dpam_mode,
            sigma=sigma,
        )
        config = config.replace(n_ctx=n_ctx, deep_prompt_length=deep_length, deep_prompt_depth=n_deep + 1)
        preset = next((p for p in PRESETS.values() if p.git_blob_sha1 == git_blob_sha1(path)), None)
        if preset is not None:  # a published checkpoint: record what its prompts were trained on
            config = config.replace(trained_on=preset.trained_on)
        model = cls(clip_model, config)
        model.load_prompts(tensors, source=str(path))
        return model.to(device=resolve_device(device), dtype=resolve_dtype(dtype))

    # ------------------------------------------------------------------ persistence
    def _check_prompt_shapes(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        expected = {
            "ctx_normal": (self.config.n_ctx, self.config.text_width),
            "ctx_anomalous": (self.config.n_ctx, self.config.text_width),
            "deep_prompts": (self.config.n_deep_prompts, self.config.deep_prompt_length, self.config.text_width),
        }
        missing = sorted(set(PROMPT_KEYS) - set(tensors))
        unexpected = sorted(set(tensors) - set(PROMPT_KEYS))
        if missing or unexpected:
            raise CheckpointError(
                f"{source}: missing keys {missing}, unexpected keys {unexpected}; expected exactly {list(PROMPT_KEYS)}."
            )
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                raise CheckpointError(
                    f"{source}: '{name}' has shape {list(tensors[name].shape)}, expected {list(shape)} "
                    f"(from config: n_ctx={self.config.n_ctx}, text_width={self.config.text_width})."
                )

    def load_prompts(self, tensors: dict[str, torch.Tensor], source: str = "prompts") -> None:
        """Load prompt tensors strictly: exactly the keys of :data:`PROMPT_KEYS`, right shapes, finite."""
        self._check_prompt_shapes(tensors, source)
        for name, t in tensors.items():
            if not t.is_floating_point() or not torch.isfinite(t).all():
                raise CheckpointError(f"{source}: '{name}' must be finite floating-point values.")
        self.prompts.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
        self._text_cache = None

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        model_card: bool = True,
        repo_id: str | None = None,
    ) -> Path:
        """Write the model to a directory that :meth:`from_pretrained` loads.

        Files: ``config.json`` (sorted, indented; the inference options, the thresholds and what
        the prompts were trained on), ``model.safetensors`` (the prompts only),
        ``references.safetensors`` when the model has few-shot references (see
        :meth:`add_references`; together an inspection profile) and ``README.md``,
        a model card (:mod:`anomalyclip.card`). A ``README.md`` that this library did not write is
        kept as it is. Each file is written to a temporary name and renamed, so an interrupted
        save never leaves a half-written model.

        Args:
            save_directory: the directory (created if needed).
            model_card: write ``README.md`` (default True).
            repo_id: the Hub repo id shown in the card's usage snippet (default: the directory).

        Returns:
            the directory.
        """
        if not self.config.backbone.startswith(("hf-hub:", "local-dir:")):
            logger.warning(
                "Saving a model whose backbone is recorded as %r: set model.config.backbone to the 'hf-hub:' or "
                "'local-dir:' reference of its CLIP, or from_pretrained cannot rebuild it.",
                self.config.backbone,
            )
        if self._references is not None:  # a profile whose references cannot run is never written
            self._references.check_compatible(**self._reference_settings())
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.prompts.state_dict().items()}
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt", "library": "anomalyclip"})
        references_file = directory / REFERENCES_NAME
        if self._references is not None:
            self._references.save(references_file)
        elif references_file.exists():
            references_file.unlink()  # never leave another profile's references beside these prompts
        with atomic_write(directory / CONFIG_NAME, "w") as handle:
            handle.write(self.config.to_json())
        if model_card:
            write_model_card(directory, self.config, location=repo_id or os.fspath(save_directory))
        return directory

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        commit_message: str = "Upload AnomalyCLIP prompts",
    ) -> str:
        """Save into a temporary directory and upload it to a Hub model repo in one commit.

        Uploads ``config.json``, ``model.safetensors`` and the model card ``README.md`` (see
        :meth:`save_pretrained`), whose usage snippet names ``repo_id``. A ``README.md`` already in
        the repo that this library did not write is kept (the card is not uploaded).

        Args:
            repo_id: ``org/name``; the repo is created if needed.
            private: visibility of a newly created repo.
            token: Hub token (None: the logged-in user's), as in ``huggingface_hub``.
            revision: branch to commit to.
            commit_message: the commit's message.

        Returns:
            the URL of the commit.
        """
        from huggingface_hub import HfApi

        if not isinstance(repo_id, str) or not is_repo_id(repo_id):
            raise InvalidInputError(f"repo_id must be 'org/name' (e.g. 'my-org/anomalyclip-bottles'), got {repo_id!r}.")
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        keep_theirs = False
        if api.file_exists(repo_id, MODEL_CARD_NAME, repo_type="model", revision=revision):
            remote = api.hf_hub_download(repo_id, MODEL_CARD_NAME, repo_type="model", revision=revision)
            keep_theirs = not is_generated_card(Path(remote).read_text(encoding="utf-8", errors="replace"))
            if keep_theirs:
                logger.info("Keeping the README.md of %s: it was not written by anomalyclip.", repo_id)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, model_card=not keep_theirs, repo_id=repo_id)
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision, commit_message=commit_message)
        return str(getattr(info, "commit_url", info))

    def reconfigure(
        self,
        *,
        image_size: int | None = None,
        feature_layers: Sequence[int] | None = None,
        dpam_layers: int | None = None,
        dpam_mode: str | None = None,
        sigma: float | None = None,
    ) -> "AnomalyCLIP":
        """Change inference options in place (validated); ``None`` keeps the current value.

        Args:
            image_size: processing size S in pixels, a multiple of the patch size.
            feature_layers: 1-based vision blocks whose patch tokens make the map, e.g.
                ``(6, 12, 18, 24)``; the map's values then lie in [0, len(feature_layers)].
            dpam_layers: number of final vision blocks with DPAM (0..depth).
            dpam_mode: DPAM attention, ``"vv"``, ``"qq"`` or ``"kk"``.
            sigma: standard deviation of the final Gaussian blur, in pixels of the S x S map
                (0: no blur).

        Thresholds on the model (:attr:`thresholds`) were chosen for the old outputs: when an
        option changes, they are dropped with a warning; calibrate again.

        Returns:
            self.
        """
        config = self.config.replace(
            image_size=image_size,
            feature_layers=feature_layers,
            dpam_layers=dpam_layers,
            dpam_mode=dpam_mode,
            sigma=sigma,
        )
        _check_config_matches_clip(config, self.clip)
        changed = [name for name in INFERENCE_OPTIONS if getattr(config, name) != getattr(self.config, name)]
        self.config = config
        if changed:
            self._drop_thresholds(f"{', '.join(changed)} changed")
        self._warn_if_references_stale()
        return self

    def _drop_thresholds(self, reason: str) -> None:
        """Forget the thresholds (with a warning): they were chosen for outputs that ``reason`` changed."""
        if self.config.thresholds is not None:
            logger.warning(
                "Dropping the model's thresholds %s: they were chosen before %s. Run model.calibrate(...) again "
                "(or set model.thresholds).",
                self.config.thresholds,
                reason,
            )
            self.config = dataclasses.replace(self.config, thresholds=None)

    def _reference_settings(self, image_size: int | None = None) -> dict[str, Any]:
        """The settings a reference memory must share with this model (``check_compatible`` keywords)."""
        c = self.config
        return dict(
            image_size=c.image_size if image_size is None else image_size,
            feature_layers=c.feature_layers,
            embed_dim=c.embed_dim,
            dpam_layers=c.dpam_layers,
            dpam_mode=c.dpam_mode,
        )

    def _warn_if_references_stale(self) -> None:
        if self._references is None:
            return
        try:
            self._references.check_compatible(**self._reference_settings())
        except InvalidInputError as exc:
            logger.warning("%s Until then, forward/predict raise this error.", exc)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.clip.visual.conv1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.clip.visual.conv1.weight.dtype

    @property
    def patch_size(self) -> int:
        return int(self.clip.visual.patch_size[0])

    @property
    def map_range(self) -> tuple[float, float]:
        """``(0.0, n)``: the range of anomaly-map values for ``n = len(config.feature_layers)``;
        ``(0.0, 3 n)`` with few-shot references.

        A zero-shot map is the official sum over the output layers of each layer's anomalous
        probability, so its values lie in [0, 1] with the default single layer and in [0, 4] with
        ``(6, 12, 18, 24)``. With references, each layer adds its nearest-neighbour cosine
        distance, in [0, 2] (``docs/fewshot.md``). Use it as an overlay's colour range
        (``save_overlay(..., vmin=lo, vmax=hi)``) and to read a pixel threshold.
        """
        n = float(len(self.config.feature_layers))
        return (0.0, 3.0 * n if self._references is not None else n)

    @property
    def thresholds(self) -> Thresholds | None:
        """The decision thresholds ``predict`` applies when none are passed, or None.

        Set by :meth:`calibrate`, or assign a :class:`~anomalyclip.Thresholds`, a mapping
        ``{"image": ..., "pixel": ...}`` or None. They live in ``config.thresholds``, so
        :meth:`save_pretrained` writes them to ``config.json`` and :meth:`from_pretrained`
        restores them. The pixel threshold is on the map's scale (see :attr:`map_range`).
        """
        values = self.config.thresholds
        return None if values is None else Thresholds(**values)

    @thresholds.setter
    def thresholds(self, value: Thresholds | Mapping[str, float | None] | None) -> None:
        if value is not None and not isinstance(value, (Thresholds, Mapping)):
            raise InvalidInputError(
                f"model.thresholds takes an anomalyclip.Thresholds, a mapping {{'image': ..., 'pixel': ...}} or "
                f"None, got {type(value).__name__}."
            )
        self.config = dataclasses.replace(self.config, thresholds=value)

    def train(self, mode: bool = True) -> "AnomalyCLIP":
        """Only the prompts ever train; CLIP stays in eval mode."""
        super().train(mode)
        self.clip.eval()
        return self

    # ------------------------------------------------------------------ tensor API
    def preprocess(
        self, images: ImageInput | Sequence[ImageInput], *, read_options: ImageReadOptions | None = None
    ) -> torch.Tensor:
        """Images -> normalized float32 ``[B, 3, S, S]`` on the CPU (official preprocessing;
        files read as ``read_options`` say, see :class:`~anomalyclip.ImageReadOptions`)."""
        items = list(images) if _is_image_list(images) else [images]
        if not items:
            raise InvalidInputError("Got an empty list of images; pass at least one image.")
        prepared = [self._prepare(img, read_options) for img in items]
        return torch.stack([self._preprocess_prepared(p) for p in prepared])

    def _prepare(self, image: ImageInput, read_options: ImageReadOptions | None = None) -> PreparedImage:
        return check_image_size(prepare_image(image, read_options), self.patch_size)

    def _preprocess_prepared(self, prepared: PreparedImage) -> torch.Tensor:
        return preprocess_image(prepared, self.config.image_size, self.config.mean, self.config.std)

    def encode_text(self) -> torch.Tensor:
        """``[2, D]`` normalized text features (normal, anomalous); cached while the prompts are unchanged.

        When gradients are enabled and the prompts require them, the features are recomputed
        (differentiable) every call.
        """
        params = list(self.prompts.parameters())
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return encode_prompts(self.clip, self.prompts, self.token_ids)
        key = (self.device, self.dtype, tuple((p.data_ptr(), p._version) for p in params))
        if self._text_cache is None or self._text_cache[0] != key:
            with torch.no_grad():
                features = encode_prompts(self.clip, self.prompts, self.token_ids)
            self._text_cache = (key, features)
        return self._text_cache[1]

    def encode_image(self, pixel_values: torch.Tensor):
        """The DPAM vision forward: global and patch features (see :func:`anomalyclip.vision.encode_image`)."""
        return encode_image(
            self.clip.visual,
            pixel_values,
            feature_layers=self.config.feature_layers,
            dpam_layers=self.config.dpam_layers,
            dpam_mode=self.config.dpam_mode,
        )

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        if not isinstance(pixel_values, torch.Tensor):
            raise InvalidInputError(
                f"forward() takes a tensor [B, 3, S, S] (see model.preprocess), got {type(pixel_values).__name__}; "
                "for paths, PIL images or arrays use model.predict()."
            )
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise InvalidInputError(f"Expected pixel_values of shape [B, 3, S, S], got {list(pixel_values.shape)}.")
        if pixel_values.shape[0] == 0:
            raise InvalidInputError("Got an empty batch (B = 0).")
        size, patch = pixel_values.shape[-1], self.patch_size
        if pixel_values.shape[-2] != size or size % patch:
            raise InvalidInputError(
                f"Expected square images with a side that is a multiple of the patch size {patch}, got "
                f"{pixel_values.shape[-2]}x{size}. Use model.preprocess()."
            )
        if not pixel_values.is_floating_point():
            raise InvalidInputError(f"pixel_values must be floating point (normalized), got {pixel_values.dtype}.")
        # Checked on the host only: on an accelerator the check would wait for the device (a sync
        # per forward). Non-finite values there give NaN scores and maps (they reach every token).
        if pixel_values.device.type == "cpu" and not torch.isfinite(pixel_values).all():
            raise InvalidInputError("pixel_values contains NaN or infinite values.")

    @_reports_out_of_memory
    def forward(self, pixel_values: torch.Tensor) -> AnomalyOutput:
        """Scores and anomaly maps of preprocessed images.

        Args:
            pixel_values: ``[B, 3, S, S]`` from :meth:`preprocess` (any device; moved to the model's).
                CPU tensors are checked for NaN and infinity; tensors already on an accelerator
                are not (that would wait for the device), and non-finite values there give NaN
                outputs.

        Returns:
            :class:`AnomalyOutput` with ``scores [B]`` and ``anomaly_maps [B, S, S]`` (float32).
            With few-shot references (:meth:`add_references`) they are the fused score and map,
            and the output also holds the zero-shot and reference parts.

        On CUDA the forward never waits for the GPU: the input is copied asynchronously (from
        pinned memory truly in the background, so do not write into a pinned input before the
        outputs have been read) and converted to the model's dtype on the GPU; the outputs are
        ready when read (e.g. ``.cpu()``). The text features are computed once and cached.

        Raises:
            InvalidInputError: ``pixel_values`` is not a float tensor ``[B, 3, S, S]`` (or, on the
                CPU, holds NaN or infinite values).
            ResourceError: the batch does not fit in the device's memory (the message says how
                to make it fit).
        """
        self._check_pixel_values(pixel_values)
        if self.device.type == "cuda" and pixel_values.device != self.device:
            pixel_values = pixel_values.to(self.device, non_blocking=True)
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        text = self.encode_text()
        features = self.encode_image(pixel_values)
        scores = image_scores(features.image_features, text, self.config.temperature)
        raw, final = anomaly_maps(
            features.patch_features,
            text,
            temperature=self.config.temperature,
            image_size=pixel_values.shape[-1],
            sigma=self.config.sigma,
        )
        out = AnomalyOutput(
            scores=scores,
            anomaly_maps=final,
            raw_anomaly_maps=raw,
            image_features=F.normalize(features.image_features.float(), dim=-1),
            patch_features=features.patch_features,
            zero_shot_scores=scores,
            zero_shot_maps=final,
        )
        if self._references is not None:
            out = self._fuse_references(out, pixel_values.shape[-1])
        return out

    def _fuse_references(self, out: AnomalyOutput, image_size: int) -> AnomalyOutput:
        """Add the reference part to a zero-shot output (the fusion of ``docs/fewshot.md``)."""
        memory = cast(ReferenceMemory, self._references)
        memory.check_compatible(**self._reference_settings(image_size))
        if memory.device != self.device:
            memory.to(self.device)
        distances = memory.distances(out.patch_features)  # layer -> [B, G*G]
        fused = fuse_references(out.scores, out.raw_anomaly_maps, distances)
        blurred = gaussian_blur(torch.cat([fused.raw_maps, fused.reference_raw_maps]), self.config.sigma)
        b = fused.raw_maps.shape[0]
        return dataclasses.replace(
            out,
            scores=fused.scores,
            anomaly_maps=blurred[:b],
            raw_anomaly_maps=fused.raw_maps,
            reference_scores=fused.reference_scores,
            reference_maps=blurred[b:],
        )

    # ------------------------------------------------------------------ few-shot references
    @property
    def references(self) -> ReferenceMemory | None:
        """The few-shot reference memory (None when zero-shot). Assign a
        :class:`~anomalyclip.references.ReferenceMemory` or None to replace it; replacing it drops
        the model's :attr:`thresholds` with a warning, as :meth:`add_references` does."""
        return self._references

    @references.setter
    def references(self, memory: ReferenceMemory | None) -> None:
        if memory is not None and not isinstance(memory, ReferenceMemory):
            raise InvalidInputError(
                f"model.references takes an anomalyclip.references.ReferenceMemory or None, got {type(memory).__name__}."
            )
        memory = memory if memory is None or len(memory) else None
        if memory is not self._references:
            self._references = memory
            self._drop_thresholds("the references changed")
        self._warn_if_references_stale()

    @property
    def num_references(self) -> int:
        """How many normal reference images are in the memory (0: zero-shot)."""
        return 0 if self._references is None else self._references.num_images

    def clear_references(self) -> None:
        """Forget the few-shot references: the model is zero-shot again.

        Thresholds (:attr:`thresholds`) chosen with the references are dropped with a warning.
        """
        if self._references is not None:
            self._references = None
            self._drop_thresholds("the references were cleared")

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
        items = self._reference_items(images)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidInputError(f"batch_size must be a positive int, got {batch_size!r}.")
        if tile_size is not None:
            self._check_tile_size(tile_size)
            tile_grid(tile_size, tile_size, tile_size, tile_overlap)  # validates the overlap
        memory = self._references
        if memory is None:
            memory = ReferenceMemory(
                image_size=self.config.image_size,
                feature_layers=self.config.feature_layers,
                backbone=self.config.backbone,
                storage_dtype=storage_dtype if storage_dtype is not None else torch.float32,
                tile_size=tile_size,
                tile_overlap=tile_overlap if tile_size is not None else None,
                dpam_layers=self.config.dpam_layers,
                dpam_mode=self.config.dpam_mode,
            )
        else:
            memory.check_compatible(**self._reference_settings())
            if memory.tile_size != tile_size:
                raise InvalidInputError(
                    f"The memory holds references taken with tile_size={memory.tile_size}; these would be taken with "
                    f"tile_size={tile_size}. Use the same tiling, or call model.clear_references() first."
                )
            if storage_dtype is not None and resolve_storage_dtype(storage_dtype) != memory.storage_dtype:
                raise InvalidInputError(
                    f"The memory stores {memory.storage_dtype}; call model.clear_references() to change the storage dtype."
                )
        tokens: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.config.feature_layers}

        def collect(pixel_values: torch.Tensor) -> None:
            features = self.encode_image(pixel_values.to(device=self.device, dtype=self.dtype))
            for layer in self.config.feature_layers:
                t = normalize_patch_tokens(features.patch_features[layer])
                tokens[layer].append(t.reshape(-1, t.shape[-1]))

        from tqdm.auto import tqdm

        with torch.inference_mode():
            if tile_size is None:
                for start in tqdm(range(0, len(items), batch_size), desc="references", unit="batch", disable=not progress):
                    collect(self.preprocess(items[start : start + batch_size]))
            else:
                for item in tqdm(items, desc="references", unit="img", disable=not progress):
                    prepared = self._prepare(item)
                    tiles = tile_grid(*prepared.size, tile_size, tile_overlap).tiles
                    for start in range(0, len(tiles), batch_size):
                        chunk = tiles[start : start + batch_size]
                        collect(torch.stack([self._preprocess_prepared(crop_prepared(prepared, t)) for t in chunk]))
            memory.add({k: torch.cat(v) for k, v in tokens.items()}, num_images=len(items), coreset=coreset, seed=seed)
        self._references = memory
        self._drop_thresholds("the references changed")
        logger.info("References: %r", memory)
        return memory.num_images

    def _reference_items(self, images: Any) -> list[ImageInput]:
        """The images of ``add_references``: folders (searched recursively) expand to their image files."""
        given = list(images) if _is_image_list(images) else [images]
        items: list[ImageInput] = []
        for item in given:
            if isinstance(item, (str, os.PathLike)) and Path(item).is_dir():
                found = find_images(item)
                if not found:
                    raise InvalidInputError(f"No image files in folder '{item}' (searched recursively).")
                items.extend(found)
            else:
                items.append(item)
        if not items:
            raise InvalidInputError("add_references got no images; pass at least one normal image.")
        return items

    def _check_tile_size(self, tile_size: Any) -> None:
        if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < self.patch_size:
            raise InvalidInputError(
                f"tile_size must be an int of at least one patch ({self.patch_size} px), got {tile_size!r}."
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
        read_options: ImageReadOptions | None = None,
    ) -> AnomalyResult | list[AnomalyResult]:
        """Score images and map anomalies at each image's original size.

        Scores lie in [0, 1]. Map values lie in :attr:`map_range`, [0, len(feature_layers)]: the
        official sum over the output layers of each layer's anomalous probability ([0, 1] with
        the default single layer). A pixel threshold is on that scale.

        Args:
            images: one image or a list: file paths (8, 16 or 32 bits, EXIF orientation applied:
                see ``read_options``), PIL images, numpy arrays (HxW, HxWx3, HxWx4; uint8, uint16
                scaled by 65535, or float in [0, 1]) or CHW tensors.
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
            read_options: how files are read (EXIF orientation, 16-bit scaling, pixel limit):
                an :class:`~anomalyclip.ImageReadOptions`; None: its defaults. Maps are at the
                size of the image as read (after EXIF orientation).

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
        _check_batch_size(batch_size)
        image_threshold, pixel_threshold = self._decision_thresholds(thresholds, image_threshold, pixel_threshold)
        workers = self._num_workers(num_workers)
        if tile_size is not None:
            return self._predict_tiled(
                items, single, tile_size, tile_overlap, batch_size, image_threshold, pixel_threshold, progress, read_options
            )
        results: list[AnomalyResult] = []
        load = functools.partial(self._load_and_preprocess, read_options=read_options)
        batches = prefetch_batches(items, load, batch_size, num_workers=workers)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=(len(items) + batch_size - 1) // batch_size, desc="AnomalyCLIP", unit="batch")
        pending: _StagedBatch | None = None
        try:
            with torch.inference_mode():
                start = 0
                for batch in batches:
                    chunk, start = items[start : start + len(batch)], start + len(batch)
                    paths = [os.fspath(x) if isinstance(x, (str, os.PathLike)) else None for x in chunk]
                    pixel_values = stack_batch([t for _, t in batch], pin_memory=self.device.type == "cuda")
                    staged = _StagedBatch.stage(self(pixel_values), [size for size, _ in batch], paths)
                    if pending is not None:  # the GPU already runs this batch while we read the last one
                        results.extend(pending.results(image_threshold, pixel_threshold))
                    pending = staged
                    if bar is not None:
                        bar.update(1)
                if pending is not None:
                    results.extend(pending.results(image_threshold, pixel_threshold))
        finally:
            batches.close()
            if bar is not None:
                bar.close()
        return results[0] if single else results

    def _num_workers(self, num_workers: int | None) -> int:
        if num_workers is None:
            return default_num_workers(self.device)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise InvalidInputError(f"num_workers must be an int >= 0 or None, got {num_workers!r}.")
        return num_workers

    def _load_and_preprocess(
        self, image: ImageInput, read_options: ImageReadOptions | None = None
    ) -> tuple[tuple[int, int], torch.Tensor]:
        """(original (height, width), ``[3, S, S]`` float32): one image's work on a prefetch worker."""
        prepared = self._prepare(image, read_options)
        return prepared.size, self._preprocess_prepared(prepared)

    def _decision_thresholds(
        self,
        thresholds: Thresholds | Literal[False] | None,
        image_threshold: float | None,
        pixel_threshold: float | None,
    ) -> tuple[float | None, float | None]:
        """The ``(image, pixel)`` thresholds ``predict`` applies (see its docstring)."""
        for name, value in (("image_threshold", image_threshold), ("pixel_threshold", pixel_threshold)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            ):
                raise InvalidInputError(f"{name} must be a finite number or None, got {value!r}.")
        if thresholds is None:
            thresholds = self.thresholds
        elif thresholds is False:
            thresholds = None
        elif not isinstance(thresholds, Thresholds):
            raise InvalidInputError(
                "thresholds must be an anomalyclip.Thresholds, None (the model's own thresholds) or False "
                f"(none), got {thresholds!r}."
            )
        if thresholds is not None:
            image_threshold = thresholds.image if image_threshold is None else image_threshold
            pixel_threshold = thresholds.pixel if pixel_threshold is None else pixel_threshold
        return (
            None if image_threshold is None else float(image_threshold),
            None if pixel_threshold is None else float(pixel_threshold),
        )

    def _predict_tiled(
        self,
        items: list[ImageInput],
        single: bool,
        tile_size: int,
        tile_overlap: float,
        batch_size: int,
        image_threshold: float | None,
        pixel_threshold: float | None,
        progress: bool,
        read_options: ImageReadOptions | None = None,
    ) -> AnomalyResult | list[AnomalyResult]:
        """``predict`` with tiles: each tile through ``preprocess``/``forward``, maps blended."""
        from tqdm.auto import tqdm

        self._check_tile_size(tile_size)
        memory = self._references
        warn_scale = memory is not None and memory.tile_size != tile_size
        results: list[AnomalyResult] = []
        with torch.inference_mode():
            for item in tqdm(items, desc="AnomalyCLIP", unit="img", disable=not progress):
                prepared = self._prepare(item, read_options)
                grid = tile_grid(*prepared.size, tile_size, tile_overlap)
                if warn_scale and (len(grid) > 1 or memory.tile_size is not None):
                    logger.warning(
                        "The references were taken with tile_size=%s but predict tiles with %s: test and reference "
                        "patches then have different scales. Add the references with the same tile_size.",
                        memory.tile_size,
                        tile_size,
                    )
                    warn_scale = False
                stitcher = TileStitcher(grid)
                zero_shot, reference = [], []
                tiles = grid.tiles
                for start in range(0, len(tiles), batch_size):
                    chunk = tiles[start : start + batch_size]
                    out = self(torch.stack([self._preprocess_prepared(crop_prepared(prepared, t)) for t in chunk]))
                    for i, tile in enumerate(chunk):
                        tile_map = F.interpolate(
                            out.anomaly_maps[i][None, None], size=(tile.height, tile.width), mode="bilinear", align_corners=False
                        )
                        stitcher.add(tile, tile_map[0, 0])
                    zero_shot.append(cast(torch.Tensor, out.zero_shot_scores).float())
                    if out.reference_scores is not None:
                        reference.append(out.reference_scores.float())
                score = torch.cat(zero_shot).max()
                if reference:
                    score = fuse_scores(score, torch.cat(reference).max())
                results.append(
                    AnomalyResult(
                        score=float(score),
                        anomaly_map=stitcher.result().numpy(),
                        image_threshold=image_threshold,
                        pixel_threshold=pixel_threshold,
                        path=os.fspath(item) if isinstance(item, (str, os.PathLike)) else None,
                    )
                )
        return results[0] if single else results

    def calibrate(
        self,
        normal_images: Sequence[ImageInput],
        *,
        quantile: float = 0.99,
        batch_size: int = 8,
        num_workers: int | None = None,
        read_options: ImageReadOptions | None = None,
    ) -> Thresholds:
        """Image and pixel thresholds from images known to be normal, kept on the model.

        The image threshold is the ``quantile`` of their scores (in [0, 1]), the pixel threshold
        the ``quantile`` of all their map values at the processing size S, on the map's scale
        [0, len(feature_layers)] (:attr:`map_range`). Anything above is flagged. The thresholds
        become :attr:`thresholds`: ``predict`` applies them from now on, and
        :meth:`save_pretrained` writes them to ``config.json``. For a labelled set use
        :meth:`anomalyclip.Thresholds.from_labelled` (F1-max) and assign ``model.thresholds``.
        ``num_workers`` and ``read_options`` are as for :meth:`predict`.

        Returns:
            the new :class:`~anomalyclip.Thresholds`.
        """
        items = list(normal_images) if _is_image_list(normal_images) else [normal_images]
        if not items:
            raise InvalidInputError("calibrate needs at least one normal image.")
        _check_batch_size(batch_size)
        if isinstance(quantile, bool) or not isinstance(quantile, numbers.Real) or not 0 <= quantile <= 1:
            raise InvalidInputError(f"quantile must be a number in [0, 1] (e.g. 0.99), got {quantile!r}.")
        workers = self._num_workers(num_workers)
        size = self.config.image_size
        scores = np.empty(len(items), dtype=np.float32)
        maps = np.empty((len(items), size, size), dtype=np.float32)
        load = functools.partial(self._load_and_preprocess, read_options=read_options)
        batches = prefetch_batches(items, load, batch_size, num_workers=workers)
        start = 0
        try:
            with torch.inference_mode():
                for batch in batches:
                    out = self(stack_batch([t for _, t in batch], pin_memory=self.device.type == "cuda"))
                    end = start + len(out.scores)
                    scores[start:end] = out.scores.float().cpu().numpy()
                    maps[start:end] = out.anomaly_maps.float().cpu().numpy()
                    start = end
        finally:
            batches.close()
        thresholds = Thresholds.from_normal(scores, maps, quantile=quantile)
        self.thresholds = thresholds
        return thresholds

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
        from .onnx.export import export_onnx

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
        from .train.finetune import finetune

        before = self.config
        name = _dataset_name(data)
        if name is not None:
            trained_on = name if before.trained_on in (None, name) else f"{before.trained_on}, then {name}"
            self.config = self.config.replace(trained_on=trained_on)
        self._drop_thresholds("new prompts were learned")
        prompts_before = {k: v.detach().clone() for k, v in self.prompts.state_dict().items()}
        try:
            return finetune(self, data, **options)
        except BaseException as exc:
            if all(torch.equal(prompts_before[k], v) for k, v in self.prompts.state_dict().items()):
                # Nothing was learned (e.g. a bad option): the model is as it was.
                self.config = dataclasses.replace(self.config, trained_on=before.trained_on, thresholds=before.thresholds)
            if is_out_of_memory(exc):
                raise out_of_memory_error(
                    exc,
                    f"finetuning at image_size {self.config.image_size} on {self.device}",
                    "Use a smaller batch_size or image_size, feature_cache='disk' or cache_dtype='float16' "
                    "(the feature cache), or fewer feature_layers.",
                ) from exc
            raise

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"backbone={c.backbone}, image_size={c.image_size}, feature_layers={list(c.feature_layers)}, "
            f"dpam={c.dpam_mode} x {c.dpam_layers} blocks, sigma={c.sigma}"
        )


def _to_pinned_host(x: torch.Tensor) -> torch.Tensor:
    """An asynchronous device-to-host copy of ``x`` into pinned memory (read it after a sync)."""
    out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    return out.copy_(x, non_blocking=True)


class _StagedBatch:
    """One batch's results on their way to the host: maps resized to each image's size and
    copied back asynchronously (on CUDA, into pinned memory, ordered before the next batch's
    forward on the stream); :meth:`results` waits for the copies and builds the results."""

    def __init__(self, scores: torch.Tensor, maps: list[torch.Tensor], paths: list[str | None], event: Any) -> None:
        self.scores, self.maps, self.paths, self.event = scores, maps, paths, event

    @classmethod
    def stage(cls, out: AnomalyOutput, sizes: list[tuple[int, int]], paths: list[str | None]) -> "_StagedBatch":
        maps = [
            F.interpolate(out.anomaly_maps[i][None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
            for i, size in enumerate(sizes)
        ]
        scores = out.scores.float()
        if scores.device.type != "cuda":
            return cls(scores.cpu(), [m.float().cpu() for m in maps], paths, None)
        scores, maps = _to_pinned_host(scores), [_to_pinned_host(m.float()) for m in maps]
        event = torch.cuda.Event()
        event.record()
        return cls(scores, maps, paths, event)

    def results(self, image_threshold: float | None, pixel_threshold: float | None) -> list[AnomalyResult]:
        if self.event is not None:
            self.event.synchronize()
        copy = self.event is not None  # the copies are in pinned memory: hand out ordinary arrays
        return [
            AnomalyResult(
                score=float(score),
                anomaly_map=np.array(m.numpy(), dtype=np.float32, copy=True) if copy else m.numpy().astype(np.float32, copy=False),
                image_threshold=image_threshold,
                pixel_threshold=pixel_threshold,
                path=path,
            )
            for score, m, path in zip(self.scores.tolist(), self.maps, self.paths)
        ]


def _config_for_clip(
    clip: nn.Module,
    backbone: str,
    *,
    image_size: int | None = None,
    feature_layers: Sequence[int] | None = None,
    dpam_layers: int | None = None,
    dpam_mode: str | None = None,
    sigma: float | None = None,
) -> AnomalyCLIPConfig:
    """The paper's defaults for ``clip`` (DPAM depth scaled to its depth), with overrides."""
    check_clip(clip, backbone)
    depth = len(clip.visual.transformer.resblocks)
    mean, std = _normalization_of(clip, backbone)
    return AnomalyCLIPConfig(
        backbone=backbone,
        quick_gelu=uses_quick_gelu(clip),
        vision_layers=depth,
        text_width=clip.token_embedding.embedding_dim,
        embed_dim=clip.visual.output_dim,
        feature_layers=tuple(feature_layers) if feature_layers is not None else (depth,),
        dpam_layers=default_dpam_layers(depth) if dpam_layers is None else dpam_layers,
        mean=mean,
        std=std,
    ).replace(image_size=image_size, dpam_mode=dpam_mode, sigma=sigma)


def _normalization_of(clip: nn.Module, backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
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


def _check_config_matches_clip(config: AnomalyCLIPConfig, clip: nn.Module) -> None:
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


def _check_batch_size(batch_size: Any) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive int, got {batch_size!r}.")


#: Data set names of the known layouts (``AnomalyDataset.format``), as the model card shows them.
_DATASET_NAMES = {"mvtec": "MVTec AD", "visa": "VisA"}


def _dataset_name(data: Any) -> str | None:
    """What ``data`` is called in ``config.trained_on``: "MVTec AD", "VisA", or its folder's name."""
    fmt, root = getattr(data, "format", None), getattr(data, "root", None)
    if fmt in _DATASET_NAMES:
        return _DATASET_NAMES[fmt]
    if root is not None and Path(root).name:
        return f"{Path(root).name} ({fmt} layout)" if fmt else Path(root).name
    return None
