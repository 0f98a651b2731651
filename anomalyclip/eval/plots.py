"""The HTML report's figures, drawn with matplotlib (the ``[report]`` extra) into PNG bytes.

Only the object-oriented API with the Agg canvas is used (``matplotlib.figure.Figure`` +
``FigureCanvasAgg``): no ``pyplot``, no change to the user's matplotlib backend or state.
"""

from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np

from ..errors import MissingDependencyError
from .details import ClassDetails

__all__ = ["require_matplotlib", "class_figure"]

_LEVEL_COLORS = {"image": "#1f6fb4", "pixel": "#e07b12"}
_NORMAL_COLOR, _ANOMALOUS_COLOR = "#3b8f4a", "#c23b3b"


def require_matplotlib() -> None:
    """Raise :class:`~anomalyclip.errors.MissingDependencyError` when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            'The HTML evaluation report draws its plots with matplotlib: pip install "anomalyclip[report]".'
        ) from exc


def class_figure(
    runs: Sequence[tuple[str, ClassDetails, float | None]],
    metrics: Sequence[dict[str, float]],
) -> bytes:
    """One class's panels as a PNG: ROC, precision-recall, and one score histogram per run.

    Args:
        runs: ``(label, details, image threshold or None)`` per run (e.g. zero-shot, then
            few-shot); curves of the runs share the ROC and PR axes (solid: the last run).
        metrics: each run's metrics of the class (for the legends: AUROC, AP).

    Returns:
        PNG bytes, about 330 px tall and 330 px wide per panel.
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = 2 + len(runs)
    fig = Figure(figsize=(3.4 * panels, 3.3), dpi=100)
    FigureCanvasAgg(fig)
    roc, pr, *hists = fig.subplots(1, panels)
    fig.subplots_adjust(left=0.055 * 4 / panels, right=0.99, bottom=0.15, top=0.92, wspace=0.3)
    last = len(runs) - 1
    for r, ((label, details, _), values) in enumerate(zip(runs, metrics)):
        style = "-" if r == last else "--"
        prefix = f"{label}, " if len(runs) > 1 else ""
        for level, curves in details.curves.items():
            color = _LEVEL_COLORS.get(level, "k")
            fpr, tpr = curves["roc"]
            roc.plot(fpr, tpr, style, color=color, lw=1.6, label=f"{prefix}{level} {100 * values[level + '_auroc']:.1f}")
            recall, precision = curves["pr"]
            recall, precision = np.concatenate(([0.0], recall)), np.concatenate((precision[:1], precision))
            pr.step(recall, precision, style, where="pre", color=color, lw=1.6,
                    label=f"{prefix}{level} {100 * values[level + '_ap']:.1f}")
    roc.plot([0, 1], [0, 1], ":", color="#999999", lw=1)
    _axes(roc, "ROC (legend: AUROC %)", "false positive rate", "true positive rate")
    _axes(pr, "Precision-recall (legend: AP %)", "recall", "precision")
    for ax, (label, details, threshold) in zip(hists, runs):
        _histogram(ax, details, threshold, f"Image scores{', ' + label if len(runs) > 1 else ''}")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _axes(ax: Any, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right" if "ROC" in title else "lower left")


def _histogram(ax: Any, details: ClassDetails, threshold: float | None, title: str) -> None:
    scores = details.scores.astype(np.float64)
    labels = details.labels.astype(bool)
    lines = [(threshold, "model threshold", "-", "#222222")] if threshold is not None else []
    if details.f1_threshold is not None:
        lines.append((details.f1_threshold, "F1-max threshold", "--", "#7a3db8"))
    # Bins over the scores only, widened to a threshold that lies close by; a threshold far off the
    # scores (over half their range away) is drawn at the edge, labelled "off scale".
    lo, hi = float(scores.min()), float(scores.max())
    span = max(hi - lo, 1e-6)
    near = [t for t, *_ in lines if lo - span / 2 <= t <= hi + span / 2]
    lo, hi = min([lo, *near]), max([hi, *near])
    edges = np.histogram_bin_edges(scores, bins=int(np.clip(scores.size // 3, 10, 40)), range=(lo, hi if hi > lo else lo + 1e-6))
    for mask, name, color in ((~labels, "normal", _NORMAL_COLOR), (labels, "anomalous", _ANOMALOUS_COLOR)):
        if mask.any():
            ax.hist(scores[mask], bins=edges, alpha=0.55, color=color, label=f"{name} ({int(mask.sum())})")
    pad = (edges[-1] - edges[0]) * 0.03
    ax.set_xlim(edges[0] - pad, edges[-1] + pad)
    for value, name, style, color in lines:
        shown = min(max(value, edges[0] - pad / 2), edges[-1] + pad / 2)
        side = "" if shown == value else (" (off scale, right)" if value > shown else " (off scale, left)")
        ax.axvline(shown, linestyle=style, color=color, lw=1.4, label=f"{name} {value:.3g}{side}")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("image score", fontsize=9)
    ax.set_ylabel("images", fontsize=9)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
