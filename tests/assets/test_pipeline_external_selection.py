"""Through the real path: the tiny synthetic profile with an external test source and
``evaluation.select_on: external``. The leaderboard carries the external set's AUC and gap, the gate's
evidence names them and how the candidate was chosen, and the served bundle's card shows them beside the
out-of-fold numbers, marked as no longer untouched."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_pipeline_sources import write_isic2020

from melanoma_ml import pipeline
from melanoma_ml.config import load_config
from melanoma_ml.evaluation.external import SELECTION_BIAS_NOTE, auc_gap
from melanoma_ml.evaluation.ranking import external_column


@pytest.mark.slow
def test_external_numbers_reach_the_leaderboard_the_gate_and_the_card(tmp_path: Path) -> None:
    from melanoma_ml.serving.model_card import model_card_markdown
    from melanoma_ml.serving.remote_registry import open_registry
    from melanoma_ml.serving.service import ModelService

    clinic = write_isic2020(tmp_path / "clinic2", "HAM", 24, seed=3)  # 6 melanoma, 18 benign
    config = load_config(
        "tiny",
        {
            "artifact_root": str(tmp_path / "artifacts"),
            "data": {"test_sources": [{"path": str(clinic), "name": "clinic2"}]},
            "evaluation": {"select_on": "external"},
        },
    )
    result = pipeline.run_all(config, progress=lambda _: None)

    board = result.leaderboard
    row = board.table.set_index("backbone").loc[board.candidate]
    tested = result.test_evaluation.find(board.candidate, "folds", "clinic2")
    assert tested is not None and tested.report.n_images == 24
    assert row[external_column("clinic2", "auc")] == pytest.approx(tested.test_auc.value)
    assert row[external_column("clinic2", "gap")] == pytest.approx(
        tested.test_auc.value - row["auc"]
    )  # external minus out-of-fold
    assert row["selection_score"] == pytest.approx(tested.test_auc.lo)
    assert board.selection["select_on"] == "external"
    assert board.selection["selection_bias"] == {"clinic2": SELECTION_BIAS_NOTE}

    decision = result.promotion.decision
    assert decision.evidence["selection"]["select_on"] == "external"
    assert "chosen by evaluation.select_on=external" in decision.reason
    assert set(decision.evidence["external"]) == {"clinic2"} and "clinic2 AUC" in decision.reason
    assert decision.promote, decision.reason  # tiny's floor is 0 and no gap limit is set

    model = ModelService(open_registry(config), config.serving).status().model
    assert model is not None
    stored = model.manifest.test_metrics["clinic2"]
    assert stored.used_in_selection and stored.n_images == 24
    assert stored.ood_flag_rate is not None and 0 <= stored.ood_flag_rate <= 1  # the bundle has a detector
    card = model_card_markdown(model)
    gap = auc_gap(stored.metrics["auc"], model.manifest.metrics["auc"])
    assert "| Metric | out-of-fold | external: clinic2 |" in card
    assert f"| AUC gap to out-of-fold | — | {gap.text()} |" in card
    assert f"| Flagged out-of-distribution | — | {stored.ood_flag_rate:.1%} |" in card
    assert f"(external test set clinic2; {SELECTION_BIAS_NOTE})" in card
