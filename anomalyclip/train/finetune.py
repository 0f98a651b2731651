"""Glocal prompt training (the paper's "object-agnostic prompt learning"), with a feature cache.

Only the prompts train (context vectors and deep prompts, see
:class:`~anomalyclip.prompts.PromptLearner`); CLIP is frozen and its vision pass runs without
gradients. Losses, optimizer and defaults follow REFERENCE.md, "Training": Adam (lr 1e-3, betas
(0.5, 0.999)), batch 8, 15 epochs, seed 111, shuffled; loss ``4 * local + global``
(:func:`anomalyclip.train.losses.glocal_loss`). Image size and output layers come from the model's
config (``model.reconfigure(image_size=..., feature_layers=...)``).

Feature cache (:mod:`anomalyclip.train.feature_cache`). The vision encoder is frozen and there is no
augmentation, so an image's vision features never change. With ``feature_cache="memory"`` (the
default) or ``"disk"``, every image is encoded once, before the first epoch, and its global
feature ``[D]`` and per-layer patch features ``[N, D]`` are stored in ``cache_dtype``; each epoch
then costs only the text encoder and the losses. Ground-truth masks are preprocessed once, before
training, and held in memory as packed bits (S*S/8 bytes per anomalous image).

Checkpoints. With ``output_dir``, each epoch ``k`` writes ``output_dir/epoch_{k}/``
(``config.json`` + ``model.safetensors`` in the :meth:`~anomalyclip.AnomalyCLIP.save_pretrained`
format, plus ``training_state.pt``: optimizer state, epoch, shuffling RNG state, history) and
updates ``output_dir/config.json`` + ``output_dir/model.safetensors`` (the latest prompts, so
``AnomalyCLIP.from_pretrained(output_dir)`` loads them) and ``output_dir/history.json``. Every file
is written atomically; an interrupted run loses at most the epoch in progress and continues
exactly with ``resume_from=output_dir``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from safetensors.torch import load_file

from ..config import CONFIG_NAME, WEIGHTS_NAME
from ..data.reader import SampleReader
from ..errors import CheckpointError, DatasetError, ImageLoadError, InvalidInputError
from .feature_cache import FeatureCache, fill_feature_cache, format_bytes, make_feature_cache
from .losses import GlocalLoss, glocal_loss
from ..files import atomic_path, atomic_write, list_paths
from ..runtime import resolve_dtype

__all__ = [
    "finetune",
    "batch_losses",
    "TrainingHistory",
    "EpochStats",
    "MaskStore",
    "STATE_NAME",
    "HISTORY_NAME",
]

logger = logging.getLogger(__name__)

#: Training state file inside each ``epoch_{k}`` checkpoint directory.
STATE_NAME = "training_state.pt"
#: Per-epoch losses and timings, at the root of ``output_dir``.
HISTORY_NAME = "history.json"
_STATE_FORMAT = 1
_FEATURE_CACHE_MODES = ("memory", "disk")
_EPOCH_DIR = re.compile(r"^epoch_(\d+)$")


# ============================================================================ results


@dataclass
class EpochStats:
    """What one epoch did.

    Attributes:
        epoch: 1-based epoch number.
        loss: mean total loss over the epoch's optimizer steps.
        image_loss: mean global (image-level) loss.
        local_loss: mean local loss (summed over output layers).
        steps: optimizer steps.
        encoded: images run through the vision encoder during the epoch (0 with a feature cache,
            which is filled before the first epoch).
        seconds: wall-clock time of the epoch (without filling the cache and checkpointing).
    """

    epoch: int
    loss: float
    image_loss: float
    local_loss: float
    steps: int
    encoded: int
    seconds: float


@dataclass
class TrainingHistory:
    """Result of :func:`finetune`.

    Attributes:
        epochs: one :class:`EpochStats` per completed epoch (including those of a resumed run).
        output_dir: where checkpoints were written, or None.
        feature_cache: ``"memory"``, ``"disk"`` or None.
        cache_bytes: size of the feature cache (features only; masks are reported separately).
        cache_encoded: images encoded to fill the cache in this run (0 for a full disk cache).
        cache_seconds: wall-clock time spent filling the cache in this run.
        mask_bytes: memory held by the packed ground-truth masks.
        resumed_from: the checkpoint directory a resumed run started from, or None.
    """

    epochs: list[EpochStats] = field(default_factory=list)
    output_dir: Path | None = None
    feature_cache: str | None = None
    cache_bytes: int = 0
    cache_encoded: int = 0
    cache_seconds: float = 0.0
    mask_bytes: int = 0
    resumed_from: Path | None = None

    @property
    def losses(self) -> list[float]:
        """Mean total loss per epoch."""
        return [e.loss for e in self.epochs]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (paths as strings)."""
        return {
            "epochs": [dataclasses.asdict(e) for e in self.epochs],
            "output_dir": None if self.output_dir is None else str(self.output_dir),
            "feature_cache": self.feature_cache,
            "cache_bytes": self.cache_bytes,
            "cache_encoded": self.cache_encoded,
            "cache_seconds": self.cache_seconds,
            "mask_bytes": self.mask_bytes,
            "resumed_from": None if self.resumed_from is None else str(self.resumed_from),
        }


# ============================================================================ samples and masks


def _as_samples(data: Any) -> list[Any]:
    """The list of samples of ``data`` (an ``AnomalyDataset`` or a sequence of ``Sample``)."""
    if isinstance(data, (str, os.PathLike)):
        raise InvalidInputError(
            f"finetune takes a data set, not a path ({os.fspath(data)!r}); load it first with "
            "anomalyclip.data.datasets.load_dataset(root, format)."
        )
    try:
        samples = list(data)
    except TypeError as exc:
        raise InvalidInputError(
            f"finetune takes an AnomalyDataset or a sequence of Sample records, got {type(data).__name__}."
        ) from exc
    for s in samples[:1]:
        if not all(hasattr(s, a) for a in ("image_path", "mask_path", "label")):
            raise InvalidInputError(
                f"finetune needs samples with image_path, mask_path and label (anomalyclip.data.datasets.Sample), "
                f"got {type(s).__name__}."
            )
    return samples


def _check_samples(samples: list[Any]) -> None:
    """Reject what training cannot use, naming the files: no samples, bad labels, no anomalies,
    anomalous images without masks, missing files. (A class without anomalous images is fine for
    training; :mod:`anomalyclip.data.datasets` warns about it.)"""
    if not samples:
        raise DatasetError("The training data set is empty; check the data root and format (no images found).")
    bad_labels = [s.image_path for s in samples if s.label not in (0, 1)]
    if bad_labels:
        raise DatasetError(f"Labels must be 0 (normal) or 1 (anomalous); bad labels for {list_paths(bad_labels)}.")
    if not any(s.label == 1 for s in samples):
        raise DatasetError(
            f"The training data ({len(samples)} images) has no anomalous image; the glocal training needs "
            "anomalous images with masks (the paper trains on a whole test split, e.g. VisA or MVTec AD)."
        )
    no_mask = [s.image_path for s in samples if s.label == 1 and s.mask_path is None]
    if no_mask:
        raise DatasetError(
            f"{len(no_mask)} anomalous image(s) have no ground-truth mask: {list_paths(no_mask)}. Training needs "
            "a mask for every anomalous image; add the masks or leave these images out."
        )
    missing = [s.image_path for s in samples if not Path(s.image_path).is_file()]
    missing += [s.mask_path for s in samples if s.label == 1 and not Path(s.mask_path).is_file()]
    if missing:
        raise ImageLoadError(f"File(s) not found: {list_paths(missing)}. Check the data set.")


class MaskStore:
    """Preprocessed ground-truth masks at the processing size, packed 8 pixels per byte.

    Only anomalous samples are stored; normal images have all-zero masks (a mask file of a normal
    sample is ignored, as :class:`anomalyclip.data.reader.SampleReader` does).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._packed: dict[int, np.ndarray] = {}

    def put(self, index: int, mask: torch.Tensor) -> None:
        """Store ``mask [S, S]`` (anything > 0.5 is anomalous)."""
        self._packed[index] = np.packbits((mask > 0.5).numpy().reshape(-1))

    def get(self, indices: Sequence[int]) -> torch.Tensor:
        """``[len(indices), S, S]`` bool masks."""
        s = self.size
        out = np.zeros((len(indices), s, s), dtype=bool)
        for row, index in enumerate(indices):
            packed = self._packed.get(index)
            if packed is not None:
                out[row] = np.unpackbits(packed, count=s * s).reshape(s, s).astype(bool)
        return torch.from_numpy(out)

    def __len__(self) -> int:
        return len(self._packed)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self._packed.values())


def _load_masks(samples: list[Any], config: Any, num_workers: int, progress: bool) -> MaskStore:
    """Preprocess every mask once (read by SampleReader, which checks sizes) and reject data with no
    anomalous pixel."""
    from tqdm.auto import tqdm

    size = config.image_size
    store = MaskStore(size)
    indices = [i for i, s in enumerate(samples) if s.label == 1]
    reader = SampleReader.for_config(samples, config, images=False)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(reader, indices), batch_size=16, num_workers=num_workers
    )
    empty: list[Any] = []
    total = 0
    with tqdm(total=len(indices), desc="masks", unit="mask", disable=not progress, leave=False) as bar:
        for batch in loader:
            for index, mask in zip(batch["index"].tolist(), batch["mask"]):
                store.put(index, mask)
                pixels = int((mask > 0.5).sum())
                total += pixels
                if pixels == 0:
                    empty.append(samples[index].mask_path)
            bar.update(len(batch["index"]))
    if total == 0:
        raise DatasetError(
            f"None of the {len(indices)} masks has an anomalous pixel at {size}x{size} px; the local loss "
            "needs defect masks (non-zero pixels mark anomalies). Check the mask files."
        )
    if empty:
        logger.warning(
            "%d anomalous image(s) have an empty mask at %dx%d px (they count as defect-free pixels): %s",
            len(empty),
            size,
            size,
            list_paths(empty),
        )
    return store


# ============================================================================ losses of a batch


def batch_losses(
    model: Any,
    image_features: torch.Tensor,
    patch_features: dict[int, torch.Tensor],
    masks: torch.Tensor,
    labels: torch.Tensor,
) -> GlocalLoss:
    """The glocal losses of a batch, with the text features recomputed (differentiably) from the
    model's current prompts.

    Args:
        model: an :class:`~anomalyclip.AnomalyCLIP`; its ``config.temperature`` is used.
        image_features: ``[B, D]`` global features (any float dtype, any device).
        patch_features: output layer -> ``[B, N, D]`` patch features (class token first).
        masks: ``[B, S, S]`` binary ground truth at the processing size.
        labels: ``[B]`` 0/1 image labels.
    """
    device = model.device
    text = model.encode_text()
    return glocal_loss(
        text,
        image_features.to(device),
        {l: t.to(device) for l, t in patch_features.items()},
        masks.to(device),
        labels.to(device),
        temperature=model.config.temperature,
    )


# ============================================================================ checkpoints


def _epoch_dirs(directory: Path) -> list[tuple[int, Path]]:
    """``epoch_{k}`` subdirectories, highest ``k`` first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if p.is_dir() and (m := _EPOCH_DIR.match(p.name))]
    return sorted(found, reverse=True)


def _is_complete(checkpoint: Path) -> bool:

    return all((checkpoint / n).is_file() for n in (CONFIG_NAME, WEIGHTS_NAME, STATE_NAME))


def _resolve_resume(resume_from: str | os.PathLike) -> Path:
    """The checkpoint directory to resume from: ``resume_from`` itself if it is one, else its
    latest complete ``epoch_{k}`` subdirectory."""
    path = Path(resume_from).expanduser()
    if not path.exists():
        raise CheckpointError(f"resume_from='{path}' does not exist.")
    if _is_complete(path):
        return path
    for _, candidate in _epoch_dirs(path):
        if _is_complete(candidate):
            return candidate
    raise CheckpointError(
        f"'{path}' holds no training checkpoint (an epoch_<k>/ directory with config.json, model.safetensors "
        f"and {STATE_NAME}); pass the output_dir of an earlier finetune run or one of its epoch directories."
    )


def _load_state(checkpoint: Path) -> dict[str, Any]:
    try:
        state = torch.load(checkpoint / STATE_NAME, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise CheckpointError(f"Cannot read {checkpoint / STATE_NAME}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format_version") != _STATE_FORMAT:
        raise CheckpointError(f"{checkpoint / STATE_NAME} is not a training state of this library version.")
    return state


def _save_checkpoint(model: Any, output_dir: Path, epoch: int, state: dict[str, Any], history: TrainingHistory) -> Path:
    """Write ``epoch_{epoch}/`` (model + training state), then the latest model at the root and
    the history. Every file is written atomically."""
    checkpoint = output_dir / f"epoch_{epoch}"
    model.save_pretrained(checkpoint)
    with atomic_path(checkpoint / STATE_NAME) as tmp:
        torch.save(state, tmp)
    model.save_pretrained(output_dir)
    with atomic_write(output_dir / HISTORY_NAME, "w") as handle:
        handle.write(json.dumps(history.to_dict(), indent=2) + "\n")
    return checkpoint


def _data_fingerprint(samples: list[Any]) -> str:
    digest = hashlib.sha256()
    for s in samples:
        digest.update(f"{s.image_path}|{s.mask_path}|{s.label}\n".encode())
    return digest.hexdigest()


# ============================================================================ finetune


def _check_options(
    epochs: int, batch_size: int, lr: float, betas: Sequence[float], seed: int, num_workers: int
) -> tuple[float, float]:
    for name, value, low in (("epochs", epochs, 0), ("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidInputError(f"{name} must be an int >= {low}, got {value!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidInputError(f"seed must be an int, got {seed!r}.")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise InvalidInputError(f"lr must be a positive number, got {lr!r}.")
    if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
        raise InvalidInputError(f"betas must be two numbers in [0, 1), got {betas!r}.")
    return float(betas[0]), float(betas[1])


def _cache_mode(feature_cache: str | None) -> str | None:
    if feature_cache is None or feature_cache is False or feature_cache == "none":
        return None
    if feature_cache not in _FEATURE_CACHE_MODES:
        raise InvalidInputError(f"feature_cache must be 'memory', 'disk' or None, got {feature_cache!r}.")
    return feature_cache


def _resume(
    model: Any, resume_from: str | os.PathLike, settings: dict[str, Any]
) -> tuple[Path, dict[str, Any]]:
    """Load the prompts of the checkpoint to resume from into ``model``; return it and its state.

    Raises:
        CheckpointError: no checkpoint there, or one trained with other model settings.
    """

    checkpoint = _resolve_resume(resume_from)
    state = _load_state(checkpoint)
    try:
        saved = json.loads((checkpoint / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"Cannot read {checkpoint / CONFIG_NAME}: {exc}") from exc
    for key in ("backbone", "image_size", "feature_layers", "dpam_layers", "dpam_mode"):
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


def _check_output_dir(out: Path, resumed_from: Path | None) -> None:
    """Refuse to mix two runs' checkpoints in one directory."""
    if not _epoch_dirs(out):
        return
    if resumed_from is not None and out.resolve() in (resumed_from.resolve(), resumed_from.resolve().parent):
        return
    raise InvalidInputError(
        f"output_dir '{out}' already holds checkpoints of a training run; pass resume_from='{out}' to continue "
        "it, or choose an empty output_dir."
    )


def _epoch_batches(
    n: int, batch_size: int, shuffle: bool, generator: torch.Generator
) -> list[list[int]]:
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    return [order[i : i + batch_size].tolist() for i in range(0, n, batch_size)]


def _batch_features(
    batches: list[list[int]],
    model: Any,
    cache: FeatureCache | None,
    reader: SampleReader,
    num_workers: int,
) -> Iterator[tuple[torch.Tensor, dict[int, torch.Tensor], int]]:
    """Per batch: ``(image_features [b, D], patch_features {layer: [b, N, D]}, images encoded)``,
    from the cache, or from the vision encoder (no gradients) without one."""
    if cache is not None:
        for batch in batches:
            image_features, patch_features = cache.get(batch)
            yield image_features, patch_features, 0
        return
    loader = torch.utils.data.DataLoader(reader, batch_sampler=batches, num_workers=num_workers)
    for batch in loader:
        pixel_values = batch["pixel_values"]
        with torch.no_grad():
            features = model.encode_image(pixel_values.to(device=model.device, dtype=model.dtype))
        yield features.image_features, features.patch_features, len(pixel_values)


def finetune(
    model: Any,
    data: Any,
    *,
    epochs: int = 15,
    batch_size: int = 8,
    lr: float = 1e-3,
    betas: Sequence[float] = (0.5, 0.999),
    seed: int = 111,
    shuffle: bool = True,
    output_dir: str | os.PathLike | None = None,
    resume_from: str | os.PathLike | None = None,
    feature_cache: str | None = "memory",
    cache_dtype: str | torch.dtype | None = None,
    cache_dir: str | os.PathLike | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> TrainingHistory:
    """Learn the prompts of ``model`` on auxiliary data with the paper's glocal training, in place.

    Args:
        model: an :class:`~anomalyclip.AnomalyCLIP` (fresh prompts from ``from_backbone`` /
            ``from_clip``, or existing ones to continue from). Its device (CPU, CUDA, MPS) and
            CLIP dtype are used as they are; the prompts are trained in float32. The processing
            size and output layers are those of ``model.config`` (``model.reconfigure``).
        data: an :class:`~anomalyclip.data.datasets.AnomalyDataset` (``load_dataset(root, format)``)
            or a sequence of :class:`~anomalyclip.data.datasets.Sample`: normal and anomalous images,
            a mask for every anomalous image.
        epochs: total number of epochs (15); with ``resume_from``, training continues up to it.
        batch_size: images per optimizer step (8); also the chunk size of the cache filling.
        lr: Adam learning rate (1e-3).
        betas: Adam betas ((0.5, 0.999)).
        seed: seed of the shuffling order (111). The prompts' initialization is seeded where
            the model is built (``from_backbone(..., seed=...)``). Same seed, data, settings and
            machine -> the same prompts, bit for bit. The global torch RNG is not touched.
        shuffle: reshuffle the images every epoch (True, as the paper).
        output_dir: if given, each epoch ``k`` writes ``output_dir/epoch_{k}/`` (``config.json``,
            ``model.safetensors``, ``training_state.pt``), and the latest prompts
            (``from_pretrained(output_dir)`` loads them) and ``history.json`` at its root. Must not
            hold checkpoints of another run (resume it instead).
        resume_from: continue an interrupted run: its ``output_dir`` (the latest complete epoch
            is used) or one ``epoch_{k}/`` directory. The prompts, optimizer state, epoch and
            shuffling RNG state are restored; with the same data and options the result equals
            an uninterrupted run's.
        feature_cache: ``"memory"`` (default), ``"disk"`` or None / ``"none"`` (run the vision
            encoder on every batch of every epoch).
        cache_dtype: dtype of the cached features (``"float32"``, ``"float16"``, ``"bfloat16"``
            or a torch dtype); None: the model's dtype. float16 halves the cache.
        cache_dir: root directory of the disk cache (default ``$ANOMALYCLIP_CACHE/features``,
            else ``~/.cache/anomalyclip/features``).
        num_workers: DataLoader worker processes that read and preprocess images and masks.
        progress: show tqdm progress bars with the running losses.

    Returns:
        A :class:`TrainingHistory`: per-epoch mean losses and timings, cache size and fill time.

    Raises:
        DatasetError: empty data, no anomalous image, anomalous images without masks, masks
            without any anomalous pixel, a mask of another size than its image.
        ImageLoadError: a missing or unreadable image or mask (named).
        InvalidInputError: a bad option, an ``output_dir`` holding another run, or a non-finite
            loss.
        CheckpointError: ``resume_from`` holds no usable checkpoint, or one for other settings.
    """
    betas = _check_options(epochs, batch_size, lr, betas, seed, num_workers)
    mode = _cache_mode(feature_cache)
    dtype = resolve_dtype(cache_dtype) if cache_dtype is not None else model.dtype
    if mode is None and cache_dtype is not None:
        logger.warning("cache_dtype=%r has no effect without a feature cache.", cache_dtype)
    samples = _as_samples(data)
    _check_samples(samples)
    out = Path(output_dir).expanduser() if output_dir is not None else None
    settings = {
        "batch_size": batch_size,
        "seed": seed,
        "shuffle": shuffle,
        "lr": lr,
        "betas": list(betas),
        "data": _data_fingerprint(samples),
    }
    history = TrainingHistory(output_dir=out, feature_cache=mode)
    state: dict[str, Any] | None = None
    if resume_from is not None:
        history.resumed_from, state = _resume(model, resume_from, settings)
        history.epochs = [EpochStats(**e) for e in state.get("history", [])]
    if out is not None:
        _check_output_dir(out, history.resumed_from)

    # The prompts train in float32, also when CLIP runs in half precision.
    params = list(model.prompts.parameters())
    if any(p.dtype != torch.float32 for p in params):
        logger.info("Training the prompts in float32 (they were %s).", params[0].dtype)
        model.prompts.float()
        params = list(model.prompts.parameters())
    optimizer = torch.optim.Adam(params, lr=lr, betas=betas)
    generator = torch.Generator().manual_seed(seed)
    start_epoch = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:
            group["lr"], group["betas"] = lr, betas
        generator.set_state(state["generator"])
        start_epoch = int(state["epoch"])
    if start_epoch >= epochs:
        logger.info("Already trained for %d epochs (epochs=%d): nothing to do.", start_epoch, epochs)
        return history

    config = model.config
    size = config.image_size
    labels = torch.tensor([int(s.label) for s in samples])
    logger.info(
        "finetune: %d images (%d anomalous), epochs %d..%d, batch %d, lr %g, image size %d, layers %s, device %s",
        len(samples),
        int(labels.sum()),
        start_epoch + 1,
        epochs,
        batch_size,
        lr,
        size,
        list(config.feature_layers),
        model.device,
    )
    masks = _load_masks(samples, config, num_workers, progress)
    history.mask_bytes = masks.nbytes
    logger.info("masks: %d preprocessed at %dx%d, %s packed", len(masks), size, size, format_bytes(masks.nbytes))
    reader = SampleReader.for_config(samples, config, masks=False)
    cache = make_feature_cache(mode, model, samples, dtype, cache_dir)
    if cache is not None:
        history.cache_bytes = cache.nbytes
        started = time.perf_counter()
        history.cache_encoded = fill_feature_cache(
            model, cache, reader, batch_size=batch_size, num_workers=num_workers, progress=progress
        )
        history.cache_seconds = time.perf_counter() - started
        logger.info("feature cache filled: %d images encoded in %.1f s", history.cache_encoded, history.cache_seconds)
    metadata = {
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "betas": list(betas),
        "seed": seed,
        "num_images": len(samples),
        "num_anomalous": int(labels.sum()),
        "data_root": None if getattr(data, "root", None) is None else str(data.root),
        "data_format": getattr(data, "format", None),
    }

    requires_grad = [p.requires_grad for p in params]
    was_training = model.training
    model.train()
    for p in params:
        p.requires_grad_(True)
    try:
        for epoch in range(start_epoch + 1, epochs + 1):
            stats = _run_epoch(
                model, optimizer, generator, cache, reader, masks, labels, epoch, epochs, batch_size, shuffle,
                num_workers, progress,
            )
            history.epochs.append(stats)
            logger.info(
                "epoch %d/%d: loss %.4f (image %.4f, local %.4f), %d steps, %.1f s",
                epoch,
                epochs,
                stats.loss,
                stats.image_loss,
                stats.local_loss,
                stats.steps,
                stats.seconds,
            )
            model.config = model.config.replace(
                extra={**model.config.extra, "training": {**metadata, "epoch": epoch, "loss": stats.loss}}
            )
            if out is not None:
                checkpoint_state = {
                    "format_version": _STATE_FORMAT,
                    "epoch": epoch,
                    "optimizer": optimizer.state_dict(),
                    "generator": generator.get_state(),
                    "settings": settings,
                    "history": [dataclasses.asdict(e) for e in history.epochs],
                }
                logger.info("saved %s", _save_checkpoint(model, out, epoch, checkpoint_state, history))
    finally:
        for p, flag in zip(params, requires_grad):
            p.requires_grad_(flag)
        model.train(was_training)
    return history


def _run_epoch(
    model: Any,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    cache: FeatureCache | None,
    reader: SampleReader,
    masks: MaskStore,
    labels: torch.Tensor,
    epoch: int,
    epochs: int,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    progress: bool,
) -> EpochStats:
    """One epoch of optimizer steps over shuffled batches; returns its mean losses and timing."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    batches = _epoch_batches(len(labels), batch_size, shuffle, generator)
    sums = np.zeros(3)
    encoded = 0
    features = _batch_features(batches, model, cache, reader, num_workers)
    with tqdm(total=len(batches), desc=f"epoch {epoch}/{epochs}", unit="step", disable=not progress) as bar:
        for step, (batch, (image_features, patch_features, n_encoded)) in enumerate(zip(batches, features), start=1):
            encoded += n_encoded
            loss = batch_losses(model, image_features, patch_features, masks.get(batch), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.total.backward()
            optimizer.step()
            values = np.array([loss.total.item(), loss.image.item(), loss.local.item()])
            if not np.isfinite(values).all():
                raise InvalidInputError(
                    f"The loss became {values[0]} at epoch {epoch}, step {step}; lower lr, or train with a "
                    "float32 model."
                )
            sums += values
            bar.set_postfix(loss=f"{sums[0] / step:.4f}", image=f"{sums[1] / step:.4f}", local=f"{sums[2] / step:.4f}")
            bar.update(1)
    means = sums / max(len(batches), 1)
    return EpochStats(
        epoch=epoch,
        loss=float(means[0]),
        image_loss=float(means[1]),
        local_loss=float(means[2]),
        steps=len(batches),
        encoded=encoded,
        seconds=time.perf_counter() - started,
    )
