"""The promotion gate: should a candidate model replace the serving champion?

Pure functions, no I/O. Metrics use the evaluation report's shape: each metric is a dict with the point
estimate and its bootstrap confidence interval, e.g. ``{"auc": {"value": 0.91, "lo": 0.88, "hi": 0.94},
...}``. The paired difference is the evaluation's ``paired_auc_difference`` of candidate minus champion
on the same out-of-fold rows, in the same shape (``{"value": 0.02, "lo": -0.01, "hi": 0.05}``); a
``"diff"`` key is accepted in place of ``"value"``.

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

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


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


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its confidence interval."""

    value: float
    lo: float
    hi: float

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.lo:.3f}, {self.hi:.3f}]"


def metric_estimate(metrics: Mapping[str, Any], name: str, *, where: str) -> Estimate:
    """Read ``metrics[name]`` as ``{"value", "lo", "hi"}`` (``"diff"`` accepted for ``"value"``).

    Raises:
        ValueError: the metric is absent, not a dict, or has non-finite or disordered numbers.
    """
    if name not in metrics:
        raise ValueError(
            f"{where} metrics lack {name!r} (keys: {sorted(metrics)}); pass the evaluation report's metrics "
            "dict, e.g. {'auc': {'value': 0.91, 'lo': 0.88, 'hi': 0.94}}"
        )
    return as_estimate(metrics[name], where=f"{where} {name}")


def as_estimate(entry: Any, *, where: str) -> Estimate:
    """Read one ``{"value"|"diff", "lo", "hi"}`` dict as an ``Estimate`` (see ``metric_estimate``)."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where} must be a dict with 'value', 'lo' and 'hi', got {entry!r}")
    point_key = "value" if "value" in entry else "diff"
    missing = [k for k in (point_key, "lo", "hi") if k not in entry]
    if missing:
        raise ValueError(
            f"{where} lacks {missing}; expected {{'value': .., 'lo': .., 'hi': ..}}, got {dict(entry)}"
        )
    try:
        value, lo, hi = (float(entry[point_key]), float(entry["lo"]), float(entry["hi"]))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where} holds a non-number ({exc}): {dict(entry)}") from exc
    if not all(math.isfinite(v) for v in (value, lo, hi)):
        raise ValueError(
            f"{where} is not finite ({dict(entry)}); the evaluation could not estimate it "
            "(e.g. a single-class fold): fix the data or the folds before promoting"
        )
    if not lo <= hi:
        raise ValueError(f"{where} has lo > hi ({dict(entry)}); the interval is malformed")
    return Estimate(value, lo, hi)


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
        "candidate_estimate": _as_dict(cand),
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
    evidence.update({"champion": champion_name, "champion_estimate": _as_dict(champ)})
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
    diff = as_estimate(paired_diff, where="paired difference")
    not_worse = diff.hi >= 0
    not_lower = diff.value >= 0
    evidence.update(
        {"paired_diff": _as_dict(diff), "not_worse": not_worse, "not_lower_on_shared_rows": not_lower}
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


def _as_dict(estimate: Estimate) -> dict[str, float]:
    return {"value": estimate.value, "lo": estimate.lo, "hi": estimate.hi}
