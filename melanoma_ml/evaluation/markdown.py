"""Markdown rendering of an evaluation report (shown by Dagster as ``MetadataValue.md``)."""

from __future__ import annotations

import base64
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from melanoma_ml.errors import InputFileNotFoundError
from melanoma_ml.evaluation.estimate import Estimate, level_text
from melanoma_ml.evaluation.metrics import THRESHOLD_METRICS

if TYPE_CHECKING:
    from melanoma_ml.evaluation.report import EvaluationReport

_LABELS = {
    "auc": "AUC",
    "pauc": "pAUC (TPR >= {min_tpr:.0%})",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
    "precision": "precision (PPV)",
    "f1": "F1",
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "brier": "Brier score",
    "ece": "ECE ({bins} bins)",
}


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if _finite(value) else "n/a"


def _with_ci(report: EvaluationReport, value: Any, lo: Any, hi: Any) -> str:
    """A table cell: ``0.810 [0.780, 0.850]`` (the column header names the level), ``-`` without a value."""
    if not _finite(value):
        return "-"
    bounds = (float(b) if _finite(b) else math.nan for b in (lo, hi))
    return Estimate(float(value), *bounds, report.ci_level).text(show_level=False)


def _label(report: EvaluationReport, metric: str) -> str:
    return _LABELS.get(metric, metric).format(
        min_tpr=report.settings.get("pauc_min_tpr", float("nan")), bins=report.ece_bins
    )


def _summary(report: EvaluationReport) -> list[str]:
    level = level_text(report.ci_level)
    t = report.threshold
    if report.settings.get("threshold_fixed_before_evaluation"):
        operating = (
            f"Operating threshold **{t.value:.4g}**, fixed before these predictions were seen (tuned out-of-fold "
            "for the target sensitivity, not re-tuned here). Threshold metrics below are at that threshold."
        )
    else:
        operating = (
            f"Operating threshold **{t.value:.4g}** ({level} CI [{_fmt(t.lo)}, {_fmt(t.hi)}] when re-tuned per "
            f"resample), the largest threshold reaching sensitivity >= {t.target_sensitivity:.0%}. Threshold "
            f"metrics below are at that fixed threshold."
        )
    return [
        f"### Evaluation{': ' + report.name if report.name else ''}",
        "",
        f"{report.n_images} images from {report.n_groups} patients/groups, {report.n_melanoma} melanoma. "
        f"{level} CIs from {report.n_bootstrap} patient-cluster bootstrap resamples "
        f"({report.n_redrawn} single-class resamples redrawn).",
        "",
        operating,
    ]


def _metrics(report: EvaluationReport) -> list[str]:
    lines = ["", f"| metric | value [{level_text(report.ci_level)} CI] |", "| --- | --- |"]
    for row in report.metrics.itertuples(index=False):
        lines.append(f"| {_label(report, row.metric)} | {_with_ci(report, row.value, row.lo, row.hi)} |")
    return lines


def _operating_points(report: EvaluationReport) -> list[str]:
    table = report.metrics_at_threshold
    points = table.drop_duplicates("operating_point")[["operating_point", "threshold"]].itertuples(
        index=False
    )
    points = list(points)
    header = " | ".join(f"{p.operating_point} (t={p.threshold:.4g})" for p in points)
    header += f" [{level_text(report.ci_level)} CI]"
    lines = ["", "#### Operating points", "", f"| metric | {header} |", "| --- |" + " --- |" * len(points)]
    by_key = table.set_index(["operating_point", "metric"])
    for metric in THRESHOLD_METRICS:
        cells = [
            _with_ci(report, *by_key.loc[(p.operating_point, metric), ["value", "lo", "hi"]]) for p in points
        ]
        lines.append(f"| {_label(report, metric)} | " + " | ".join(cells) + " |")
    return lines


def _subgroups(report: EvaluationReport) -> list[str]:
    if not len(report.subgroups):
        return []
    lines = [
        "",
        f"#### Subgroups (sensitivity/specificity at the tuned threshold; {level_text(report.ci_level)} CIs)",
        "",
        "| variable | level | n | melanoma | AUC | sensitivity | specificity | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in report.subgroups.to_dict(orient="records"):
        cells = [
            _with_ci(report, row[m], row[f"{m}_lo"], row[f"{m}_hi"])
            for m in ("auc", "sensitivity", "specificity")
        ]
        lines.append(
            f"| {row['variable']} | {row['level']} | {int(row['n'])} | {int(row['n_melanoma'])} | "
            + " | ".join(cells)
            + f" | {row['note'] or ''} |"
        )
    return lines


def _image_source(path: Path, embed: bool) -> str:
    if not embed:
        return path.as_posix()
    if not path.is_file():
        raise InputFileNotFoundError(f"figure {path} is missing; re-run evaluate_predictions with an out_dir")
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _figures(report: EvaluationReport, embed: bool) -> list[str]:
    if not report.figures:
        return []
    return ["", "#### Figures", ""] + [
        f"![{name}]({_image_source(Path(path), embed)})" for name, path in report.figures.items()
    ]


def report_markdown(report: EvaluationReport, embed_figures: bool = False) -> str:
    """The whole report as Markdown; figures inlined as base64 data URIs when ``embed_figures``."""
    lines = [
        *_summary(report),
        *_metrics(report),
        *_operating_points(report),
        *_subgroups(report),
        *_figures(report, embed_figures),
    ]
    return "\n".join(lines) + "\n"
