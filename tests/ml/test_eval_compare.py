"""Paired AUC comparison and the backbone leaderboard of melanoma_ml.evaluation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from melanoma_ml.config import EvaluationConfig
from melanoma_ml.evaluation import evaluate_predictions, leaderboard, paired_auc_difference, split_by_backbone

CONFIG = EvaluationConfig(n_bootstrap=200, bootstrap_seed=3)


def predictions(
    signal: float, n_patients: int = 150, seed: int = 0, noise_seed: int | None = None
) -> pd.DataFrame:
    """Out-of-fold table of a model whose probability separates classes by ``signal`` (same labels per seed)."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_patients), 3)
    y = (rng.random(groups.size) < 0.25).astype(int)
    noise = np.random.default_rng(seed if noise_seed is None else noise_seed).normal(size=groups.size)
    return pd.DataFrame(
        {
            "image_name": [f"ISIC_{i:05d}" for i in range(groups.size)],
            "group_id": [f"IP_{g}" for g in groups],
            "target": y,
            "prob": 1 / (1 + np.exp(-(signal * y + noise - 1))),
            "fold": groups % 3,
        }
    )


def test_a_better_model_has_a_positive_difference_with_a_ci_above_zero():
    better, worse = predictions(2.5, noise_seed=1), predictions(0.5, noise_seed=2)
    result = paired_auc_difference(better, worse, CONFIG)
    assert result["diff"] == pytest.approx(result["auc_a"] - result["auc_b"])
    assert 0 < result["lo"] <= result["diff"] <= result["hi"]
    assert result["p_value"] < 0.05 and result["share_not_better"] < 0.025
    assert (result["n"], result["n_groups"], result["n_bootstrap"]) == (450, 150, 200)


def test_swapping_the_models_mirrors_the_difference_exactly():
    a, b = predictions(1.5, noise_seed=1), predictions(1.0, noise_seed=2)
    ab = paired_auc_difference(a, b, CONFIG)
    ba = paired_auc_difference(b, a, CONFIG)
    assert ba["diff"] == pytest.approx(-ab["diff"])
    assert (ba["lo"], ba["hi"]) == pytest.approx((-ab["hi"], -ab["lo"]))  # same resamples for both


def test_a_model_against_itself_differs_by_exactly_zero():
    a = predictions(1.0)
    result = paired_auc_difference(a, a.sample(frac=1, random_state=0), CONFIG)  # row order is irrelevant
    assert (result["diff"], result["lo"], result["hi"], result["p_value"]) == (0.0, 0.0, 0.0, 1.0)


def test_equally_good_models_usually_have_a_ci_that_contains_zero():
    def contains_zero(seed: int) -> bool:
        a, b = predictions(1.0, noise_seed=seed), predictions(1.0, noise_seed=seed + 100)
        result = paired_auc_difference(a, b, CONFIG)
        return result["lo"] < 0 < result["hi"]

    assert sum(contains_zero(seed) for seed in range(10)) >= 8  # a 95% CI misses the true 0 ~1 in 20


def test_models_must_cover_the_same_images():
    a = predictions(1.0)
    with pytest.raises(ValueError, match=r"1 image\(s\) only in a \(ISIC_00000\), 0 only in b"):
        paired_auc_difference(a, a.iloc[1:], CONFIG)


def test_models_must_agree_on_the_labels():
    a = predictions(1.0)
    b = a.copy()
    b.loc[4, "target"] = 1 - b.loc[4, "target"]
    with pytest.raises(ValueError, match=r"disagree on target for row 4 \(ISIC_00004\)"):
        paired_auc_difference(a, b, CONFIG)


def test_leaderboard_ranks_by_auc_and_names_the_candidate():
    oofs = {
        "weak": predictions(0.3, noise_seed=1),
        "strong": predictions(2.5, noise_seed=2),
        "middle": predictions(1.2, noise_seed=3),
    }
    reports = {name: evaluate_predictions(oof, CONFIG, name=name) for name, oof in oofs.items()}
    table = leaderboard(reports, oofs, CONFIG)
    assert list(table["backbone"]) == ["strong", "middle", "weak"]
    assert list(table["rank"]) == [1, 2, 3]
    assert table.attrs["candidate"] == "strong"
    assert list(table["candidate"]) == [True, False, False]
    assert table.loc[0, "auc_diff_vs_best"] == 0
    assert (table.loc[1:, "auc_diff_vs_best"] < 0).all()
    assert (table.loc[1:, "diff_hi"] < 0).all()  # clearly worse than the best
    assert table.loc[1, "auc_diff_vs_best"] == pytest.approx(table.loc[1, "auc"] - table.loc[0, "auc"])


def test_leaderboard_needs_matching_inputs():
    oof = predictions(1.0)
    report = evaluate_predictions(oof, CONFIG, name="a")
    with pytest.raises(ValueError, match="same backbones"):
        leaderboard({"a": report}, {"b": oof}, CONFIG)
    with pytest.raises(ValueError, match="at least one"):
        leaderboard({}, {}, CONFIG)


def test_split_by_backbone_and_the_hint_for_a_mixed_table():
    both = pd.concat([predictions(1.0).assign(backbone="x"), predictions(2.0).assign(backbone="y")])
    parts = split_by_backbone(both)
    assert sorted(parts) == ["x", "y"] and len(parts["x"]) == 450
    with pytest.raises(ValueError, match="several backbones"):
        evaluate_predictions(both, CONFIG)
