"""The promotion gate's look at the clinic's own labelled cases: candidate vs champion on the same cases.

When the clinic has sent outcomes back for cases whose images were kept (``monitoring.deployed.feedback_cases``,
passed in by ``pipeline.promote_best``), a candidate that the other rules would promote is staged as a
complete bundle, and both it and the serving champion score those images on ``melanoma-ml predict``'s path
(``batch.rows_scored_as_predict``: TTA, calibrator): ``feedback_check`` builds the check that
``champion.challenge_champion`` runs on the staged bundle. The paired AUC difference (candidate minus champion, the
same patient-cluster resamples for both: ``evaluation.paired_auc_difference``) goes into the decision's
evidence (``evidence["feedback"]``) and its reason.

It blocks only when the candidate is *significantly worse* there (the difference's whole CI below 0). Why
not more: a retraining run on feedback (``data.train_on_feedback``) has trained on these very cases, which
favours the candidate (``trained_on`` in the evidence counts them); a candidate worse even so is a clear
sign of trouble, while "better" on cases it saw proves little. With fewer than
``evaluation.subgroup_min_cases`` labelled melanoma or benign cases nothing is compared and nothing blocks
(the reason says so).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from melanoma_ml import schema

if TYPE_CHECKING:
    from melanoma_ml.config import PipelineConfig
    from melanoma_ml.serving.promotion import GateDecision

FEEDBACK_NAMES = ("candidate", "champion")


@dataclass(frozen=True)
class FeedbackComparison:
    """Candidate vs champion on the labelled clinic cases.

    Attributes:
        n_cases, n_melanoma: Cases scored by both (decoded, labelled).
        trained_on: How many of them the candidate's training table held (a retraining on feedback).
        difference: ``paired_auc_difference``'s dict (``diff``, ``lo``, ``hi``, ``auc_a`` = candidate,
            ``auc_b`` = champion, ...), or None when not compared.
        note: Why nothing was compared (too few cases), else "".
    """

    n_cases: int
    n_melanoma: int
    trained_on: int
    difference: dict[str, Any] | None
    note: str = ""

    @property
    def significantly_worse(self) -> bool:
        return self.difference is not None and float(self.difference["hi"]) < 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_cases": self.n_cases,
            "n_melanoma": self.n_melanoma,
            "trained_on": self.trained_on,
            "difference": self.difference,
            "significantly_worse": self.significantly_worse,
            "note": self.note,
        }

    def text(self) -> str:
        cases = f"{self.n_cases} labelled clinic cases ({self.n_melanoma} melanoma"
        cases += f", {self.trained_on} of them trained on by the candidate)" if self.trained_on else ")"
        if self.difference is None:
            return f"not compared on {cases}: {self.note}"
        d = self.difference
        level = f"{round(float(d.get('ci_level', 0.95)) * 100):g}%"
        return (
            f"on {cases} candidate AUC {float(d['auc_a']):.3f} vs champion {float(d['auc_b']):.3f}, difference "
            f"{float(d['diff']):+.3f} [{float(d['lo']):+.3f}, {float(d['hi']):+.3f}] ({level} CI)"
        )


def compare_on_feedback(
    config: PipelineConfig,
    candidate_bundle: Path,
    champion_bundle: Any,
    feedback: pd.DataFrame,
    *,
    trained_on: set[str] | frozenset[str] = frozenset(),
) -> FeedbackComparison:
    """Score ``feedback`` (``deployed.feedback_cases``' columns) with both bundles and compare them (paired).

    Args:
        candidate_bundle: The staged candidate bundle folder.
        champion_bundle: The champion's loaded ``Bundle`` (``batch.load_scoring_model``).
        trained_on: Image names of the candidate's training table (feedback case ids included when it
            trained on them).
    """
    from melanoma_ml.artifacts import artifact_paths
    from melanoma_ml.evaluation import paired_auc_difference
    from melanoma_ml.serving.batch import rows_scored_as_predict
    from melanoma_ml.serving.bundle import load_bundle

    candidate = load_bundle(candidate_bundle)
    root = artifact_paths(config).root
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".feedback-gate-", dir=root) as folder:
        scored = {}
        for name, bundle in zip(FEEDBACK_NAMES, (candidate, champion_bundle), strict=True):
            probs, rows = rows_scored_as_predict(config, bundle, feedback, Path(folder) / f"{name}.csv")
            scored[name] = rows[[schema.IMAGE, schema.GROUP, schema.TARGET]].assign(prob=probs)
    both = set(scored["candidate"][schema.IMAGE]) & set(scored["champion"][schema.IMAGE])
    tables = {n: t[t[schema.IMAGE].isin(both)].reset_index(drop=True) for n, t in scored.items()}
    y = tables["candidate"][schema.TARGET].to_numpy(dtype=int)
    melanoma, benign = int(y.sum()), int(len(y) - y.sum())
    seen = len(both & set(trained_on))
    need = config.evaluation.subgroup_min_cases
    if min(melanoma, benign) < need:
        note = (
            f"{melanoma} melanoma and {benign} benign, at least {need} of each needed "
            "(evaluation.subgroup_min_cases); not blocking"
        )
        return FeedbackComparison(len(y), melanoma, seen, None, note)
    difference = paired_auc_difference(
        tables["candidate"], tables["champion"], config.evaluation, names=FEEDBACK_NAMES
    )
    clean = {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in difference.items()}
    return FeedbackComparison(len(y), melanoma, seen, clean)


def with_feedback(decision: GateDecision, comparison: FeedbackComparison, champion_name: str) -> GateDecision:
    """``decision`` (a promotion by the other rules) with the feedback comparison in its evidence and reason;
    refused when the candidate is significantly worse than the champion on the clinic's cases."""
    from melanoma_ml.serving.promotion import GateDecision

    evidence = {**decision.evidence, "feedback": comparison.to_dict()}
    if comparison.significantly_worse:
        return GateDecision(
            False,
            f"candidate {decision.evidence.get('candidate', '')} is significantly worse than champion "
            f"{champion_name} on the clinic's labelled cases: {comparison.text()}, entirely below 0; "
            f"champion {champion_name} stays (other rules: {decision.reason})",
            evidence,
        )
    return GateDecision(decision.promote, f"{decision.reason}; feedback: {comparison.text()}", evidence)


def feedback_check(
    config: PipelineConfig, feedback: pd.DataFrame | None, folds_table: pd.DataFrame | None = None
) -> Callable[[Path, GateDecision, str], GateDecision] | None:
    """``champion.challenge_champion``'s ``staged_check`` for ``feedback`` (None when there is no case).

    The check loads the champion (sha256-verified, ``batch.load_scoring_model``), runs
    :func:`compare_on_feedback` against the staged candidate folder and returns :func:`with_feedback`'s
    decision. ``folds_table`` (the candidate's training table) counts the cases it trained on.
    """
    if feedback is None or feedback.empty:
        return None
    names = set() if folds_table is None else set(folds_table[schema.IMAGE].astype(str))
    trained_on = frozenset(names & set(feedback[schema.IMAGE].astype(str)))

    def check(folder: Path, decision: GateDecision, champion: str) -> GateDecision:
        from melanoma_ml.serving.batch import load_scoring_model
        from melanoma_ml.serving.remote_registry import open_registry

        champion_bundle = load_scoring_model(open_registry(config), champion)
        comparison = compare_on_feedback(config, folder, champion_bundle, feedback, trained_on=trained_on)
        return with_feedback(decision, comparison, champion)

    return check


__all__ = ["FeedbackComparison", "compare_on_feedback", "feedback_check", "with_feedback"]
