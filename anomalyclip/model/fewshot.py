"""Few-shot references of a model: collecting normal images' patch tokens into its memory.

``AnomalyCLIP.add_references`` is :func:`add_references`; the memory and the fusion themselves
live in :mod:`anomalyclip.references`.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from ..errors import InvalidInputError
from ..predictor.stream import expand_inputs
from ..references import DEFAULT_FUSION, ReferenceMemory, normalize_patch_tokens, resolve_storage_dtype
from ..tiling import crop_prepared, tile_grid

__all__ = ["add_references"]

logger = logging.getLogger(__name__)


def add_references(
    model: Any,
    images: Any,
    *,
    batch_size: int,
    tile_size: int | None,
    tile_overlap: float,
    coreset: float | None,
    storage_dtype: Any,
    seed: int,
    fusion: str | None = None,
    progress: bool,
) -> int:
    """``model.add_references`` (documented there): returns the number of reference images."""
    items, _ = expand_inputs(images, "add_references")
    tile_overlap = 0.25 if tile_overlap is None else tile_overlap
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive int, got {batch_size!r}.")
    if tile_size is not None:
        model._check_tile_size(tile_size)
        tile_grid(tile_size, tile_size, tile_size, tile_overlap)  # validates the overlap
    config = model.config
    memory = model.references
    if memory is None:
        memory = ReferenceMemory(
            image_size=config.image_size,
            feature_layers=config.feature_layers,
            backbone=config.backbone,
            storage_dtype=storage_dtype if storage_dtype is not None else torch.float32,
            tile_size=tile_size,
            tile_overlap=tile_overlap if tile_size is not None else None,
            dpam_layers=config.dpam_layers,
            dpam_mode=config.dpam_mode,
            backbone_fingerprint=model.backbone_fingerprint(),
            fusion=fusion if fusion is not None else DEFAULT_FUSION,
        )
    else:
        memory.check_compatible(**model._reference_settings())
        if memory.tile_size != tile_size:
            raise InvalidInputError(
                f"The memory holds references taken with tile_size={memory.tile_size}; these would be taken with "
                f"tile_size={tile_size}. Use the same tiling, or call model.clear_references() first."
            )
        if storage_dtype is not None and resolve_storage_dtype(storage_dtype) != memory.storage_dtype:
            raise InvalidInputError(
                f"The memory stores {memory.storage_dtype}; call model.clear_references() to change the storage dtype."
            )
        if fusion is not None and fusion != memory.fusion:
            raise InvalidInputError(f"The memory fuses with {memory.fusion!r}; call model.clear_references() to change the fusion.")
    tokens: dict[int, list[torch.Tensor]] = {layer: [] for layer in config.feature_layers}
    zero_shot: list[tuple[torch.Tensor, torch.Tensor]] = []  # units' (scores, maps), for the fusion statistics
    groups: list[int] = []  # the image index of each unit (image or tile)

    def collect(pixel_values: torch.Tensor, group: Sequence[int]) -> None:
        out = model._zero_shot_forward(pixel_values)
        zero_shot.append((out.scores, out.anomaly_maps))
        groups.extend(group)
        for layer in config.feature_layers:
            tokens[layer].append(normalize_patch_tokens(out.patch_features[layer]))

    from tqdm.auto import tqdm

    with torch.inference_mode():
        if tile_size is None:
            for start in tqdm(range(0, len(items), batch_size), desc="references", unit="batch", disable=not progress):
                chunk_items = items[start : start + batch_size]
                collect(model.preprocess(chunk_items), range(start, start + len(chunk_items)))
        else:
            for index, item in enumerate(tqdm(items, desc="references", unit="img", disable=not progress)):
                prepared = model._prepare(item)
                tiles = tile_grid(*prepared.size, tile_size, tile_overlap).tiles
                for start in range(0, len(tiles), batch_size):
                    chunk = tiles[start : start + batch_size]
                    collect(
                        torch.stack([model._preprocess_prepared(crop_prepared(prepared, t)) for t in chunk]),
                        [index] * len(chunk),
                    )
        memory.add_units(
            {k: torch.cat(v) for k, v in tokens.items()},
            groups=torch.tensor(groups),
            zero_shot_scores=torch.cat([scores for scores, _ in zero_shot]),
            zero_shot_maps=torch.cat([maps for _, maps in zero_shot]),
            sigma=config.sigma,
            coreset=coreset,
            seed=seed,
        )
        if memory.fusion == "standardized" and memory.fusion_statistics() is None:
            logger.warning(
                "The standardized fusion needs leave-one-out statistics of at least two reference images; "
                "with %d, the plain sum is used until more are added (docs/fewshot.md).",
                memory.num_images,
            )
    model._set_references(memory)
    logger.info("References: %r", memory)
    return memory.num_images
