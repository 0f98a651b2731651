"""The feature cache of :func:`anomalyclip.train.finetune.finetune`: frozen vision features, computed once.

Training uses no augmentation and the vision encoder is frozen, so an image's vision features
never change from one epoch to the next. The cache stores, per image (by its index in the
training data), the global feature ``[D]`` and, per output layer, the patch features ``[N, D]``
(projected, not normalized, class token first) in a chosen dtype:

- :class:`MemoryFeatureCache`: preallocated CPU tensors;
- :class:`DiskFeatureCache`: one safetensors file per image, written atomically, keyed to
  everything the features depend on (:func:`feature_cache_key`: backbone and a fingerprint of its
  vision weights, image size, output layers, DPAM settings, normalization, dtypes) and to the
  image file (absolute path, size, modification time), so that a stale entry is never used.

:func:`fill_feature_cache` encodes the missing images in fixed chunks of consecutive indices, so
an image's features do not depend on the shuffling order, on which epoch filled the cache or on
whether a run was resumed: runs with the same data and settings get bit-identical features.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..data.reader import SampleReader
from ..errors import DatasetError, ImageLoadError, InvalidInputError
from ..runtime import is_out_of_memory, out_of_memory_error
from ..files import atomic_path, cache_root
from .interface import TrainableModel

__all__ = [
    "FeatureCache",
    "MemoryFeatureCache",
    "DiskFeatureCache",
    "feature_cache_key",
    "make_feature_cache",
    "fill_feature_cache",
    "default_cache_dir",
    "format_bytes",
    "vision_fingerprint",
]

logger = logging.getLogger(__name__)

_CACHE_FORMAT = 1


def format_bytes(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def vision_fingerprint(model: TrainableModel) -> str:
    """A cheap fingerprint of the vision weights: names, shapes and up to 4096 strided values of
    every vision parameter and buffer (a different CLIP, or one fine-tuned anywhere, differs)."""
    digest = hashlib.sha256()
    tensors = list(model.clip.visual.named_parameters()) + list(model.clip.visual.named_buffers())
    for name, t in tensors:
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        digest.update(f"{name}:{list(t.shape)}:{t.dtype};".encode())
        digest.update(flat[::step][:4096].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def feature_cache_key(model: TrainableModel, dtype: torch.dtype) -> dict[str, Any]:
    """Everything the cached vision features of an image depend on, besides the image itself."""
    c = model.config
    return {
        "cache_format": _CACHE_FORMAT,
        "backbone": c.backbone,
        "quick_gelu": c.quick_gelu,
        "vision_weights": vision_fingerprint(model),
        "image_size": c.image_size,
        "feature_layers": sorted(c.feature_layers),
        "dpam_layers": c.dpam_layers,
        "dpam_mode": c.dpam_mode,
        "mean": list(c.mean),
        "std": list(c.std),
        "model_dtype": str(model.dtype),
        "cache_dtype": str(dtype),
    }


class FeatureCache:
    """Vision features by sample index: the global feature ``[D]`` and, per output layer, the
    patch features ``[N, D]`` (projected, not normalized), stored in ``dtype``.

    Subclasses implement :meth:`_store` and :meth:`_load`; :meth:`put` then :meth:`get` returns
    the values rounded to ``dtype`` on the CPU.
    """

    def __init__(self, n: int, layers: Sequence[int], n_tokens: int, dim: int, dtype: torch.dtype) -> None:
        self.n, self.layers, self.n_tokens, self.dim, self.dtype = n, tuple(layers), n_tokens, dim, dtype
        self.filled = np.zeros(n, dtype=bool)

    @property
    def nbytes(self) -> int:
        """Size of the full cache in bytes."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.n * (1 + len(self.layers) * self.n_tokens) * self.dim * itemsize

    def describe(self) -> str:
        """The size computation, e.g. ``"1725 images x (1 global + 1 layers x 1370 tokens) x 768 x 2 bytes = 3.6 GB"``."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return (
            f"{self.n} images x (1 global + {len(self.layers)} layers x {self.n_tokens} tokens) x {self.dim} x "
            f"{itemsize} bytes = {format_bytes(self.nbytes)}"
        )

    def missing(self, indices: Iterable[int]) -> list[int]:
        """The indices among ``indices`` without an entry yet."""
        return [i for i in indices if not self.filled[i]]

    @property
    def complete(self) -> bool:
        """Whether every image has an entry."""
        return bool(self.filled.all())

    def put(self, indices: Sequence[int], image_features: torch.Tensor, patch_features: dict[int, torch.Tensor]) -> None:
        """Store ``image_features [b, D]`` and ``patch_features {layer: [b, N, D]}`` of ``indices``."""
        image = image_features.detach().to(device="cpu", dtype=self.dtype)
        patches = {l: patch_features[l].detach().to(device="cpu", dtype=self.dtype) for l in self.layers}
        self._store(list(indices), image, patches)
        self.filled[list(indices)] = True

    def get(self, indices: Sequence[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """``([b, D], {layer: [b, N, D]})`` in the cache dtype, on the CPU."""
        not_there = self.missing(indices)
        if not_there:
            raise InvalidInputError(
                f"The feature cache has no entry for sample(s) {not_there[:5]}{' ...' if len(not_there) > 5 else ''} "
                f"({len(not_there)} missing); put() their features first (fill_feature_cache does it for a data set)."
            )
        return self._load(list(indices))

    def _store(self, indices: list[int], image: torch.Tensor, patches: dict[int, torch.Tensor]) -> None:
        raise NotImplementedError

    def _load(self, indices: list[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        raise NotImplementedError


class MemoryFeatureCache(FeatureCache):
    """The cache as preallocated CPU tensors (pages are only touched as they fill)."""

    def __init__(self, n: int, layers: Sequence[int], n_tokens: int, dim: int, dtype: torch.dtype) -> None:
        super().__init__(n, layers, n_tokens, dim, dtype)
        self._image = torch.empty((n, dim), dtype=dtype)
        self._patches = {l: torch.empty((n, n_tokens, dim), dtype=dtype) for l in self.layers}

    def _store(self, indices: list[int], image: torch.Tensor, patches: dict[int, torch.Tensor]) -> None:
        idx = torch.tensor(indices)
        self._image[idx] = image
        for l in self.layers:
            self._patches[l][idx] = patches[l]

    def _load(self, indices: list[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        idx = torch.tensor(indices)
        return self._image[idx], {l: self._patches[l][idx] for l in self.layers}


class DiskFeatureCache(FeatureCache):
    """The cache as one safetensors file per image under ``directory/<key hash>/``.

    A file's name hashes the model key (:func:`feature_cache_key`) and the image file's absolute
    path, size and modification time; its metadata holds both keys in full and is checked, with the
    tensor shapes, before an entry is trusted. Files are written atomically, so an interrupted run
    leaves only complete entries, which the next run reuses.
    """

    def __init__(
        self,
        directory: Path,
        key: dict[str, Any],
        samples: list[Any],
        layers: Sequence[int],
        n_tokens: int,
        dim: int,
        dtype: torch.dtype,
    ) -> None:
        super().__init__(len(samples), layers, n_tokens, dim, dtype)
        self.key_json = json.dumps(key, sort_keys=True)
        self.directory = Path(directory) / hashlib.sha256(self.key_json.encode()).hexdigest()[:16]
        self._sample_keys = [self._sample_key(s.image_path) for s in samples]
        self._paths = [
            self.directory / (hashlib.sha256(f"{self.key_json}\n{k}".encode()).hexdigest()[:32] + ".safetensors")
            for k in self._sample_keys
        ]
        for i, path in enumerate(self._paths):
            self.filled[i] = path.is_file() and self._valid(path, self._sample_keys[i])

    @staticmethod
    def _sample_key(image_path: Any) -> str:
        path = Path(image_path).resolve()
        try:
            st = path.stat()
        except OSError as exc:
            raise ImageLoadError(f"Cannot read image '{image_path}': {exc}") from exc
        return json.dumps({"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}, sort_keys=True)

    def _valid(self, path: Path, sample_key: str) -> bool:
        expected = {"image": [self.dim], **{f"patch.{l}": [self.n_tokens, self.dim] for l in self.layers}}
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
                ok = meta.get("model_key") == self.key_json and meta.get("sample_key") == sample_key
                ok = ok and shapes == expected and all(f.get_slice(k).get_dtype() == self._st_dtype for k in f.keys())
        except (SafetensorError, OSError, ValueError) as exc:
            logger.warning("Ignoring unreadable feature cache entry %s: %s", path, exc)
            return False
        if not ok:
            logger.warning("Ignoring feature cache entry %s: it does not match this image and model.", path)
        return ok

    @property
    def _st_dtype(self) -> str:
        return {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[self.dtype]

    def _store(self, indices: list[int], image: torch.Tensor, patches: dict[int, torch.Tensor]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for row, index in enumerate(indices):
            tensors = {"image": image[row].contiguous(), **{f"patch.{l}": patches[l][row].contiguous() for l in self.layers}}
            metadata = {"model_key": self.key_json, "sample_key": self._sample_keys[index]}
            with atomic_path(self._paths[index]) as tmp:
                save_file(tensors, str(tmp), metadata=metadata)

    def _load(self, indices: list[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        entries = []
        for index in indices:
            try:
                entries.append(load_file(str(self._paths[index])))
            except (SafetensorError, OSError) as exc:
                raise DatasetError(
                    f"Feature cache entry {self._paths[index]} (image '{json.loads(self._sample_keys[index])['path']}') "
                    f"became unreadable during training: {exc}. Delete {self.directory} and restart."
                ) from exc
        image = torch.stack([e["image"] for e in entries])
        return image, {l: torch.stack([e[f"patch.{l}"] for e in entries]) for l in self.layers}


def default_cache_dir() -> Path:
    """``$ANOMALYCLIP_CACHE/features``, else ``~/.cache/anomalyclip/features``."""


    return cache_root() / "features"


def make_feature_cache(
    mode: str | None,
    model: TrainableModel,
    samples: list[Any],
    dtype: torch.dtype,
    cache_dir: str | os.PathLike | None,
) -> FeatureCache | None:
    """The cache for ``samples`` under ``model``'s current settings, its size logged before use.

    Args:
        mode: ``"memory"``, ``"disk"`` or None (no cache: returns None).
        model: the :class:`~anomalyclip.AnomalyCLIP` whose features are cached.
        samples: the training samples (index ``i`` of the cache is ``samples[i]``).
        dtype: storage dtype of the features.
        cache_dir: root of the disk cache (default :func:`default_cache_dir`).
    """
    if mode is None:
        return None
    c = model.config
    n_tokens = 1 + (c.image_size // model.patch_size) ** 2
    layers = sorted(c.feature_layers)
    if mode == "memory":
        try:
            cache: FeatureCache = MemoryFeatureCache(len(samples), layers, n_tokens, c.embed_dim, dtype)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            raise out_of_memory_error(
                exc,
                f"allocating the in-memory feature cache ({len(samples)} images x (1 + {len(layers)} x {n_tokens}) x "
                f"{c.embed_dim} values in {str(dtype).replace('torch.', '')})",
                "Use cache_dtype='float16', feature_cache='disk' or feature_cache=None.",
            ) from exc
        logger.info("feature cache (memory, %s): %s", str(dtype).replace("torch.", ""), cache.describe())
        return cache
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache = DiskFeatureCache(directory, feature_cache_key(model, dtype), samples, layers, n_tokens, c.embed_dim, dtype)
    todo = len(cache.missing(range(cache.n)))
    logger.info(
        "feature cache (disk, %s, %s): %s; %d of %d images already cached",
        str(dtype).replace("torch.", ""),
        cache.directory,
        cache.describe(),
        cache.n - todo,
        cache.n,
    )
    needed = cache.nbytes * todo / max(cache.n, 1)
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if needed > free:
        logger.warning(
            "The feature cache needs %s more but only %s are free under %s; pass cache_dir= elsewhere, "
            "cache_dtype='float16', or feature_cache='memory'.",
            format_bytes(needed),
            format_bytes(free),
            directory,
        )
    return cache


def fill_feature_cache(
    model: TrainableModel,
    cache: FeatureCache,
    reader: SampleReader,
    *,
    batch_size: int,
    num_workers: int = 0,
    progress: bool = True,
) -> int:
    """Encode the images missing from ``cache`` and store their features.

    ``reader`` reads the images of the cache's samples as the model preprocesses them
    (``SampleReader.for_config(samples, model.config, masks=False)``).

    Images are encoded in fixed chunks of ``batch_size`` consecutive indices (``0..b-1``,
    ``b..2b-1``, ...); a chunk with any missing image is encoded whole and its missing images are
    stored. The vision pass runs without gradients on the model's device and dtype.

    Returns:
        The number of images stored.
    """
    from tqdm.auto import tqdm

    chunks = [list(range(i, min(i + batch_size, cache.n))) for i in range(0, cache.n, batch_size)]
    todo = [chunk for chunk in chunks if cache.missing(chunk)]
    if not todo:
        return 0
    loader = torch.utils.data.DataLoader(reader, batch_sampler=todo, num_workers=num_workers)
    stored = 0
    with tqdm(total=sum(len(c) for c in todo), desc="feature cache", unit="img", disable=not progress) as bar:
        for batch in loader:
            indices, pixel_values = batch["index"], batch["pixel_values"]
            with torch.no_grad():
                features = model.encode_image(pixel_values.to(device=model.device, dtype=model.dtype))
            rows = [r for r, i in enumerate(indices.tolist()) if not cache.filled[i]]
            keep = torch.tensor(rows, device=features.image_features.device)
            cache.put(
                [int(indices[r]) for r in rows],
                features.image_features.index_select(0, keep),
                {l: t.index_select(0, keep) for l, t in features.patch_features.items()},
            )
            stored += len(rows)
            bar.update(len(indices))
    return stored
