"""How each served model version did on the clinic's cases whose outcomes came back: the optimism gap in production.

:func:`deployed_performance` reads ``outcomes.labelled_cases`` (every prediction-log record joined to its
case's single consistent outcome) and, per model version, evaluates the probabilities it served with
``evaluation.evaluate_predictions``: AUC, sensitivity and specificity at the threshold it served (fixed
before the outcomes were known, never re-tuned), Brier score, ECE, and calibration-in-the-large (mean
served probability minus the observed melanoma rate; > 0: the model over-calls), each with a
patient-cluster bootstrap CI (``evaluation.n_bootstrap`` resamples of patients: the outcome's
``patient_id`` where given, else each case is its own patient). Beside them stand the numbers the model
card promised on its untouched test set (``manifest.test_metrics``, the locked test split ``internal``
first) and the gap (deployed minus card: negative AUC/sensitivity = the model does worse in the clinic than
its card says).

Caveats the report repeats: probabilities are served at ``serving.deployment_prevalence`` while the card's
ECE/Brier are measured at the test rows' own prevalence, so their gap mixes a prior shift with miscalibration
(AUC, sensitivity and specificity are unaffected by a prior shift); and outcomes usually come back for
a biased subset of cases (biopsied lesions are the suspicious ones), so deployed specificity on labelled
cases is not the clinic's specificity on every case.

A version with fewer than ``evaluation.subgroup_min_cases`` labelled melanoma or benign cases is listed with
its counts and the reason, and no number.

:func:`feedback_cases` is the table the promotion gate scores candidate and champion on (labelled cases whose
image ``serving.keep_images`` kept).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from melanoma_ml import schema
from melanoma_ml.artifacts import artifact_paths
from melanoma_ml.evaluation.bootstrap import percentile_interval
from melanoma_ml.evaluation.estimate import Estimate
from melanoma_ml.evaluation.inputs import PROB, group_codes
from melanoma_ml.evaluation.resample import draw_group_resamples
from melanoma_ml.monitoring.outcomes import labelled_cases

if TYPE_CHECKING:
    from melanoma_ml.config import PipelineConfig
    from melanoma_ml.serving.manifest import BundleManifest

METRICS: tuple[str, ...] = ("auc", "sensitivity", "specificity", "brier", "ece", "calibration_in_the_large")
"""What is measured per version (the first five by ``evaluate_predictions``)."""

GAP_METRICS: tuple[str, ...] = ("auc", "sensitivity", "specificity", "brier", "ece")
"""Metrics compared with the card's test numbers (deployed minus card)."""

UNVERSIONED = "unversioned"
"""How records logged without a model version are grouped."""


@dataclass(frozen=True)
class VersionPerformance:
    """One model version on its labelled cases.

    Attributes:
        model_version: Registry version that served the cases (``UNVERSIONED`` when the log has none).
        n_cases, n_melanoma, n_patients: Labelled cases it scored, melanomas among them, patient groups.
        threshold: The served decision threshold (the most common one when it changed; see ``notes``).
        metrics: ``METRICS`` -> :class:`Estimate` dict; empty when not measured (``notes`` say why).
        card: The card's test numbers (``manifest.test_metrics[card_set]``), ``GAP_METRICS`` -> Estimate dict.
        card_set: Which test set the card numbers are from (``internal``: the locked test split), or None.
        gap: ``GAP_METRICS`` -> deployed value minus card value (point estimates).
        notes: What could not be measured and why, and caveats.
    """

    model_version: str
    n_cases: int
    n_melanoma: int
    n_patients: int
    threshold: float | None
    metrics: dict[str, dict[str, float | None]] = field(default_factory=dict)
    card: dict[str, dict[str, float | None]] = field(default_factory=dict)
    card_set: str | None = None
    gap: dict[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def measured(self) -> bool:
        return bool(self.metrics)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_version": self.model_version,
            "n_cases": self.n_cases,
            "n_melanoma": self.n_melanoma,
            "n_patients": self.n_patients,
            "threshold": self.threshold,
            "metrics": self.metrics,
            "card_set": self.card_set,
            "card": self.card,
            "gap": self.gap,
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class DeployedPerformance:
    """Every version's :class:`VersionPerformance`, newest version first, and overall notes."""

    versions: tuple[VersionPerformance, ...]
    n_labelled: int
    notes: tuple[str, ...] = ()

    def find(self, version: str) -> VersionPerformance | None:
        return next((v for v in self.versions if v.model_version == version), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_labelled": self.n_labelled,
            "versions": [v.to_dict() for v in self.versions],
            "notes": list(self.notes),
        }

    def table(self) -> pd.DataFrame:
        """One row per version: counts, each metric's value and CI, the card's value and the gap."""
        rows = []
        for v in self.versions:
            row: dict[str, Any] = {
                "model_version": v.model_version,
                "n_cases": v.n_cases,
                "n_melanoma": v.n_melanoma,
                "n_patients": v.n_patients,
                "threshold": v.threshold,
            }
            for name in METRICS:
                entry = v.metrics.get(name, {})
                row[name] = entry.get("value")
                row[f"{name}_lo"] = entry.get("lo")
                row[f"{name}_hi"] = entry.get("hi")
                if name in GAP_METRICS:
                    row[f"card_{name}"] = v.card.get(name, {}).get("value")
                    row[f"gap_{name}"] = v.gap.get(name)
            row["notes"] = "; ".join(v.notes)
            rows.append(row)
        return pd.DataFrame(rows)

    def markdown(self) -> str:
        """A table for people: per version, deployed value [CI] vs card, and the gap."""
        if not self.versions:
            return "No labelled case yet: " + " ".join(self.notes)
        head = (
            "| version | cases (melanoma) | metric | deployed [CI] | card | gap |\n|---|---|---|---|---|---|"
        )
        lines = [head]
        for v in self.versions:
            counts = f"{v.n_cases} ({v.n_melanoma})"
            if not v.measured:
                lines.append(f"| {v.model_version} | {counts} | - | not measured | - | - |")
                continue
            for name in METRICS:
                est = Estimate.from_dict(v.metrics[name], where=name)
                card = v.card.get(name, {}).get("value")
                gap = v.gap.get(name)
                card_text = "-" if card is None else f"{card:.3f}"
                gap_text = "-" if gap is None else f"{gap:+.3f}"
                lines.append(f"| {v.model_version} | {counts} | {name} | {est} | {card_text} | {gap_text} |")
        notes = [f"- {v.model_version}: {note}" for v in self.versions for note in v.notes]
        return "\n".join([*lines, "", *notes, *(f"- {n}" for n in self.notes)])


def deployed_performance(
    config: PipelineConfig, root: str | Path | None = None, *, as_of: str | None = None
) -> DeployedPerformance:
    """Per model version, the served probabilities against the outcomes that came back (module docstring).

    Args:
        config: ``evaluation`` (bootstrap, CI level, minimum cases) and the registry holding the cards.
        root: Artifact root of the prediction log and outcomes; None: ``config``'s.
        as_of: A UTC day ``YYYY-MM-DD``: only outcomes recorded by the end of that day count (what was
            known then: the Dagster asset's daily partitions); None: every outcome.
    """
    root = Path(root) if root is not None else artifact_paths(config).root
    labelled = labelled_cases(root)
    if as_of is not None and not labelled.empty:
        end = pd.Timestamp(as_of, tz="UTC") + pd.Timedelta(days=1)
        recorded = pd.to_datetime(labelled["outcome_recorded_at"], utc=True, errors="coerce")
        labelled = labelled[recorded < end]
    if labelled.empty:
        return DeployedPerformance(
            (),
            0,
            (
                "no labelled case: record outcomes for logged case ids (melanoma-ml outcomes import FILE, or "
                "the app's outcome tab)",
            ),
        )
    labelled = labelled.assign(
        model_version=labelled["model_version"].fillna(UNVERSIONED).astype(str)
    ).sort_values("time", kind="stable")
    # a case scored twice by one version counts once, as last scored
    labelled = labelled.drop_duplicates(["model_version", "case_id"], keep="last")
    manifests = _manifests(config, labelled["model_version"].unique())
    versions = [
        version_performance(config, rows, manifests.get(str(version)), str(version))
        for version, rows in labelled.groupby("model_version", sort=False)
    ]
    versions.sort(key=lambda v: v.model_version, reverse=True)
    return DeployedPerformance(tuple(versions), int(labelled["case_id"].nunique()))


def version_performance(
    config: PipelineConfig, rows: pd.DataFrame, manifest: BundleManifest | None, version: str
) -> VersionPerformance:
    """One version's labelled ``rows`` (``labelled_cases`` columns) measured and set beside its card."""
    from melanoma_ml.evaluation.report import evaluate_predictions

    y = rows["target"].to_numpy(dtype=int)
    groups = _groups(rows)
    n_melanoma = int(y.sum())
    n_benign = len(y) - n_melanoma
    thresholds = rows["threshold"].dropna()
    threshold = float(thresholds.mode().iloc[0]) if len(thresholds) else None
    notes: list[str] = []
    if thresholds.nunique() > 1:
        notes.append(
            f"served thresholds differed ({sorted(thresholds.unique().round(4))}: serving.deployment_prevalence "
            f"changed?); sensitivity/specificity are at the most common one, {threshold:.4f}"
        )
    card_set, card = _card(manifest)
    if manifest is None:
        notes.append(f"version {version} is not in the registry: no card numbers to compare with")
    elif card_set is None:
        notes.append(f"the card of {version} has no untouched test numbers (manifest.test_metrics)")
    base = dict(
        model_version=version,
        n_cases=len(rows),
        n_melanoma=n_melanoma,
        n_patients=int(groups.nunique()),
        threshold=threshold,
        card=card,
        card_set=card_set,
    )
    need = config.evaluation.subgroup_min_cases
    if min(n_melanoma, n_benign) < need or threshold is None:
        why = (
            f"too few labelled cases to measure: {n_melanoma} melanoma and {n_benign} benign, at least {need} of "
            "each needed (evaluation.subgroup_min_cases)"
            if threshold is not None
            else "no served threshold in the log"
        )
        return VersionPerformance(**base, notes=(why, *notes))
    table = pd.DataFrame(
        {
            schema.IMAGE: rows["case_id"].astype(str).to_numpy(),
            schema.GROUP: groups.to_numpy(),
            schema.TARGET: y,
            PROB: rows["probability"].to_numpy(dtype=float),
        }
    )
    report = evaluate_predictions(table, config.evaluation, name=f"{version} deployed", threshold=threshold)
    stored = report.to_dict()["metrics"]
    metrics = {name: stored[name] for name in METRICS[:-1]}
    metrics["calibration_in_the_large"] = calibration_in_the_large(table, config).to_dict()
    gap = {
        name: float(metrics[name]["value"]) - float(card[name]["value"])
        for name in GAP_METRICS
        if name in card and card[name].get("value") is not None and metrics[name].get("value") is not None
    }
    if card:
        notes.append(
            "probabilities are served at serving.deployment_prevalence while the card's ECE/Brier are at its test "
            "rows' prevalence: their gaps mix a prior shift with miscalibration (AUC, sensitivity and "
            "specificity are not affected by it)"
        )
    return VersionPerformance(**base, metrics=metrics, gap=gap, notes=tuple(notes))


def calibration_in_the_large(table: pd.DataFrame, config: PipelineConfig) -> Estimate:
    """Mean served probability minus observed melanoma rate, with a patient-cluster bootstrap CI.

    ``table``: ``group_id``, ``target``, ``prob`` (both classes present).
    """
    evaluation = config.evaluation
    y = table[schema.TARGET].to_numpy(dtype=float)
    p = table[PROB].to_numpy(dtype=float)
    codes, n_groups = group_codes(table)
    resamples = draw_group_resamples(
        y.astype(np.int8), codes, evaluation.n_bootstrap, evaluation.bootstrap_seed
    )
    per_group_p = np.bincount(codes, weights=p, minlength=n_groups)
    per_group_y = np.bincount(codes, weights=y, minlength=n_groups)
    per_group_n = np.bincount(codes, minlength=n_groups).astype(float)
    counts = resamples.counts.astype(float)
    draws = (counts @ per_group_p - counts @ per_group_y) / (counts @ per_group_n)
    lo, hi = percentile_interval(draws, evaluation.ci_level)
    return Estimate(float(p.mean() - y.mean()), lo, hi, evaluation.ci_level)


def _groups(rows: pd.DataFrame) -> pd.Series:
    """Bootstrap group per case: its outcome's patient id, else the case itself."""
    patients = rows["patient_id"] if "patient_id" in rows.columns else pd.Series(None, index=rows.index)
    named = patients.notna() & (patients.astype(str).str.len() > 0)
    return ("patient:" + patients.astype(str)).where(named, "case:" + rows["case_id"].astype(str))


def _manifests(config: PipelineConfig, versions: Any) -> dict[str, BundleManifest]:
    from melanoma_ml.serving.remote_registry import open_registry

    registry = open_registry(config)
    known = set(registry.versions())
    return {str(v): registry.manifest(str(v)) for v in versions if str(v) in known}


def _card(manifest: BundleManifest | None) -> tuple[str | None, dict[str, dict[str, float | None]]]:
    """The card's test set (``internal`` first, else the first one) and its ``GAP_METRICS``."""
    from melanoma_ml.evaluation.holdout import INTERNAL_TEST

    tested: Mapping[str, Any] = (manifest.test_metrics or {}) if manifest is not None else {}
    if not tested:
        return None, {}
    name = INTERNAL_TEST if INTERNAL_TEST in tested else next(iter(tested))
    metrics = tested[name].metrics
    return name, {
        m: Estimate.from_dict(metrics[m], where=f"card {m}").to_dict() for m in GAP_METRICS if m in metrics
    }


FEEDBACK_COLUMNS: tuple[str, ...] = (
    schema.IMAGE,
    schema.IMAGE_PATH,
    schema.TARGET,
    schema.GROUP,
    *schema.METADATA_FEATURES,
    "case_id",
    "model_version",
    "outcome_recorded_at",
)
"""Columns of :func:`feedback_cases` (``image_name`` is the case id)."""


def feedback_cases(config: PipelineConfig, root: str | Path | None = None) -> pd.DataFrame:
    """Labelled cases whose kept image still exists, one row per case (its last scored record).

    What a retraining run can train on (``melanoma-ml outcomes export``) and what the promotion gate scores
    candidate and champion on: ``FEEDBACK_COLUMNS``, ``image_name`` = case id, ``group_id`` = the outcome's
    patient id (else the case id), metadata as the model read it.
    """
    root = Path(root) if root is not None else artifact_paths(config).root
    labelled = labelled_cases(root)
    kept = labelled[labelled["image_path"].notna() & (labelled["image_path"].astype(str) != "")]
    kept = kept[kept["image_path"].map(lambda p: Path(p).is_file()).astype(bool)]
    if kept.empty:
        return pd.DataFrame(columns=list(FEEDBACK_COLUMNS))
    latest = kept.sort_values("time", kind="stable").drop_duplicates("case_id", keep="last")
    latest = latest.sort_values("case_id").reset_index(drop=True)
    return pd.DataFrame(
        {
            schema.IMAGE: latest["case_id"].astype(str),
            schema.IMAGE_PATH: latest["image_path"].astype(str),
            schema.TARGET: latest["target"].astype(int),
            schema.GROUP: _groups(latest),
            schema.AGE: latest["age"],
            schema.SEX: latest["sex"],
            schema.SITE: latest["anatom_site"],
            "case_id": latest["case_id"].astype(str),
            "model_version": latest["model_version"],
            "outcome_recorded_at": latest["outcome_recorded_at"].astype(str),
        }
    )[list(FEEDBACK_COLUMNS)]


@dataclass(frozen=True)
class RetrainCheck:
    """Whether enough new labelled cases arrived for a retraining run (:func:`retraining_due`).

    Attributes:
        due: ``new_cases >= monitoring.retrain_after_labelled_cases``.
        new_cases: Labelled cases with a kept image whose outcome was recorded after the cursor's.
        total_cases: All labelled cases with a kept image (what the retraining run trains on).
        cursor: The cursor to store once a run is requested (the newest outcome time and the cases at it).
        message: One sentence for the sensor's tick.
    """

    due: bool
    new_cases: int
    total_cases: int
    cursor: str
    message: str


def retraining_due(
    config: PipelineConfig, cursor: str | None, root: str | Path | None = None
) -> RetrainCheck:
    """Count the labelled cases with a kept image that arrived since ``cursor`` (None: since ever).

    A case is new when its outcome (``outcome_recorded_at`` of its last effective record, so a correction
    counts as new) is later than the cursor's time, or at that very second and not yet counted. The cursor
    is JSON ``{"until": time, "at_until": [case ids]}``.

    Raises:
        InputValueError: ``cursor`` is not such JSON (a hand-edited cursor: reset it in the UI).
    """
    import json

    from melanoma_ml.errors import InputValueError

    need = config.monitoring.retrain_after_labelled_cases
    cases = feedback_cases(config, root)
    until, at_until = "", set()
    if cursor:
        try:
            state = json.loads(cursor)
            until, at_until = str(state["until"]), set(state["at_until"])
        except (ValueError, KeyError, TypeError) as exc:
            raise InputValueError(
                f"sensor cursor {cursor[:80]!r} is not {{'until': time, 'at_until': [case ids]}} ({exc}); reset "
                "the labelled_cases_arrived sensor's cursor in the Dagster UI"
            ) from exc
    recorded = cases["outcome_recorded_at"].astype(str)
    new = (recorded > until) | ((recorded == until) & ~cases["case_id"].isin(at_until))
    n_new = int(new.sum())
    latest = recorded.max() if len(cases) else until
    latest_ids = sorted(
        set(cases.loc[recorded == latest, "case_id"]) | (at_until if latest == until else set())
    )
    next_cursor = json.dumps({"until": latest, "at_until": latest_ids})
    due = n_new >= need
    message = (
        f"{n_new} new labelled case(s) with a kept image since the last retraining this sensor started "
        f"({len(cases)} in all); monitoring.retrain_after_labelled_cases is {need}"
    )
    if not len(cases):
        message += (
            "; cases become trainable only when serving.keep_images was on when they were scored and an outcome "
            "was recorded (melanoma-ml outcomes import FILE)"
        )
    return RetrainCheck(due, n_new, len(cases), next_cursor, message)


__all__ = [
    "DeployedPerformance",
    "RetrainCheck",
    "retraining_due",
    "FEEDBACK_COLUMNS",
    "METRICS",
    "VersionPerformance",
    "calibration_in_the_large",
    "deployed_performance",
    "feedback_cases",
    "version_performance",
]
