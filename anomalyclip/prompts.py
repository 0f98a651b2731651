"""Learned object-agnostic text prompts and the text encoder with deep prompts.

Two prompts, normal and anomalous, are tokenized from ``"X X ... X object."`` and
``"X X ... X damaged object."`` (``n_ctx`` placeholder words). Their placeholder embeddings are
replaced by learned context vectors; before text blocks ``2 .. deep_prompt_depth`` the first
``deep_prompt_length`` context positions of both prompts are overwritten by learned deep
prompts (rounded to float16 as the official release does). See REFERENCE.md, "Text encoder".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import AnomalyCLIPConfig
from .ops import attention

__all__ = ["PromptLearner", "prompt_texts", "tokenize_prompts", "encode_prompts", "PROMPT_KEYS"]

#: Names and order of the tensors in ``model.safetensors``.
PROMPT_KEYS = ("ctx_normal", "ctx_anomalous", "deep_prompts")


def prompt_texts(n_ctx: int) -> tuple[str, str]:
    """The normal and anomalous prompt templates with ``n_ctx`` placeholder words."""
    placeholder = " ".join(["X"] * n_ctx)
    return f"{placeholder} object.", f"{placeholder} damaged object."


def tokenize_prompts(n_ctx: int, context_length: int = 77) -> torch.Tensor:
    """Token ids ``[2, context_length]`` (int64) of the two templates with CLIP's BPE tokenizer."""
    import open_clip

    return open_clip.tokenize(list(prompt_texts(n_ctx)), context_length=context_length)


class PromptLearner(nn.Module):
    """The trainable part of AnomalyCLIP: context vectors and deep text prompts, always float32.

    Parameters:
        ctx_normal: ``[n_ctx, W_t]`` context of the normal prompt.
        ctx_anomalous: ``[n_ctx, W_t]`` context of the anomalous prompt (not shared).
        deep_prompts: ``[deep_prompt_depth - 1, deep_prompt_length, W_t]``; entry ``i`` enters
            before text block ``i + 2``.
    """

    def __init__(self, n_ctx: int, width: int, n_deep: int, deep_length: int) -> None:
        super().__init__()
        self.ctx_normal = nn.Parameter(torch.empty(n_ctx, width, dtype=torch.float32))
        self.ctx_anomalous = nn.Parameter(torch.empty(n_ctx, width, dtype=torch.float32))
        self.deep_prompts = nn.Parameter(torch.empty(n_deep, deep_length, width, dtype=torch.float32))
        self.reset_parameters()

    @classmethod
    def from_config(cls, config: AnomalyCLIPConfig) -> "PromptLearner":
        return cls(config.n_ctx, config.text_width, config.n_deep_prompts, config.deep_prompt_length)

    def reset_parameters(self) -> None:
        """The paper's initialization: normal(0, 0.02) for every tensor."""
        for p in (self.ctx_normal, self.ctx_anomalous, self.deep_prompts):
            nn.init.normal_(p, std=0.02)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(getattr(self, name).shape) for name in PROMPT_KEYS}

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """Move the prompts with ``.to()`` / ``.cuda()`` / ... but never change their dtype.

        The prompts are float32 whatever the dtype of the model around them (``model.to(dtype=
        torch.bfloat16)`` casts only the frozen CLIP): they are cast to the compute dtype where
        they are used (:func:`encode_prompts`), as the official code does, so a low-precision model
        saves and trains its prompts without rounding them.
        """

        def device_only(t: torch.Tensor) -> torch.Tensor:
            moved = fn(t)
            if moved.dtype != t.dtype:
                return t.to(device=moved.device)
            return moved

        return super()._apply(device_only, recurse)


def encode_prompts(clip: nn.Module, prompts: PromptLearner, token_ids: torch.Tensor) -> torch.Tensor:
    """Encode the two learned prompts with the CLIP text tower.

    Args:
        clip: an open_clip ``CLIP`` (its text modules are used in place).
        prompts: the learned context and deep prompts.
        token_ids: ``[2, context_length]`` ids from :func:`tokenize_prompts`.

    Returns:
        ``[2, D]`` L2-normalized text features; row 0 normal, row 1 anomalous. Differentiable
        with respect to ``prompts``.
    """
    dtype = clip.token_embedding.weight.dtype
    n_ctx = prompts.ctx_normal.shape[0]
    eot = token_ids.argmax(dim=-1)  # [2]
    # Attention is causal, so tokens after the last EOT never influence the EOT features:
    # truncating there gives the same result for a fraction of the work.
    length = int(eot.max()) + 1
    ids = token_ids[:, :length]
    embeddings = clip.token_embedding(ids)  # [2, T, W]
    ctx = torch.stack((prompts.ctx_normal, prompts.ctx_anomalous)).to(dtype)
    x = torch.cat([embeddings[:, :1], ctx, embeddings[:, 1 + n_ctx :]], dim=1)
    x = x + clip.positional_embedding[:length].to(dtype)

    deep = prompts.deep_prompts
    deep_length = deep.shape[1]
    for index, block in enumerate(clip.transformer.resblocks):
        if 1 <= index <= deep.shape[0]:
            # The official release feeds each deep prompt through float16 (even in float32 runs).
            d = deep[index - 1].half().to(dtype).expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :1], d, x[:, 1 + deep_length :]], dim=1)
        x = x + block.ls_1(attention(block, block.ln_1(x), causal=True))
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
    x = clip.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), eot]  # [2, W]
    proj = clip.text_projection
    x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return F.normalize(x.float(), dim=-1)
