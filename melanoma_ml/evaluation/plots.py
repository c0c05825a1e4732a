"""Figures as PNG: ROC with bootstrap band, precision-recall, reliability, confusion matrix, training curves.

Every figure is a ``matplotlib.figure.Figure`` with its own ``FigureCanvasAgg``: no pyplot figure and no
``matplotlib.use``, so importing or calling this module leaves the process's backend and pyplot state alone
(it runs inside Dagster and the app). Files are written atomically, so a reader never sees a half-written
PNG. Only matplotlib, numpy, pandas and sklearn are imported (no torch).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    average_precision_score,
    precision_recall_curve,
    roc_curve,
)

from melanoma_ml.atomic import atomic_write_bytes
from melanoma_ml.errors import InputValueError
from melanoma_ml.evaluation.inputs import labels_and_scores, validate_predictions

if TYPE_CHECKING:
    from melanoma_ml.evaluation.report import EvaluationReport

FIGURE_NAMES: tuple[str, ...] = ("roc", "precision_recall", "calibration", "confusion_matrix")
_SIZE = (5.0, 4.5)
_DPI = 100


def _figure(size: tuple[float, float] = _SIZE) -> Figure:
    """A figure on its own Agg canvas (not registered with pyplot, so nothing to close)."""
    figure = Figure(figsize=size, dpi=_DPI)
    FigureCanvasAgg(figure)
    return figure


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


def _save(fig: Figure, path: Path) -> Path:
    return atomic_write_bytes(path, _png(fig))


def _title(report: EvaluationReport, what: str) -> str:
    return f"{report.name}: {what}" if report.name else what


def plot_roc(y: np.ndarray, p: np.ndarray, report: EvaluationReport, path: Path) -> Path:
    """ROC curve with the bootstrap band of TPR at each FPR and the tuned operating point."""
    fpr, tpr, _ = roc_curve(y, p)
    band: pd.DataFrame = report.roc_band
    auc = report.metric("auc")
    sens, spec = report.metric("sensitivity"), report.metric("specificity")
    fig = _figure()
    ax = fig.subplots()
    level = f"{report.ci_level:.0%}"
    ax.fill_between(band["fpr"], band["tpr_lo"], band["tpr_hi"], alpha=0.25, label=f"{level} bootstrap band")
    ax.plot(fpr, tpr, lw=1.8, label=f"AUC {auc.value:.3f} ({auc.lo:.3f}-{auc.hi:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey")
    ax.scatter(
        [1 - spec.value],
        [sens.value],
        color="black",
        zorder=3,
        label=f"threshold {report.threshold.value:.3g}",
    )
    ax.set(xlabel="False positive rate (1 - specificity)", ylabel="Sensitivity", xlim=(0, 1), ylim=(0, 1.01))
    ax.set_title(_title(report, "ROC"))
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_precision_recall(y: np.ndarray, p: np.ndarray, report: EvaluationReport, path: Path) -> Path:
    """Precision-recall curve with average precision and the melanoma prevalence as baseline."""
    precision, recall, _ = precision_recall_curve(y, p)
    fig = _figure()
    ax = fig.subplots()
    ax.step(recall, precision, where="post", lw=1.8, label=f"AP {average_precision_score(y, p):.3f}")
    ax.axhline(float(np.mean(y)), ls="--", lw=0.8, color="grey", label=f"prevalence {np.mean(y):.3f}")
    ax.set(xlabel="Recall (sensitivity)", ylabel="Precision", xlim=(0, 1), ylim=(0, 1.01))
    ax.set_title(_title(report, "precision-recall"))
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def plot_calibration(y: np.ndarray, p: np.ndarray, report: EvaluationReport, n_bins: int, path: Path) -> Path:
    """Reliability diagram (equal-width bins) over a histogram of predicted probabilities."""
    observed, predicted = calibration_curve(y, p, n_bins=n_bins, strategy="uniform")
    ece = report.metric("ece")
    fig = _figure((_SIZE[0], _SIZE[1] + 1))
    ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey", label="perfect calibration")
    ax.plot(predicted, observed, marker="o", lw=1.5, label=f"model (ECE {ece.value:.3f})")
    ax.set(ylabel="Observed melanoma fraction", ylim=(0, 1.01))
    ax.set_title(_title(report, "reliability"))
    ax.legend(loc="upper left", fontsize=8)
    hist.hist(p, bins=n_bins, range=(0, 1), color="grey")
    hist.set(xlabel="Predicted probability", ylabel="Images", xlim=(0, 1))
    return _save(fig, path)


def plot_confusion_matrix(y: np.ndarray, p: np.ndarray, report: EvaluationReport, path: Path) -> Path:
    """Confusion matrix of the decision ``p >= tuned threshold``."""
    threshold = report.threshold.value
    fig = _figure()
    ax = fig.subplots()
    ConfusionMatrixDisplay.from_predictions(
        y,
        (p >= threshold).astype(int),
        labels=[0, 1],
        display_labels=["benign", "melanoma"],
        ax=ax,
        colorbar=False,
        values_format="d",
    )
    ax.set_title(_title(report, f"confusion at threshold {threshold:.3g}"))
    return _save(fig, path)


def plot_all(oof: pd.DataFrame, report: EvaluationReport, out_dir: Path) -> dict[str, Path]:
    """Write every figure of :data:`FIGURE_NAMES` as ``<out_dir>/<name>.png``; returns name -> path."""
    frame = validate_predictions(oof)
    y, p = labels_and_scores(frame)
    out_dir = Path(out_dir)
    return {
        "roc": plot_roc(y, p, report, out_dir / "roc.png"),
        "precision_recall": plot_precision_recall(y, p, report, out_dir / "precision_recall.png"),
        "calibration": plot_calibration(y, p, report, report.ece_bins, out_dir / "calibration.png"),
        "confusion_matrix": plot_confusion_matrix(y, p, report, out_dir / "confusion_matrix.png"),
    }


def plot_training_curves(history: pd.DataFrame, title: str | None = None) -> bytes:
    """Loss and AUROC per epoch (train and validation) from a fold's ``history.csv``, as PNG bytes.

    Raises:
        InputValueError: ``history`` has no ``epoch`` column or no rows.
    """
    if "epoch" not in history.columns or history.empty:
        raise InputValueError(
            "history needs an 'epoch' column and at least one row (history.csv of a trained fold)"
        )
    figure = _figure((9, 3.5))
    loss_ax, auc_ax = figure.subplots(1, 2)
    for ax, metric in ((loss_ax, "loss"), (auc_ax, "auroc")):
        for stage in ("train", "val"):
            column = f"{stage}/{metric}"
            if column in history.columns:
                ax.plot(history["epoch"], history[column], marker="o", label=column)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    auc_ax.set_ylim(0, 1)
    if title:
        figure.suptitle(title)
    return _png(figure)
