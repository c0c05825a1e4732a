"""Promotion gate: floor, no champion, and against a champion only the paired difference on the same rows."""

from __future__ import annotations

import pytest

from melanoma_ml.serving.promotion import GateDecision, decide_promotion


def auc(value: float, lo: float, hi: float) -> dict:
    return {"auc": {"value": value, "lo": lo, "hi": hi}, "pauc": {"value": 0.1, "lo": 0.05, "hi": 0.15}}


def diff(value: float, lo: float, hi: float) -> dict:
    return {"value": value, "lo": lo, "hi": hi}


@pytest.mark.parametrize(
    ("candidate", "champion", "paired", "floor", "promote", "reason_part"),
    [
        # no champion: the floor alone decides
        (auc(0.91, 0.88, 0.94), None, None, 0.70, True, "there is no champion; promoted"),
        (auc(0.75, 0.69, 0.81), None, None, 0.70, False, "at or below the floor 0.700"),
        (auc(0.75, 0.70, 0.81), None, None, 0.70, False, "at or below the floor"),  # strictly above
        # better than the champion on the same rows
        (auc(0.91, 0.88, 0.94), auc(0.89, 0.86, 0.92), diff(0.02, 0.005, 0.035), 0.7, True, "promoted"),
        # indistinguishable and higher point estimate: promoted
        (
            auc(0.90, 0.87, 0.93),
            auc(0.89, 0.86, 0.92),
            diff(0.01, -0.02, 0.04),
            0.7,
            True,
            "beats or matches",
        ),
        # significantly worse: champion stays
        (
            auc(0.85, 0.82, 0.88),
            auc(0.89, 0.86, 0.92),
            diff(-0.04, -0.06, -0.02),
            0.7,
            False,
            "significantly worse",
        ),
        # indistinguishable but lower on the same rows: champion stays
        (
            auc(0.88, 0.85, 0.91),
            auc(0.89, 0.86, 0.92),
            diff(-0.01, -0.03, 0.01),
            0.7,
            False,
            "lower AUC on the same rows",
        ),
        # own AUCs from different images say "worse", the paired difference says "better": promoted
        (
            auc(0.85, 0.80, 0.90),
            auc(0.93, 0.90, 0.96),
            diff(0.01, -0.01, 0.03),
            0.7,
            True,
            "beats or matches the champion on the same rows",
        ),
        # own AUCs from different images say "better", the paired difference says "lower": champion stays
        (
            auc(0.95, 0.92, 0.98),
            auc(0.89, 0.86, 0.92),
            diff(-0.01, -0.03, 0.01),
            0.7,
            False,
            "champion v0002 stays",
        ),
        # better than the champion but under the floor: refused
        (auc(0.72, 0.65, 0.79), auc(0.60, 0.52, 0.68), diff(0.12, 0.05, 0.19), 0.7, False, "below the floor"),
        # a champion without a paired comparison: cannot show "not worse"
        (auc(0.95, 0.93, 0.97), auc(0.89, 0.86, 0.92), None, 0.7, False, "run paired_auc_difference"),
    ],
    ids=[
        "first",
        "floor",
        "floor-strict",
        "better",
        "tie-higher",
        "worse",
        "tie-lower",
        "paired-beats-unpaired-lower",
        "paired-lower-unpaired-higher",
        "floor-champ",
        "no-paired",
    ],
)
def test_gate_table(candidate, champion, paired, floor, promote, reason_part):
    decision = decide_promotion(
        candidate, champion, paired, auc_floor=floor, candidate_name="test_resnet", champion_name="v0002"
    )
    assert isinstance(decision, GateDecision)
    assert decision.promote is promote
    assert reason_part in decision.reason
    assert "test_resnet" in decision.reason
    assert decision.evidence["candidate_estimate"]["value"] == candidate["auc"]["value"]


def test_reason_reads_like_a_sentence_with_the_numbers():
    decision = decide_promotion(
        auc(0.91, 0.88, 0.94),
        auc(0.89, 0.86, 0.92),
        {"diff": 0.02, "lo": 0.001, "hi": 0.04, "ci_level": 0.9},  # paired_auc_difference's shape
        auc_floor=0.7,
        candidate_name="test_resnet",
        champion_name="v0002",
    )
    assert decision.reason.startswith(
        "candidate test_resnet AUC 0.910 [0.880, 0.940] (95% CI) vs champion v0002 (0.890"
    )
    assert "difference 0.020 [0.001, 0.040] (90% CI)" in decision.reason
    assert decision.evidence["not_worse"] is True
    assert decision.evidence["not_lower_on_shared_rows"] is True
    assert decision.evidence["paired_diff"] == {"value": 0.02, "lo": 0.001, "hi": 0.04, "level": 0.9}


def test_a_missing_paired_difference_is_refused_with_the_callers_reason():
    decision = decide_promotion(
        auc(0.95, 0.93, 0.97),
        auc(0.89, 0.86, 0.92),
        None,
        auc_floor=0.7,
        candidate_name="test_resnet",
        champion_name="v0002",
        paired_note="only 3 melanoma images are shared with the champion (need 5)",
    )
    assert not decision.promote
    assert "only 3 melanoma images are shared with the champion (need 5)" in decision.reason
    assert decision.evidence["not_worse"] is None


@pytest.mark.parametrize(
    ("candidate", "paired", "message"),
    [
        ({"accuracy": 0.9}, None, r"candidate test_resnet metrics lack 'auc'"),
        ({"auc": 0.9}, None, "candidate test_resnet auc must be a dict"),
        ({"auc": {"value": 0.9, "lo": 0.8}}, None, r"lacks \['hi'\]"),
        ({"auc": {"value": float("nan"), "lo": 0.8, "hi": 0.9}}, None, "is not finite"),
        ({"auc": {"value": 0.9, "lo": 0.95, "hi": 0.85}}, None, "lo > hi"),
        (auc(0.9, 0.85, 0.95), {"value": "x", "lo": 0, "hi": 1}, "paired difference holds a non-number"),
    ],
)
def test_malformed_metrics_are_named(candidate, paired, message):
    champion = auc(0.8, 0.75, 0.85) if paired is not None else None
    with pytest.raises(ValueError, match=message):
        decide_promotion(candidate, champion, paired, auc_floor=0.5, candidate_name="test_resnet")
