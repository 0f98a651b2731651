"""Reading and validating checkpoints in the official AnomalyCLIP format.

The official release saves ``torch.save({"prompt_learner": state_dict})`` with these keys
(W_t = text width, 768 for ViT-L/14@336):

- ``ctx_pos``, ``ctx_neg``: ``[1, 1, n_ctx, W_t]`` learned contexts (normal, anomalous);
- ``compound_prompts_text.{i}``: ``[deep_length, W_t]`` deep prompts;
- ``token_prefix_{pos,neg}`` ``[1, 1, 1, W_t]`` and ``token_suffix_{pos,neg}``
  ``[1, 1, 77 - 1 - n_ctx, W_t]``: embeddings of the fixed tokens around the context;
- ``tokenized_prompts_{pos,neg}``: ``[1, 1, 77]`` token ids;
- ``compound_prompt_projections.{i}.{weight,bias}``: created but never used (ignored).

The fixed tokens and embeddings are checked against the backbone, so that prompts trained on one
CLIP can never be run silently on another.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError
from .prompts import tokenize_prompts

__all__ = ["load_official_state_dict", "convert_official_state_dict"]

logger = logging.getLogger(__name__)

_DEEP = re.compile(r"^compound_prompts_text\.(\d+)$")
_PROJ = re.compile(r"^compound_prompt_projections\.(\d+)\.(weight|bias)$")
_FIXED = ("token_prefix_pos", "token_prefix_neg", "token_suffix_pos", "token_suffix_neg")
_IDS = ("tokenized_prompts_pos", "tokenized_prompts_neg")


def load_official_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load the prompt-learner state dict from an official ``.pth`` safely (``weights_only=True``).

    Accepts ``{"prompt_learner": state_dict}`` (the official layout) or a bare state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Official checkpoint not found: '{path}'.")
    try:
        with warnings.catch_warnings():  # torch's note on the pickle protocol of a file it then refuses
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types (IndexError, UnpicklingError, ...) on bad files
        raise _load_error(path, exc) from exc
    if isinstance(data, dict) and "prompt_learner" in data:
        data = data["prompt_learner"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(
            f"'{path}' does not hold an AnomalyCLIP prompt state dict (expected {{'prompt_learner': {{name: tensor}}}})."
        )
    return dict(data)


# Globals a plain tensor checkpoint may name (torch's own rebuild functions and storages, OrderedDict).
_SAFE_GLOBAL_PREFIXES = ("torch.", "collections.OrderedDict", "_codecs.encode")
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def _pickle_globals(path: Path) -> list[str] | None:
    """The ``module.name`` objects the pickle(s) of a checkpoint would import, or None when the file
    cannot be parsed as one (corrupt, truncated, another format). Nothing is executed."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                streams = [archive.read(n) for n in archive.namelist() if n.endswith("data.pkl")]
            if not streams:
                return None
        else:
            streams = [path.read_bytes()]
        found: list[str] = []
        for data in streams:
            buffer = io.BytesIO(data)
            # The legacy format is several pickles in a row (magic, version, info, object, keys),
            # then raw storage bytes: parse up to 5; a failure after the first is the raw data.
            for index in range(5):
                strings: list[str] = []
                try:
                    for opcode, arg, _ in pickletools.genops(buffer):
                        if opcode.name in _STRING_OPS:
                            strings.append(str(arg))
                        elif opcode.name == "GLOBAL":
                            found.append(str(arg).replace(" ", "."))
                        elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                            found.append(".".join(strings[-2:]))
                except Exception:
                    if index == 0:
                        return None
                    break
                if buffer.tell() >= len(data):
                    break
        return found
    except (OSError, zipfile.BadZipFile, RuntimeError, ValueError):
        return None


def _torch_detail(exc: Exception) -> str:
    """The reason in a ``torch.load`` error, without torch's advice to retry with
    ``weights_only=False`` (which this library never does: it would let the file run code)."""
    text = str(exc)
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", text, re.S)
    lines = [line for line in text.strip().splitlines() if "weights_only" not in line and "Weights only load failed" not in line]
    detail = " ".join(found.group(1).split()) if found else (lines[0].strip() if lines else "")
    return f"{type(exc).__name__}: {detail[:200]}" if detail else type(exc).__name__


def _load_error(path: Path, exc: Exception) -> CheckpointError:
    """Why ``torch.load(path, weights_only=True)`` failed: a refusal for safety (the file would run
    code) or a file that is not a readable checkpoint (corrupt, truncated, another format)."""
    detail = _torch_detail(exc)
    refused: list[str] = []
    if isinstance(exc, pickle.UnpicklingError):
        named = re.findall(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        scanned = _pickle_globals(path) or []
        refused = sorted(set(named) | {g for g in scanned if not g.startswith(_SAFE_GLOBAL_PREFIXES)})
    if refused:
        return CheckpointError(
            f"Refused to load '{path}' for safety: it would import the Python object(s) {', '.join(refused)}, "
            "which can run arbitrary code (torch.load with weights_only=True refuses them). An official "
            "AnomalyCLIP checkpoint holds only tensors: check where this file came from."
        )
    return CheckpointError(
        f"Cannot read '{path}': it is not a readable PyTorch checkpoint; it is corrupt or truncated (an "
        f"interrupted download?) or in another format ({detail}). Download it again "
        "(e.g. `anomalyclip fetch official-visa`) or check the path; expected an official AnomalyCLIP .pth "
        "such as epoch_15.pth."
    )


def _check_close(name: str, stored: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    stored, expected = stored.float().reshape(expected.shape), expected.float()
    scale = float(expected.abs().max()) or 1.0
    diff = float((stored - expected).abs().max())
    if diff > 1e-3 * scale:
        raise CheckpointError(
            f"'{name}' does not match the {what} of the backbone (max difference {diff:.3g}, scale "
            f"{scale:.3g}): these prompts were trained with a different CLIP. Pass the backbone they "
            "were trained with (clip=...)."
        )


def convert_official_state_dict(
    state_dict: dict[str, torch.Tensor], clip: nn.Module, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Validate an official prompt state dict against ``clip`` and convert it to this library's keys.

    Args:
        state_dict: the official keys (see module docstring).
        clip: the open_clip backbone the prompts are meant for.
        source: name used in error messages.

    Returns:
        ``{"ctx_normal": [n_ctx, W_t], "ctx_anomalous": [n_ctx, W_t],
        "deep_prompts": [n_deep, deep_length, W_t]}`` float32 tensors.
    """
    width = clip.token_embedding.embedding_dim
    keys = set(state_dict)
    deep_ids = sorted(int(m.group(1)) for k in keys if (m := _DEEP.match(k)))
    required = {"ctx_pos", "ctx_neg", *_FIXED, *_IDS}
    missing = sorted(required - keys)
    if missing or not deep_ids:
        raise CheckpointError(
            f"{source}: missing keys {missing or ['compound_prompts_text.0', '...']}; this is not an official "
            "AnomalyCLIP prompt checkpoint (keys ctx_pos, ctx_neg, compound_prompts_text.*, token_prefix_*, "
            "token_suffix_*, tokenized_prompts_*)."
        )
    if deep_ids != list(range(len(deep_ids))):
        raise CheckpointError(f"{source}: deep prompt indices {deep_ids} are not 0..{len(deep_ids) - 1}.")
    unexpected = sorted(k for k in keys - required if not _DEEP.match(k) and not _PROJ.match(k))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected keys {unexpected}.")

    ctx_pos, ctx_neg = state_dict["ctx_pos"], state_dict["ctx_neg"]
    if ctx_pos.ndim != 4 or ctx_pos.shape[:2] != (1, 1) or ctx_pos.shape[-1] != width:
        raise CheckpointError(
            f"{source}: ctx_pos has shape {list(ctx_pos.shape)}, expected [1, 1, n_ctx, {width}] for this "
            f"backbone (text width {width})."
        )
    n_ctx = ctx_pos.shape[2]
    if ctx_neg.shape != ctx_pos.shape:
        raise CheckpointError(f"{source}: ctx_neg has shape {list(ctx_neg.shape)}, expected {list(ctx_pos.shape)}.")
    deep = [state_dict[f"compound_prompts_text.{i}"] for i in deep_ids]
    deep_length = deep[0].shape[0]
    for i, t in enumerate(deep):
        if tuple(t.shape) != (deep_length, width):
            raise CheckpointError(
                f"{source}: compound_prompts_text.{i} has shape {list(t.shape)}, expected [{deep_length}, {width}]."
            )
    if deep_length > n_ctx:
        raise CheckpointError(f"{source}: deep prompts of length {deep_length} exceed n_ctx={n_ctx}.")
    if len(deep) >= len(clip.transformer.resblocks):
        raise CheckpointError(
            f"{source}: {len(deep)} deep prompts need at least {len(deep) + 1} text blocks; the backbone has "
            f"{len(clip.transformer.resblocks)}."
        )

    # Fixed tokens: ids and their embeddings must be those of this backbone's tokenizer/table.
    token_ids = tokenize_prompts(n_ctx, clip.context_length)
    for name, row in zip(_IDS, token_ids):
        stored = state_dict[name].reshape(-1).long()
        if stored.shape != row.shape or not torch.equal(stored, row.cpu()):
            raise CheckpointError(
                f"{source}: {name} holds token ids {stored[:20].tolist()}..., expected {row[:20].tolist()}... "
                "(the prompt templates 'X ... X object.' / 'X ... X damaged object.' with CLIP's tokenizer)."
            )
    with torch.no_grad():
        table = clip.token_embedding.weight.detach().float().cpu()
        for suffix, row in zip(("pos", "neg"), token_ids.cpu()):
            prefix, tail = state_dict[f"token_prefix_{suffix}"], state_dict[f"token_suffix_{suffix}"]
            if prefix.numel() != width or tail.numel() != (row.numel() - 1 - n_ctx) * width:
                raise CheckpointError(
                    f"{source}: token_prefix_{suffix}/token_suffix_{suffix} have shapes {list(prefix.shape)}/"
                    f"{list(tail.shape)}, expected [1, 1, 1, {width}]/[1, 1, {row.numel() - 1 - n_ctx}, {width}]."
                )
            _check_close(f"token_prefix_{suffix}", prefix, table[row[:1]], "token embeddings")
            _check_close(f"token_suffix_{suffix}", tail, table[row[1 + n_ctx :]], "token embeddings")

    tensors = {
        "ctx_normal": ctx_pos[0, 0].float().contiguous(),
        "ctx_anomalous": ctx_neg[0, 0].float().contiguous(),
        "deep_prompts": torch.stack(deep).float().contiguous(),
    }
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise CheckpointError(f"{source}: {name} contains NaN or infinite values.")
    logger.info("Converted official checkpoint %s: n_ctx=%d, %d deep prompts of length %d", source, n_ctx, len(deep), deep_length)
    return tensors
