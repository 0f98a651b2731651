"""The paper's evaluation protocol: run a model over a data set, class by class, and compute
the metrics on the S x S maps against masks preprocessed as the official code does.

Memory: only one class's maps are held at a time, as float32 ``[n, S, S]`` plus boolean masks
(no float64 copies); the metrics sort them once. A class of 200 images at 518 px holds about
270 MB.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, cast

import numpy as np
import torch

from ..errors import DatasetError, InvalidInputError
from .metrics import METRIC_HEADERS, METRIC_NAMES, compute_metrics
from ..files import atomic_write

if TYPE_CHECKING:
    from .details import ClassDetails

__all__ = ["METRIC_NAMES", "EvaluationReport", "evaluate", "format_table", "write_reports"]

logger = logging.getLogger(__name__)


@dataclass
class EvaluationReport:
    """Per-class and mean metrics (fractions in [0, 1]; nan where undefined).

    Attributes:
        classes: class name -> metric name -> value.
        mean: metric name -> mean over the classes where it is defined (as in the paper).
        counts: class name -> ``{"images", "anomalous"}``.
        settings: what was evaluated (backbone, image size, layers and options, references,
            thresholds, data set, library version, UTC date).
        details: with ``evaluate(..., details=True)``, class name -> the curves, scores and
            worst cases the HTML report draws (:class:`~anomalyclip.eval.details.ClassDetails`);
            None otherwise. Not part of :meth:`to_dict` (``metrics.json``).
    """

    classes: dict[str, dict[str, float]]
    mean: dict[str, float]
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    details: dict[str, ClassDetails] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: nan becomes None."""

        def clean(d: dict[str, float]) -> dict[str, float | None]:
            return {k: (None if v is None or math.isnan(v) else float(v)) for k, v in d.items()}

        return {
            "mean": clean(self.mean),
            "classes": {name: clean(m) for name, m in self.classes.items()},
            "counts": self.counts,
            "settings": self.settings,
        }


def _mean_over_classes(classes: dict[str, dict[str, float]]) -> dict[str, float]:
    mean = {}
    for key in METRIC_NAMES:
        values = [m[key] for m in classes.values() if key in m and not math.isnan(m[key])]
        if len(values) < len(classes):
            skipped = [c for c, m in classes.items() if key not in m or math.isnan(m[key])]
            if values:
                logger.warning("%s is undefined for %s: the mean is over the other classes.", key, skipped)
        mean[key] = float(np.mean(values)) if values else math.nan
    return mean


def evaluate(
    model: Any,
    dataset: Any,
    *,
    batch_size: int = 8,
    num_workers: int | None = None,
    progress: bool = True,
    shots: int | None = None,
    seed: int = 0,
    references: Any = None,
    details: bool = False,
) -> EvaluationReport:
    """Evaluate ``model`` on ``dataset`` with the official protocol (zero-shot or few-shot).

    Args:
        model: an :class:`~anomalyclip.AnomalyCLIP`. Images are preprocessed as its
            ``preprocess`` / ``predict`` do (``config.image_size`` S, ``config.mean`` / ``std``);
            maps and masks are compared at S x S.
        dataset: an :class:`~anomalyclip.data.datasets.AnomalyDataset` (see
            :func:`~anomalyclip.data.datasets.load_dataset`).
        batch_size: images per forward pass.
        num_workers: data-loading worker processes, which decode and resize the next batches
            while the model runs; None: 0 on the CPU, up to 8 on an accelerator
            (:func:`~anomalyclip.prefetch.default_num_workers`). On CUDA the batches are
            pinned and copied asynchronously.
        progress: show a tqdm progress bar.
        shots: the few-shot protocol: for each class, ``shots`` normal images drawn with ``seed``
            from that class's normal training images (:func:`~anomalyclip.data.datasets.draw_shots`)
            are the model's only references while the class is evaluated (a drawn image that is
            also in the evaluated set is left out of it); the model's own references are restored
            afterwards. ``0``: zero-shot, the model's own references (if any) put aside while it
            runs. ``None``: the model as it is (zero-shot, or with the references it holds).
        seed: seed of the draw.
        references: the pool to draw from, an :class:`~anomalyclip.data.datasets.AnomalyDataset`
            of normal images; default :func:`~anomalyclip.data.datasets.load_reference_pool` of
            the data set's root and format (MVTec AD ``train/good``, VisA's and ``meta.json``'s
            train split, a folder's ``good/`` images).
        details: also collect what :func:`write_reports` ``(..., html=True)`` draws: per class
            the curves from the metrics' own counts, the image scores, and the few worst cases
            kept in small heaps as the class streams (:mod:`anomalyclip.eval.details`; bounded
            memory, no map kept beyond those).

    Returns:
        An :class:`EvaluationReport`. Pixel metrics are computed for the classes whose anomalous
        images all have masks. ``settings`` records ``shots`` (the number of references; 0 for
        zero-shot), ``seed`` and, with ``shots``, the drawn ``reference_images`` per class.
    """
    if isinstance(shots, bool):
        raise InvalidInputError(f"shots must be an int >= 0 or None, got {shots!r}.")
    run = dict(batch_size=batch_size, num_workers=num_workers, progress=progress, details=details)
    if shots is None or (shots == 0 and model.references is None):
        report = _evaluate(model, dataset, **run)
        report.settings.update(shots=model.num_references, seed=None)
        return report
    if shots == 0:  # put the references (and their thresholds) aside
        own_references, own_thresholds = model.references, model.thresholds
        model.thresholds = None  # dropping the references would drop them, with a warning
        model.references = None
        try:
            report = _evaluate(model, dataset, **run)
        finally:
            model.references = own_references
            model.thresholds = own_thresholds
        report.settings.update(shots=0, seed=None)
        return report
    from ..data.datasets import draw_shots, load_reference_pool

    pool = references if references is not None else load_reference_pool(dataset.root, dataset.format)
    drawn: dict[str, list[str]] = {}

    def use_shots(name: str, samples: list) -> list:
        """Make ``shots`` drawn normals the model's references; return the samples to evaluate."""
        chosen = draw_shots(pool, name, cast(int, shots), seed)
        drawn[name] = [str(s.image_path) for s in chosen]
        held_out = {s.image_path for s in chosen}
        kept = [s for s in samples if s.image_path not in held_out]
        if len(kept) < len(samples):
            logger.info("%s: %d reference image(s) held out of the evaluated images.", name, len(samples) - len(kept))
        model.clear_references()
        model.add_references([s.image_path for s in chosen], batch_size=batch_size)
        return kept

    own_references, own_thresholds = model.references, model.thresholds
    model.thresholds = None  # the per-class references would drop them, class after class, with a warning
    try:
        report = _evaluate(model, dataset, **run, before_class=use_shots)
    finally:
        # Both as they were (assigning the references drops thresholds: set them after).
        model.references = own_references
        model.thresholds = own_thresholds
    report.settings.update(shots=shots, seed=seed, reference_images=drawn)
    return report


def _evaluate(
    model: Any,
    dataset: Any,
    *,
    batch_size: int,
    num_workers: int | None,
    progress: bool,
    details: bool = False,
    before_class: Callable[[str, list], list] | None = None,
) -> EvaluationReport:
    """The protocol's loop; ``before_class(name, samples)`` may prepare the model for a class and
    returns the samples to evaluate."""
    from tqdm.auto import tqdm

    from ..data.reader import SampleReader
    from .details import WorstCases, class_details
    from ..prefetch import default_num_workers

    if len(dataset) == 0:
        raise DatasetError("The data set is empty; nothing to evaluate.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be an int >= 1, got {batch_size!r}.")
    device = getattr(model, "device", torch.device("cpu"))
    if num_workers is None:
        num_workers = default_num_workers(device)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise InvalidInputError(f"num_workers must be an int >= 0 (or None: the default), got {num_workers!r}.")
    size = model.config.image_size
    classes: dict[str, dict[str, float]] = {}
    counts: dict[str, dict[str, int]] = {}
    collected: dict[str, ClassDetails] = {}
    settings = _settings(model, dataset)  # before the loop: what the model is, not what a class made it
    bar = tqdm(total=len(dataset), desc="evaluate", unit="img", disable=not progress)
    for name, subset in dataset.by_class().items():
        samples = list(subset)
        if before_class is not None:
            samples = before_class(name, samples)
            bar.update(len(subset) - len(samples))
        n = len(samples)
        with_masks = all(s.mask_path is not None for s in samples if s.label == 1)
        scores = np.empty(n, dtype=np.float32)
        labels = np.array([s.label for s in samples], dtype=np.int8)
        maps = np.empty((n, size, size), dtype=np.float32) if with_masks else None
        masks = np.empty((n, size, size), dtype=bool) if with_masks else None
        worst = WorstCases() if details else None
        loader = torch.utils.data.DataLoader(
            SampleReader.for_config(samples, model.config, masks=with_masks),
            batch_size=batch_size,
            num_workers=num_workers,
            shuffle=False,
            pin_memory=torch.device(device).type == "cuda",
        )
        start = 0
        for batch in loader:
            with torch.inference_mode():
                out = model(batch["pixel_values"])
            end = start + len(out.scores)
            scores[start:end] = out.scores.float().cpu().numpy()
            if maps is not None and masks is not None:
                maps[start:end] = out.anomaly_maps.float().cpu().numpy()
                masks[start:end] = batch["mask"].numpy() > 0.5
            if worst is not None:
                batch_maps = maps[start:end] if maps is not None else out.anomaly_maps.float().cpu().numpy()
                batch_masks = masks[start:end] if masks is not None else None
                worst.update(start, scores[start:end], labels[start:end], batch_maps, batch_masks)
            start = end
            bar.update(len(out.scores))
        if not with_masks:
            logger.warning("Class %s: some anomalous images have no mask; pixel metrics are skipped.", name)
        rank: dict = {}
        metrics = compute_metrics(scores, labels, maps, masks, counts=rank)
        if worst is not None:
            collected[name] = class_details(scores, labels, rank, worst, samples, model.map_range)
        del rank
        classes[name] = {key: metrics.get(key, math.nan) for key in METRIC_NAMES}
        counts[name] = {"images": n, "anomalous": int(labels.sum())}
        logger.info("%s: %s", name, {k: round(v, 4) for k, v in classes[name].items()})
        del maps, masks
    bar.close()
    return EvaluationReport(
        classes=classes,
        mean=_mean_over_classes(classes),
        counts=counts,
        settings=settings,
        details=collected if details else None,
    )


def _settings(model: Any, dataset: Any) -> dict[str, Any]:
    """The run's record: the model's options, thresholds, data set, library version and UTC date."""
    from .._version import __version__

    config = model.config
    thresholds = model.thresholds
    return {
        "backbone": config.backbone,
        "image_size": config.image_size,
        "feature_layers": list(config.feature_layers),
        "dpam_layers": config.dpam_layers,
        "dpam_mode": config.dpam_mode,
        "sigma": config.sigma,
        "dtype": str(getattr(model, "dtype", "")).replace("torch.", ""),
        "trained_on": config.trained_on,
        "thresholds": None if thresholds is None else {**thresholds.to_dict(), "mode": _mode_text(config)},
        "dataset_root": str(getattr(dataset, "root", "")),
        "dataset_format": getattr(dataset, "format", None),
        "anomalyclip_version": __version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _mode_text(config: Any) -> str | None:
    """The decision mode the model's thresholds were chosen in, in words (None: not recorded)."""
    mode = getattr(config, "threshold_mode", None)
    if not mode:
        return None
    parts = [f"{mode.get('image_size')} px", "layers " + ", ".join(str(v) for v in mode.get("feature_layers", []))]
    tile = mode.get("tile_size")
    parts.append(f"tiles of {tile} px, overlap {mode.get('tile_overlap')}" if tile else "untiled")
    parts.append("with references " + str(mode["references"])[:12] if mode.get("references") else "zero-shot")
    return ", ".join(parts)


def _percent(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def format_table(report: EvaluationReport) -> str:
    """The paper's table layout: one row per class and a mean row, percent with one decimal."""
    width = max([len("mean"), *(len(c) for c in report.classes)])
    header = f"{'class':<{width}}  " + "  ".join(f"{h:>7}" for h in METRIC_HEADERS)
    lines = [header, "-" * len(header)]
    for name, metrics in [*report.classes.items(), ("mean", report.mean)]:
        if name == "mean":
            lines.append("-" * len(header))
        lines.append(f"{name:<{width}}  " + "  ".join(f"{_percent(metrics.get(k)):>7}" for k in METRIC_NAMES))
    return "\n".join(lines)


def write_reports(
    report: EvaluationReport,
    out_dir: str | os.PathLike,
    *,
    html: bool = False,
    compare: EvaluationReport | None = None,
) -> Path:
    """Write ``metrics.json`` and ``metrics.csv`` (fractions in [0, 1]) atomically; returns the directory.

    Args:
        report: the evaluation to write.
        out_dir: the directory (created if needed).
        html: also write ``report.html``, one self-contained page (run, metrics table, per class
            curves, score histogram with the thresholds, worst cases; :mod:`anomalyclip.eval.report`).
            Needs ``report`` from ``evaluate(..., details=True)`` and matplotlib
            (``pip install "anomalyclip[report]"``).
        compare: with ``html``, a second evaluation of the same data set with details, shown
            side by side on the page (e.g. the zero-shot run beside a few-shot ``report``).
            ``metrics.json`` / ``metrics.csv`` hold ``report`` only.

    Raises:
        InvalidInputError: ``html`` for a report without details; ``compare`` without ``html``.
        MissingDependencyError: ``html`` without matplotlib (checked before anything is written).
    """
    if compare is not None and not html:
        raise InvalidInputError("compare is shown on the HTML page only: pass html=True with it.")
    if html:
        from .plots import require_matplotlib

        require_matplotlib()
        if report.details is None or (compare is not None and compare.details is None):
            raise InvalidInputError(
                "This evaluation has no report details; run evaluate(model, dataset, details=True) "
                "(anomalyclip evaluate --report) to write report.html."
            )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "metrics.json", "w") as handle:
        json.dump(report.to_dict(), handle, indent=2, sort_keys=False)
        handle.write("\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["class", "images", "anomalous", *METRIC_NAMES])
    data = report.to_dict()
    for name, metrics in data["classes"].items():
        c = report.counts.get(name, {})
        writer.writerow([name, c.get("images", ""), c.get("anomalous", ""), *("" if metrics.get(k) is None else metrics[k] for k in METRIC_NAMES)])
    total = sum(c.get("images", 0) for c in report.counts.values())
    anomalous = sum(c.get("anomalous", 0) for c in report.counts.values())
    writer.writerow(["mean", total, anomalous, *("" if data["mean"][k] is None else data["mean"][k] for k in METRIC_NAMES)])
    with atomic_write(out / "metrics.csv", "w") as handle:
        handle.write(buffer.getvalue())
    if html:
        from .report import REPORT_FILE, write_html

        write_html(report, out / REPORT_FILE, compare=compare)
    return out
