"""The nearest-neighbour search of the few-shot references and the greedy coreset (pure tensor
functions; :mod:`anomalyclip.references` holds the memory that uses them).

Notation: B batch, N = 1 + G*G tokens (class token first), D embedding dim, K memory rows
(reference patches of one output layer), U reference units (images or tiles), P patches per unit.
The search runs in blocks of at most ``chunk_elements`` similarities (never a full
patch-by-memory matrix), on the memory's device, in float32 whatever the storage dtype.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import InvalidInputError

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "normalize_patch_tokens",
    "nearest_neighbor_distance",
    "nearest_neighbor_distance_blocks",
    "reference_distances",
    "leave_one_out_distances",
    "greedy_coreset",
]

#: Default budget of one similarity block of the nearest-neighbour search (elements; 64 MiB float32).
DEFAULT_CHUNK_ELEMENTS = 1 << 24


def normalize_patch_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """``[B, N, D]`` projected tokens (class token first) -> ``[B, N - 1, D]`` float32, L2-normalized."""
    return F.normalize(tokens[:, 1:].float(), dim=-1)


def _block_rows(queries: int, memory: int, chunk_elements: int) -> tuple[int, int]:
    """Rows of queries and of memory per block so that ``q_rows * m_rows <= chunk_elements``."""
    m_rows = min(memory, max(1, chunk_elements // min(queries, chunk_elements)))
    q_rows = min(queries, max(1, chunk_elements // m_rows))
    return q_rows, m_rows


def nearest_neighbor_distance(
    queries: torch.Tensor, memory: torch.Tensor, *, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
) -> torch.Tensor:
    """Cosine distance of each query to its nearest memory row: ``1 - max_k <q, m_k>``.

    Args:
        queries: ``[Q, D]`` L2-normalized (any float dtype).
        memory: ``[K, D]`` L2-normalized, float32 or float16, on the device where the search runs
            (``queries`` are moved there). The products run in float32, except for a float16
            memory on CUDA, where they run in float16 on the tensor cores (float32 accumulation;
            similarities rounded to float16, about 5e-4 near 1).
        chunk_elements: the largest similarity block computed at once (``q_rows * m_rows``);
            memory is read block by block, each block once per call.

    Returns:
        ``[Q]`` float32 distances in [0, 2] on ``memory``'s device.
    """
    if queries.ndim != 2 or memory.ndim != 2 or queries.shape[1] != memory.shape[1]:
        raise InvalidInputError(
            f"nearest_neighbor_distance: expected queries [Q, D] and memory [K, D] with the same D, got "
            f"{list(queries.shape)} and {list(memory.shape)}."
        )
    if memory.shape[0] == 0:
        raise InvalidInputError("nearest_neighbor_distance: the memory is empty; add references first.")
    if chunk_elements < 1:
        raise InvalidInputError(f"chunk_elements must be >= 1, got {chunk_elements}.")
    compute = torch.float16 if memory.dtype == torch.float16 and memory.device.type == "cuda" else torch.float32
    queries = queries.to(device=memory.device, dtype=compute)
    n_q, n_m = queries.shape[0], memory.shape[0]
    q_rows, m_rows = _block_rows(n_q, n_m, chunk_elements)
    best = torch.full((n_q,), -math.inf, dtype=torch.float32, device=memory.device)
    for m_start in range(0, n_m, m_rows):
        block = memory[m_start : m_start + m_rows].to(compute).T  # [D, m]
        for q_start in range(0, n_q, q_rows):
            sim = queries[q_start : q_start + q_rows] @ block  # [q, m] <= chunk_elements
            part = best[q_start : q_start + q_rows]
            torch.maximum(part, sim.amax(dim=1).float(), out=part)
    return (1.0 - best).clamp_(min=0.0)


def nearest_neighbor_distance_blocks(queries: torch.Tensor, blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """:func:`nearest_neighbor_distance` for a graph export: the same ``1 - max_k <q, m_k>``,
    with no in-place update and no shape-dependent control flow, for any leading query shape.

    Args:
        queries: ``[..., D]`` L2-normalized (e.g. ``[B, G*G, D]``; computed in float32).
        blocks: the memory as float32 ``[D, m]`` blocks (transposed rows; see
            :meth:`ReferenceMemory.blocks`), each read once. A block's similarities take
            ``Q * m`` elements, so the block size bounds the search's memory.

    Returns:
        ``[...]`` float32 distances in [0, 2].
    """
    if not blocks:
        raise InvalidInputError("nearest_neighbor_distance_blocks: the memory is empty; add references first.")
    queries = queries.float()
    best: torch.Tensor | None = None
    for block in blocks:
        similarity = (queries @ block).amax(dim=-1)
        best = similarity if best is None else torch.maximum(best, similarity)
    return (1.0 - best).clamp(min=0.0)


def reference_distances(
    patch_features: dict[int, torch.Tensor],
    memories: dict[int, torch.Tensor],
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> dict[int, torch.Tensor]:
    """Per output layer, the nearest-neighbour distance of every test patch: ``[B, G*G]`` float32.

    Args:
        patch_features: layer -> ``[B, N, D]`` projected tokens, class token first (not normalized).
        memories: layer -> ``[K, D]`` L2-normalized reference patch tokens of that layer.
    """
    out = {}
    for layer, tokens in patch_features.items():
        queries = normalize_patch_tokens(tokens)  # [B, G*G, D]
        b, n, d = queries.shape
        dist = nearest_neighbor_distance(queries.reshape(b * n, d), memories[layer], chunk_elements=chunk_elements)
        out[layer] = dist.reshape(b, n).to(tokens.device)
    return out


def leave_one_out_distances(
    queries: torch.Tensor,
    groups: torch.Tensor,
    rows: torch.Tensor,
    row_groups: torch.Tensor,
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each reference unit's nearest-neighbour distances to the memory WITHOUT the rows of its
    own image (leave-one-out), as a normal test image would see the memory.

    Args:
        queries: ``[U, P, D]`` L2-normalized patch tokens of U units (images or tiles).
        groups: ``[U]`` int, the image each unit comes from (tiles of one image share it).
        rows: ``[K, D]`` the memory (L2-normalized; any storage dtype).
        row_groups: ``[K]`` int, non-decreasing: the image of each row (-1: an image that is
            none of the units', e.g. added by an earlier call).

    Returns:
        ``(distances [V, P] float32, kept [V] int64)``: the distances of the ``V <= U`` units
        whose image is not alone in the memory, and their indices into ``U``.
    """
    if queries.ndim != 3 or groups.shape != (queries.shape[0],) or row_groups.shape != (rows.shape[0],):
        raise InvalidInputError(
            f"leave_one_out_distances: expected queries [U, P, D], groups [U], rows [K, D], row_groups [K]; got "
            f"{list(queries.shape)}, {list(groups.shape)}, {list(rows.shape)}, {list(row_groups.shape)}."
        )
    row_groups = row_groups.to(rows.device)
    out: list[torch.Tensor] = []
    kept: list[torch.Tensor] = []
    for group in torch.unique(groups.cpu()).tolist():
        units = torch.nonzero(groups.cpu() == group).flatten()
        key = torch.tensor([group], dtype=row_groups.dtype, device=rows.device)
        start = int(torch.searchsorted(row_groups, key, right=False))
        end = int(torch.searchsorted(row_groups, key, right=True))
        others = [part for part in (rows[:start], rows[end:]) if part.shape[0]]
        if not others:
            continue  # the only image in the memory: nothing to leave in
        q = queries[units.to(queries.device)]
        flat = q.reshape(-1, q.shape[-1])
        best = torch.stack([nearest_neighbor_distance(flat, part, chunk_elements=chunk_elements) for part in others]).amin(dim=0)
        out.append(best.reshape(q.shape[0], q.shape[1]))
        kept.append(units)
    if not out:
        return queries.new_zeros((0, queries.shape[1]), dtype=torch.float32), torch.zeros(0, dtype=torch.long)
    order = torch.cat(kept)
    distances = torch.cat(out)
    sort = torch.argsort(order)
    return distances[sort.to(distances.device)], order[sort]


def greedy_coreset(
    features: torch.Tensor,
    n_select: int,
    *,
    projection_dim: int | None = 128,
    seed: int = 0,
) -> torch.Tensor:
    """Indices of a k-center greedy coreset of ``features`` (PatchCore, Roth et al. 2022, Sec. 3.2).

    Starting from one random row, repeatedly add the row farthest (Euclidean) from everything
    selected so far. As in PatchCore, distances are computed on a Johnson-Lindenstrauss random
    projection of the features to ``projection_dim`` dimensions (``None``: no projection).
    For L2-normalized features the Euclidean distance is ``sqrt(2 - 2 cos)``.

    Args:
        features: ``[N, D]`` (any float dtype; projected in float32 on its device).
        n_select: rows to keep, ``1 <= n_select <= N``.
        projection_dim: dimensions of the random projection.
        seed: seed of the projection and of the first row.

    Returns:
        ``[n_select]`` int64 indices (on the CPU), in selection order.
    """
    n = features.shape[0]
    if not 1 <= n_select <= n:
        raise InvalidInputError(f"greedy_coreset: n_select must be in 1..{n}, got {n_select}.")
    generator = torch.Generator().manual_seed(seed)
    x = features.float()
    if projection_dim is not None and projection_dim < x.shape[1]:
        proj = torch.randn(x.shape[1], projection_dim, generator=generator) / math.sqrt(projection_dim)
        x = x @ proj.to(x.device)
    first = int(torch.randint(n, (1,), generator=generator))
    selected = torch.empty(n_select, dtype=torch.long)
    selected[0] = first
    norms = (x * x).sum(dim=1)  # [N]
    # squared distance to the nearest selected row: |x|^2 - 2 x.c + |c|^2
    min_dist = (norms - 2.0 * (x @ x[first]) + norms[first]).clamp_(min=0.0)
    for i in range(1, n_select):
        index = int(torch.argmax(min_dist))
        selected[i] = index
        dist = (norms - 2.0 * (x @ x[index]) + norms[index]).clamp_(min=0.0)
        torch.minimum(min_dist, dist, out=min_dist)
    return selected
