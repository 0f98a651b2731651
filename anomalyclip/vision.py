"""The two-stream vision forward with DPAM, run on open_clip's own ViT modules.

Notation: B batch, N = 1 + G*G tokens, W vision width, H heads, D embedding dim, L blocks.

Blocks ``1 .. L - dpam_layers`` are standard pre-LN blocks. From block ``f = L - dpam_layers + 1``
on, each block computes, from ONE qkv projection of ``ln_1(h)``:

- the original path ``o = softmax(q k^T / sqrt(d)) v`` (then the out-projection), which with the
  MLP updates the original stream ``h``;
- the DPAM path ``a = softmax(s s^T / sqrt(d)) v`` with ``s = v`` (V-V, the paper), ``q`` or ``k``,
  which updates a second stream ``z`` with no MLP: ``z_f = h_{f-1} + a_f``, ``z_l = z_{l-1} + a_l``.

Patch features of an output layer ``l >= f`` are ``ln_post(z_l) @ proj``; of ``l < f``,
``ln_post(h_l) @ proj``. The global feature is ``h_L[:, 0] @ proj`` WITHOUT ``ln_post`` (as the
official release computes it). See REFERENCE.md, "Vision encoder with DPAM".

Work that feeds no output is skipped: the original stream's last block runs its attention for the
class token only and its MLP on the class token only; the DPAM stream has no MLP; both attention
paths of a block share one fused ``scaled_dot_product_attention`` call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["VisionFeatures", "encode_image", "resize_positional_embedding", "attention", "qkv_heads"]


@dataclass
class VisionFeatures:
    """Output of :func:`encode_image`.

    Attributes:
        image_features: ``[B, D]`` global feature (not normalized).
        patch_features: output layer (1-based) -> ``[B, N, D]`` projected tokens, class token first
            (not normalized).
    """

    image_features: torch.Tensor
    patch_features: dict[int, torch.Tensor]


def resize_positional_embedding(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """Resize a ``[1 + g*g, W]`` ViT positional table to ``[1 + grid*grid, W]``.

    The patch part is interpolated bilinearly (align_corners=False, no antialias) from the
    checkpoint's own table every time; the class position is kept.
    """
    n_patches = pos.shape[0] - 1
    src = int(round(n_patches**0.5))
    if src * src != n_patches:
        raise ValueError(f"positional embedding of {pos.shape[0]} rows is not 1 + a square grid")
    if src == grid:
        return pos
    cls_pos, patch_pos = pos[:1], pos[1:]
    patch_pos = patch_pos.reshape(1, src, src, -1).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos.float(), size=(grid, grid), mode="bilinear", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(pos.dtype)
    return torch.cat([cls_pos, patch_pos], dim=0)


def qkv_heads(attn: nn.MultiheadAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Project ``x [B, N, W]`` with the attention's packed in-projection to q, k, v ``[B, H, N, W/H]``."""
    b, n, w = x.shape
    heads = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)  # [B, N, 3W]
    qkv = qkv.view(b, n, 3, heads, w // heads).permute(2, 0, 3, 1, 4)  # [3, B, H, N, W/H]
    return qkv[0], qkv[1], qkv[2]


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[..., H, N, W/H] -> [..., N, W]``."""
    *lead, h, n, d = x.shape
    return x.transpose(-3, -2).reshape(*lead, n, h * d)


def attention(block: nn.Module, x: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
    """Standard multi-head self-attention of an open_clip block on ``x [B, N, W]`` (already ln_1'd)."""
    q, k, v = qkv_heads(block.attn, x)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return block.attn.out_proj(merge_heads(out))


def _standard_block(block: nn.Module, h: torch.Tensor, cls_only: bool = False) -> torch.Tensor:
    """A pre-LN block; with ``cls_only`` only the class token is computed (``[B, 1, W]`` out)."""
    x = block.ln_1(h)
    if cls_only:
        q, k, v = qkv_heads(block.attn, x)
        o = F.scaled_dot_product_attention(q[:, :, :1], k, v)
        h = h[:, :1] + block.ls_1(block.attn.out_proj(merge_heads(o)))
    else:
        h = h + block.ls_1(attention(block, x))
    return h + block.ls_2(block.mlp(block.ln_2(h)))


def _dpam_block(
    block: nn.Module, h: torch.Tensor, z: torch.Tensor, mode: str, last: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DPAM block: returns the new original stream ``h`` and DPAM stream ``z``.

    If ``last``, only the class token of ``h`` is computed (``h`` becomes ``[B, 1, W]``).
    """
    q, k, v = qkv_heads(block.attn, block.ln_1(h))  # [B, H, N, d]
    s = {"vv": v, "qq": q, "kk": k}[mode]
    out_proj = block.attn.out_proj
    if last:
        # The original stream only has to deliver the class token from here on.
        o = F.scaled_dot_product_attention(q[:, :, :1], k, v)
        a = F.scaled_dot_product_attention(s, s, v)
        o, a = out_proj(merge_heads(o)), out_proj(merge_heads(a))
        h = h[:, :1] + block.ls_1(o)
    else:
        # Both paths in one fused call: queries [q; s], keys [k; s], values [v; v].
        both = F.scaled_dot_product_attention(torch.stack((q, s)), torch.stack((k, s)), v.expand(2, *v.shape))
        both = out_proj(merge_heads(both))  # [2, B, N, W]
        o, a = both[0], both[1]
        h = h + block.ls_1(o)
    h = h + block.ls_2(block.mlp(block.ln_2(h)))
    return h, z + block.ls_1(a)


def embed_patches(visual: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Patch embedding + class token + (resized) positional embedding + ``ln_pre``: ``[B, N, W]``."""
    x = visual.conv1(pixel_values.to(visual.conv1.weight.dtype))  # [B, W, G, G]
    grid = x.shape[-1]
    x = x.flatten(2).transpose(1, 2)  # [B, G*G, W]
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1)
    x = x + resize_positional_embedding(visual.positional_embedding, grid).to(x.dtype)
    return visual.ln_pre(x)


def encode_image(
    visual: nn.Module,
    pixel_values: torch.Tensor,
    *,
    feature_layers: tuple[int, ...],
    dpam_layers: int,
    dpam_mode: str = "vv",
) -> VisionFeatures:
    """Run the DPAM vision forward of an open_clip ``VisionTransformer``.

    Args:
        visual: ``clip.visual`` (weights are used in place, never copied).
        pixel_values: ``[B, 3, S, S]`` normalized images, S a multiple of the patch size.
        feature_layers: 1-based blocks whose patch features are returned.
        dpam_layers: number of final blocks with DPAM.
        dpam_mode: ``"vv"``, ``"qq"`` or ``"kk"``.
    """
    blocks = visual.transformer.resblocks
    depth = len(blocks)
    first_dpam = depth - dpam_layers + 1  # 1-based; depth + 1 means no DPAM
    wanted = set(feature_layers)
    proj, ln_post = visual.proj, visual.ln_post

    h = embed_patches(visual, pixel_values)
    z: torch.Tensor | None = None
    patch_features: dict[int, torch.Tensor] = {}
    for index, block in enumerate(blocks, start=1):
        last = index == depth
        if index < first_dpam:
            h = _standard_block(block, h, cls_only=last and index not in wanted)
            if index in wanted:
                patch_features[index] = ln_post(h) @ proj
            continue
        if z is None:
            z = h
        h, z = _dpam_block(block, h, z, dpam_mode, last=last)
        if index in wanted:
            patch_features[index] = ln_post(z) @ proj
    image_features = h[:, 0] @ proj
    return VisionFeatures(image_features=image_features, patch_features=patch_features)
