"""Few-shot normal references: a memory of normal patch features and the distance of test
patches to it (numerics and the memory container; :class:`~anomalyclip.AnomalyCLIP` wires it in).

Notation: B batch, N = 1 + G*G tokens (class token first), D embedding dim, K memory rows
(reference patches of one output layer), L output layers, S processing size.

The fusion (see ``docs/fewshot.md``), per output layer ``l`` and test patch ``p``:

- ``d_l(p) = 1 - max_k cos(t_l(p), m_l(k))``: the nearest-neighbour cosine distance of the test
  patch token to the memory of layer ``l`` (APRIL-GAN / VAND 2023 few-shot; WinCLIP+'s
  "visual association score" is ``d / 2``). The tokens are the SAME patch tokens as the zero-shot
  map (``ln_post`` + ``proj`` of the output layer, class token dropped), L2-normalized.
- reference map ``R = sum_l upsample(d_l)``: each ``G x G`` distance grid bilinearly upsampled to
  ``S x S`` (align_corners=False), summed over layers, exactly as the zero-shot layer maps are.
- fused map ``= blur(zero-shot raw map + R)`` with the model's Gaussian blur (APRIL-GAN adds the
  two maps; the blur is AnomalyCLIP's, applied once to the sum).
- reference score ``= max_p (1/L) sum_l d_l(p) / 2`` (in [0, 1]) and fused image score
  ``= (zero-shot score + reference score) / 2`` (WinCLIP+'s image score, with its visual
  association score averaged over the output layers).

The nearest-neighbour search runs in blocks of at most ``chunk_elements`` similarities (never a
full patch-by-memory matrix), on the memory's device, in float32 whatever the storage dtype.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from .errors import CheckpointError, InvalidInputError, with_fix

__all__ = [
    "REFERENCES_NAME",
    "DEFAULT_CHUNK_ELEMENTS",
    "normalize_patch_tokens",
    "nearest_neighbor_distance",
    "nearest_neighbor_distance_blocks",
    "reference_distances",
    "reference_map",
    "reference_score",
    "fuse_scores",
    "ReferenceFusion",
    "fuse_references",
    "greedy_coreset",
    "resolve_storage_dtype",
    "ReferenceMemory",
]

logger = logging.getLogger(__name__)

#: File name of the references beside ``config.json`` in a ``save_pretrained`` directory.
REFERENCES_NAME = "references.safetensors"
#: Default budget of one similarity block of the nearest-neighbour search (elements; 64 MiB float32).
DEFAULT_CHUNK_ELEMENTS = 1 << 24
_FORMAT = "anomalyclip-references"
_FORMAT_VERSION = 1
_STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
#: The command-line flag of each setting :meth:`ReferenceMemory.mismatches` compares.
_CLI_FLAGS = {
    "image_size": "--image-size",
    "feature_layers": "--feature-layers",
    "dpam_layers": "--dpam-layers",
    "dpam_mode": "--dpam-mode",
}


# ----------------------------------------------------------------------------- numerics


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


def reference_map(distances: dict[int, torch.Tensor], image_size: int) -> torch.Tensor:
    """The raw reference map ``[B, S, S]``: each layer's ``G x G`` distances upsampled bilinearly
    (align_corners=False, as the zero-shot layer maps) and summed over layers (values in [0, 2L])."""
    total: torch.Tensor | None = None
    for dist in distances.values():
        b, n = dist.shape
        grid = int(round(math.sqrt(n)))
        up = F.interpolate(dist.reshape(b, 1, grid, grid), size=(image_size, image_size), mode="bilinear", align_corners=False)
        total = up[:, 0] if total is None else total + up[:, 0]
    if total is None:
        raise InvalidInputError("reference_map: no output layer given.")
    return total


def reference_score(distances: dict[int, torch.Tensor]) -> torch.Tensor:
    """``[B]`` in [0, 1]: the largest, over patches, layer-averaged visual association score
    ``mean_l d_l / 2`` (WinCLIP+)."""
    stacked = torch.stack(list(distances.values()))  # [L, B, G*G]
    return (stacked.mean(dim=0) / 2.0).amax(dim=-1)


def fuse_scores(zero_shot_scores: torch.Tensor, reference_scores: torch.Tensor) -> torch.Tensor:
    """The fused image score ``(zero-shot + reference) / 2`` (WinCLIP+), ``[B]`` in [0, 1]."""
    return (zero_shot_scores.float() + reference_scores.float()) / 2.0


class ReferenceFusion(NamedTuple):
    """The fused outputs of :func:`fuse_references` (all float32)."""

    scores: torch.Tensor  #: ``[B]`` fused image scores in [0, 1]
    raw_maps: torch.Tensor  #: ``[B, S, S]`` zero-shot raw map + reference map, before the blur
    reference_raw_maps: torch.Tensor  #: ``[B, S, S]`` the reference map alone, before the blur
    reference_scores: torch.Tensor  #: ``[B]`` reference scores in [0, 1]


def fuse_references(
    zero_shot_scores: torch.Tensor, zero_shot_raw_maps: torch.Tensor, distances: dict[int, torch.Tensor]
) -> ReferenceFusion:
    """Fuse the zero-shot outputs with the reference distances (the module docstring's fusion).

    Args:
        zero_shot_scores: ``[B]`` zero-shot image scores.
        zero_shot_raw_maps: ``[B, S, S]`` zero-shot layer-sum maps, before the blur.
        distances: layer -> ``[B, G*G]`` nearest-neighbour distances (:func:`reference_distances`).

    Returns:
        :class:`ReferenceFusion`; the caller blurs ``raw_maps`` (and ``reference_raw_maps`` if it
        reports them) with the model's Gaussian blur, as the zero-shot map is blurred.
    """
    reference_raw = reference_map(distances, zero_shot_raw_maps.shape[-1])
    reference_scores = reference_score(distances)
    return ReferenceFusion(
        scores=fuse_scores(zero_shot_scores, reference_scores),
        raw_maps=zero_shot_raw_maps + reference_raw,
        reference_raw_maps=reference_raw,
        reference_scores=reference_scores,
    )


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


# ----------------------------------------------------------------------------- the memory


def _layers(value: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(v) for v in value)


class ReferenceMemory:
    """Per-layer memories of L2-normalized patch tokens of normal reference images.

    It records what the tokens were computed with (``image_size``, ``feature_layers``, the DPAM
    settings, the backbone and, when the references were tiled, the tile size and overlap), so
    that a model whose settings changed refuses to mix them (:meth:`check_compatible`).

    Attributes:
        image_size: the processing size S the reference tokens were computed at.
        feature_layers: the output layers, one memory each.
        memories: layer -> ``[K, D]`` normalized tokens in ``storage_dtype``.
        num_images: how many reference images (not tiles) were added.
        storage_dtype: float32 or float16.
        backbone: the backbone reference of the model that computed them.
        tile_size, tile_overlap: the tiling of the reference images, or None.
        dpam_layers, dpam_mode: the DPAM settings of the model that computed them (None:
            unknown, in files written before they were recorded; then not checked).
        backbone_fingerprint: :func:`anomalyclip.backbone.backbone_fingerprint` of the CLIP that
            computed them (None: unknown, in files written before anomalyclip 0.3; then not
            checked, with a warning); a model with another backbone refuses the memory
            (:meth:`check_backbone`).
        chunk_elements: budget of one similarity block of the search.
    """

    def __init__(
        self,
        *,
        image_size: int,
        feature_layers: Sequence[int],
        backbone: str = "",
        storage_dtype: torch.dtype | str = torch.float32,
        tile_size: int | None = None,
        tile_overlap: float | None = None,
        dpam_layers: int | None = None,
        dpam_mode: str | None = None,
        backbone_fingerprint: str | None = None,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ) -> None:
        self.image_size = int(image_size)
        self.feature_layers = _layers(feature_layers)
        self.backbone = str(backbone)
        self.storage_dtype = resolve_storage_dtype(storage_dtype)
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap
        self.dpam_layers = None if dpam_layers is None else int(dpam_layers)
        self.dpam_mode = dpam_mode
        self.backbone_fingerprint = None if backbone_fingerprint is None else str(backbone_fingerprint)
        self._warned_unfingerprinted = False
        self.chunk_elements = int(chunk_elements)
        self.memories: dict[int, torch.Tensor] = {}
        self.num_images = 0

    # -------------------------------------------------------------- building
    def add(
        self,
        tokens: dict[int, torch.Tensor],
        *,
        num_images: int,
        coreset: float | None = None,
        seed: int = 0,
    ) -> None:
        """Append the patch tokens of ``num_images`` reference images (or of their tiles).

        Args:
            tokens: layer -> ``[K, D]`` L2-normalized patch tokens (class tokens excluded; see
                :func:`normalize_patch_tokens`), for every layer in :attr:`feature_layers`.
            num_images: the number of images these tokens come from.
            coreset: keep only this fraction (0, 1] of the new patches, chosen per layer by
                :func:`greedy_coreset` on the tokens' device (None: keep all).
            seed: seed of the coreset.
        """
        missing = [layer for layer in self.feature_layers if layer not in tokens]
        if missing:
            raise InvalidInputError(f"ReferenceMemory.add: no patch tokens for layer(s) {missing}.")
        if coreset is not None and not (isinstance(coreset, (int, float)) and 0.0 < coreset <= 1.0):
            raise InvalidInputError(f"coreset must be a fraction in (0, 1], got {coreset!r}.")
        new = {}
        for layer in self.feature_layers:
            rows = tokens[layer]
            if rows.ndim != 2 or rows.shape[0] == 0:
                raise InvalidInputError(f"ReferenceMemory.add: layer {layer} needs [K, D] tokens, got {list(rows.shape)}.")
            if coreset is not None:
                keep = max(1, int(math.ceil(coreset * rows.shape[0])))
                if keep < rows.shape[0]:
                    rows = rows[greedy_coreset(rows, keep, seed=seed).to(rows.device)]
            new[layer] = rows.to(self.storage_dtype)
        for layer, rows in new.items():
            old = self.memories.get(layer)
            self.memories[layer] = rows if old is None else torch.cat([old, rows.to(old.device)])
        self.num_images += int(num_images)

    # -------------------------------------------------------------- use
    def __len__(self) -> int:
        """Rows per memory (patches kept per layer; the same for every layer)."""
        return 0 if not self.memories else int(next(iter(self.memories.values())).shape[0])

    @property
    def device(self) -> torch.device | None:
        return None if not self.memories else next(iter(self.memories.values())).device

    def to(self, device: torch.device | str) -> "ReferenceMemory":
        """Move the memories to ``device`` (in place); returns self."""
        self.memories = {k: v.to(device) for k, v in self.memories.items()}
        return self

    def blocks(self, patches_per_image: int, device: torch.device | str | None = None) -> dict[int, list[torch.Tensor]]:
        """Each layer's memory as float32 ``[D, m]`` blocks for :func:`nearest_neighbor_distance_blocks`.

        ``m`` is the most rows with ``patches_per_image * m <= chunk_elements`` (at least 1), so
        one block's similarities take at most :attr:`chunk_elements` elements per image. The
        blocks are float32 copies on ``device`` (default: the memory's), whatever the storage
        dtype; each is moved there before it is widened.
        """
        if patches_per_image < 1:
            raise InvalidInputError(f"patches_per_image must be >= 1, got {patches_per_image}.")
        rows = max(1, self.chunk_elements // int(patches_per_image))
        return {
            layer: [block.to(device if device is not None else block.device).float().T.contiguous() for block in memory.split(rows)]
            for layer, memory in self.memories.items()
        }

    def nbytes(self) -> int:
        """Bytes held by the memories."""
        return sum(t.numel() * t.element_size() for t in self.memories.values())

    def mismatches(
        self,
        *,
        image_size: int,
        feature_layers: Sequence[int],
        embed_dim: int | None = None,
        dpam_layers: int | None = None,
        dpam_mode: str | None = None,
    ) -> list[tuple[str, object, object]]:
        """``(setting, the references' value, the given value)`` for every setting that differs
        (settings given as None, or unknown to the memory, are not compared)."""
        found: list[tuple[str, object, object]] = []
        if int(image_size) != self.image_size:
            found.append(("image_size", self.image_size, int(image_size)))
        if _layers(feature_layers) != self.feature_layers:
            found.append(("feature_layers", list(self.feature_layers), list(_layers(feature_layers))))
        if embed_dim is not None and self.memories:
            dim = int(next(iter(self.memories.values())).shape[1])
            if dim != int(embed_dim):
                found.append(("embedding dim", dim, int(embed_dim)))
        for name, ours, given in (("dpam_layers", self.dpam_layers, dpam_layers), ("dpam_mode", self.dpam_mode, dpam_mode)):
            if ours is not None and given is not None and ours != given:
                found.append((name, ours, given))
        return found

    def check_compatible(self, **settings: Any) -> None:
        """Raise :class:`InvalidInputError` when a model with these settings (the keywords of
        :meth:`mismatches`) cannot use the memory."""
        found = self.mismatches(**settings)
        if found:
            flags = [_CLI_FLAGS[name] for name, _, _ in found if name in _CLI_FLAGS]
            raise with_fix(
                InvalidInputError,
                "The references were computed with "
                + " and ".join(f"{name} {ours} (the model now has {given})" for name, ours, given in found)
                + ": their patch tokens do not match the model's. {fix}.",
                python="Call model.clear_references() and add the references again with the current settings, or "
                "set the model back (model.reconfigure(...))",
                cli=(f"Drop {' / '.join(flags)} to run the profile at the settings of its references" if flags else
                     "Use the profile with the backbone it was made with")
                + ", or save a new profile with references taken at these settings",
            )

    def check_backbone(self, fingerprint: str, backbone: str = "") -> None:
        """Refuse a model whose backbone differs from the one that computed the references.

        Args:
            fingerprint: :func:`anomalyclip.backbone.backbone_fingerprint` of the model's CLIP.
            backbone: the model's backbone reference (for the message).

        Raises:
            InvalidInputError: the fingerprints differ (the message names both backbones).

        A memory without a recorded fingerprint (a file written before anomalyclip 0.3) is not
        checked; it logs one warning per memory.
        """
        if self.backbone_fingerprint is None:
            if not self._warned_unfingerprinted:
                self._warned_unfingerprinted = True
                logger.warning(
                    "These references (backbone %r) record no backbone fingerprint (written before anomalyclip 0.3): "
                    "cannot check that they were computed with this model's backbone. Add them again and save the "
                    "profile to record it.",
                    self.backbone or "unknown",
                )
            return
        if self.backbone_fingerprint != fingerprint:
            raise InvalidInputError(
                f"The references were computed with backbone {self.backbone or 'unknown'!r} (weights fingerprint "
                f"{self.backbone_fingerprint}), but this model's backbone is {backbone or 'unknown'!r} (fingerprint "
                f"{fingerprint}): their patch tokens cannot be compared. Add the references again with this model "
                "(model.clear_references(); model.add_references(...)), or load the model with the backbone they "
                "were computed with."
            )

    def fingerprint(self) -> str:
        """A content hash of the memory: ``sha256`` over :meth:`metadata` (sorted JSON) and every
        layer's tensor bytes (in layer order, as stored); the first 16 hex digits.

        Equal memories (same tokens, settings and backbone) give equal fingerprints, whatever
        device they are on; adding a reference changes it. It reads every byte (about 1 GB/s).
        """
        digest = hashlib.sha256(json.dumps(self.metadata(), sort_keys=True).encode())
        for layer in sorted(self.memories):
            tensor = self.memories[layer].detach().cpu().contiguous()
            digest.update(f"layer_{layer}:{tuple(tensor.shape)}:".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        return digest.hexdigest()[:16]

    def distances(self, patch_features: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """:func:`reference_distances` against this memory: layer -> ``[B, G*G]``."""
        return reference_distances(patch_features, self.memories, chunk_elements=self.chunk_elements)

    # -------------------------------------------------------------- persistence
    def metadata(self) -> dict[str, str]:
        """What the memory was computed with, as safetensors metadata (strings)."""
        return {
            "format": _FORMAT,
            "format_version": str(_FORMAT_VERSION),
            "image_size": str(self.image_size),
            "feature_layers": json.dumps(list(self.feature_layers)),
            "backbone": self.backbone,
            "dtype": str(self.storage_dtype).replace("torch.", ""),
            "num_images": str(self.num_images),
            "tile_size": json.dumps(self.tile_size),
            "tile_overlap": json.dumps(self.tile_overlap),
            "dpam_layers": json.dumps(self.dpam_layers),
            "dpam_mode": json.dumps(self.dpam_mode),
            "backbone_fingerprint": json.dumps(self.backbone_fingerprint),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``layer_<l>`` tensors ``[K, D]`` and :meth:`metadata` to a safetensors file, atomically."""
        from safetensors.torch import save_file

        from .files import atomic_path

        if not self.memories:
            raise InvalidInputError("The reference memory is empty; nothing to save.")
        tensors = {f"layer_{layer}": t.detach().cpu().contiguous() for layer, t in self.memories.items()}
        path = Path(path)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=self.metadata())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ReferenceMemory":
        """Read a file written by :meth:`save`, validated (keys, shapes, dtype, finite, normalized)."""
        from safetensors import SafetensorError, safe_open

        source = str(path)
        try:
            with safe_open(source, framework="pt") as handle:
                meta = dict(handle.metadata() or {})
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"Cannot read {source} as safetensors: {exc}") from exc
        if meta.get("format") != _FORMAT:
            raise CheckpointError(f"{source}: not an anomalyclip references file (metadata format {meta.get('format')!r}).")
        try:
            version = int(meta["format_version"])
            if version > _FORMAT_VERSION:
                raise CheckpointError(
                    f"{source}: format_version {version} is newer than this library supports ({_FORMAT_VERSION}). "
                    "Upgrade anomalyclip."
                )
            memory = cls(
                image_size=int(meta["image_size"]),
                feature_layers=json.loads(meta["feature_layers"]),
                backbone=meta.get("backbone", ""),
                storage_dtype=meta["dtype"],
                tile_size=json.loads(meta.get("tile_size", "null")),
                tile_overlap=json.loads(meta.get("tile_overlap", "null")),
                dpam_layers=json.loads(meta.get("dpam_layers", "null")),
                dpam_mode=json.loads(meta.get("dpam_mode", "null")),
                backbone_fingerprint=json.loads(meta.get("backbone_fingerprint", "null")),
            )
            memory.num_images = int(meta["num_images"])
        except (KeyError, ValueError, TypeError, InvalidInputError) as exc:
            raise CheckpointError(f"{source}: invalid references metadata ({exc}).") from exc
        expected = {f"layer_{layer}" for layer in memory.feature_layers}
        if set(tensors) != expected:
            raise CheckpointError(f"{source}: tensors {sorted(tensors)}, expected {sorted(expected)}.")
        rows = {t.shape[0] for t in tensors.values()}
        dims = {t.shape[1] if t.ndim == 2 else -1 for t in tensors.values()}
        if len(rows) != 1 or len(dims) != 1 or -1 in dims or 0 in rows:
            raise CheckpointError(f"{source}: each layer must hold a non-empty [K, D] tensor with the same K and D.")
        for key, t in tensors.items():
            if t.dtype != memory.storage_dtype or not torch.isfinite(t).all():
                raise CheckpointError(f"{source}: '{key}' must hold finite {meta['dtype']} values.")
            norms = t.float().norm(dim=1)
            if not torch.allclose(norms, torch.ones_like(norms), atol=1e-2):
                raise CheckpointError(f"{source}: '{key}' rows are not L2-normalized patch tokens.")
        memory.memories = {layer: tensors[f"layer_{layer}"] for layer in memory.feature_layers}
        return memory

    def __repr__(self) -> str:
        return (
            f"ReferenceMemory({self.num_images} images, {len(self)} patches per layer, layers "
            f"{list(self.feature_layers)}, S={self.image_size}, {str(self.storage_dtype).replace('torch.', '')}, "
            f"{self.nbytes() / 2**20:.1f} MiB)"
        )


def resolve_storage_dtype(value: torch.dtype | str) -> torch.dtype:
    """``torch.float32`` / ``torch.float16`` from a dtype or its name; anything else is an error."""
    if isinstance(value, torch.dtype) and value in _STORAGE_DTYPES.values():
        return value
    if isinstance(value, str) and value.replace("torch.", "") in _STORAGE_DTYPES:
        return _STORAGE_DTYPES[value.replace("torch.", "")]
    raise InvalidInputError(f"Reference storage dtype must be float32 or float16, got {value!r}.")

