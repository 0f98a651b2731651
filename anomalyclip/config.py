"""The model configuration: a small, flat, typed record that round-trips through ``config.json``."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import CheckpointError, InvalidInputError

__all__ = [
    "AnomalyCLIPConfig",
    "FORMAT_VERSION",
    "DEFAULT_BACKBONE",
    "DPAM_MODES",
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
FORMAT_VERSION = 1
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


@dataclass
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
        format_version: version of the saved format.
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
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.feature_layers = tuple(int(x) for x in self.feature_layers)
        self.mean = tuple(float(x) for x in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(x) for x in self.std)  # type: ignore[assignment]
        self.validate()

    @property
    def n_deep_prompts(self) -> int:
        """Number of deep prompt tensors (``deep_prompt_depth - 1``: blocks 2..depth get one each)."""
        return self.deep_prompt_depth - 1

    @property
    def first_dpam_layer(self) -> int:
        """1-based index of the first vision block with DPAM (6 for the paper's ViT-L/14)."""
        return self.vision_layers - self.dpam_layers + 1

    def validate(self) -> None:
        """Check internal consistency; raise :class:`InvalidInputError` naming the bad field."""
        if not isinstance(self.image_size, int) or self.image_size <= 0:
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
        """A copy with some fields changed (``None`` values are ignored), validated."""
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
        """Build from a dict read from ``config.json``; unknown keys and newer formats are errors."""
        if not isinstance(data, Mapping):
            raise CheckpointError(f"{source}: expected a JSON object, got {type(data).__name__}.")
        version = data.get("format_version")
        if version is None:
            raise CheckpointError(f"{source}: missing 'format_version'; this is not an anomalyclip config.json.")
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"{source}: format_version {version} is newer than this library supports ({FORMAT_VERSION}). "
                "Upgrade anomalyclip (pip install -U anomalyclip)."
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise CheckpointError(f"{source}: unknown keys {unknown}. Known keys: {sorted(names)}.")
        try:
            return cls(**dict(data))
        except TypeError as exc:
            raise CheckpointError(f"{source}: {exc}") from exc
