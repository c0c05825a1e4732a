"""The gate reads external test sets: ``evaluation.max_external_gap`` blocks a gap whose whole CI lies
below it (never one that straddles it), the reason names the set, the gap and its CI, and the card shows
the external numbers beside the in-domain ones, saying when a set chose the model."""

from __future__ import annotations

from pathlib import Path

import pytest
from app_helpers import register_tiny

from melanoma_ml.config import ServingConfig
from melanoma_ml.errors import InputValueError
from melanoma_ml.evaluation.estimate import Estimate
from melanoma_ml.evaluation.external import SELECTION_BIAS_NOTE, ExternalScore, auc_gap
from melanoma_ml.serving.champion import external_for
from melanoma_ml.serving.model_card import model_card_markdown
from melanoma_ml.serving.promotion import decide_promotion
from melanoma_ml.serving.registry import ModelRegistry
from melanoma_ml.serving.service import ModelService

CANDIDATE = {"auc": {"value": 0.90, "lo": 0.86, "hi": 0.94, "level": 0.95}}


def external(gap: Estimate) -> dict[str, dict[str, Estimate]]:
    auc = Estimate(0.90 + gap.value, 0.80, 0.85, 0.95)
    return {"ph2": {"auc": auc, "gap": gap}}


def test_a_gap_whose_ci_lies_below_the_allowed_drop_blocks_promotion() -> None:
    below = Estimate(-0.20, -0.30, -0.12, 0.95)
    decision = decide_promotion(
        CANDIDATE, None, None, auc_floor=0.7, external=external(below), max_external_gap=0.10
    )
    assert not decision.promote
    assert "external test set ph2" in decision.reason and "-0.200 [-0.300, -0.120]" in decision.reason
    assert "evaluation.max_external_gap" in decision.reason
    assert decision.evidence["external"]["ph2"]["blocks"] is True
    assert decision.evidence["external"]["ph2"]["gap"] == below.to_dict()


def test_a_gap_whose_ci_straddles_the_allowed_drop_passes_and_is_named() -> None:
    straddles = Estimate(-0.20, -0.32, -0.05, 0.95)
    decision = decide_promotion(
        CANDIDATE, None, None, auc_floor=0.7, external=external(straddles), max_external_gap=0.10
    )
    assert decision.promote
    assert "no external gap significantly below -0.1" in decision.reason and "ph2 AUC" in decision.reason
    assert decision.evidence["external"]["ph2"]["blocks"] is False


def test_without_max_external_gap_the_gap_is_shown_and_never_blocks() -> None:
    far_below = Estimate(-0.40, -0.50, -0.30, 0.95)
    decision = decide_promotion(CANDIDATE, None, None, auc_floor=0.7, external=external(far_below))
    assert decision.promote and "external, not gated" in decision.reason
    assert decision.evidence["max_external_gap"] is None


def test_the_gate_refuses_when_it_cannot_show_the_gap() -> None:
    refused = decide_promotion(CANDIDATE, None, None, auc_floor=0.7, external={}, max_external_gap=0.1)
    assert not refused.promote and "has no AUC on an external test set" in refused.reason
    no_ci = Estimate(-0.1, float("nan"), float("nan"), 0.95)
    with pytest.raises(InputValueError, match="ph2 AUC gap to out-of-fold is not finite"):
        decide_promotion(CANDIDATE, None, None, auc_floor=0.7, external=external(no_ci), max_external_gap=0.1)


def test_the_reason_says_how_the_candidate_was_chosen() -> None:
    selection = {
        "select_on": "external",
        "rule": "highest lower CI bound",
        "candidate": "b",
        "scores": {"b": 0.81},
    }
    decision = decide_promotion(CANDIDATE, None, None, auc_floor=0.7, candidate_name="b", selection=selection)
    assert (
        "chosen by evaluation.select_on=external: highest lower CI bound; its score 0.810" in decision.reason
    )
    assert decision.evidence["selection"] == selection


def test_the_gate_reads_the_served_models_own_external_scores() -> None:
    from types import SimpleNamespace

    from melanoma_ml.serving.champion import ServedChoice

    auc = Estimate(0.8, 0.7, 0.9, 0.95)
    scores = [
        ExternalScore("b", "folds", None, "ph2", auc, auc, 40, 10),
        ExternalScore("b", "best_fold", 1, "ph2", auc, auc, 40, 10),
        ExternalScore("b", "best_fold", 0, "ph2", auc, auc, 40, 10),
        ExternalScore("b+c", "top_k", None, "ph2", auc, auc, 40, 10),
    ]
    fold = {k: SimpleNamespace(backbone="b", fold=k) for k in (0, 1)}
    one = ServedChoice("best_fold", (fold[1],), None, "probability", "b fold 1")
    both = ServedChoice("folds", (fold[1], fold[0]), None, "logit", "b mean")
    top = ServedChoice("top_k", (fold[1], SimpleNamespace(backbone="c", fold=0)), None, "logit", "b+c")
    assert external_for(one, scores) == [scores[1]]
    assert external_for(both, scores) == [scores[0]]
    assert external_for(top, scores) == [scores[3]]


def test_the_card_shows_external_numbers_beside_the_in_domain_ones(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    ph2_auc = {"value": 0.70, "lo": 0.60, "hi": 0.79, "level": 0.95}
    tested = {
        "internal": {
            "metrics": {"auc": {"value": 0.84, "lo": 0.78, "hi": 0.90}},
            "n_images": 90,
            "n_melanoma": 20,
        },
        "ph2": {
            "metrics": {"auc": ph2_auc},
            "n_images": 200,
            "n_melanoma": 40,
            "ood_flag_rate": 0.47,
            "used_in_selection": True,
        },
    }
    register_tiny(registry, seed=4, threshold=0.42, test_metrics=tested)
    model = ModelService(registry, ServingConfig()).status().model
    assert model is not None
    card = model_card_markdown(model)
    gap = auc_gap(Estimate.from_dict(ph2_auc), model.manifest.metrics["auc"])  # register_tiny's OOF 0.810
    assert "| Metric | out-of-fold | locked test split | external: ph2 |" in card
    assert (
        "| ROC AUC | 0.810 [0.740, 0.880] (95% CI) | 0.840 [0.780, 0.900] (95% CI) | 0.700 [0.600, 0.790] (95% CI) |"
        in card
    )
    assert (
        f"| AUC gap to out-of-fold | — | 0.030 [-0.062, 0.122] (95% CI) | {gap.text()} |" in card
        and gap.text().startswith("-0.110 [")
    )
    assert "| Flagged out-of-distribution | — | no detector | 47.0% |" in card
    assert f"| **Test** (external test set ph2; {SELECTION_BIAS_NOTE}) | 200 images, 40 melanoma |" in card
    assert "| **Test** (locked test split) | 90 images, 20 melanoma |" in card  # not used: still untouched
    assert "Exception: ph2 chose or gated this model" in card
