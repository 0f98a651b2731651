"""The model configuration: a small, flat, typed record that round-trips through ``config.json``."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import operator
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import CheckpointError, InvalidInputError

__all__ = [
    "AnomalyCLIPConfig",
    "FORMAT_VERSION",
    "DEFAULT_BACKBONE",
    "DPAM_MODES",
    "INFERENCE_OPTIONS",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "OPENAI_MEAN",
    "OPENAI_STD",
    "default_dpam_layers",
]

#: File names of a saved model (``save_pretrained`` / ``from_pretrained``).
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
#: CLIP's image normalization (OpenAI), the default of ``AnomalyCLIPConfig.mean`` / ``std``.
OPENAI_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

#: Version of the ``config.json`` + ``model.safetensors`` format written by ``save_pretrained``.
#: 2 added ``thresholds`` and ``trained_on``; version-1 files load (both read as None).
#: 3 added ``threshold_mode`` (the decision mode the thresholds were chosen in); version-2
#: thresholds load without one and are applied as before.
FORMAT_VERSION = 3
#: Fields added by each format version (a file of an older version cannot hold them).
_ADDED_IN = {2: ("thresholds", "trained_on"), 3: ("threshold_mode",)}
#: Options that change what the model outputs for an image (``AnomalyCLIP.reconfigure``).
INFERENCE_OPTIONS = ("image_size", "feature_layers", "dpam_layers", "dpam_mode", "sigma")
#: The paper's backbone: OpenAI CLIP ViT-L/14 at 336 px, in open_clip's Hub format.
DEFAULT_BACKBONE = "hf-hub:timm/vit_large_patch14_clip_336.openai"
#: Attention used by DPAM's second stream: value-value (the paper's choice), query-query, key-key.
DPAM_MODES = ("vv", "qq", "kk")

# The paper applies DPAM to the last 19 of ViT-L/14's 24 blocks.
_PAPER_DPAM_LAYERS, _PAPER_DEPTH = 19, 24


def default_dpam_layers(depth: int) -> int:
    """Number of final vision blocks that get DPAM for a backbone of ``depth`` blocks.

    19 for the paper's 24-block ViT-L/14, scaled proportionally (rounded half up) otherwise,
    e.g. 10 of 12 blocks for a ViT-B.
    """
    return min(depth, max(1, math.floor(depth * _PAPER_DPAM_LAYERS / _PAPER_DEPTH + 0.5)))


@dataclass(frozen=True)
class AnomalyCLIPConfig:
    """Everything needed to rebuild an AnomalyCLIP model around its learned prompts.

    Attributes:
        backbone: open_clip model reference (``hf-hub:org/repo`` or ``local-dir:/path``).
        quick_gelu: whether the backbone's MLPs use QuickGELU (True for OpenAI CLIP weights);
            recorded so that a load can never silently switch the activation.
        image_size: processing size S in pixels; images are squashed to S x S (518 in the paper).
        feature_layers: 1-based vision blocks whose patch tokens make the anomaly map
            (``(24,)`` by default; the multi-layer variant uses ``(6, 12, 18, 24)``).
        dpam_layers: number of final vision blocks with DPAM (19 of 24 in the paper).
        dpam_mode: DPAM attention: ``"vv"`` (paper), ``"qq"`` or ``"kk"``.
        sigma: standard deviation, in pixels of the S x S map, of the final Gaussian blur.
        temperature: fixed softmax temperature of the similarity logits (0.07).
        n_ctx: learned context tokens per prompt (12).
        deep_prompt_length: learned tokens inserted in the text encoder's deeper blocks (4).
        deep_prompt_depth: text blocks up to which deep prompts are inserted (9: blocks 2..9).
        text_width: width of the text transformer (768 for ViT-L/14); checked on load.
        embed_dim: joint embedding dimension (768 for ViT-L/14); checked on load.
        vision_layers: depth of the vision transformer (24 for ViT-L/14); checked on load.
        mean, std: per-channel normalization of images in [0, 1].
        thresholds: decision thresholds ``{"image": float | None, "pixel": float | None}`` set by
            ``AnomalyCLIP.calibrate`` or by assigning ``model.thresholds``; None when unset. The
            pixel threshold is on the map's scale, [0, len(feature_layers)].
        threshold_mode: the decision mode the thresholds were chosen in
            (:class:`anomalyclip.predictor.DecisionMode` as a dict: processing size, output
            layers, DPAM, sigma, tiling, references fingerprint, backbone); ``predict`` never
            applies thresholds chosen in another mode. None for thresholds of a version-2 file.
        trained_on: what the prompts were trained on (e.g. ``"VisA"``), when known; shown in the
            model card.
        format_version: version of the saved format.
        extra: free-form metadata (e.g. ``extra["training"]`` after ``finetune``).
    """

    backbone: str = DEFAULT_BACKBONE
    quick_gelu: bool = True
    image_size: int = 518
    feature_layers: tuple[int, ...] = (24,)
    dpam_layers: int = 19
    dpam_mode: str = "vv"
    sigma: float = 4.0
    temperature: float = 0.07
    n_ctx: int = 12
    deep_prompt_length: int = 4
    deep_prompt_depth: int = 9
    text_width: int = 768
    embed_dim: int = 768
    vision_layers: int = 24
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    thresholds: dict[str, float | None] | None = None
    threshold_mode: dict[str, Any] | None = None
    trained_on: str | None = None
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Frozen: a change goes through ``replace`` (or ``AnomalyCLIP.reconfigure``), which validates
        # it and lets the model drop what the change invalidates (thresholds, references).
        set_ = functools.partial(object.__setattr__, self)
        set_("feature_layers", _int_tuple(self.feature_layers, "feature_layers"))
        set_("mean", _float_tuple(self.mean, "mean"))
        set_("std", _float_tuple(self.std, "std"))
        set_("thresholds", _threshold_dict(self.thresholds))
        if self.threshold_mode is not None and not isinstance(self.threshold_mode, Mapping):
            raise InvalidInputError(f"threshold_mode must be a mapping or None, got {self.threshold_mode!r}.")
        if self.threshold_mode is not None:
            set_("threshold_mode", dict(self.threshold_mode))
        self.validate()
        # Plain Python numbers (numpy scalars would not serialize to JSON).
        for name in ("image_size", "dpam_layers", "n_ctx", "deep_prompt_length", "deep_prompt_depth",
                     "text_width", "embed_dim", "vision_layers", "format_version"):
            set_(name, int(getattr(self, name)))
        set_("sigma", float(self.sigma))
        set_("temperature", float(self.temperature))

    @property
    def n_deep_prompts(self) -> int:
        """Number of deep prompt tensors (``deep_prompt_depth - 1``: blocks 2..depth get one each)."""
        return self.deep_prompt_depth - 1

    @property
    def first_dpam_layer(self) -> int:
        """1-based index of the first vision block with DPAM (6 for the paper's ViT-L/14)."""
        return self.vision_layers - self.dpam_layers + 1

    def validate(self) -> None:
        """Check types and consistency; raise :class:`InvalidInputError` naming the bad field."""
        for name in ("image_size", "dpam_layers", "n_ctx", "deep_prompt_length", "deep_prompt_depth",
                     "text_width", "embed_dim", "vision_layers", "format_version"):
            value = getattr(self, name)
            if not _is_int(value):
                raise InvalidInputError(f"{name} must be an int, got {value!r} ({type(value).__name__}).")
        for name in ("sigma", "temperature"):
            value = getattr(self, name)
            if not _is_real(value):
                raise InvalidInputError(f"{name} must be a number, got {value!r} ({type(value).__name__}).")
        if not isinstance(self.quick_gelu, bool):
            raise InvalidInputError(f"quick_gelu must be True or False, got {self.quick_gelu!r}.")
        for name in ("backbone", "dpam_mode"):
            if not isinstance(getattr(self, name), str):
                raise InvalidInputError(f"{name} must be a string, got {getattr(self, name)!r}.")
        if self.trained_on is not None and not isinstance(self.trained_on, str):
            raise InvalidInputError(f"trained_on must be a string or None, got {self.trained_on!r}.")
        if not isinstance(self.extra, dict):
            raise InvalidInputError(f"extra must be a dict, got {type(self.extra).__name__}.")
        if self.image_size <= 0:
            raise InvalidInputError(f"image_size must be a positive int, got {self.image_size!r}.")
        if not self.feature_layers:
            raise InvalidInputError("feature_layers must name at least one vision block, e.g. (24,).")
        bad = [i for i in self.feature_layers if not 1 <= i <= self.vision_layers]
        if bad or len(set(self.feature_layers)) != len(self.feature_layers):
            raise InvalidInputError(
                f"feature_layers must be distinct 1-based block indices in 1..{self.vision_layers}, "
                f"got {list(self.feature_layers)}."
            )
        if not 0 <= self.dpam_layers <= self.vision_layers:
            raise InvalidInputError(f"dpam_layers must be in 0..{self.vision_layers}, got {self.dpam_layers}.")
        if self.dpam_mode not in DPAM_MODES:
            raise InvalidInputError(f"dpam_mode must be one of {DPAM_MODES}, got {self.dpam_mode!r}.")
        if not (self.sigma >= 0 and math.isfinite(self.sigma)):
            raise InvalidInputError(f"sigma must be a finite number >= 0, got {self.sigma!r}.")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise InvalidInputError(f"temperature must be > 0, got {self.temperature!r}.")
        if self.n_ctx < self.deep_prompt_length:
            raise InvalidInputError("deep_prompt_length cannot exceed n_ctx.")
        if self.deep_prompt_depth < 1:
            raise InvalidInputError(f"deep_prompt_depth must be >= 1, got {self.deep_prompt_depth}.")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise InvalidInputError("mean and std must be 3 numbers each, std > 0.")

    def replace(self, **changes: Any) -> "AnomalyCLIPConfig":
        """A copy with some fields changed (``None`` values are ignored), validated.

        To set a field to None (``thresholds``, ``trained_on``), use :func:`dataclasses.replace`.
        """
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise InvalidInputError(f"Unknown config field(s) {unknown}; known fields: {sorted(names)}.")
        changes = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    def to_json(self) -> str:
        """Sorted, indented JSON, as written to ``config.json``."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> "AnomalyCLIPConfig":
        """Build from a dict read from ``config.json``.

        Files of an older format version are read and upgraded (fields added since are None).
        Unknown keys, newer formats and invalid values are :class:`CheckpointError` naming
        ``source``.
        """
        if not isinstance(data, Mapping):
            raise CheckpointError(f"{source}: expected a JSON object, got {type(data).__name__}.")
        version = data.get("format_version")
        if version is None:
            raise CheckpointError(f"{source}: missing 'format_version'; this is not an anomalyclip config.json.")
        if not _is_int(version) or version < 1:
            raise CheckpointError(f"{source}: format_version must be a positive int, got {version!r}.")
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"{source}: format_version {version} is newer than this library supports ({FORMAT_VERSION}). "
                "Upgrade anomalyclip (pip install -U anomalyclip)."
            )
        names = {f.name for f in dataclasses.fields(cls)}
        too_new = {key for added, keys in _ADDED_IN.items() if version < added for key in keys}
        unknown = sorted(set(data) - (names - too_new))
        if unknown:
            raise CheckpointError(
                f"{source}: unknown keys {unknown} for format_version {version}. Known keys: {sorted(names - too_new)}."
            )
        try:
            return cls(**{**dict(data), "format_version": FORMAT_VERSION})
        except InvalidInputError as exc:
            raise CheckpointError(f"{source}: {exc} Fix the value in the file or save the model again.") from exc


def _is_int(value: Any) -> bool:
    """An integer that is not a bool (numpy integers included)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    """A real number that is not a bool (numpy floats included)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _int_tuple(values: Any, name: str) -> tuple[int, ...]:
    """``values`` as a tuple of ints; floats, bools and strings are refused (never truncated)."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise InvalidInputError(f"{name} must be a sequence of ints, e.g. (24,) or [6, 12, 18, 24]; got {values!r}.")
    items = list(values)
    if not all(_is_int(v) for v in items):
        raise InvalidInputError(f"{name} must hold ints (1-based block indices), got {items!r}.")
    return tuple(operator.index(v) for v in items)


def _float_tuple(values: Any, name: str) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise InvalidInputError(f"{name} must be 3 numbers (R, G, B), got {values!r}.")
    items = list(values)
    if not all(_is_real(v) and math.isfinite(v) for v in items):
        raise InvalidInputError(f"{name} must be 3 finite numbers (R, G, B), got {items!r}.")
    return tuple(float(v) for v in items)


def _threshold_dict(value: Any) -> dict[str, float | None] | None:
    """``None`` or ``{"image": float | None, "pixel": float | None}`` (both None -> None).

    Accepts any mapping with those keys, or an object with ``image`` / ``pixel`` attributes (an
    :class:`anomalyclip.eval.thresholds.Thresholds`).
    """
    if value is None:
        return None
    if not isinstance(value, Mapping):
        if hasattr(value, "image") and hasattr(value, "pixel"):
            value = {"image": value.image, "pixel": value.pixel}
        else:
            raise InvalidInputError(
                f"thresholds must be None or {{'image': float | None, 'pixel': float | None}}, got {value!r}."
            )
    unknown = sorted(set(value) - {"image", "pixel"})
    if unknown:
        raise InvalidInputError(f"thresholds: unknown keys {unknown}; expected only 'image' and 'pixel'.")
    out: dict[str, float | None] = {}
    for key in ("image", "pixel"):
        v = value.get(key)
        if v is not None and not (_is_real(v) and math.isfinite(v)):
            raise InvalidInputError(f"thresholds['{key}'] must be a finite number or None, got {v!r}.")
        out[key] = None if v is None else float(v)
    return None if out["image"] is None and out["pixel"] is None else out
