"""One day of served cases against the served bundle's reference: :func:`monitor_day` -> :class:`MonitorReport`.

What is measured (each on the day's cases scored by the bundle's version; ``monitoring`` settings in
``config.MonitoringConfig`` hold every warning level):

- volume, and the share of cases the bundle's OOD detector flagged against its expected share
  (``1 - quantile`` of the detector: ``manifest.ood``);
- the served probabilities against the bundle's out-of-fold rows served the same way at
  ``serving.deployment_prevalence`` (``monitoring.reference``): PSI and a KS test (``monitoring.drift``);
- the sex, anatomic-site and age-band mix against the mix the bundle ships (``manifest.monitor_reference``;
  older bundles have none: the report says so and measures the rest);
- the share of positive decisions against ``pi * sensitivity + (1 - pi) * FPR`` of the reference rows;
- AUC and sensitivity estimated from the calibrated probabilities before any label (``monitoring.cbpe``)
  against the same estimates on the reference rows (like with like: the reference's realised numbers
  carry its own label noise on top); a drop warns only when the day's bootstrap upper bound is below too.

A day with fewer than ``monitoring.min_daily_cases`` cases is measured and reported but warns about
nothing: its report says "too few cases".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import stats

from melanoma_ml.artifacts import artifact_paths
from melanoma_ml.monitoring.cbpe import PerformanceEstimate, estimate_performance, upper_bounds
from melanoma_ml.monitoring.drift import ShiftResult, category_shift, score_shift
from melanoma_ml.monitoring.prediction_log import read_predictions
from melanoma_ml.monitoring.reference import reference_scores
from melanoma_ml.serving.monitor_reference import METADATA_FIELDS, metadata_categories
from melanoma_ml.serving.remote_registry import open_registry

if TYPE_CHECKING:
    from melanoma_ml.config import MonitoringConfig, PipelineConfig
    from melanoma_ml.serving.manifest import BundleManifest

CHECKS = ("score_shift", "metadata_shift", "ood_rate", "positive_rate", "estimated_performance")
"""What a warning is about (one Dagster asset check each)."""


@dataclass(frozen=True)
class MonitorWarning:
    """A threshold a day crossed.

    Attributes:
        check: One of :data:`CHECKS`.
        measured: The value that crossed it.
        threshold: The ``monitoring`` setting it crossed.
        message: What crossed what, in words.
    """

    check: str
    measured: float
    threshold: float
    message: str


@dataclass(frozen=True)
class MonitorReport:
    """What the monitor measured on one day (None where it could not measure; ``notes`` say why).

    Attributes:
        model_version: The bundle's version the day was compared with.
        n_cases: Cases of that version with a probability.
        n_other_versions: Cases of the day scored by another version (left out).
        judged: ``n_cases >= monitoring.min_daily_cases`` (only then can anything warn).
        ood_flag_rate, ood_expected_rate: Share of flagged cases; the detector's expected share.
        score: Served probabilities against the reference rows' (PSI, KS p-value).
        metadata: Field (``sex``, ``site``, ``age_band``) -> mix shift (PSI, chi-square p-value).
        positive_rate, expected_positive_rate: Share of positive decisions; what the reference expects.
        estimated: CBPE's AUC / sensitivity / specificity from the day's probabilities.
        reference_auc, reference_sensitivity: The same CBPE estimates on the reference rows.
        warnings: Thresholds crossed.
        notes: What could not be measured and why, and other remarks.
    """

    model_version: str | None
    n_cases: int
    n_other_versions: int = 0
    judged: bool = False
    ood_flag_rate: float | None = None
    ood_expected_rate: float | None = None
    score: ShiftResult | None = None
    metadata: dict[str, ShiftResult] = field(default_factory=dict)
    positive_rate: float | None = None
    expected_positive_rate: float | None = None
    estimated: PerformanceEstimate | None = None
    reference_auc: float | None = None
    reference_sensitivity: float | None = None
    warnings: tuple[MonitorWarning, ...] = ()
    notes: tuple[str, ...] = ()

    def warnings_for(self, check: str) -> list[MonitorWarning]:
        return [w for w in self.warnings if w.check == check]

    def metrics(self) -> dict[str, float]:
        """Every measured number by name (what the UI plots over days); unmeasured ones are left out."""
        values: dict[str, float | None] = {
            "cases": self.n_cases,
            "ood_flag_rate": self.ood_flag_rate,
            "ood_expected_rate": self.ood_expected_rate,
            "score_psi": None if self.score is None else self.score.psi,
            "score_ks_p": None if self.score is None else self.score.p_value,
            **{f"{name}_psi": shift.psi for name, shift in self.metadata.items()},
            "positive_rate": self.positive_rate,
            "expected_positive_rate": self.expected_positive_rate,
            "estimated_auc": None if self.estimated is None else self.estimated.auc,
            "estimated_sensitivity": None if self.estimated is None else self.estimated.sensitivity,
            "reference_auc": self.reference_auc,
            "reference_sensitivity": self.reference_sensitivity,
            "warnings": len(self.warnings),
        }
        return {k: float(v) for k, v in values.items() if v is not None and np.isfinite(v)}

    def markdown(self) -> str:
        """The day as a markdown table, then its warnings and notes."""
        lines = ["| measure | value |", "|---|---|"]
        lines += [f"| {name} | {value:.4g} |" for name, value in self.metrics().items()]
        lines.append("")
        if self.warnings:
            lines += ["**Warnings**", ""] + [f"- {w.message}" for w in self.warnings]
        else:
            lines.append("No warnings." if self.judged else "No warnings (too few cases to judge).")
        if self.notes:
            lines += ["", "**Notes**", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines)


def monitor_day(predictions: pd.DataFrame, manifest: BundleManifest, config: PipelineConfig) -> MonitorReport:
    """Compare one day of the prediction log with ``manifest``'s reference (module docstring).

    Args:
        predictions: The day's prediction records (``monitoring.prediction_log.read_predictions``):
            ``model_version``, ``probability``, ``positive``, ``ood_flag``, ``age``, ``sex``, ``anatom_site``.
        manifest: The served bundle's manifest (its ``version`` selects the day's rows when set).
        config: ``monitoring`` thresholds and ``serving.deployment_prevalence``.
    """
    settings = config.monitoring
    rows, n_other = _rows_of(predictions, manifest.version)
    n = len(rows)
    notes: list[str] = []
    if n_other:
        notes.append(f"{n_other} case(s) of the day were scored by another model version and are left out")
    judged = n >= settings.min_daily_cases
    if not judged:
        notes.append(
            f"too few cases: {n} < monitoring.min_daily_cases ({settings.min_daily_cases}); measured, not judged"
        )
    if n == 0:
        return MonitorReport(manifest.version, 0, n_other, judged, notes=tuple(notes))
    found = _Measured(notes=notes)
    _ood(rows, manifest, found)
    _scores(rows, manifest, config, found)
    _metadata(rows, manifest, found)
    found.estimated = estimate_performance(rows["probability"], rows["positive"])
    if judged:
        found.estimated_upper = upper_bounds(
            rows["probability"], rows["positive"], quantile=1 - settings.p_value_warn
        )
    warnings = _warnings(found, n, settings) if judged else []
    return MonitorReport(
        model_version=manifest.version,
        n_cases=n,
        n_other_versions=n_other,
        judged=judged,
        ood_flag_rate=found.ood_rate,
        ood_expected_rate=found.ood_expected,
        score=found.score,
        metadata=found.metadata,
        positive_rate=float(rows["positive"].mean()),
        expected_positive_rate=found.expected_positive_rate,
        estimated=found.estimated,
        reference_auc=found.reference_auc,
        reference_sensitivity=found.reference_sensitivity,
        warnings=tuple(warnings),
        notes=tuple(notes),
    )


def monitor_logged_day(config: PipelineConfig, day: str) -> MonitorReport | None:
    """:func:`monitor_day` for the UTC ``day`` (``YYYY-MM-DD``) of the prediction log under the artifact root.

    The day is compared with the registered version that scored most of its cases (the current version
    when none was logged that day); None when nothing was logged that day and no version is current.
    """
    predictions = read_predictions(artifact_paths(config).root, start=day, end=day)
    registry = open_registry(config)
    versions = predictions["model_version"].dropna()
    version = str(versions.mode().iloc[0]) if len(versions) else registry.current()
    if version is None:
        return None
    return monitor_day(predictions, registry.manifest(version), config)


@dataclass
class _Measured:
    notes: list[str]
    ood_rate: float | None = None
    ood_expected: float | None = None
    ood_flagged: int = 0
    ood_scored: int = 0
    score: ShiftResult | None = None
    metadata: dict[str, ShiftResult] = field(default_factory=dict)
    positive: int = 0
    expected_positive_rate: float | None = None
    estimated: PerformanceEstimate | None = None
    estimated_upper: tuple[float | None, float | None] = (None, None)
    reference_auc: float | None = None
    reference_sensitivity: float | None = None


def _rows_of(predictions: pd.DataFrame, version: str | None) -> tuple[pd.DataFrame, int]:
    """The day's scored rows of ``version`` (all rows when the manifest has none) and how many others."""
    scored = predictions[pd.to_numeric(predictions["probability"], errors="coerce").notna()]
    if version is None:
        return scored.reset_index(drop=True), 0
    mine = scored["model_version"] == version
    return scored[mine].reset_index(drop=True), int((~mine).sum())


def _ood(rows: pd.DataFrame, manifest: BundleManifest, found: _Measured) -> None:
    flags = rows["ood_flag"].dropna().astype(bool)
    quantile = None if manifest.ood is None else manifest.ood.summary.get("quantile")
    if manifest.ood is None or quantile is None:
        found.notes.append("the bundle ships no OOD detector (or not its quantile): no OOD-rate reference")
    else:
        found.ood_expected = 1.0 - float(quantile)
    if flags.empty:
        found.notes.append("no case carries an OOD flag: OOD rate not measured")
        return
    found.ood_flagged, found.ood_scored = int(flags.sum()), len(flags)
    found.ood_rate = float(flags.mean())


def _scores(rows: pd.DataFrame, manifest: BundleManifest, config: PipelineConfig, found: _Measured) -> None:
    found.positive = int(rows["positive"].astype(bool).sum())
    reference = reference_scores(manifest, config.serving.deployment_prevalence)
    if reference is None:
        found.notes.append("the bundle stores no out-of-fold rows (oof): no score reference")
        return
    prob = rows["probability"].astype(float).to_numpy()
    found.score = score_shift(
        prob, reference.prob, reference_weights=reference.weight, bins=config.monitoring.psi_bins
    )
    found.expected_positive_rate = reference.expected_positive_rate
    found.reference_auc = reference.estimated_auc
    found.reference_sensitivity = reference.estimated_sensitivity


def _metadata(rows: pd.DataFrame, manifest: BundleManifest, found: _Measured) -> None:
    reference = manifest.monitor_reference
    if reference is None:
        found.notes.append(
            "no reference in this bundle: metadata mix not compared (promoted before monitoring)"
        )
        return
    categories = metadata_categories(rows["age"], rows["sex"], rows["anatom_site"])
    for name in METADATA_FIELDS:
        if name in reference.mix:
            counts = categories[name].value_counts().to_dict()
            found.metadata[name] = category_shift(counts, reference.mix[name], reference.n_rows)


def _warnings(found: _Measured, n: int, settings: MonitoringConfig) -> list[MonitorWarning]:
    alpha = settings.p_value_warn
    out: list[MonitorWarning] = []
    if found.score is not None and found.score.psi >= settings.score_psi_warn and found.score.p_value < alpha:
        out.append(
            MonitorWarning(
                "score_shift",
                found.score.psi,
                settings.score_psi_warn,
                f"served probabilities shifted: PSI {found.score.psi:.3f} >= monitoring.score_psi_warn "
                f"{settings.score_psi_warn} (KS p {found.score.p_value:.2g} < {alpha})",
            )
        )
    for name, shift in found.metadata.items():
        if shift.psi >= settings.metadata_psi_warn and shift.p_value < alpha:
            out.append(
                MonitorWarning(
                    "metadata_shift",
                    shift.psi,
                    settings.metadata_psi_warn,
                    f"{name} mix shifted: PSI {shift.psi:.3f} >= monitoring.metadata_psi_warn "
                    f"{settings.metadata_psi_warn} (chi-square p {shift.p_value:.2g} < {alpha})",
                )
            )
    if found.ood_rate is not None and found.ood_expected is not None:
        excess = found.ood_rate - found.ood_expected
        p = stats.binomtest(
            found.ood_flagged, found.ood_scored, found.ood_expected, alternative="greater"
        ).pvalue
        if excess >= settings.ood_rate_excess_warn and p < alpha:
            out.append(
                MonitorWarning(
                    "ood_rate",
                    found.ood_rate,
                    found.ood_expected + settings.ood_rate_excess_warn,
                    f"{found.ood_rate:.1%} of cases flagged out-of-distribution, expected {found.ood_expected:.1%} "
                    f"(+{excess:.1%} >= monitoring.ood_rate_excess_warn {settings.ood_rate_excess_warn}; p {p:.2g})",
                )
            )
    if found.expected_positive_rate is not None:
        rate, expected = found.positive / n, found.expected_positive_rate
        p = stats.binomtest(found.positive, n, min(max(expected, 1e-9), 1 - 1e-9)).pvalue
        if abs(rate - expected) >= settings.positive_rate_difference_warn and p < alpha:
            out.append(
                MonitorWarning(
                    "positive_rate",
                    rate,
                    settings.positive_rate_difference_warn,
                    f"{rate:.1%} of decisions positive, the reference expects {expected:.1%} at the deployment "
                    f"prevalence (difference >= monitoring.positive_rate_difference_warn "
                    f"{settings.positive_rate_difference_warn}; p {p:.2g})",
                )
            )
    out += _performance_warnings(found, settings)
    return out


def _performance_warnings(found: _Measured, settings: MonitoringConfig) -> list[MonitorWarning]:
    out: list[MonitorWarning] = []
    estimated = found.estimated
    pairs = (
        (
            "AUC",
            None if estimated is None else estimated.auc,
            found.estimated_upper[0],
            found.reference_auc,
            settings.estimated_auc_drop_warn,
            "estimated_auc_drop_warn",
        ),
        (
            "sensitivity",
            None if estimated is None else estimated.sensitivity,
            found.estimated_upper[1],
            found.reference_sensitivity,
            settings.estimated_sensitivity_drop_warn,
            "estimated_sensitivity_drop_warn",
        ),
    )
    alpha = settings.p_value_warn
    for what, value, upper, reference, drop, setting in pairs:
        if value is None or upper is None or reference is None:
            continue
        if reference - value >= drop and upper < reference:
            out.append(
                MonitorWarning(
                    "estimated_performance",
                    value,
                    reference - drop,
                    f"estimated {what} {value:.3f} (CBPE, before labels) is {reference - value:.3f} below the "
                    f"reference's {reference:.3f} (>= monitoring.{setting} {drop}; bootstrap {1 - alpha:.1%} "
                    f"upper bound {upper:.3f})",
                )
            )
    return out
