"""The evaluation report: metrics with CIs, operating threshold, subgroups, figures; JSON and Markdown.

``evaluate_predictions`` is the one entry point the pipeline calls per backbone. The report round-trips
through ``to_dict``/``from_dict`` (JSON-safe: NaN is stored as null) so it can be stored as
``report.json`` and its metrics copied into the serving bundle manifest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

from melanoma_ml.atomic import atomic_write_json, to_jsonable
from melanoma_ml.config import EvaluationConfig
from melanoma_ml.errors import InputFileNotFoundError, InputValueError
from melanoma_ml.evaluation.bootstrap import (
    BootstrapDraws,
    bootstrap_overall,
    metric_key,
    percentile_interval,
)
from melanoma_ml.evaluation.estimate import Estimate
from melanoma_ml.evaluation.inputs import BACKBONE, group_codes, labels_and_scores, validate_predictions
from melanoma_ml.evaluation.markdown import report_markdown
from melanoma_ml.evaluation.metrics import (
    THRESHOLD_METRICS,
    brier_score,
    expected_calibration_error,
    partial_auc,
    require_both_classes,
    roc_auc,
    threshold_metrics,
)
from melanoma_ml.evaluation.resample import draw_group_resamples
from melanoma_ml.evaluation.subgroups import subgroup_table
from melanoma_ml.evaluation.threshold import threshold_for_sensitivity
from melanoma_ml.evaluation.weighted import WeightedRows

REPORT_FORMAT = "melanoma-evaluation-report/1"
REPORT_FILE = "report.json"
FIGURES_DIR = "figures"
ROC_GRID_POINTS = 101
"""False-positive rates (0..1) at which the ROC bootstrap band is stored."""

RANKING_METRICS: tuple[str, ...] = ("auc", "pauc", "brier", "ece")
FIXED_THRESHOLD_SETTING = "threshold_fixed_before_evaluation"
"""``EvaluationReport.settings`` key, True when the threshold was given (e.g. tuned out-of-fold and applied
unchanged to a test set) rather than tuned on the evaluated predictions."""

REQUIRED_METRICS: tuple[str, ...] = (*RANKING_METRICS[:2], *THRESHOLD_METRICS, *RANKING_METRICS[2:])
"""Every metric of ``EvaluationReport.metrics``; each must have a finite value and CI (asset check).
The threshold metrics here are at the tuned operating point."""


@dataclass(frozen=True)
class ThresholdEstimate(Estimate):
    """The operating threshold tuned on all out-of-fold predictions, and its CI when re-tuned per resample."""

    target_sensitivity: float

    def to_dict(self) -> dict[str, float | None]:
        return {**super().to_dict(), "target_sensitivity": self.target_sensitivity}


def _nan(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _frame_from_records(records: list[dict[str, Any]], columns: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame.from_records(records, columns=columns)
    return frame.fillna(value=np.nan) if len(frame) else frame


@dataclass
class EvaluationReport:
    """Out-of-fold evaluation of one model.

    Attributes:
        name: the model (backbone) name.
        metrics: columns ``metric, value, lo, hi``, one row per :data:`REQUIRED_METRICS`; threshold
            metrics at the tuned operating point.
        threshold: the tuned threshold, its CI and the target sensitivity.
        metrics_at_threshold: columns ``operating_point, threshold, metric, value, lo, hi`` for the
            ``tuned`` threshold and the ``fixed`` one (``EvaluationConfig.fixed_threshold``).
        subgroups: see ``subgroups.subgroup_table``.
        roc_band: columns ``fpr, tpr, tpr_lo, tpr_hi``: the ROC and its bootstrap band.
        n_images, n_groups, n_melanoma: size of the evaluated set.
        n_bootstrap: resamples behind every CI; ``n_redrawn``: single-class resamples that were redrawn.
        ci_level: coverage of the CIs; ``ece_bins``: calibration bins.
        settings: the ``EvaluationConfig`` used, as a dict.
        figures: figure name -> PNG path (empty until written).
    """

    name: str
    metrics: pd.DataFrame
    threshold: ThresholdEstimate
    metrics_at_threshold: pd.DataFrame
    subgroups: pd.DataFrame
    roc_band: pd.DataFrame
    n_images: int
    n_groups: int
    n_melanoma: int
    n_bootstrap: int
    n_redrawn: int
    ci_level: float
    ece_bins: int
    settings: dict[str, Any]
    figures: dict[str, str] = field(default_factory=dict)

    def metric(self, name: str) -> Estimate:
        """The estimate of one metric of :attr:`metrics` (e.g. ``report.metric("auc").lo``)."""
        rows = self.metrics[self.metrics["metric"] == name]
        if rows.empty:
            raise KeyError(f"no metric {name!r} in the report; known: {list(self.metrics['metric'])}")
        row = rows.iloc[0]
        return Estimate(float(row["value"]), float(row["lo"]), float(row["hi"]), self.ci_level)

    def incomplete_metrics(self) -> list[str]:
        """Names of :data:`REQUIRED_METRICS` missing from the report or without a finite value and CI."""
        known = set(self.metrics["metric"])
        missing = [name for name in REQUIRED_METRICS if name not in known]
        return missing + [
            name for name in REQUIRED_METRICS if name in known and not self.metric(name).is_finite
        ]

    def flat_metrics(self) -> dict[str, float]:
        """``{"auc": .., "auc_lo": .., "auc_hi": .., ..., "threshold": ..}`` for metadata and manifests."""
        out: dict[str, float] = {}
        for name in self.metrics["metric"]:
            estimate = self.metric(name)
            out.update({name: estimate.value, f"{name}_lo": estimate.lo, f"{name}_hi": estimate.hi})
        out.update(
            {
                "threshold": self.threshold.value,
                "threshold_lo": self.threshold.lo,
                "threshold_hi": self.threshold.hi,
            }
        )
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (NaN stored as None); inverse of :meth:`from_dict`."""
        return to_jsonable(
            {
                "format": REPORT_FORMAT,
                "name": self.name,
                "n_images": self.n_images,
                "n_groups": self.n_groups,
                "n_melanoma": self.n_melanoma,
                "n_bootstrap": self.n_bootstrap,
                "n_redrawn": self.n_redrawn,
                "ci_level": self.ci_level,
                "ece_bins": self.ece_bins,
                "metrics": {name: self.metric(name).to_dict() for name in self.metrics["metric"]},
                "threshold": self.threshold.to_dict(),
                "metrics_at_threshold": self.metrics_at_threshold.to_dict(orient="records"),
                "subgroups": self.subgroups.to_dict(orient="records"),
                "roc_band": {column: self.roc_band[column].tolist() for column in self.roc_band.columns},
                "settings": self.settings,
                "figures": dict(self.figures),
            },
            "report",
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvaluationReport:
        """Rebuild a report from :meth:`to_dict` output (e.g. a loaded ``report.json``).

        Raises:
            ValueError: the dict is not an evaluation report of this format.
        """
        if data.get("format") != REPORT_FORMAT:
            raise InputValueError(
                f"not an evaluation report of format {REPORT_FORMAT!r} (got format {data.get('format')!r}); "
                f"re-run the evaluation to regenerate report.json"
            )
        ci_level = float(data["ci_level"])
        estimates = {
            name: Estimate.from_dict(m, default_level=ci_level, where=f"report metric {name!r}")
            for name, m in data["metrics"].items()
        }
        metrics = pd.DataFrame(
            [{"metric": name, "value": e.value, "lo": e.lo, "hi": e.hi} for name, e in estimates.items()],
            columns=["metric", "value", "lo", "hi"],
        )
        t = data["threshold"]
        threshold = Estimate.from_dict(t, default_level=ci_level, where="report threshold")
        at_threshold = data["metrics_at_threshold"]
        subgroups = data["subgroups"]
        return cls(
            name=data["name"],
            metrics=metrics,
            threshold=ThresholdEstimate(
                threshold.value, threshold.lo, threshold.hi, threshold.level, t["target_sensitivity"]
            ),
            metrics_at_threshold=_frame_from_records(
                at_threshold, list(at_threshold[0]) if at_threshold else []
            ),
            subgroups=_frame_from_records(subgroups, list(subgroups[0]) if subgroups else []),
            roc_band=pd.DataFrame({k: [_nan(v) for v in vs] for k, vs in data["roc_band"].items()}),
            n_images=data["n_images"],
            n_groups=data["n_groups"],
            n_melanoma=data["n_melanoma"],
            n_bootstrap=data["n_bootstrap"],
            n_redrawn=data["n_redrawn"],
            ci_level=ci_level,
            ece_bins=data["ece_bins"],
            settings=data["settings"],
            figures=dict(data.get("figures", {})),
        )

    def save(self, out_dir: str | Path) -> Path:
        """Write ``<out_dir>/report.json`` atomically; returns its path."""
        return atomic_write_json(Path(out_dir) / REPORT_FILE, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> EvaluationReport:
        """Read a ``report.json`` (or the folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / REPORT_FILE
        if not path.is_file():
            raise InputFileNotFoundError(
                f"evaluation report not found: {path}; run the evaluation step first"
            )
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))

    def to_markdown(self, embed_figures: bool = False) -> str:
        """A readable Markdown summary; figures as base64 data-URI images when ``embed_figures``."""
        return report_markdown(self, embed_figures)


def _report_name(frame: pd.DataFrame, name: str) -> str:
    if name or BACKBONE not in frame.columns:
        return name
    backbones = frame[BACKBONE].dropna().unique()
    return str(backbones[0]) if len(backbones) == 1 else ""


def _roc_band(y: np.ndarray, p: np.ndarray, draws: BootstrapDraws, ci_level: float) -> pd.DataFrame:
    """The ROC's TPR at ``draws.fpr_grid`` with the pointwise percentile band of the resampled curves."""
    fpr, tpr, _ = roc_curve(y, p)
    tail = (1.0 - ci_level) / 2 * 100
    lo, hi = np.nanpercentile(draws.roc_tpr, [tail, 100 - tail], axis=1)
    grid = draws.fpr_grid
    return pd.DataFrame({"fpr": grid, "tpr": np.interp(grid, fpr, tpr), "tpr_lo": lo, "tpr_hi": hi})


def evaluate_predictions(
    oof: pd.DataFrame,
    config: EvaluationConfig,
    out_dir: str | Path | None = None,
    *,
    name: str = "",
    threshold: float | None = None,
) -> EvaluationReport:
    """Evaluate one model's out-of-fold predictions with patient-cluster bootstrap CIs.

    Steps: validate the table; tune the threshold reaching ``config.target_sensitivity``; compute point
    estimates; draw ``config.n_bootstrap`` group resamples (seed ``config.bootstrap_seed``); score every
    metric, the re-tuned threshold and the ROC on each; build the subgroup table on the same resamples.
    With ``out_dir``, write the figures to ``<out_dir>/figures/*.png`` and the report to
    ``<out_dir>/report.json``.

    Args:
        oof: out-of-fold predictions (``image_name, group_id, target, prob`` plus optional fold, sex,
            age, site, backbone).
        config: evaluation settings.
        out_dir: where to write figures and ``report.json``; nothing is written when None.
        name: model name shown in the report; defaults to the single ``backbone`` value if present.
        threshold: the operating threshold fixed BEFORE these predictions were seen (a test set is scored at
            the threshold tuned out-of-fold, never re-tuned on it). None tunes it here for
            ``config.target_sensitivity``. A given threshold has no CI (NaN bounds) and the report's
            settings say so (``FIXED_THRESHOLD_SETTING``).

    Raises:
        ValueError: invalid predictions (see ``inputs.validate_predictions``) or a single class.
    """
    frame = validate_predictions(oof)
    y, p = labels_and_scores(frame)
    require_both_classes(y)  # fails early, before any resampling
    codes, n_groups = group_codes(frame)
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise InputValueError(f"threshold must be a probability in [0, 1], got {threshold}")
    tuned = threshold_for_sensitivity(y, p, config.target_sensitivity) if threshold is None else threshold
    operating = {"tuned": tuned, "fixed": config.fixed_threshold}

    point: dict[str, float] = {
        "auc": roc_auc(y, p),
        "pauc": partial_auc(y, p, config.pauc_min_tpr),
        "brier": brier_score(y, p),
        "ece": expected_calibration_error(y, p, config.ece_bins),
    }
    at_point = {op: threshold_metrics(y, p, t) for op, t in operating.items()}

    resamples = draw_group_resamples(y, codes, config.n_bootstrap, config.bootstrap_seed)
    fpr_grid = np.linspace(0.0, 1.0, ROC_GRID_POINTS)
    draws = bootstrap_overall(
        WeightedRows(y, p, codes, n_groups),
        resamples,
        operating_points=operating,
        config=config,
        fpr_grid=fpr_grid,
    )

    def estimate(key: str, value: float) -> dict[str, float]:
        lo, hi = percentile_interval(draws.values[key], config.ci_level)
        return {"value": value, "lo": lo, "hi": hi}

    rows = [{"metric": m, **estimate(m, point[m])} for m in RANKING_METRICS[:2]]
    rows += [
        {"metric": m, **estimate(metric_key(m, "tuned"), at_point["tuned"][m])} for m in THRESHOLD_METRICS
    ]
    rows += [{"metric": m, **estimate(m, point[m])} for m in RANKING_METRICS[2:]]
    at_threshold = [
        {"operating_point": op, "threshold": t, "metric": m, **estimate(metric_key(m, op), at_point[op][m])}
        for op, t in operating.items()
        for m in THRESHOLD_METRICS
    ]
    threshold_lo, threshold_hi = percentile_interval(draws.values["threshold"], config.ci_level)
    if threshold is not None:  # fixed beforehand: re-tuning it per resample would describe another rule
        threshold_lo = threshold_hi = float("nan")

    report = EvaluationReport(
        name=_report_name(frame, name),
        metrics=pd.DataFrame(rows, columns=["metric", "value", "lo", "hi"]),
        threshold=ThresholdEstimate(
            tuned, threshold_lo, threshold_hi, config.ci_level, config.target_sensitivity
        ),
        metrics_at_threshold=pd.DataFrame(
            at_threshold, columns=["operating_point", "threshold", "metric", "value", "lo", "hi"]
        ),
        subgroups=subgroup_table(frame, config, threshold=tuned, resamples=resamples),
        roc_band=_roc_band(y, p, draws, config.ci_level),
        n_images=len(frame),
        n_groups=n_groups,
        n_melanoma=int(y.sum()),
        n_bootstrap=resamples.n_resamples,
        n_redrawn=resamples.n_redrawn,
        ci_level=config.ci_level,
        ece_bins=config.ece_bins,
        settings={**config.model_dump(), FIXED_THRESHOLD_SETTING: threshold is not None},
    )
    if out_dir is not None:
        from melanoma_ml.evaluation.plots import plot_all  # matplotlib loads only when figures are wanted

        out_dir = Path(out_dir)
        figures = plot_all(frame, report, out_dir / FIGURES_DIR)
        report.figures = {key: str(path) for key, path in figures.items()}
        report.save(out_dir)
    return report
