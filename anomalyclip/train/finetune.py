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
training, and held in memory as packed bits (:mod:`anomalyclip.train.masks`). Images and masks are
read by :class:`anomalyclip.data.reader.SampleReader` with the model's preprocessing.

Checkpoints (:mod:`anomalyclip.train.checkpoints`). With ``output_dir``, each epoch ``k`` writes
``output_dir/epoch_{k}/`` (``config.json`` + ``model.safetensors`` in the
:meth:`~anomalyclip.AnomalyCLIP.save_pretrained` format, plus ``training_state.pt``: optimizer
state, epoch, shuffling RNG state, history) and updates ``output_dir/config.json`` + ``output_dir/model.safetensors`` (the latest prompts, so
``AnomalyCLIP.from_pretrained(output_dir)`` loads them) and ``output_dir/history.json``. Every file
is written atomically; an interrupted run loses at most the epoch in progress and continues
exactly with ``resume_from=output_dir``.

A non-finite loss or gradient stops training with :class:`~anomalyclip.errors.TrainingError`
before the optimizer step, so the prompts are left as they were after the last good step.

Structure: :func:`finetune` checks its options (:class:`TrainingOptions`) and data, then
:func:`_start_run` builds the run's state (:class:`_Run`: model, optimizer, shuffling RNG,
history, resumed state), :func:`_prepare_data` reads the masks and fills the feature cache, and
:func:`_train_epochs` runs :func:`_run_epoch` per epoch, each a loop of :func:`_step`, writing a
checkpoint after each epoch. Training knows the model only through
:class:`~anomalyclip.train.interface.TrainableModel`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence, cast

import numpy as np
import torch

from ..data.reader import SampleReader
from ..errors import DatasetError, ImageLoadError, InvalidInputError, TrainingError
from ..files import list_paths
from ..runtime import resolve_dtype
from .checkpoints import HISTORY_NAME, STATE_FORMAT, STATE_NAME, check_output_dir, resume, save_checkpoint
from .feature_cache import FeatureCache, fill_feature_cache, format_bytes, make_feature_cache
from .interface import TrainableModel
from .losses import GlocalLoss, glocal_loss
from .masks import MaskStore, load_masks

__all__ = [
    "finetune",
    "batch_losses",
    "TrainingOptions",
    "TrainingHistory",
    "EpochStats",
    "MaskStore",
    "STATE_NAME",
    "HISTORY_NAME",
]

logger = logging.getLogger(__name__)

_FEATURE_CACHE_MODES = ("memory", "disk")


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


# ============================================================================ options


@dataclass(frozen=True)
class TrainingOptions:
    """The options of a :func:`finetune` run, checked (see :func:`finetune` for each).

    ``feature_cache`` is ``"memory"``, ``"disk"`` or None; ``cache_dtype`` a torch dtype or None
    (the model's dtype).
    """

    epochs: int = 15
    batch_size: int = 8
    lr: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.999)
    seed: int = 111
    shuffle: bool = True
    feature_cache: str | None = "memory"
    cache_dtype: torch.dtype | None = None
    cache_dir: str | os.PathLike | None = None
    num_workers: int = 0
    progress: bool = True

    @classmethod
    def checked(
        cls,
        *,
        epochs: int,
        batch_size: int,
        lr: float,
        betas: Sequence[float],
        seed: int,
        shuffle: bool,
        feature_cache: str | None,
        cache_dtype: str | torch.dtype | None,
        cache_dir: str | os.PathLike | None,
        num_workers: int,
        progress: bool,
    ) -> "TrainingOptions":
        """Validate the user's options.

        Raises:
            InvalidInputError: naming the bad option and what it must be.
        """
        for name, value, low in (("epochs", epochs, 0), ("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InvalidInputError(f"{name} must be an int >= {low}, got {value!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InvalidInputError(f"seed must be an int, got {seed!r}.")
        if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
            raise InvalidInputError(f"lr must be a positive number, got {lr!r}.")
        if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
            raise InvalidInputError(f"betas must be two numbers in [0, 1), got {betas!r}.")
        mode = None if feature_cache in (None, False, "none") else feature_cache
        if mode is not None and mode not in _FEATURE_CACHE_MODES:
            raise InvalidInputError(f"feature_cache must be 'memory', 'disk' or None, got {feature_cache!r}.")
        dtype = resolve_dtype(cache_dtype) if cache_dtype is not None else None
        if mode is None and cache_dtype is not None:
            logger.warning("cache_dtype=%r has no effect without a feature cache.", cache_dtype)
        return cls(
            epochs=epochs,
            batch_size=batch_size,
            lr=float(lr),
            betas=(float(betas[0]), float(betas[1])),
            seed=seed,
            shuffle=bool(shuffle),
            feature_cache=mode,
            cache_dtype=dtype,
            cache_dir=cache_dir,
            num_workers=num_workers,
            progress=bool(progress),
        )

    def settings(self, samples: list[Any]) -> dict[str, Any]:
        """What decides the result besides the model (compared when a run is resumed)."""
        return {
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "lr": self.lr,
            "betas": list(self.betas),
            "data": _data_fingerprint(samples),
        }


# ============================================================================ samples


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


def _data_fingerprint(samples: list[Any]) -> str:
    digest = hashlib.sha256()
    for s in samples:
        digest.update(f"{s.image_path}|{s.mask_path}|{s.label}\n".encode())
    return digest.hexdigest()


# ============================================================================ losses of a batch


def batch_losses(
    model: TrainableModel,
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


# ============================================================================ the run


@dataclass
class _Run:
    """The state of one :func:`finetune` run, shared by its steps."""

    model: TrainableModel
    options: TrainingOptions
    samples: list[Any]
    labels: torch.Tensor  # [n] 0/1
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # the shuffling order
    history: TrainingHistory
    settings: dict[str, Any]  # compared on resume
    metadata: dict[str, Any]  # recorded in config.extra["training"]
    start_epoch: int = 0
    masks: MaskStore | None = None
    reader: SampleReader | None = None
    cache: FeatureCache | None = None

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]


def finetune(
    model: TrainableModel,
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
        InvalidInputError: a bad option, or an ``output_dir`` holding another run.
        CheckpointError: ``resume_from`` holds no usable checkpoint, or one for other settings.
        TrainingError: a non-finite loss or gradient; raised before that optimizer step, so the
            prompts keep the values of the last good step.
    """
    options = TrainingOptions.checked(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        betas=betas,
        seed=seed,
        shuffle=shuffle,
        feature_cache=feature_cache,
        cache_dtype=cache_dtype,
        cache_dir=cache_dir,
        num_workers=num_workers,
        progress=progress,
    )
    samples = _as_samples(data)
    _check_samples(samples)
    out = Path(output_dir).expanduser() if output_dir is not None else None
    run = _start_run(model, data, samples, options, out, resume_from)
    if run.start_epoch >= options.epochs:
        logger.info("Already trained for %d epochs (epochs=%d): nothing to do.", run.start_epoch, options.epochs)
        return run.history
    _prepare_data(run)
    _train_epochs(run)
    return run.history


def _start_run(
    model: TrainableModel,
    data: Any,
    samples: list[Any],
    options: TrainingOptions,
    out: Path | None,
    resume_from: str | os.PathLike | None,
) -> _Run:
    """The run's state: history, optimizer and shuffling RNG, restored from ``resume_from`` if given."""
    settings = options.settings(samples)
    history = TrainingHistory(output_dir=out, feature_cache=options.feature_cache)
    state: dict[str, Any] | None = None
    if resume_from is not None:
        history.resumed_from, state = resume(model, resume_from, settings)
        history.epochs = [EpochStats(**e) for e in state.get("history", [])]
    if out is not None:
        check_output_dir(out, history.resumed_from)
    params = list(model.prompts.parameters())
    if any(p.dtype != torch.float32 for p in params):  # PromptLearner keeps them float32
        raise TrainingError(f"The prompts must be float32 to train, got {params[0].dtype}.")
    optimizer = torch.optim.Adam(params, lr=options.lr, betas=options.betas)
    generator = torch.Generator().manual_seed(options.seed)
    start_epoch = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:
            group["lr"], group["betas"] = options.lr, options.betas
        generator.set_state(state["generator"])
        start_epoch = int(state["epoch"])
    labels = torch.tensor([int(s.label) for s in samples])
    metadata = {
        "epochs": options.epochs,
        "batch_size": options.batch_size,
        "lr": options.lr,
        "betas": list(options.betas),
        "seed": options.seed,
        "num_images": len(samples),
        "num_anomalous": int(labels.sum()),
        "data_root": None if getattr(data, "root", None) is None else str(data.root),
        "data_format": getattr(data, "format", None),
    }
    return _Run(
        model=model,
        options=options,
        samples=samples,
        labels=labels,
        optimizer=optimizer,
        generator=generator,
        history=history,
        settings=settings,
        metadata=metadata,
        start_epoch=start_epoch,
    )


def _prepare_data(run: _Run) -> None:
    """Read the masks, and fill the feature cache (if any) before the first epoch."""
    model, options, config = run.model, run.options, run.model.config
    size = config.image_size
    logger.info(
        "finetune: %d images (%d anomalous), epochs %d..%d, batch %d, lr %g, image size %d, layers %s, device %s",
        len(run.samples),
        int(run.labels.sum()),
        run.start_epoch + 1,
        options.epochs,
        options.batch_size,
        options.lr,
        size,
        list(config.feature_layers),
        model.device,
    )
    run.masks = load_masks(run.samples, config, num_workers=options.num_workers, progress=options.progress)
    run.history.mask_bytes = run.masks.nbytes
    logger.info("masks: %d preprocessed at %dx%d, %s packed", len(run.masks), size, size, format_bytes(run.masks.nbytes))
    run.reader = SampleReader.for_config(run.samples, config, masks=False)
    dtype = options.cache_dtype if options.cache_dtype is not None else model.dtype
    run.cache = make_feature_cache(options.feature_cache, model, run.samples, dtype, options.cache_dir)
    if run.cache is None:
        return
    run.history.cache_bytes = run.cache.nbytes
    started = time.perf_counter()
    run.history.cache_encoded = fill_feature_cache(
        model,
        run.cache,
        run.reader,
        batch_size=options.batch_size,
        num_workers=options.num_workers,
        progress=options.progress,
    )
    run.history.cache_seconds = time.perf_counter() - started
    logger.info("feature cache filled: %d images encoded in %.1f s", run.history.cache_encoded, run.history.cache_seconds)


def _train_epochs(run: _Run) -> None:
    """Epochs ``start_epoch + 1 .. epochs`` with the prompts in training mode (restored after)."""
    model = run.model
    requires_grad = [p.requires_grad for p in run.params]
    was_training = model.training
    model.train()
    for p in run.params:
        p.requires_grad_(True)
    try:
        for epoch in range(run.start_epoch + 1, run.options.epochs + 1):
            stats = _run_epoch(run, epoch)
            run.history.epochs.append(stats)
            logger.info(
                "epoch %d/%d: loss %.4f (image %.4f, local %.4f), %d steps, %.1f s",
                epoch,
                run.options.epochs,
                stats.loss,
                stats.image_loss,
                stats.local_loss,
                stats.steps,
                stats.seconds,
            )
            model.config = model.config.replace(
                extra={**model.config.extra, "training": {**run.metadata, "epoch": epoch, "loss": stats.loss}}
            )
            if run.history.output_dir is not None:
                logger.info("saved %s", _checkpoint(run, epoch))
    finally:
        for p, flag in zip(run.params, requires_grad):
            p.requires_grad_(flag)
        model.train(was_training)


def _checkpoint(run: _Run, epoch: int) -> Path:
    """Write the checkpoint of ``epoch`` (see :mod:`anomalyclip.train.checkpoints`)."""
    output_dir = cast(Path, run.history.output_dir)  # only called when the run has an output directory
    state = {
        "format_version": STATE_FORMAT,
        "epoch": epoch,
        "optimizer": run.optimizer.state_dict(),
        "generator": run.generator.get_state(),
        "settings": run.settings,
        "history": [dataclasses.asdict(e) for e in run.history.epochs],
    }
    return save_checkpoint(run.model, output_dir, epoch, state, run.history.to_dict())


# ============================================================================ one epoch


def _epoch_batches(n: int, batch_size: int, shuffle: bool, generator: torch.Generator) -> list[list[int]]:
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    return [order[i : i + batch_size].tolist() for i in range(0, n, batch_size)]


def _batch_features(
    run: _Run, batches: list[list[int]]
) -> Iterator[tuple[torch.Tensor, dict[int, torch.Tensor], int]]:
    """Per batch: ``(image_features [b, D], patch_features {layer: [b, N, D]}, images encoded)``,
    from the cache, or from the vision encoder (no gradients) without one."""
    if run.cache is not None:
        for batch in batches:
            image_features, patch_features = run.cache.get(batch)
            yield image_features, patch_features, 0
        return
    model = run.model
    loader = torch.utils.data.DataLoader(run.reader, batch_sampler=batches, num_workers=run.options.num_workers)
    for batch in loader:
        pixel_values = batch["pixel_values"]
        with torch.no_grad():
            features = model.encode_image(pixel_values.to(device=model.device, dtype=model.dtype))
        yield features.image_features, features.patch_features, len(pixel_values)


def _run_epoch(run: _Run, epoch: int) -> EpochStats:
    """One epoch of optimizer steps over (re)shuffled batches; returns its mean losses and timing."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    options = run.options
    batches = _epoch_batches(len(run.samples), options.batch_size, options.shuffle, run.generator)
    sums = np.zeros(3)
    encoded = 0
    features = _batch_features(run, batches)
    bar = tqdm(total=len(batches), desc=f"epoch {epoch}/{options.epochs}", unit="step", disable=not options.progress)
    with bar:
        for step, (batch, (image_features, patch_features, n_encoded)) in enumerate(zip(batches, features), start=1):
            encoded += n_encoded
            sums += _step(run, batch, image_features, patch_features, where=f"epoch {epoch}, step {step}")
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


def _step(
    run: _Run,
    batch: list[int],
    image_features: torch.Tensor,
    patch_features: dict[int, torch.Tensor],
    *,
    where: str,
) -> np.ndarray:
    """One optimizer step on the samples ``batch``; returns ``[total, image, local]`` losses.

    The loss and the gradients are checked before the optimizer step: if either is not finite,
    the prompts are left as they were and :class:`TrainingError` is raised.
    """
    masks = cast(MaskStore, run.masks)  # loaded before the first epoch
    loss = batch_losses(run.model, image_features, patch_features, masks.get(batch), run.labels[batch])
    values = np.array([loss.total.item(), loss.image.item(), loss.local.item()])
    if not np.isfinite(values).all():
        raise TrainingError(
            f"The loss became {values[0]} (image {values[1]}, local {values[2]}) at {where}; the prompts are "
            "left as they were after the previous step. Lower lr, or train with a float32 model."
        )
    run.optimizer.zero_grad(set_to_none=True)
    loss.total.backward()
    if not all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in run.params):
        run.optimizer.zero_grad(set_to_none=True)
        raise TrainingError(
            f"The gradients of the prompts became non-finite at {where} (loss {values[0]}); the prompts are left "
            "as they were after the previous step. Lower lr, or train with a float32 model."
        )
    run.optimizer.step()
    return values
