"""Rule 4 of the promotion gate: candidate vs champion on the clinic's labelled cases."""

from __future__ import annotations

from pathlib import Path

import pytest

from melanoma_ml.serving.champion import RefusedWhileStaged, _check_then_measure
from melanoma_ml.serving.feedback_gate import FeedbackComparison, feedback_check, with_feedback
from melanoma_ml.serving.promotion import GateDecision

PROMOTED = GateDecision(True, "candidate m beats the champion on the same rows; promoted", {"candidate": "m"})


def comparison(diff: float, lo: float, hi: float, trained_on: int = 0) -> FeedbackComparison:
    difference = {"diff": diff, "lo": lo, "hi": hi, "auc_a": 0.7 + diff, "auc_b": 0.7, "ci_level": 0.95}
    return FeedbackComparison(80, 20, trained_on, difference)


def test_significantly_worse_on_the_clinics_cases_refuses_and_says_why() -> None:
    decision = with_feedback(PROMOTED, comparison(-0.2, -0.3, -0.1, trained_on=80), "v0001")
    assert not decision.promote
    assert "significantly worse than champion v0001 on the clinic's labelled cases" in decision.reason
    assert "80 of them trained on by the candidate" in decision.reason
    assert "-0.200 [-0.300, -0.100]" in decision.reason and "champion v0001 stays" in decision.reason
    assert decision.evidence["feedback"]["significantly_worse"] is True
    assert decision.evidence["candidate"] == "m"  # the other rules' evidence is kept


@pytest.mark.parametrize(("diff", "lo", "hi"), [(-0.05, -0.15, 0.05), (0.1, 0.02, 0.2), (0.0, 0.0, 0.0)])
def test_not_significantly_worse_keeps_the_promotion_and_reports_the_numbers(diff, lo, hi) -> None:
    decision = with_feedback(PROMOTED, comparison(diff, lo, hi), "v0001")
    assert decision.promote and decision.reason.startswith(PROMOTED.reason)
    assert f"difference {diff:+.3f}" in decision.reason
    assert decision.evidence["feedback"]["significantly_worse"] is False


def test_too_few_cases_compare_nothing_and_never_block() -> None:
    few = FeedbackComparison(6, 2, 0, None, "2 melanoma and 4 benign, at least 5 of each needed")
    decision = with_feedback(PROMOTED, few, "v0001")
    assert decision.promote and "not compared on 6 labelled clinic cases" in decision.reason
    assert decision.evidence["feedback"]["difference"] is None


def test_no_feedback_case_means_no_check(tmp_path: Path) -> None:
    import pandas as pd

    from melanoma_ml.config import load_config
    from melanoma_ml.monitoring.deployed import FEEDBACK_COLUMNS

    config = load_config("tiny", {"artifact_root": str(tmp_path)})
    assert feedback_check(config, None) is None
    assert feedback_check(config, pd.DataFrame(columns=list(FEEDBACK_COLUMNS))) is None


def test_the_staged_check_runs_before_the_test_metrics_and_a_refusal_stops_registration() -> None:
    measured, checked = [], []

    def measure(folder: Path):
        measured.append(folder)
        return {"internal": "numbers"}

    def refuse(folder: Path, decision: GateDecision, champion: str) -> GateDecision:
        return with_feedback(decision, comparison(-0.2, -0.3, -0.1), champion)

    run = _check_then_measure(refuse, PROMOTED, "v0001", measure, checked)
    with pytest.raises(RefusedWhileStaged) as refused:
        run(Path("stage"))
    assert not refused.value.decision.promote and measured == []

    def accept(folder: Path, decision: GateDecision, champion: str) -> GateDecision:
        return with_feedback(decision, comparison(0.0, -0.1, 0.1), champion)

    checked.clear()
    run = _check_then_measure(accept, PROMOTED, "v0001", measure, checked)
    assert run(Path("stage")) == {"internal": "numbers"} and measured == [Path("stage")]
    assert checked[0].promote and "feedback:" in checked[0].reason
    assert _check_then_measure(accept, PROMOTED, "v0001", None, [])(Path("stage")) is None
