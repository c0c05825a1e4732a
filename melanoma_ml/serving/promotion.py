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
1b. With ``max_external_gap`` (``evaluation.max_external_gap``), the served model's AUC gap on each external
   test set (external minus out-of-fold, ``evaluation.external.auc_gap``: MOVER CI of two independent
   samples) must not be significantly worse than allowed: it is refused when the gap's whole CI lies below
   ``-max_external_gap``; a CI that straddles it passes (the data cannot tell). Without external numbers
   for the served model the gate refuses (it cannot show the gap is acceptable).
2. With no champion, rules 1 and 1b suffice.
3. With a champion, only the paired difference on the same rows decides (the two models' own AUCs were
   measured on different images and are shown, never compared): the candidate must not be
   significantly worse (the difference's CI upper bound is >= 0) and the difference itself must be
   >= 0 (a statistically indistinguishable but lower candidate does not replace a working champion:
   churn without evidence).
4. With labelled clinic cases whose images were kept (``data.feedback_sources``' raw material), a candidate
   rules 1-3 promote is then scored beside the champion on those cases (``serving.feedback_gate``, called by
   ``champion.challenge_champion``): the paired AUC difference is reported in the reason and evidence
   (``evidence["feedback"]``) and refuses only when its whole CI lies below 0 (significantly worse on the
   clinic's own cases); too few cases (``evaluation.subgroup_min_cases`` per class) compare nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from melanoma_ml.errors import InputValueError
from melanoma_ml.evaluation.estimate import Estimate
from melanoma_ml.evaluation.external import gap_checks


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
    external: Mapping[str, Mapping[str, Any]] | None = None,
    max_external_gap: float | None = None,
    selection: Mapping[str, Any] | None = None,
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
        external: The served model on each external test set: set -> ``{"auc", "gap"}`` (``Estimate`` s or
            their dicts; ``gap`` is external minus the candidate's out-of-fold AUC). Shown in the evidence;
            read by rule 1b.
        max_external_gap: ``evaluation.max_external_gap`` (None: rule 1b is off).
        selection: How the leaderboard chose the candidate (``Leaderboard.selection``), kept in the evidence
            and named in the reason when it was not the out-of-fold AUC.

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
    chosen = ""
    if selection:
        evidence["selection"] = dict(selection)
        if selection.get("select_on", "oof") != "oof":
            score = selection.get("scores", {}).get(selection.get("candidate"), float("nan"))
            chosen = (
                f" (chosen by evaluation.select_on={selection['select_on']}: {selection.get('rule', '')}; "
                f"its score {score:.3f})"
            )
    above_floor = cand.lo > auc_floor
    evidence["above_floor"] = above_floor
    if not above_floor:
        return GateDecision(
            False,
            f"candidate {candidate_name}{chosen} {label} {cand} has its lower bound at or below the floor "
            f"{auc_floor:.3f}; not promoted",
            evidence,
        )
    external_refusal, gap_note = _external_gap_check(external, max_external_gap, evidence)
    if external_refusal:
        return GateDecision(
            False, f"candidate {candidate_name}{chosen} {label} {cand}: {external_refusal}", evidence
        )
    if champion is None:
        return GateDecision(
            True,
            f"candidate {candidate_name}{chosen} {label} {cand} clears the floor {auc_floor:.3f}{gap_note} and "
            "there is no champion; promoted",
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
    versus = f"candidate {candidate_name}{chosen} {label} {cand} vs champion {champion_name} ({champ})"
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
        f"{auc_floor:.3f}{gap_note}; promoted",
        evidence,
    )


def _external_gap_check(
    external: Mapping[str, Mapping[str, Any]] | None,
    max_external_gap: float | None,
    evidence: dict[str, Any],
) -> tuple[str, str]:
    """Rule 1b: ``(refusal, note)``: why the external gap refuses the candidate ("" when it does not), and
    the clause a promotion reason quotes (which set, which gap, which CI; "" without external numbers).

    Fills ``evidence["external"]``: set -> its AUC, gap and whether the gap blocks.

    Raises:
        InputValueError: an external AUC or gap is malformed or not finite while rule 1b is on.
    """
    evidence["max_external_gap"] = max_external_gap
    if not external:
        if max_external_gap is None:
            return "", ""
        evidence["external"] = {}
        return (
            f"evaluation.max_external_gap={max_external_gap} is set but the served model has no AUC on an "
            "external test set (none scorable, or the served model was not among those tested), so its gap "
            "cannot be shown acceptable; not promoted"
        ), ""
    gaps: dict[str, Estimate] = {}
    aucs: dict[str, Estimate] = {}
    for test_set, entry in external.items():
        where = f"external test set {test_set}"
        if max_external_gap is None:
            aucs[test_set] = Estimate.from_dict(entry["auc"], where=f"{where} AUC")
            gaps[test_set] = Estimate.from_dict(entry["gap"], where=f"{where} gap")
        else:
            aucs[test_set] = finite_estimate(entry["auc"], where=f"{where} AUC")
            gaps[test_set] = finite_estimate(entry["gap"], where=f"{where} AUC gap to out-of-fold")
    checks = gap_checks(gaps, max_external_gap)
    evidence["external"] = {s: {"auc": aucs[s].to_dict(), **checks[s]} for s in checks}
    shown = "; ".join(f"{s} AUC {aucs[s]}, gap to out-of-fold {gaps[s]}" for s in checks)
    blocked: Sequence[str] = [s for s, check in checks.items() if check["blocks"]]
    if blocked:
        worst = min(blocked, key=lambda s: gaps[s].hi)
        refusal = (
            f"on external test set {worst} its AUC gap to out-of-fold {gaps[worst]} lies entirely below "
            f"-{max_external_gap} (evaluation.max_external_gap): significantly worse on another clinic than "
            f"allowed ({shown}); not promoted"
        )
        return refusal, ""
    if max_external_gap is not None:
        return (
            "",
            f", no external gap significantly below -{max_external_gap} (evaluation.max_external_gap; {shown})",
        )
    return "", f" (external, not gated: {shown})"
