"""The promotion gate: should a candidate model replace the serving champion?

Pure functions, no I/O. Metrics map names to :class:`~melanoma_ml.evaluation.estimate.Estimate` s or their
stored dicts, e.g. ``{"auc": {"value": 0.91, "lo": 0.88, "hi": 0.94, "level": 0.95}, ...}`` (read by
``Estimate.from_dict``). The paired difference is the evaluation's ``paired_auc_difference`` of candidate
minus champion on the same out-of-fold rows (its ``{"diff", "lo", "hi", "ci_level"}`` dict or an
``Estimate``).

The candidate metrics describe the model that would be served (the pipeline passes the chosen fold
model's metrics on its own validation rows), not a pool of models.

Rules:
1. The candidate's AUC lower CI bound must exceed ``auc_floor`` (a weak model is never served).
2. With no champion, rule 1 suffices.
3. With a champion, only the paired difference on the same rows decides (the two models' own AUCs were
   measured on different images and are shown, never compared): the candidate must not be
   significantly worse (the difference's CI upper bound is >= 0) and the difference itself must be
   >= 0 (a statistically indistinguishable but lower candidate does not replace a working champion:
   churn without evidence).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from melanoma_ml.errors import InputValueError
from melanoma_ml.evaluation.estimate import Estimate


@dataclass(frozen=True)
class GateDecision:
    """Outcome of the gate.

    Attributes:
        promote: Whether the candidate should become the serving model.
        reason: One readable sentence for people and the registry history.
        evidence: The numbers and per-rule outcomes behind the decision.
    """

    promote: bool
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)


def metric_estimate(metrics: Mapping[str, Any], name: str, *, where: str) -> Estimate:
    """``metrics[name]`` as a finite :class:`Estimate` (see :func:`finite_estimate`).

    Raises:
        InputValueError: the metric is absent, malformed or not finite.
    """
    if name not in metrics:
        raise InputValueError(
            f"{where} metrics lack {name!r} (keys: {sorted(metrics)}); pass the evaluation report's metrics "
            "dict, e.g. {'auc': {'value': 0.91, 'lo': 0.88, 'hi': 0.94, 'level': 0.95}}"
        )
    return finite_estimate(metrics[name], where=f"{where} {name}")


def finite_estimate(entry: Estimate | Mapping[str, Any], *, where: str) -> Estimate:
    """Read ``entry`` with ``Estimate.from_dict`` and require finite numbers: the gate never guesses.

    Raises:
        InputValueError: malformed (see ``Estimate.from_dict``) or not finite.
    """
    estimate = Estimate.from_dict(entry, where=where)
    if not estimate.is_finite:
        raise InputValueError(
            f"{where} is not finite ({estimate.to_dict()}); the evaluation could not estimate it "
            "(e.g. a single-class fold): fix the data or the folds before promoting"
        )
    return estimate


def decide_promotion(
    candidate: Mapping[str, Any],
    champion: Mapping[str, Any] | None,
    paired_diff: Mapping[str, Any] | None,
    *,
    auc_floor: float,
    candidate_name: str = "candidate",
    champion_name: str = "champion",
    metric: str = "auc",
    paired_note: str = "",
) -> GateDecision:
    """Decide whether ``candidate`` replaces ``champion`` (see the module docstring for the rules).

    Args:
        candidate: Candidate metrics, ``{"auc": {"value", "lo", "hi"}, ...}``.
        champion: The serving model's metrics in the same shape, or None when nothing is served yet
            (shown in the reason and evidence; the comparison itself uses ``paired_diff``).
        paired_diff: Candidate-minus-champion AUC difference on the same rows with its CI; required when
            there is a champion (without it the gate cannot tell "worse" from "noise" and refuses).
        auc_floor: ``EvaluationConfig.promotion_auc_floor``.
        candidate_name: How the reason names the candidate (e.g. ``"test_resnet"``).
        champion_name: How the reason names the champion (e.g. ``"v0002"``).
        metric: The metric key to judge (AUC by default).
        paired_note: Why ``paired_diff`` is None (e.g. too few shared images), put into the refusal reason.

    Raises:
        ValueError: a metrics dict lacks the metric or holds malformed numbers.
    """
    cand = metric_estimate(candidate, metric, where=f"candidate {candidate_name}")
    label = metric.upper()
    evidence: dict[str, Any] = {
        "metric": metric,
        "auc_floor": float(auc_floor),
        "candidate": candidate_name,
        "candidate_estimate": cand.to_dict(),
    }
    above_floor = cand.lo > auc_floor
    evidence["above_floor"] = above_floor
    if not above_floor:
        return GateDecision(
            False,
            f"candidate {candidate_name} {label} {cand} has its lower bound at or below the floor {auc_floor:.3f}; "
            "not promoted",
            evidence,
        )
    if champion is None:
        return GateDecision(
            True,
            f"candidate {candidate_name} {label} {cand} clears the floor {auc_floor:.3f} and there is no "
            "champion; promoted",
            evidence,
        )

    champ = metric_estimate(champion, metric, where=f"champion {champion_name}")
    evidence.update({"champion": champion_name, "champion_estimate": champ.to_dict()})
    if paired_diff is None:
        evidence["not_worse"] = None
        why = paired_note or (
            "no paired difference on the same rows was given; run paired_auc_difference on both models' "
            "out-of-fold predictions"
        )
        return GateDecision(
            False,
            f"candidate {candidate_name} {label} {cand} vs champion {champion_name} ({champ.value:.3f}): {why}, "
            "so 'not worse' cannot be shown; not promoted",
            evidence,
        )
    diff = finite_estimate(paired_diff, where="paired difference")
    not_worse = diff.hi >= 0
    not_lower = diff.value >= 0
    evidence.update(
        {"paired_diff": diff.to_dict(), "not_worse": not_worse, "not_lower_on_shared_rows": not_lower}
    )
    versus = f"candidate {candidate_name} {label} {cand} vs champion {champion_name} ({champ})"
    if not not_worse:
        return GateDecision(
            False,
            f"{versus}: significantly worse on the same rows (difference {diff}, entirely below 0); "
            f"champion {champion_name} stays",
            evidence,
        )
    if not not_lower:
        return GateDecision(
            False,
            f"{versus}: lower {label} on the same rows and no significant gain (difference {diff}); "
            f"champion {champion_name} stays",
            evidence,
        )
    return GateDecision(
        True,
        f"{versus}: beats or matches the champion on the same rows (difference {diff}) and clears the floor "
        f"{auc_floor:.3f}; promoted",
        evidence,
    )
