"""``AnomalyCLIP``: the nn.Module, its tensor API (``preprocess`` -> ``forward``) and its options.

Building (:mod:`.factory`), saving and loading (:mod:`.persistence`) and the image-level API
(:mod:`.api`: references, predict, calibrate, export, finetune) live beside it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Mapping, Sequence, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import backbone_fingerprint, check_clip
from ..decoding import ImageReadOptions
from ..config import DEFAULT_BACKBONE, INFERENCE_OPTIONS, AnomalyCLIPConfig
from ..errors import CheckpointError, InvalidInputError
from ..eval.thresholds import Thresholds
from ..options import InferenceOptions
from ..outputs import AnomalyOutput
from ..preprocessing import ImageInput, PreparedImage, check_image_size, prepare_image, preprocess_image
from ..prompts import PROMPT_KEYS, PromptLearner, encode_prompts, tokenize_prompts
from ..references import ReferenceMemory, fuse_references
from ..runtime import is_out_of_memory, out_of_memory_error
from ..scoring import anomaly_maps, image_scores
from ..vision import encode_image
from .factory import build_from_backbone, build_from_clip, build_from_official_checkpoint, check_config_matches_clip
from ..predictor.thresholds import resolve_thresholds
from .api import ImageAPI
from .predict import decision_mode
from .persistence import HubPersistence

__all__ = ["AnomalyCLIP"]

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


class AnomalyCLIP(ImageAPI, nn.Module, HubPersistence):
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
        check_config_matches_clip(config, clip)
        self.config = config
        self.clip = clip.eval().requires_grad_(False)
        self.prompts = prompts if prompts is not None else PromptLearner.from_config(config)
        self._check_prompt_shapes(self.prompts.state_dict(), "prompts")
        self.register_buffer("token_ids", tokenize_prompts(config.n_ctx, clip.context_length), persistent=False)
        self._text_cache: tuple[tuple, torch.Tensor] | None = None
        self._references: ReferenceMemory | None = None
        self._fingerprint: tuple[int, str] | None = None  # (id of the CLIP, its backbone_fingerprint)
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
        options = InferenceOptions(image_size, feature_layers, dpam_layers, dpam_mode, sigma)
        return build_from_clip(cls, clip, backbone=backbone, options=options, seed=seed)

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
        options = InferenceOptions(image_size, feature_layers, dpam_layers, dpam_mode, sigma)
        return build_from_backbone(
            cls, backbone, device=device, dtype=dtype, options=options, cache_dir=cache_dir, seed=seed, quick_gelu=quick_gelu
        )

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
        options = InferenceOptions(image_size, feature_layers, dpam_layers, dpam_mode, sigma)
        return build_from_official_checkpoint(
            cls, path, clip=clip, backbone=backbone, device=device, dtype=dtype, options=options, cache_dir=cache_dir
        )


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
        check_config_matches_clip(config, self.clip)
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
            self.config = dataclasses.replace(self.config, thresholds=None, threshold_mode=None)

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
            logger.warning("%s Until then, forward/predict raise this error.", exc, extra={"anomalyclip_stale_references": True})

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
        with few-shot references ``(0.0, 1.0)`` (the ``"standardized"`` fusion) or ``(0.0, 3 n)``
        (the ``"sum"`` fusion).

        A zero-shot map is the official sum over the output layers of each layer's anomalous
        probability, so its values lie in [0, 1] with the default single layer and in [0, 4] with
        ``(6, 12, 18, 24)``. The ``"sum"`` fusion adds each layer's nearest-neighbour cosine
        distance, in [0, 2]; the ``"standardized"`` one maps the mean standardized part into
        (0, 1), 0.5 at the normal references' mean (``docs/fewshot.md``). Use it as an overlay's
        colour range (``save_overlay(..., vmin=lo, vmax=hi)``) and to read a pixel threshold.
        """
        if self._references is not None:
            return self._references.map_range
        return (0.0, float(len(self.config.feature_layers)))

    @property
    def thresholds(self) -> Thresholds | None:
        """The decision thresholds ``predict`` applies when none are passed, or None.

        Set by :meth:`calibrate`, or assign a :class:`~anomalyclip.Thresholds`, a mapping
        ``{"image": ..., "pixel": ...}`` or None. They live in ``config.thresholds``, with the
        decision mode they belong to in ``config.threshold_mode`` (``Thresholds.mode``), so
        :meth:`save_pretrained` writes them to ``config.json`` and :meth:`from_pretrained`
        restores them. Assigned thresholds without a mode belong to the current untiled mode.
        ``predict`` in another mode (e.g. tiled) warns and applies none (``docs/thresholds.md``).
        The pixel threshold is on the map's scale (see :attr:`map_range`).
        """
        values = self.config.thresholds
        return None if values is None else Thresholds(**values, mode=self.config.threshold_mode)

    @thresholds.setter
    def thresholds(self, value: Thresholds | Mapping[str, Any] | None) -> None:
        if value is None:
            self.config = dataclasses.replace(self.config, thresholds=None, threshold_mode=None)
            return
        if not isinstance(value, (Thresholds, Mapping)):
            raise InvalidInputError(
                f"model.thresholds takes an anomalyclip.Thresholds, a mapping {{'image': ..., 'pixel': ...}} or "
                f"None, got {type(value).__name__}."
            )
        if isinstance(value, Mapping):
            values = {k: v for k, v in value.items() if k != "mode"}
            dataclasses.replace(self.config, thresholds=values)  # the config's own checks and messages
            value = Thresholds.from_dict(value)
        mode = value.mode if value.mode is not None else decision_mode(self).to_dict()
        resolve_thresholds(  # validates the values against the score range and map_range
            own=None, thresholds=Thresholds(value.image, value.pixel), image_threshold=None, pixel_threshold=None,
            map_range=self.map_range, mode=None,
        )
        self._set_thresholds(Thresholds(value.image, value.pixel), mode)

    def _set_thresholds(self, values: Thresholds, mode: Any) -> None:
        mode = mode.to_dict() if hasattr(mode, "to_dict") else dict(mode)
        self.config = dataclasses.replace(self.config, thresholds=values.to_dict(), threshold_mode=mode)
        self.__dict__.pop("_threshold_warnings", None)

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
        out = self._zero_shot_forward(pixel_values)
        if self._references is not None:
            out = self._fuse_references(out, pixel_values.shape[-1])
        return out

    def _zero_shot_forward(self, pixel_values: torch.Tensor) -> AnomalyOutput:
        """:meth:`forward` without the references."""
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
        return out

    def _fuse_references(self, out: AnomalyOutput, image_size: int) -> AnomalyOutput:
        """Add the reference part to a zero-shot output (the fusion of ``docs/fewshot.md``)."""
        memory = cast(ReferenceMemory, self._references)
        memory.check_compatible(**self._reference_settings(image_size))
        if memory.device != self.device:
            memory.to(self.device)
        distances = memory.distances(out.patch_features)  # layer -> [B, G*G]
        fused = fuse_references(
            out.scores, out.raw_anomaly_maps, distances, sigma=self.config.sigma, statistics=memory.fusion_statistics()
        )
        return dataclasses.replace(
            out,
            scores=fused.scores,
            anomaly_maps=fused.maps,
            raw_anomaly_maps=fused.raw_maps,
            reference_scores=fused.reference_scores,
            reference_maps=fused.reference_maps,
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
        if memory is not None:
            memory.check_backbone(self.backbone_fingerprint(), self.config.backbone)
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

    def _install_references(self, memory: ReferenceMemory) -> None:
        """Install a loaded profile's memory: its thresholds were chosen with it and stay."""
        memory.check_backbone(self.backbone_fingerprint(), self.config.backbone)
        self._references = memory
        self._warn_if_references_stale()

    def backbone_fingerprint(self) -> str:
        """:func:`anomalyclip.backbone.backbone_fingerprint` of the frozen CLIP (computed once)."""
        if self._fingerprint is None or self._fingerprint[0] != id(self.clip):
            self._fingerprint = (id(self.clip), backbone_fingerprint(self.clip))
        return self._fingerprint[1]

    def _set_references(self, memory: ReferenceMemory) -> None:
        """Install a grown or new memory (thresholds chosen before are dropped)."""
        memory.check_backbone(self.backbone_fingerprint(), self.config.backbone)
        self._references = memory
        self._drop_thresholds("the references changed")

    def _check_tile_size(self, tile_size: Any) -> None:
        if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < self.patch_size:
            raise InvalidInputError(
                f"tile_size must be an int of at least one patch ({self.patch_size} px), got {tile_size!r}."
            )

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"backbone={c.backbone}, image_size={c.image_size}, feature_layers={list(c.feature_layers)}, "
            f"dpam={c.dpam_mode} x {c.dpam_layers} blocks, sigma={c.sigma}"
        )

