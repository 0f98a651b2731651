"""Matrix-product FLOPs of AnomalyCLIP inference, counted from the shapes.

One multiply-add counts as 2 FLOPs. Only matrix products are counted (linear layers, the patch
convolution, the two attention products ``q k^T`` and ``P v``); layer norms, softmax, QuickGELU and
residual additions are not (they are memory-bound and small: well under 1 % of the total at the
paper's size).

Notation as in :mod:`anomalyclip.vision`: S image size, P patch size, G = S / P, N = 1 + G*G,
W vision width, L vision blocks, M MLP width, D embedding dim, F = L - dpam_layers + 1 the first
DPAM block.

What the forward of :func:`anomalyclip.vision.encode_image` computes, per image:

- ``patch_embed``: the P x P stride-P convolution, ``2 * G^2 * 3 P^2 * W``;
- ``qkv``: ``2 * N * W * 3W`` per block, except the last one, where only the class token's query is
  needed (``2 * N * W * 2W + 2 * W * W``);
- ``attention``: ``q k^T`` and ``P v``, ``2 * 2 * N^2 * W`` per block for the original path (the
  last block's original path is the class token only: ``2 * 2 * N * W``);
- ``attention_dpam``: the same ``2 * 2 * N^2 * W`` for the DPAM path of each of blocks F..L;
- ``out_proj``: ``2 * N * W^2`` per path and block (class token only for the last original path);
- ``mlp``: ``2 * 2 * N * W * M`` per block of the original stream (class token only in the last
  block; the DPAM stream has no MLP);
- ``head``: ``ln_post(z_l) @ proj`` for each output layer (``2 * N * W * D``), the global feature
  (``2 * W * D``) and the similarities to the two text features (``2 * 2 * (N + 1) * D``).

``text`` (the two prompts through the text tower, truncated at the last end-of-text token) is
computed once and cached by :class:`~anomalyclip.model.AnomalyCLIP`, so it is reported on its own and
not included in ``total``.

With ``official_style=True`` the counts are those of the straightforward forward of the official
release: every block computes all N tokens of the original stream (no class-token shortcut in the
last block).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .errors import InvalidInputError

__all__ = ["ModelDims", "count_inference_flops"]


@dataclass(frozen=True)
class ModelDims:
    """The sizes that determine the FLOPs. :meth:`from_clip` reads them off an open_clip CLIP."""

    image_size: int = 518
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    mlp_width: int = 4096
    embed_dim: int = 768
    dpam_layers: int = 19
    feature_layers: tuple[int, ...] = (24,)
    text_width: int = 768
    text_layers: int = 12
    text_mlp_width: int = 3072
    text_length: int = 17  # tokens up to the anomalous prompt's end-of-text token
    n_prompts: int = 2

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "feature_layers":
                if not value or not all(isinstance(i, int) and 1 <= i <= self.layers for i in value):
                    raise InvalidInputError(
                        f"ModelDims.feature_layers must be 1-based block indices in 1..{self.layers}, got {value!r}."
                    )
                continue
            low = 0 if f.name == "dpam_layers" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InvalidInputError(f"ModelDims.{f.name} must be an int >= {low}, got {value!r}.")
        if self.dpam_layers > self.layers:
            raise InvalidInputError(f"ModelDims.dpam_layers ({self.dpam_layers}) exceeds layers ({self.layers}).")
        if self.image_size % self.patch_size:
            raise InvalidInputError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size} "
                f"(e.g. {max(1, round(self.image_size / self.patch_size)) * self.patch_size})."
            )

    @classmethod
    def from_clip(
        cls,
        clip: Any,
        *,
        image_size: int,
        dpam_layers: int,
        feature_layers: tuple[int, ...],
        text_length: int = 17,
    ) -> "ModelDims":
        visual = clip.visual
        block = visual.transformer.resblocks[0]
        text_block = clip.transformer.resblocks[0]
        return cls(
            image_size=image_size,
            patch_size=int(visual.conv1.kernel_size[0]),
            width=int(visual.conv1.out_channels),
            layers=len(visual.transformer.resblocks),
            mlp_width=int(block.mlp.c_fc.out_features),
            embed_dim=int(visual.proj.shape[1]),
            dpam_layers=dpam_layers,
            feature_layers=tuple(feature_layers),
            text_width=int(clip.token_embedding.embedding_dim),
            text_layers=len(clip.transformer.resblocks),
            text_mlp_width=int(text_block.mlp.c_fc.out_features),
            text_length=text_length,
        )

    @classmethod
    def from_model(cls, model: Any) -> "ModelDims":
        """From an :class:`~anomalyclip.model.AnomalyCLIP` and its config."""
        c = model.config
        return cls.from_clip(
            model.clip,
            image_size=c.image_size,
            dpam_layers=c.dpam_layers,
            feature_layers=tuple(c.feature_layers),
            text_length=int(model.token_ids.argmax(dim=-1).max()) + 1,
        )


def count_inference_flops(dims: ModelDims | None = None, *, official_style: bool = False, **overrides: Any) -> dict[str, int]:
    """Matrix-product FLOPs of one image's forward, broken down (see the module docstring).

    Args:
        dims: the model sizes (default: ViT-L/14@336 at S = 518, the paper's setting); keyword
            ``overrides`` replace single fields, e.g. ``count_inference_flops(image_size=336)``.
        official_style: count the official release's forward (all tokens in the last block).

    Returns:
        ``{"patch_embed", "qkv", "attention", "attention_dpam", "out_proj", "mlp", "head",
        "total", "text"}`` in FLOPs; ``total`` is per image and excludes ``text`` (cached).
    """
    d = dims if dims is not None else ModelDims()
    if overrides:
        known = {f.name for f in dataclasses.fields(ModelDims)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise InvalidInputError(f"Unknown ModelDims field(s) {unknown}; known: {sorted(known)}.")
        d = dataclasses.replace(d, **overrides)
    grid = d.image_size // d.patch_size
    n, w, m, L = 1 + grid * grid, d.width, d.mlp_width, d.layers
    n_dpam = d.dpam_layers
    last_tokens = n if official_style else 1  # tokens of the original stream in the last block

    flops = {
        "patch_embed": 2 * grid * grid * 3 * d.patch_size**2 * w,
        "qkv": (L - 1) * 2 * n * w * 3 * w + (2 * n * w * 3 * w if official_style else 2 * n * w * 2 * w + 2 * w * w),
        "attention": (L - 1) * 2 * 2 * n * n * w + 2 * 2 * last_tokens * n * w,
        "attention_dpam": n_dpam * 2 * 2 * n * n * w,
        "out_proj": (L - 1) * 2 * n * w * w + 2 * last_tokens * w * w + n_dpam * 2 * n * w * w,
        "mlp": (L - 1) * 2 * 2 * n * w * m + 2 * 2 * last_tokens * w * m,
        "head": len(d.feature_layers) * (2 * n * w * d.embed_dim + 2 * 2 * n * d.embed_dim)
        + 2 * w * d.embed_dim
        + 2 * 2 * d.embed_dim,
    }
    flops["total"] = sum(flops.values())

    t, tw, tm = d.n_prompts * d.text_length, d.text_width, d.text_mlp_width
    per_block = 2 * t * tw * 3 * tw + 2 * 2 * d.n_prompts * d.text_length**2 * tw + 2 * t * tw * tw + 2 * 2 * t * tw * tm
    flops["text"] = d.text_layers * per_block + 2 * d.n_prompts * tw * d.embed_dim
    return flops
