"""``AnomalyCLIP``: the model, its tensor API (``preprocess`` -> ``forward``) and ``predict``."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .backbone import check_clip, clip_preprocess_cfg, load_clip, uses_quick_gelu
from .config import (
    CONFIG_NAME,
    DEFAULT_BACKBONE,
    OPENAI_MEAN,
    OPENAI_STD,
    WEIGHTS_NAME,
    AnomalyCLIPConfig,
    default_dpam_layers,
)
from .errors import BackboneError, CheckpointError, InvalidInputError
from .hub import hub_download, is_repo_id
from .official import convert_official_state_dict, load_official_state_dict
from .outputs import AnomalyOutput, AnomalyResult
from .presets import DEFAULT_PRESET, PRESETS, OfficialPreset, fetch_official_checkpoint, get_preset
from .prefetch import default_num_workers, prefetch_batches, stack_batch
from .preprocessing import ImageInput, PreparedImage, check_image_size, prepare_image, preprocess_image
from .prompts import PROMPT_KEYS, PromptLearner, encode_prompts, tokenize_prompts
from .files import atomic_path, atomic_write, cache_root
from .runtime import resolve_device, resolve_dtype
from .scoring import anomaly_maps, image_scores
from .eval.thresholds import Thresholds
from .vision import encode_image

__all__ = ["AnomalyCLIP", "CONFIG_NAME", "WEIGHTS_NAME"]

logger = logging.getLogger(__name__)



def _is_image_list(images: Any) -> bool:
    return isinstance(images, (list, tuple))


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
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        quick_gelu: bool | None = None,
    ) -> "AnomalyCLIP":
        """Load a model: a preset name, a local directory, or a Hugging Face Hub repo id.

        Args:
            name_or_path: ``None`` (the default preset, the official prompts trained on VisA),
                a preset name (see :data:`anomalyclip.presets.PRESETS`), a directory written by
                :meth:`save_pretrained`, or a Hub repo id holding ``config.json`` and
                ``model.safetensors``.
            device: ``"cuda"``, ``"cpu"``, ``"mps"``...; None picks the best available.
            dtype: float32 (default), float16 or bfloat16 for the frozen CLIP.
            image_size: override the processing size S (a multiple of the patch size).
            feature_layers: override the output layers, e.g. ``(6, 12, 18, 24)``.
            revision: Hub revision (branch, tag or commit) of a repo id.
            cache_dir: Hugging Face cache directory (also used for the backbone).
            quick_gelu: override the backbone activation the saved config records (the one the
                prompts were trained with); a choice that disagrees with open_clip's pretrained
                registry is logged as a warning either way.
        """
        if name_or_path is None:
            name_or_path = DEFAULT_PRESET
        overrides = dict(
            device=device, dtype=dtype, image_size=image_size, feature_layers=feature_layers, quick_gelu=quick_gelu
        )
        if isinstance(name_or_path, OfficialPreset):
            return cls._from_preset(name_or_path, cache_dir=cache_dir, **overrides)
        if not isinstance(name_or_path, (str, os.PathLike)):
            raise InvalidInputError(f"name_or_path must be a string or path, got {type(name_or_path).__name__}.")
        name = os.fspath(name_or_path)
        if name in PRESETS:
            return cls._from_preset(name, cache_dir=cache_dir, **overrides)
        path = Path(name).expanduser()
        if path.is_dir():
            config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
            for f in (config_file, weights_file):
                if not f.is_file():
                    raise CheckpointError(
                        f"'{path}' has no {f.name}; expected a directory written by save_pretrained "
                        f"({CONFIG_NAME} + {WEIGHTS_NAME})."
                    )
        elif is_repo_id(name) and not path.exists():
            config_file = hub_download(name, CONFIG_NAME, revision=revision, cache_dir=cache_dir, what="model config")
            weights_file = hub_download(name, WEIGHTS_NAME, revision=revision, cache_dir=cache_dir, what="prompt weights")
        else:
            raise InvalidInputError(
                f"'{name}' is not a directory, a preset ({', '.join(sorted(PRESETS))}) or a Hub repo id "
                "('org/name'). Check the path."
            )
        return cls._from_files(config_file, weights_file, cache_dir=cache_dir, **overrides)

    @classmethod
    def _from_preset(
        cls,
        preset: str | OfficialPreset,
        *,
        device: str | torch.device | None,
        dtype: str | torch.dtype | None,
        image_size: int | None,
        feature_layers: Sequence[int] | None,
        quick_gelu: bool | None,
        cache_dir: str | os.PathLike | None,
    ) -> "AnomalyCLIP":
        """A preset, converted from its verified official checkpoint on first use and cached."""
        preset = get_preset(preset)
        converted = cache_root(cache_dir) / "converted" / preset.name
        if not ((converted / CONFIG_NAME).is_file() and (converted / WEIGHTS_NAME).is_file()):
            checkpoint = fetch_official_checkpoint(preset, cache_dir=cache_dir)
            cls.from_official_checkpoint(checkpoint, clip=preset.backbone, cache_dir=cache_dir, device="cpu").save_pretrained(
                converted
            )
        return cls._from_files(
            converted / CONFIG_NAME,
            converted / WEIGHTS_NAME,
            device=device,
            dtype=dtype,
            image_size=image_size,
            feature_layers=feature_layers,
            quick_gelu=quick_gelu,
            cache_dir=cache_dir,
        )

    @classmethod
    def _from_files(
        cls,
        config_file: Path,
        weights_file: Path,
        *,
        device: str | torch.device | None,
        dtype: str | torch.dtype | None,
        image_size: int | None,
        feature_layers: Sequence[int] | None,
        quick_gelu: bool | None,
        cache_dir: str | os.PathLike | None,
    ) -> "AnomalyCLIP":
        try:
            data = json.loads(Path(config_file).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"Cannot read {config_file}: {exc}") from exc
        config = AnomalyCLIPConfig.from_dict(data, source=str(config_file))
        config = config.replace(
            image_size=image_size,
            feature_layers=tuple(feature_layers) if feature_layers is not None else None,
            quick_gelu=quick_gelu,
        )
        try:
            tensors = load_file(str(weights_file))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"Cannot read {weights_file} as safetensors: {exc}") from exc
        clip = load_clip(config.backbone, quick_gelu=config.quick_gelu, cache_dir=cache_dir)
        model = cls(clip, config)
        model.load_prompts(tensors, source=str(weights_file))
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
        cache_dir: str | os.PathLike | None = None,
    ) -> "AnomalyCLIP":
        """Load an official AnomalyCLIP ``.pth`` (``{"prompt_learner": ...}``), validated against ``clip``.

        ``clip`` is a backbone reference (default: the paper's ViT-L/14@336 on the Hub) or an
        open_clip model already built; with a built model, ``backbone`` is the reference to record
        in the config so that a saved copy can be reloaded. The checkpoint is read with
        ``weights_only=True``.
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
        config = _config_for_clip(clip_model, backbone, image_size=image_size, feature_layers=feature_layers)
        config = config.replace(n_ctx=n_ctx, deep_prompt_length=deep_length, deep_prompt_depth=n_deep + 1)
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

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``config.json`` (sorted, indented) and ``model.safetensors`` (the prompts only).

        Each file is written to a temporary name and renamed, so an interrupted save never leaves a
        half-written model. Returns the directory.
        """
        if not self.config.backbone.startswith(("hf-hub:", "local-dir:")):
            logger.warning(
                "Saving a model whose backbone is recorded as %r: set model.config.backbone to the 'hf-hub:' or "
                "'local-dir:' reference of its CLIP, or from_pretrained cannot rebuild it.",
                self.config.backbone,
            )
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.prompts.state_dict().items()}
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt", "library": "anomalyclip"})
        with atomic_write(directory / CONFIG_NAME, "w") as handle:
            handle.write(self.config.to_json())
        return directory

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        commit_message: str = "Upload AnomalyCLIP prompts",
    ) -> str:
        """Save into a temporary directory and upload it to a Hub model repo in one commit.

        Returns the URL of the commit.
        """
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            (Path(tmp) / "README.md").write_text(_model_card(self.config), encoding="utf-8")
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision, commit_message=commit_message)
        return str(getattr(info, "commit_url", info))

    def reconfigure(
        self,
        *,
        image_size: int | None = None,
        feature_layers: Sequence[int] | None = None,
        sigma: float | None = None,
    ) -> "AnomalyCLIP":
        """Change inference options in place (validated); ``None`` keeps the current value. Returns self."""
        config = self.config.replace(
            image_size=image_size,
            feature_layers=tuple(feature_layers) if feature_layers is not None else None,
            sigma=sigma,
        )
        _check_config_matches_clip(config, self.clip)
        self.config = config
        return self

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

    def train(self, mode: bool = True) -> "AnomalyCLIP":
        """Only the prompts ever train; CLIP stays in eval mode."""
        super().train(mode)
        self.clip.eval()
        return self

    # ------------------------------------------------------------------ tensor API
    def preprocess(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """Images -> normalized float32 ``[B, 3, S, S]`` on the CPU (official preprocessing)."""
        items = list(images) if _is_image_list(images) else [images]
        if not items:
            raise InvalidInputError("Got an empty list of images; pass at least one image.")
        prepared = [self._prepare(img) for img in items]
        return torch.stack([self._preprocess_prepared(p) for p in prepared])

    def _prepare(self, image: ImageInput) -> PreparedImage:
        return check_image_size(prepare_image(image), self.patch_size)

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

    def forward(self, pixel_values: torch.Tensor) -> AnomalyOutput:
        """Scores and anomaly maps of preprocessed images.

        Args:
            pixel_values: ``[B, 3, S, S]`` from :meth:`preprocess` (any device; moved to the model's).
                CPU tensors are checked for NaN and infinity; tensors already on an accelerator
                are not (that would wait for the device), and non-finite values there give NaN
                outputs.

        Returns:
            :class:`AnomalyOutput` with ``scores [B]`` and ``anomaly_maps [B, S, S]`` (float32).

        On CUDA the forward never waits for the GPU: the input is copied asynchronously (from
        pinned memory truly in the background, so do not write into a pinned input before the
        outputs have been read) and converted to the model's dtype on the GPU; the outputs are
        ready when read (e.g. ``.cpu()``). The text features are computed once and cached.
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
        return AnomalyOutput(
            scores=scores,
            anomaly_maps=final,
            raw_anomaly_maps=raw,
            image_features=F.normalize(features.image_features.float(), dim=-1),
            patch_features=features.patch_features,
        )

    # ------------------------------------------------------------------ friendly API
    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        batch_size: int = 8,
        image_threshold: float | None = None,
        pixel_threshold: float | None = None,
        thresholds: Thresholds | None = None,
        progress: bool = False,
        num_workers: int | None = None,
    ) -> AnomalyResult | list[AnomalyResult]:
        """Score images and map anomalies at each image's original size.

        Args:
            images: one image or a list: file paths, PIL images, numpy arrays (HxW, HxWx3, HxWx4;
                uint8 or float in [0, 1]) or CHW tensors.
            batch_size: images per forward pass.
            image_threshold: if given, results carry ``label = score > image_threshold``.
            pixel_threshold: if given, results carry ``mask = anomaly_map > pixel_threshold``.
            thresholds: both thresholds at once, e.g. from :meth:`calibrate` or
                :class:`~anomalyclip.eval.thresholds.Thresholds` (explicit thresholds take precedence).
            progress: show a tqdm progress bar.
            num_workers: threads that load and preprocess the next batches while the model runs
                (:func:`~anomalyclip.prefetch.prefetch_batches`); None: 0 on the CPU, up to 8 on
                an accelerator (:func:`~anomalyclip.prefetch.default_num_workers`). The results
                do not depend on it.

        Returns:
            An :class:`AnomalyResult` for a single image, a list of them for a list.

        On CUDA, batches are stacked in pinned memory and copied asynchronously, and each batch's
        maps are resized and copied back before the next batch is started, so that the GPU
        always has queued work.
        """
        single = not _is_image_list(images)
        items = [images] if single else list(images)
        if not items:
            raise InvalidInputError("Got an empty list of images; pass at least one image.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidInputError(f"batch_size must be a positive int, got {batch_size!r}.")
        if thresholds is not None:
            image_threshold = thresholds.image if image_threshold is None else image_threshold
            pixel_threshold = thresholds.pixel if pixel_threshold is None else pixel_threshold
        workers = self._num_workers(num_workers)
        results: list[AnomalyResult] = []
        batches = prefetch_batches(items, self._load_and_preprocess, batch_size, num_workers=workers)
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
        """Image and pixel thresholds from images known to be normal.

        The image threshold is the ``quantile`` of their scores, the pixel threshold the
        ``quantile`` of all their map values (at the processing size S). Anything above is
        flagged: pass the result to ``predict(..., thresholds=...)``. For a labelled set use
        :meth:`anomalyclip.eval.thresholds.Thresholds.from_labelled` (F1-max) instead.
        ``num_workers`` is as for :meth:`predict`.
        """
        items = list(normal_images) if _is_image_list(normal_images) else [normal_images]
        if not items:
            raise InvalidInputError("calibrate needs at least one normal image.")
        workers = self._num_workers(num_workers)
        size = self.config.image_size
        scores = np.empty(len(items), dtype=np.float32)
        maps = np.empty((len(items), size, size), dtype=np.float32)
        batches = prefetch_batches(items, self._load_and_preprocess, batch_size, num_workers=workers)
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
        return Thresholds.from_normal(scores, maps, quantile=quantile)

    def export_onnx(
        self,
        path: str | os.PathLike,
        *,
        image_size: int | None = None,
        feature_layers: Sequence[int] | None = None,
        dtype: str = "float32",
        opset: int | None = None,
        thresholds: Thresholds | None = None,
    ) -> Path:
        """Export the model for deployment as ONNX: one file, run by :class:`anomalyclip.onnx.OnnxAnomalyCLIP`
        with onnxruntime, numpy and Pillow (no torch).

        Input ``pixel_values [B, 3, S, S]`` (float32, dynamic batch), outputs ``scores [B]`` and
        ``anomaly_maps [B, S, S]`` (blurred, as :meth:`forward`). Every option is documented at
        :func:`anomalyclip.onnx.export_onnx`. Returns the path written. Needs ``anomalyclip[onnx]``.
        """
        from .onnx.export import export_onnx

        return export_onnx(
            self, path, image_size=image_size, feature_layers=feature_layers, dtype=dtype, opset=opset, thresholds=thresholds
        )

    def finetune(self, data: Any, **options: Any):
        """Learn new prompts on auxiliary data with the paper's glocal training, in place.

        ``model.finetune(data, output_dir=..., epochs=..., ...)`` runs
        :func:`anomalyclip.train.finetune.finetune` on this model; every option and its default is
        documented there. Returns a :class:`~anomalyclip.train.finetune.TrainingHistory`.
        """
        from .train.finetune import finetune

        return finetune(self, data, **options)

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


def _model_card(config: AnomalyCLIPConfig) -> str:
    return (
        "---\nlibrary_name: anomalyclip\ntags:\n- anomaly-detection\n- zero-shot\n- clip\n---\n\n"
        "# AnomalyCLIP prompts\n\n"
        f"Learned object-agnostic prompts for the CLIP backbone `{config.backbone}`, for the "
        "[anomalyclip](https://pypi.org/project/anomalyclip/) library:\n\n"
        "```python\nfrom anomalyclip import AnomalyCLIP\nmodel = AnomalyCLIP.from_pretrained(\"<this repo>\")\n"
        "result = model.predict(\"image.png\")\n```\n"
    )
