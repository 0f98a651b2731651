"""``AnomalyCLIP.finetune``: glocal training in place, recording what the prompts were trained on."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..runtime import is_out_of_memory, out_of_memory_error

__all__ = ["finetune_in_place"]


def finetune_in_place(model: Any, data: Any, options: dict[str, Any]) -> Any:
    """Run :func:`anomalyclip.train.finetune.finetune` on ``model`` (an ``AnomalyCLIP``); the config
    records ``trained_on`` and the thresholds are dropped, both restored when nothing was learned."""
    from ..train.finetune import finetune

    before = model.config
    name = _dataset_name(data)
    if name is not None:
        trained_on = name if before.trained_on in (None, name) else f"{before.trained_on}, then {name}"
        model.config = model.config.replace(trained_on=trained_on)
    model._drop_thresholds("new prompts were learned")
    prompts_before = {k: v.detach().clone() for k, v in model.prompts.state_dict().items()}
    try:
        return finetune(model, data, **options)
    except BaseException as exc:
        if all(torch.equal(prompts_before[k], v) for k, v in model.prompts.state_dict().items()):
            # Nothing was learned (e.g. a bad option): the model is as it was.
            model.config = dataclasses.replace(model.config, trained_on=before.trained_on, thresholds=before.thresholds)
        if is_out_of_memory(exc):
            raise out_of_memory_error(
                exc,
                f"finetuning at image_size {model.config.image_size} on {model.device}",
                "Use a smaller batch_size or image_size, feature_cache='disk' or cache_dtype='float16' "
                "(the feature cache), or fewer feature_layers.",
            ) from exc
        raise


#: Data set names of the known layouts (``AnomalyDataset.format``), as the model card shows them.
_DATASET_NAMES = {"mvtec": "MVTec AD", "visa": "VisA"}


def _dataset_name(data: Any) -> str | None:
    """What ``data`` is called in ``config.trained_on``: "MVTec AD", "VisA", or its folder's name."""
    fmt, root = getattr(data, "format", None), getattr(data, "root", None)
    if fmt in _DATASET_NAMES:
        return _DATASET_NAMES[fmt]
    if root is not None and Path(root).name:
        return f"{Path(root).name} ({fmt} layout)" if fmt else Path(root).name
    return None
