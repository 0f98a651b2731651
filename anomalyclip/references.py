"""Few-shot normal references: a memory of normal patch features and the distance of test
patches to it (the memory container; :class:`~anomalyclip.AnomalyCLIP` wires it in). The
numerics live in :mod:`anomalyclip.reference_search` (the search, the coreset) and
:mod:`anomalyclip.reference_fusion` (the fusion); they are re-exported here.

Notation: B batch, N = 1 + G*G tokens (class token first), D embedding dim, K memory rows
(reference patches of one output layer), L output layers, S processing size.

The distance, per output layer ``l`` and test patch ``p``:
``d_l(p) = 1 - max_k cos(t_l(p), m_l(k))``, the nearest-neighbour cosine distance of the test
patch token to the memory of layer ``l`` (APRIL-GAN / VAND 2023 few-shot; WinCLIP+'s "visual
association score" is ``d / 2``). The tokens are the SAME patch tokens as the zero-shot map
(``ln_post`` + ``proj`` of the output layer, class token dropped), L2-normalized. How the
distances become the reference map and score, and how those are fused with the zero-shot
output (the ``"sum"`` and ``"standardized"`` rules), is :mod:`anomalyclip.reference_fusion`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import CheckpointError, InvalidInputError, with_fix
from .reference_fusion import (
    FUSIONS,
    FusionStatistics,
    Moments,
    ReferenceFusion,
    fuse_references,
    fuse_scores,
    reference_map,
    reference_score,
)
from .reference_search import (
    DEFAULT_CHUNK_ELEMENTS,
    greedy_coreset,
    leave_one_out_distances,
    nearest_neighbor_distance,
    nearest_neighbor_distance_blocks,
    normalize_patch_tokens,
    reference_distances,
)
from .scoring import gaussian_blur

__all__ = [
    "REFERENCES_NAME",
    "DEFAULT_FUSION",
    "FUSIONS",
    "FusionStatistics",
    "leave_one_out_distances",
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
_FORMAT = "anomalyclip-references"
_FORMAT_VERSION = 2  # 2: the fusion rule and its statistics
#: The fusion of a new memory (chosen by measurement, docs/fewshot.md).
DEFAULT_FUSION = "standardized"
_STATISTICS_KEY = "fusion_statistics"
_STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
#: The command-line flag of each setting :meth:`ReferenceMemory.mismatches` compares.
_CLI_FLAGS = {
    "image_size": "--image-size",
    "feature_layers": "--feature-layers",
    "dpam_layers": "--dpam-layers",
    "dpam_mode": "--dpam-mode",
}


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
        fusion: ``"sum"`` or ``"standardized"`` (:mod:`anomalyclip.reference_fusion`); files
            written before it was recorded load as ``"sum"``.
        statistics: the :class:`FusionStatistics` of the references (computed by
            :meth:`add_units`), or None when rows were added without them (:meth:`add`).
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
        fusion: str = DEFAULT_FUSION,
    ) -> None:
        if fusion not in FUSIONS:
            raise InvalidInputError(f"fusion must be one of {list(FUSIONS)}, got {fusion!r}.")
        self.fusion = fusion
        self.statistics: FusionStatistics | None = FusionStatistics()
        self._pending: dict[int, torch.Tensor] | None = None  # a lone first image's units, to measure later
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

        Rows added this way carry no fusion statistics (:attr:`statistics` becomes None: the
        ``"standardized"`` fusion then falls back to the sum); :meth:`add_units` computes them.
        """
        self._append(tokens, num_images=num_images, coreset=coreset, seed=seed)
        self.statistics = None

    def _append(
        self, tokens: dict[int, torch.Tensor], *, num_images: int, coreset: float | None, seed: int
    ) -> dict[int, torch.Tensor]:
        """:meth:`add`'s work; returns layer -> ``[k]`` indices of the kept new rows (sorted)."""
        missing = [layer for layer in self.feature_layers if layer not in tokens]
        if missing:
            raise InvalidInputError(f"ReferenceMemory.add: no patch tokens for layer(s) {missing}.")
        if coreset is not None and not (isinstance(coreset, (int, float)) and 0.0 < coreset <= 1.0):
            raise InvalidInputError(f"coreset must be a fraction in (0, 1], got {coreset!r}.")
        new, kept = {}, {}
        for layer in self.feature_layers:
            rows = tokens[layer]
            if rows.ndim != 2 or rows.shape[0] == 0:
                raise InvalidInputError(f"ReferenceMemory.add: layer {layer} needs [K, D] tokens, got {list(rows.shape)}.")
            index = torch.arange(rows.shape[0])
            if coreset is not None:
                keep = max(1, int(math.ceil(coreset * rows.shape[0])))
                if keep < rows.shape[0]:
                    index = greedy_coreset(rows, keep, seed=seed).sort().values  # row order: the images' order
                    rows = rows[index.to(rows.device)]
            new[layer] = rows.to(self.storage_dtype)
            kept[layer] = index
        for layer, rows in new.items():
            old = self.memories.get(layer)
            self.memories[layer] = rows if old is None else torch.cat([old, rows.to(old.device)])
        self.num_images += int(num_images)
        return kept

    def add_units(
        self,
        tokens: dict[int, torch.Tensor],
        *,
        groups: torch.Tensor,
        zero_shot_scores: torch.Tensor,
        zero_shot_maps: torch.Tensor,
        sigma: float,
        coreset: float | None = None,
        seed: int = 0,
    ) -> None:
        """Append reference units (images, or tiles of images) and update :attr:`statistics`.

        The units' zero-shot scores and maps enter the zero-shot statistics as given. Their
        reference part is measured leave-one-out (:func:`leave_one_out_distances`): each unit's
        patches against the memory as it stands after this call (earlier calls' rows and the
        kept rows of this call's other images), upsampled, summed over layers and blurred as in
        ``forward``. The statistics of earlier calls are merged in unchanged (pooled moments):
        their distances were measured against the smaller memory of their call, so adding all
        references in one call gives the exact leave-one-out statistics of the final memory.
        The one exception: a first call with a single image has no other image to measure it
        against; its units are kept (in memory, not saved) and measured against the next call's
        rows. With a coreset the memory holds only the kept rows, and so does the search.

        Args:
            tokens: layer -> ``[U, P, D]`` L2-normalized patch tokens of the U units.
            groups: ``[U]`` int, the image of each unit, 0-based within this call; the number of
                images added is ``groups.max() + 1``.
            zero_shot_scores: ``[U]`` the units' zero-shot scores.
            zero_shot_maps: ``[U, S, S]`` the units' zero-shot maps (blurred, as ``forward``'s).
            sigma: the model's blur, for the reference maps.
            coreset, seed: as in :meth:`add`.
        """
        first = next(iter(tokens.values())) if tokens else None
        if first is None or first.ndim != 3 or groups.ndim != 1 or groups.shape[0] != first.shape[0] or groups.numel() == 0:
            raise InvalidInputError("ReferenceMemory.add_units: expected tokens [U, P, D] per layer and groups [U].")
        groups = groups.to(torch.long).cpu()
        order = torch.argsort(groups, stable=True)  # rows of one image contiguous, as the search needs
        groups = groups[order]
        units = {layer: t[order.to(t.device)] for layer, t in tokens.items()}
        patches = first.shape[1]
        old_rows = len(self)
        kept = self._append(
            {layer: t.reshape(-1, t.shape[-1]) for layer, t in units.items()},
            num_images=int(groups.max()) + 1,
            coreset=coreset,
            seed=seed,
        )
        distances, measured = {}, torch.zeros(0, dtype=torch.long)
        for layer in self.feature_layers:
            row_groups = torch.cat([torch.full((old_rows,), -1, dtype=torch.long), groups.repeat_interleave(patches)[kept[layer]]])
            distances[layer], measured = leave_one_out_distances(
                units[layer], groups, self.memories[layer], row_groups, chunk_elements=self.chunk_elements
            )
        size = zero_shot_maps.shape[-1]
        update = FusionStatistics.of(
            zero_shot_scores=zero_shot_scores,
            zero_shot_maps=zero_shot_maps,
            reference_scores=reference_score(distances) if measured.numel() else torch.zeros(0),
            reference_maps=gaussian_blur(reference_map(distances, size), sigma) if measured.numel() else torch.zeros(0),
        )
        if self._pending is not None and old_rows:  # the lone first image, against this call's rows
            lone = {}
            for layer, pending in self._pending.items():
                new_rows = self.memories[layer].shape[0] - old_rows
                row_groups = torch.cat([torch.zeros(old_rows, dtype=torch.long), torch.ones(new_rows, dtype=torch.long)])
                lone[layer], _ = leave_one_out_distances(
                    pending, torch.zeros(pending.shape[0], dtype=torch.long), self.memories[layer], row_groups,
                    chunk_elements=self.chunk_elements,
                )  # fmt: skip
            update = update.merge(
                FusionStatistics(
                    reference_map=Moments.of(gaussian_blur(reference_map(lone, size), sigma)),
                    reference_score=Moments.of(reference_score(lone)),
                )
            )
        self._pending = units if old_rows == 0 and not measured.numel() else None
        if self.statistics is not None:
            self.statistics = self.statistics.merge(update)

    def fusion_statistics(self) -> FusionStatistics | None:
        """What :func:`~anomalyclip.reference_fusion.fuse_references` takes: the statistics for
        the ``"standardized"`` fusion when they are usable, else None (the plain sum: the
        ``"sum"`` fusion, or too few references for leave-one-out statistics)."""
        if self.fusion == "standardized" and self.statistics is not None and self.statistics.usable:
            return self.statistics
        return None

    @property
    def map_range(self) -> tuple[float, float]:
        """The range of the fused maps: ``(0, 1)`` when standardized, else ``(0, 3 L)``."""
        return (0.0, 1.0) if self.fusion_statistics() is not None else (0.0, 3.0 * len(self.feature_layers))

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
        """A content hash of the memory: ``sha256`` over :meth:`metadata` (sorted JSON, with the
        fusion rule), every layer's tensor bytes (in layer order, as stored) and the fusion
        statistics' bytes; the first 16 hex digits.

        Equal memories (same tokens, settings, fusion and backbone) give equal fingerprints,
        whatever device they are on; adding a reference or changing the fusion changes it. It
        reads every byte (about 1 GB/s).
        """
        digest = hashlib.sha256(json.dumps(self.metadata(), sort_keys=True).encode())
        for layer in sorted(self.memories):
            tensor = self.memories[layer].detach().cpu().contiguous()
            digest.update(f"layer_{layer}:{tuple(tensor.shape)}:".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        if self.statistics is not None:
            stats = self.statistics.to_tensor().detach().to("cpu", torch.float64).contiguous()
            digest.update(f"{_STATISTICS_KEY}:{tuple(stats.shape)}:".encode())
            digest.update(stats.numpy().tobytes())
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
            "fusion": self.fusion,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``layer_<l>`` tensors ``[K, D]`` and :meth:`metadata` to a safetensors file, atomically."""
        from safetensors.torch import save_file

        from .files import atomic_path

        if not self.memories:
            raise InvalidInputError("The reference memory is empty; nothing to save.")
        tensors = {f"layer_{layer}": t.detach().cpu().contiguous() for layer, t in self.memories.items()}
        if self.statistics is not None:
            tensors[_STATISTICS_KEY] = self.statistics.to_tensor()
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
                fusion=meta.get("fusion", "sum"),  # files before format 2: the plain sum
            )
            memory.num_images = int(meta["num_images"])
            statistics = tensors.pop(_STATISTICS_KEY, None)
            memory.statistics = None if statistics is None else FusionStatistics.from_tensor(statistics)
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
            f"{self.nbytes() / 2**20:.1f} MiB, fusion {self.fusion!r}"
            + ("" if self.fusion == "sum" or self.fusion_statistics() is not None else " (too few references: the sum)")
            + ")"
        )


def resolve_storage_dtype(value: torch.dtype | str) -> torch.dtype:
    """``torch.float32`` / ``torch.float16`` from a dtype or its name; anything else is an error."""
    if isinstance(value, torch.dtype) and value in _STORAGE_DTYPES.values():
        return value
    if isinstance(value, str) and value.replace("torch.", "") in _STORAGE_DTYPES:
        return _STORAGE_DTYPES[value.replace("torch.", "")]
    raise InvalidInputError(f"Reference storage dtype must be float32 or float16, got {value!r}.")

