"""External validation in the decision: each model's AUC on other clinics beside its out-of-fold AUC.

The numbers come from the test evaluation (``holdout.evaluate_test_sets``: each model's fold-model mean, its
served fold model and, with ``serving.ensemble: top_k``, the top-k mean, scored on every
``data.test_sources`` set at the threshold fixed out-of-fold); nothing is re-scored here. This module
reads them as :class:`ExternalScore` s, gives each its gap to the in-domain AUC with a CI
(:func:`auc_gap`) and the number that picks the leaderboard's candidate (:func:`selection_score`,
``evaluation.select_on``). The promotion gate reads the same scores for the served model
(``serving.champion``) and blocks on the gap (``evaluation.max_external_gap``).

The gap's CI. The out-of-fold rows (the training patients) and an external set (another clinic) are
independent samples, each with its own patient-cluster bootstrap percentile CI. Their difference's CI is
MOVER (method of variance estimates recovery; Zou & Donner 2008, Stat Med 27:1693): with ``a`` the external
AUC and ``b`` the out-of-fold AUC,
``lo = (a - b) - sqrt((a - a_lo)^2 + (b_hi - b)^2)`` and ``hi = (a - b) + sqrt((a_hi - a)^2 + (b - b_lo)^2)``.
It needs only the two stored CIs (so the leaderboard, the gate and the model card compute the same gap
from the numbers they show), keeps each CI's asymmetry, and for symmetric CIs is the usual
``sqrt(se_a^2 + se_b^2)`` interval.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from melanoma_ml.errors import InputValueError
from melanoma_ml.evaluation.estimate import Estimate

if TYPE_CHECKING:
    from melanoma_ml.config import EnsembleKind
    from melanoma_ml.evaluation.holdout import TestEvaluation

SELECTION_RULES = {
    "oof": "highest out-of-fold AUC (point value), ties by pAUC then name",
    "external": "highest lower CI bound of the external AUC (the lowest over the external sets), ties by "
    "out-of-fold AUC then name",
    "worst": "highest of min(out-of-fold AUC lower CI bound, every external AUC lower CI bound), ties by "
    "out-of-fold AUC then name",
}
"""What each ``evaluation.select_on`` ranks on, in words (the leaderboard and the gate evidence quote it)."""

SELECTION_BIAS_NOTE = (
    "used to choose or gate the model (evaluation.select_on / evaluation.max_external_gap): its numbers "
    "are no longer an untouched estimate (selection bias)"
)
"""What the leaderboard and the model card say of an external set whose numbers chose or gated the model."""


def auc_gap(external: Estimate, in_domain: Estimate) -> Estimate:
    """``external - in_domain`` with the MOVER CI of two independent estimates (module docstring).

    The bounds are NaN when either CI is missing (e.g. a served fold's point-only out-of-fold AUC); the
    level is the lower of the two levels.
    """
    diff = external.value - in_domain.value
    lo = diff - math.hypot(external.value - external.lo, in_domain.hi - in_domain.value)
    hi = diff + math.hypot(external.hi - external.value, in_domain.value - in_domain.lo)
    return Estimate(diff, lo, hi, min(external.level, in_domain.level))


@dataclass(frozen=True)
class ExternalScore:
    """One model on one external test set, beside its in-domain (out-of-fold) AUC.

    Attributes:
        backbone: The model's backbone (``a+b`` for a top-k mean).
        kind: ``folds`` (fold-model mean), ``best_fold`` (the served fold model) or ``top_k``
            (``config.EnsembleKind``).
        fold: The served fold, else None.
        test_set: The ``data.test_sources`` name.
        auc: AUC on the external set (patient-cluster bootstrap CI).
        oof_auc: The same model's out-of-fold AUC (a served fold's has no CI: its gap has none either,
            and the gate recomputes it from the served model's own report).
        n_images: External images scored.
        n_melanoma: Of which melanoma.
    """

    backbone: str
    kind: EnsembleKind
    fold: int | None
    test_set: str
    auc: Estimate
    oof_auc: Estimate
    n_images: int
    n_melanoma: int

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling (a leaderboard step value of an older run): its kind in today's words, so the gate
        still finds the served model's scores (``holdout.tested_kind``: ``ensemble``/``served`` -> ``folds``/
        ``best_fold``)."""
        from melanoma_ml.evaluation.holdout import tested_kind

        self.__dict__.update({**state, "kind": tested_kind(state["kind"])})

    @property
    def gap(self) -> Estimate:
        """External minus out-of-fold AUC (negative: worse on the other clinic), MOVER CI."""
        return auc_gap(self.auc, self.oof_auc)

    def to_dict(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone,
            "kind": self.kind,
            "fold": self.fold,
            "test_set": self.test_set,
            "auc": self.auc.to_dict(),
            "oof_auc": self.oof_auc.to_dict(),
            "gap": self.gap.to_dict(),
            "n_images": self.n_images,
            "n_melanoma": self.n_melanoma,
        }


def external_scores(test_evaluation: TestEvaluation | None) -> tuple[ExternalScore, ...]:
    """Every result of ``test_evaluation`` on an external set (not the locked ``internal`` split)."""
    from melanoma_ml.evaluation.holdout import INTERNAL_TEST

    if test_evaluation is None:
        return ()
    return tuple(
        ExternalScore(
            r.backbone,
            r.kind,
            r.fold,
            r.test_set,
            r.test_auc,
            r.oof_auc,
            r.report.n_images,
            r.report.n_melanoma,
        )
        for r in test_evaluation.results
        if r.test_set != INTERNAL_TEST
    )


def external_sets(scores: Iterable[ExternalScore]) -> list[str]:
    """The external test sets among ``scores``, in first-seen order."""
    return list(dict.fromkeys(s.test_set for s in scores))


def selection_score(select_on: str, oof_auc: Estimate, external: Sequence[Estimate]) -> float:
    """The number ``evaluation.select_on`` ranks a model on (higher is better; :data:`SELECTION_RULES`).

    Raises:
        InputValueError: ``select_on`` reads external AUCs and ``external`` is empty, or a bound is missing.
    """
    if select_on == "oof":
        return oof_auc.value
    if select_on not in SELECTION_RULES:
        raise InputValueError(f"evaluation.select_on={select_on!r} is not one of {sorted(SELECTION_RULES)}")
    if not external:
        raise InputValueError(
            f"evaluation.select_on={select_on} needs the model's AUC on a data.test_sources set, and it has "
            "none (no external set was scored: see the test evaluation's notes); fix the test source or set "
            "evaluation.select_on: oof"
        )
    bounds = [e.lo for e in external] + ([oof_auc.lo] if select_on == "worst" else [])
    if not all(math.isfinite(b) for b in bounds):
        raise InputValueError(
            f"evaluation.select_on={select_on} ranks on lower CI bounds, but one is not finite ({bounds}); "
            "the bootstrap could not estimate it (too few melanoma in a set?)"
        )
    return min(bounds)


def select_candidate(
    select_on: str,
    oof_aucs: Mapping[str, Estimate],
    external: Mapping[str, Sequence[Estimate]],
) -> tuple[str, dict[str, float]]:
    """The model with the highest :func:`selection_score`, and every model's score.

    Args:
        oof_aucs: Model -> its out-of-fold AUC.
        external: Model -> its AUC on each external set (empty under ``oof``).

    Ties are broken by the higher out-of-fold AUC, then by name (as the leaderboard orders rows).
    """
    scores = {m: selection_score(select_on, auc, external.get(m, ())) for m, auc in oof_aucs.items()}
    best = min(scores, key=lambda m: (-scores[m], -oof_aucs[m].value, m))
    return best, scores


def gap_checks(gaps: Mapping[str, Estimate], max_external_gap: float | None) -> dict[str, dict[str, Any]]:
    """Per external set: the gap and whether it blocks promotion under ``max_external_gap``.

    A gap blocks only when its whole CI lies below ``-max_external_gap`` (``hi < -max_external_gap``): the
    drop is significantly larger than allowed. A CI that straddles ``-max_external_gap`` does not block (the
    data cannot tell), nor does any gap when ``max_external_gap`` is None.
    """
    out = {}
    for test_set, gap in gaps.items():
        blocks = max_external_gap is not None and gap.hi < -max_external_gap
        out[test_set] = {"gap": gap.to_dict(), "blocks": bool(blocks)}
    return out
