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

How the forward stays close to the machine's matrix-product throughput (nearly all of its work,
about 1.2 TFLOP per image for ViT-L/14 at 518 px, is matrix products):

- attention runs in ``scaled_dot_product_attention`` (fused, no ``N x N`` matrix in memory), one
  call per path on 4-D views of the single qkv projection: no copies of q, k, v (a single call on
  stacked 5-D ``[q; s]`` inputs would copy them, and PyTorch's CPU backend answers 5-D inputs with
  its unfused fallback that materializes the attention matrices);
- work that feeds no output is skipped: the original stream's last block computes its query,
  attention, out-projection and MLP for the class token only; the DPAM stream has no MLP;
- when nothing needs gradients, fresh intermediates are reused in place: residual additions go
  into the tensor just produced, and QuickGELU (``x * sigmoid(1.702 x) = silu(1.702 x) / 1.702``)
  is one in-place ``silu`` between two GEMMs that apply the two factors as their alpha/beta;
- on the CPU, a batch goes through the blocks in micro-batches of about
  :data:`CPU_TOKENS_PER_CHUNK` tokens (one image at 518 px): the GEMMs are at full speed with
  that many rows, and the smaller activations are reused by the allocator instead of being mapped
  and page-faulted afresh for every intermediate (worth ~5 % at batch 8);
- bfloat16 / float16 weights on a CPU whose PyTorch build has no fast kernel for that dtype's
  matrix products (no oneDNN support, e.g. AVX2-only x86, where bfloat16 GEMMs run ~15x slower
  than float32) have their GEMMs and attention computed in float32 from the rounded inputs, and
  the results rounded back (see :func:`set_cpu_low_precision_matmul`).

:func:`compile_blocks` optionally runs the blocks through ``torch.compile``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import BackboneError, InvalidInputError
from .float8 import check_float8_supported
from .ops import (
    attention,
    float8_matmuls,
    get_cpu_low_precision_matmul,
    linear,
    linear_silu,
    matmul_dtype,
    plain_matmuls,
    out_proj,
    project,
    qkv_heads,
    sdpa,
    set_cpu_low_precision_matmul,
    split_heads,
)

__all__ = [
    "VisionFeatures",
    "encode_image",
    "resize_positional_embedding",
    "embed_patches",
    "patch_embedding_gemm",
    "CPU_TOKENS_PER_CHUNK",
    "get_cpu_low_precision_matmul",
    "set_cpu_low_precision_matmul",
    "compile_blocks",
    "set_float8",
    "uses_float8",
]


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
    src = int(round(max(n_patches, 0) ** 0.5))
    if pos.ndim != 2 or n_patches < 1 or src * src != n_patches:
        raise BackboneError(
            f"The backbone's positional embedding has shape {list(pos.shape)}: not [1 + g*g, width] (a class "
            "token and a square grid of patches). AnomalyCLIP needs a ViT CLIP with a square patch grid."
        )
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise InvalidInputError(f"grid must be a positive int (patches per side), got {grid!r}.")
    if src == grid:
        return pos
    cls_pos, patch_pos = pos[:1], pos[1:]
    patch_pos = patch_pos.reshape(1, src, src, -1).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos.float(), size=(grid, grid), mode="bilinear", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(pos.dtype)
    return torch.cat([cls_pos, patch_pos], dim=0)


# ----------------------------------------------------------------------------- blocks

# QuickGELU(x) = x * sigmoid(1.702 x) = silu(1.702 x) / 1.702: with the two factors folded into the
# GEMMs around it (alpha / beta, free), the activation is one in-place silu pass.
_QUICK_GELU_SCALE = 1.702


def _fast_mlp_ok(mlp: nn.Module) -> bool:
    fc, act, proj = (getattr(mlp, name, None) for name in ("c_fc", "gelu", "c_proj"))
    return (
        isinstance(fc, nn.Linear)
        and isinstance(proj, nn.Linear)
        and type(act).__name__ == "QuickGELU"
        and fc.bias is not None
        and proj.bias is not None
    )


def _mlp(mlp: nn.Module, x: torch.Tensor, fast: bool) -> torch.Tensor:
    """``mlp(x)``; with ``fast`` and a QuickGELU MLP: two GEMMs and one in-place silu."""
    if not (fast and _fast_mlp_ok(mlp)):
        if matmul_dtype(x) is None:
            return mlp(x)
        fc, act, proj = mlp.c_fc, mlp.gelu, mlp.c_proj
        return linear(act(linear(x, fc.weight, fc.bias)), proj.weight, proj.bias)
    fc, proj = mlp.c_fc, mlp.c_proj
    y = linear_silu(x, fc.weight, fc.bias, _QUICK_GELU_SCALE)  # 1.702 * QuickGELU(fc(x))
    return linear(y, proj.weight, proj.bias, alpha=1.0 / _QUICK_GELU_SCALE)


def _add_residual(residual: torch.Tensor, ls: nn.Module, update: torch.Tensor, fast: bool) -> torch.Tensor:
    """``residual + ls(update)``; with ``fast``, ``update`` (a fresh tensor) receives the sum."""
    if fast and isinstance(ls, nn.Identity) and update.shape == residual.shape:
        return update.add_(residual)  # addition commutes exactly: the same bits as residual + update
    return residual + ls(update)


def _mlp_residual(block: nn.Module, h: torch.Tensor, fast: bool) -> torch.Tensor:
    """``h + ls_2(mlp(ln_2(h)))``."""
    return _add_residual(h, block.ls_2, _mlp(block.mlp, block.ln_2(h), fast), fast)


def _cls_query_qkv(
    attn: nn.MultiheadAttention, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q of the class token only ``[B, H, 1, d]``, k and v of all tokens ``[B, H, N, d]``."""
    width, heads = x.shape[-1], attn.num_heads
    weight, bias = attn.in_proj_weight, attn.in_proj_bias
    kv = linear(x, weight[width:], bias[width:] if bias is not None else None)  # [B, N, 2W]
    q = linear(x[:, :1], weight[:width], bias[:width] if bias is not None else None)  # [B, 1, W]
    return split_heads(q, heads), split_heads(kv[..., :width], heads), split_heads(kv[..., width:], heads)


def _standard_block(block: nn.Module, h: torch.Tensor, fast: bool, cls_only: bool = False) -> torch.Tensor:
    """A pre-LN block; with ``cls_only`` only the class token is computed (``[B, 1, W]`` out)."""
    x = block.ln_1(h)
    if cls_only:
        q, k, v = _cls_query_qkv(block.attn, x)
        o = out_proj(block.attn, sdpa(q, k, v))
        h = _add_residual(h[:, :1], block.ls_1, o, fast)
    else:
        h = _add_residual(h, block.ls_1, attention(block, x), fast)
    return _mlp_residual(block, h, fast)


def _dpam_block(
    block: nn.Module, h: torch.Tensor, z: torch.Tensor, mode: str, last: bool, fast: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DPAM block: returns the new original stream ``h`` and DPAM stream ``z``.

    If ``last``, only the class token of ``h`` is computed (``h`` becomes ``[B, 1, W]``).
    """
    attn = block.attn
    x = block.ln_1(h)
    if last and mode != "qq":
        q, k, v = _cls_query_qkv(attn, x)  # the original stream only needs the class token
    else:
        q, k, v = qkv_heads(attn, x)
    s = {"vv": v, "qq": q, "kk": k}[mode]
    if last:
        q = q[:, :, :1]
    # Two fused attention calls on views of the one projection (no N x N matrices, no copies).
    o = out_proj(attn, sdpa(q, k, v))
    a = out_proj(attn, sdpa(s, s, v))
    h = _mlp_residual(block, _add_residual(h[:, :1] if last else h, block.ls_1, o, fast), fast)
    return h, _add_residual(z, block.ls_1, a, fast)


def patch_embedding_gemm(conv: nn.Conv2d, pixel_values: torch.Tensor) -> torch.Tensor:
    """A ``P x P``, stride-``P`` patch convolution as one matrix product: ``[B, C, S, S] -> [B, G*G, W]``.

    Patches are laid out row-major (the order of ``conv(x).flatten(2).transpose(1, 2)``), each
    flattened as ``(C, P, P)`` like the convolution's weight.
    """
    b, c, s, _ = pixel_values.shape
    p = conv.kernel_size[0]
    g = s // p
    patches = pixel_values.reshape(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * p * p)
    return linear(patches, conv.weight.reshape(conv.out_channels, -1), conv.bias)


def _is_patchify(conv: nn.Module) -> bool:
    return (
        isinstance(conv, nn.Conv2d)
        and conv.kernel_size[0] == conv.kernel_size[1] == conv.stride[0] == conv.stride[1]
        and conv.padding in (0, (0, 0))
        and conv.dilation in (1, (1, 1))
        and conv.groups == 1
    )


def embed_patches(visual: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Patch embedding + class token + (resized) positional embedding + ``ln_pre``: ``[B, N, W]``.

    On CUDA the patch convolution runs as a matrix product (:func:`patch_embedding_gemm`):
    cuBLAS keeps float32 in IEEE float32 unless TF32 matrix products were enabled
    (``torch.backends.cuda.matmul.allow_tf32``), whereas cuDNN convolutions use TF32 by default.
    """
    conv = visual.conv1
    x = pixel_values.to(conv.weight.dtype)
    if x.device.type == "cuda" and _is_patchify(conv):
        grid = x.shape[-1] // conv.kernel_size[0]
        x = patch_embedding_gemm(conv, x)  # [B, G*G, W]
    else:
        if matmul_dtype(x) is not None:
            x = F.conv2d(x.float(), conv.weight.float(), None, conv.stride).to(x.dtype)  # [B, W, G, G]
        else:
            x = conv(x)
        grid = x.shape[-1]
        x = x.flatten(2).transpose(1, 2)  # [B, G*G, W]
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1)
    x = x + resize_positional_embedding(visual.positional_embedding, grid).to(x.dtype)
    return visual.ln_pre(x)


# ----------------------------------------------------------------------------- the forward


#: On the CPU, images go through the blocks in micro-batches of about this many tokens (at least
#: one image): matrix products are already at full speed with ~1,000 rows, and larger batches only
#: add memory traffic and page faults (see :func:`encode_image`). ``None`` disables it.
CPU_TOKENS_PER_CHUNK: int | None = 2048


def encode_image(
    visual: nn.Module,
    pixel_values: torch.Tensor,
    *,
    feature_layers: tuple[int, ...],
    dpam_layers: int,
    dpam_mode: str = "vv",
    traceable: bool = False,
) -> VisionFeatures:
    """Run the DPAM vision forward of an open_clip ``VisionTransformer``.

    Args:
        visual: ``clip.visual`` (weights are used in place, never copied).
        pixel_values: ``[B, 3, S, S]`` normalized images, S a multiple of the patch size.
        feature_layers: 1-based blocks whose patch features are returned.
        dpam_layers: number of final blocks with DPAM.
        dpam_mode: ``"vv"``, ``"qq"`` or ``"kk"``.
        traceable: for ``torch.jit.trace`` / ``torch.onnx.export``: the whole batch in one pass
            (a micro-batch loop would be recorded for the traced batch size only), no in-place
            updates and the plain block functions (not those of :func:`compile_blocks`). The
            same arithmetic; results agree with the default path to rounding.

    On the CPU, a batch runs in micro-batches of :data:`CPU_TOKENS_PER_CHUNK` tokens (one image
    at 518 px): each matrix product still has over a thousand rows (full GEMM speed), and the
    activations stay small enough for the allocator to reuse their memory instead of mapping and
    faulting in fresh pages for every intermediate (at batch 8 that costs several percent).
    The results are the same as for the whole batch at once.
    """
    if uses_float8(visual) and not traceable:
        check_float8_supported(pixel_values.device)
        with float8_matmuls():
            return _encode_image_chunked(visual, pixel_values, feature_layers, dpam_layers, dpam_mode)
    if traceable:  # the plain operators in the trace: no packed CPU weights, no float8
        with plain_matmuls():
            return _encode_image_chunked(visual, pixel_values, feature_layers, dpam_layers, dpam_mode, True)
    return _encode_image_chunked(visual, pixel_values, feature_layers, dpam_layers, dpam_mode)


def _encode_image_chunked(
    visual: nn.Module,
    pixel_values: torch.Tensor,
    feature_layers: tuple[int, ...],
    dpam_layers: int,
    dpam_mode: str,
    traceable: bool = False,
) -> VisionFeatures:
    if traceable:
        blocks = (_standard_block, _dpam_block)
        return _encode_image(visual, pixel_values, feature_layers, dpam_layers, dpam_mode, False, blocks)
    # Fresh intermediates are reused in place only when nothing needs gradients.
    fast = not torch.is_grad_enabled() or not (
        pixel_values.requires_grad or any(p.requires_grad for p in visual.parameters())
    )
    b = pixel_values.shape[0]
    patch = visual.conv1.kernel_size[0]
    tokens = 1 + (pixel_values.shape[-2] // patch) * (pixel_values.shape[-1] // patch)
    chunk = b
    if pixel_values.device.type == "cpu" and CPU_TOKENS_PER_CHUNK is not None:
        chunk = max(1, CPU_TOKENS_PER_CHUNK // tokens)
    if b <= chunk:
        return _encode_image(visual, pixel_values, feature_layers, dpam_layers, dpam_mode, fast)
    parts = [
        _encode_image(visual, pixel_values[start : start + chunk], feature_layers, dpam_layers, dpam_mode, fast)
        for start in range(0, b, chunk)
    ]
    return VisionFeatures(
        image_features=torch.cat([p.image_features for p in parts]),
        patch_features={layer: torch.cat([p.patch_features[layer] for p in parts]) for layer in parts[0].patch_features},
    )


def _encode_image(
    visual: nn.Module,
    pixel_values: torch.Tensor,
    feature_layers: tuple[int, ...],
    dpam_layers: int,
    dpam_mode: str,
    fast: bool,
    block_functions: tuple[Callable, Callable] | None = None,
) -> VisionFeatures:
    blocks = visual.transformer.resblocks
    depth = len(blocks)
    first_dpam = depth - dpam_layers + 1  # 1-based; depth + 1 means no DPAM
    wanted = set(feature_layers)
    proj, ln_post = visual.proj, visual.ln_post
    standard, dpam = block_functions or _block_functions(visual)

    h = embed_patches(visual, pixel_values)
    z: torch.Tensor | None = None
    patch_features: dict[int, torch.Tensor] = {}
    for index, block in enumerate(blocks, start=1):
        last = index == depth
        if index < first_dpam:
            h = standard(block, h, fast, cls_only=last and index not in wanted)
            if index in wanted:
                patch_features[index] = project(ln_post(h), proj)
            continue
        if z is None:
            z = h
        h, z = dpam(block, h, z, dpam_mode, last=last, fast=fast)
        if index in wanted:
            patch_features[index] = project(ln_post(z), proj)
    image_features = project(h[:, 0], proj)
    return VisionFeatures(image_features=image_features, patch_features=patch_features)


# ----------------------------------------------------------------------------- float8

_FLOAT8_ATTR = "_anomalyclip_float8"


def set_float8(visual: nn.Module, enable: bool = True) -> nn.Module:
    """Run the blocks' linear layers of ``visual`` in float8 from now on (``enable=False`` undoes it).

    ``visual`` must be bfloat16 on a CUDA GPU with float8 tensor cores (compute capability 8.9+);
    otherwise :class:`~anomalyclip.errors.InvalidInputError` names the device and the fix. The
    in-, out- and MLP projections of every block run as float8 e4m3 products with dynamic scales
    (:mod:`anomalyclip.float8`); the patch embedding, attention, norms and the output projection
    stay bfloat16. The float8 weights are a cache, not parameters: ``state_dict`` is unchanged.
    Returns ``visual``.
    """
    if not enable:
        if hasattr(visual, _FLOAT8_ATTR):
            delattr(visual, _FLOAT8_ATTR)
        return visual
    weight = visual.conv1.weight
    check_float8_supported(weight.device)
    if weight.dtype != torch.bfloat16:
        raise InvalidInputError(
            f"float8 matrix products need the vision tower in bfloat16, got {str(weight.dtype).replace('torch.', '')}: "
            "use dtype='float8' when loading the model, or model.to(dtype=torch.bfloat16) first."
        )
    object.__setattr__(visual, _FLOAT8_ATTR, True)
    return visual


def uses_float8(visual: nn.Module) -> bool:
    """Whether :func:`set_float8` is on for ``visual``."""
    return bool(getattr(visual, _FLOAT8_ATTR, False))


# ----------------------------------------------------------------------------- torch.compile

_COMPILED_ATTR = "_anomalyclip_compiled_blocks"


def _block_functions(visual: nn.Module) -> tuple[Callable, Callable]:
    return getattr(visual, _COMPILED_ATTR, None) or (_standard_block, _dpam_block)


def compile_blocks(visual: nn.Module, enable: bool = True, **compile_kwargs) -> nn.Module:
    """Run the blocks of ``visual`` through ``torch.compile`` from now on (``enable=False`` undoes it).

    The block functions are compiled once per (block kind, shape, dtype) and shared by all blocks
    (the block's weights are graph inputs, so the 19 DPAM blocks reuse one graph). Extra keyword
    arguments go to ``torch.compile``. Returns ``visual``.
    """
    if not enable:
        if hasattr(visual, _COMPILED_ATTR):
            delattr(visual, _COMPILED_ATTR)
        return visual
    kwargs = {"dynamic": False, **compile_kwargs}
    object.__setattr__(visual, _COMPILED_ATTR, (torch.compile(_standard_block, **kwargs), torch.compile(_dpam_block, **kwargs)))
    return visual
