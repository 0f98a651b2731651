"""Training checkpoints: where a run writes each epoch, and how an interrupted run resumes.

Layout of an ``output_dir``: ``epoch_{k}/`` per epoch (``config.json`` + ``model.safetensors`` in
the ``save_pretrained`` format, plus :data:`STATE_NAME`: optimizer state, epoch, shuffling RNG
state, settings, history), and at its root the latest prompts and :data:`HISTORY_NAME`. Every
file is written atomically.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..config import CONFIG_NAME, WEIGHTS_NAME
from ..errors import CheckpointError, InvalidInputError, with_fix
from ..files import atomic_path, atomic_write
from .interface import TrainableModel

__all__ = [
    "STATE_NAME",
    "HISTORY_NAME",
    "STATE_FORMAT",
    "epoch_dirs",
    "resolve_resume",
    "load_state",
    "resume",
    "check_output_dir",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

#: Training state file inside each ``epoch_{k}`` checkpoint directory.
STATE_NAME = "training_state.pt"
#: Per-epoch losses and timings, at the root of ``output_dir``.
HISTORY_NAME = "history.json"
#: Version of the training state format.
STATE_FORMAT = 1
_EPOCH_DIR = re.compile(r"^epoch_(\d+)$")
#: Model settings a resumed run must share with the checkpoint.
_MODEL_KEYS = ("backbone", "image_size", "feature_layers", "dpam_layers", "dpam_mode")


def epoch_dirs(directory: Path) -> list[tuple[int, Path]]:
    """``(k, path)`` of the ``epoch_{k}`` subdirectories, highest ``k`` first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if p.is_dir() and (m := _EPOCH_DIR.match(p.name))]
    return sorted(found, reverse=True)


def _is_complete(checkpoint: Path) -> bool:
    return all((checkpoint / n).is_file() for n in (CONFIG_NAME, WEIGHTS_NAME, STATE_NAME))


def resolve_resume(resume_from: str | os.PathLike) -> Path:
    """The checkpoint directory to resume from: ``resume_from`` itself if it is one, else its
    latest complete ``epoch_{k}`` subdirectory.

    Raises:
        CheckpointError: no such path, or no complete checkpoint there.
    """
    path = Path(resume_from).expanduser()
    if not path.exists():
        raise CheckpointError(f"resume_from='{path}' does not exist.")
    if _is_complete(path):
        return path
    for _, candidate in epoch_dirs(path):
        if _is_complete(candidate):
            return candidate
    raise CheckpointError(
        f"'{path}' holds no training checkpoint (an epoch_<k>/ directory with config.json, model.safetensors "
        f"and {STATE_NAME}); pass the output_dir of an earlier finetune run or one of its epoch directories."
    )


def load_state(checkpoint: Path) -> dict[str, Any]:
    """The training state of a checkpoint directory (read with ``weights_only=True``)."""
    try:
        state = torch.load(checkpoint / STATE_NAME, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise CheckpointError(f"Cannot read {checkpoint / STATE_NAME}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format_version") != STATE_FORMAT:
        raise CheckpointError(f"{checkpoint / STATE_NAME} is not a training state of this library version.")
    return state


def resume(
    model: TrainableModel, resume_from: str | os.PathLike, settings: dict[str, Any]
) -> tuple[Path, dict[str, Any]]:
    """Load the prompts of the checkpoint to resume from into ``model``; return it and its state.

    ``settings`` are the run's options that decide its result (batch size, seed, data...): a
    difference from the interrupted run's is logged (the result will differ from an uninterrupted
    run), not refused.

    Raises:
        CheckpointError: no checkpoint there, or one trained with other model settings.
    """
    checkpoint = resolve_resume(resume_from)
    state = load_state(checkpoint)
    try:
        saved = json.loads((checkpoint / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"Cannot read {checkpoint / CONFIG_NAME}: {exc}") from exc
    for key in _MODEL_KEYS:
        mine = getattr(model.config, key)
        mine = list(mine) if isinstance(mine, tuple) else mine
        if saved.get(key) != mine:
            raise CheckpointError(
                f"Cannot resume from '{checkpoint}': it was trained with {key}={saved.get(key)!r}, the model has "
                f"{mine!r}. Build the model with the same settings to continue that run."
            )
    model.load_prompts(load_file(str(checkpoint / WEIGHTS_NAME)), source=str(checkpoint / WEIGHTS_NAME))
    changed = [k for k, v in settings.items() if state.get("settings", {}).get(k) != v]
    if changed:
        logger.warning(
            "Resuming from %s with other %s than the interrupted run: the result will differ from an "
            "uninterrupted run.",
            checkpoint,
            ", ".join(changed),
        )
    logger.info("Resuming from %s (epoch %d done).", checkpoint, int(state["epoch"]))
    return checkpoint, state


def check_output_dir(out: Path, resumed_from: Path | None) -> None:
    """Refuse to mix two runs' checkpoints in one directory.

    Raises:
        InvalidInputError: ``out`` holds epoch checkpoints of a run that is not being resumed.
    """
    if not epoch_dirs(out):
        return
    if resumed_from is not None and out.resolve() in (resumed_from.resolve(), resumed_from.resolve().parent):
        return
    raise with_fix(
        InvalidInputError,
        f"output_dir '{out}' already holds checkpoints of a training run; {{fix}}.",
        python=f"pass resume_from='{out}' to continue it, or choose an empty output_dir",
        cli=f"pass --resume {out} to continue it, or choose an empty --out",
    )


def save_checkpoint(
    model: TrainableModel, output_dir: Path, epoch: int, state: dict[str, Any], history: dict[str, Any]
) -> Path:
    """Write ``epoch_{epoch}/`` (model + training ``state``), then the latest model at the root and
    ``history`` (JSON-ready). Every file is written atomically. Returns the epoch directory."""
    checkpoint = output_dir / f"epoch_{epoch}"
    model.save_pretrained(checkpoint)
    with atomic_path(checkpoint / STATE_NAME) as tmp:
        torch.save(state, tmp)
    model.save_pretrained(output_dir)
    with atomic_write(output_dir / HISTORY_NAME, "w") as handle:
        handle.write(json.dumps(history, indent=2) + "\n")
    return checkpoint
