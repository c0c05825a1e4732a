"""External validation decides: the gap's CI (MOVER), and the candidate ``evaluation.select_on`` picks.

Constructed predictions with known orderings: on 50 melanoma + 50 benign images (one per patient), a
model whose melanoma scores sit ``shift`` ranks above the benign ones has AUC ~ 1 - (1 - shift/50)^2 / 2.
Three backbones: A best out-of-fold and worst externally, C best externally and worst out-of-fold, B good
on both. The margins between them are several CI widths, so the order holds for any bootstrap seed.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from melanoma_ml import schema
from melanoma_ml.config import EvaluationConfig, load_config
from melanoma_ml.errors import InputValueError
from melanoma_ml.evaluation.estimate import Estimate
from melanoma_ml.evaluation.external import (
    SELECTION_BIAS_NOTE,
    auc_gap,
    gap_checks,
    selection_score,
)
from melanoma_ml.evaluation.holdout import TestEvaluation, TestResult
from melanoma_ml.evaluation.inputs import PROB
from melanoma_ml.evaluation.ranking import SELECTION_SCORE, Leaderboard, external_column
from melanoma_ml.evaluation.report import evaluate_predictions

N = 50
SHIFTS = {  # backbone -> (out-of-fold shift, external shift)
    "A": (40, 4),  # OOF ~0.98, external ~0.58
    "B": (22, 36),  # OOF ~0.84, external ~0.96
    "C": (8, 46),  # OOF ~0.65, external ~1.00
}


def predictions(shift: int, prefix: str, backbone: str) -> pd.DataFrame:
    """``N`` benign images scored 0..N-1 and ``N`` melanoma scored ``shift``..``shift``+N-1 (one patient each)."""
    target = np.r_[np.zeros(N, int), np.ones(N, int)]
    score = np.r_[np.arange(N), np.arange(N) + shift].astype(float) + 0.5 * target  # no ties
    names = [f"{prefix}_{i:03d}" for i in range(2 * N)]
    return pd.DataFrame(
        {
            schema.IMAGE: names,
            schema.GROUP: names,
            schema.TARGET: target,
            PROB: score / score.max(),
            "backbone": backbone,
        }
    )


def board(select_on: str, seed: int = 0, **extra) -> Leaderboard:
    config = EvaluationConfig(n_bootstrap=200, bootstrap_seed=seed, select_on=select_on, **extra)
    oofs = {b: predictions(oof, "OOF", b) for b, (oof, _) in SHIFTS.items()}
    reports = {b: evaluate_predictions(oofs[b], config, name=b) for b in SHIFTS}
    results = []
    for b, (_, external) in SHIFTS.items():
        report = evaluate_predictions(
            predictions(external, "PH2", b), config, name=f"{b} on ph2", threshold=0.5
        )
        results.append(TestResult(b, "folds", None, "ph2", report, reports[b].metric("auc")))
    tested = TestEvaluation(results, {"ph2": {"rows_scored": 2 * N, "melanoma": N}})
    return Leaderboard.rank(reports, oofs, config, tested)


def test_the_gap_ci_is_mover_of_the_two_independent_cis() -> None:
    external, oof = Estimate(0.80, 0.70, 0.86, 0.95), Estimate(0.90, 0.87, 0.95, 0.95)
    gap = auc_gap(external, oof)
    assert gap.value == pytest.approx(-0.10)
    assert gap.lo == pytest.approx(-0.10 - math.hypot(0.10, 0.05))  # external's lower arm, OOF's upper
    assert gap.hi == pytest.approx(-0.10 + math.hypot(0.06, 0.03))  # external's upper arm, OOF's lower
    symmetric = auc_gap(Estimate(0.7, 0.6, 0.8, 0.95), Estimate(0.8, 0.7, 0.9, 0.95))
    assert (symmetric.lo, symmetric.hi) == pytest.approx(
        (-0.1 - 0.1 * math.sqrt(2), -0.1 + 0.1 * math.sqrt(2))
    )
    assert math.isnan(auc_gap(external, Estimate(0.9, math.nan, math.nan, 0.95)).lo)


def test_the_mover_gap_covers_like_independent_bootstraps_combined() -> None:
    """On the constructed sets, MOVER's interval matches the percentile CI of independent bootstrap
    differences (external draw minus OOF draw) to within a few hundredths."""
    from melanoma_ml.evaluation import weighted
    from melanoma_ml.evaluation.bootstrap import percentile_interval
    from melanoma_ml.evaluation.inputs import group_codes
    from melanoma_ml.evaluation.resample import draw_group_resamples

    config = EvaluationConfig(n_bootstrap=2000)

    def draws(frame: pd.DataFrame, seed: int) -> np.ndarray:
        y = frame[schema.TARGET].to_numpy()
        codes, n_groups = group_codes(frame)
        resamples = draw_group_resamples(y, codes, config.n_bootstrap, seed)
        rows = weighted.WeightedRows(y, frame[PROB].to_numpy(), codes, n_groups)
        return weighted.auc(*rows.class_weights(resamples.counts))

    oof, external = predictions(22, "OOF", "B"), predictions(12, "PH2", "B")
    lo, hi = percentile_interval(draws(external, 1) - draws(oof, 2), 0.95)
    gap = auc_gap(
        evaluate_predictions(external, config).metric("auc"), evaluate_predictions(oof, config).metric("auc")
    )
    assert gap.lo == pytest.approx(lo, abs=0.03) and gap.hi == pytest.approx(hi, abs=0.03)


@pytest.mark.parametrize("seed", [0, 7])
def test_select_on_picks_the_best_out_of_fold_externally_or_in_the_worst_case(seed: int) -> None:
    by_oof = board("oof", seed)
    assert by_oof.candidate == "A"  # today's behaviour: the highest out-of-fold AUC
    assert by_oof.table["backbone"].tolist() == ["A", "B", "C"]
    assert by_oof.selection["select_on"] == "oof" and "selection_bias" not in by_oof.selection

    by_external = board("external", seed)
    assert by_external.candidate == "C"  # highest lower bound of the external AUC
    assert by_external.table["backbone"].tolist() == ["A", "B", "C"]  # rows keep the out-of-fold order
    assert by_external.table.set_index("backbone")["candidate"].to_dict() == {
        "A": False,
        "B": False,
        "C": True,
    }
    assert by_external.top_backbones(2) == ["C", "B"]
    diffs = by_external.table.set_index("backbone")["auc_diff_vs_best"]
    assert diffs["C"] == 0 and diffs["A"] > 0.2  # paired differences are to the new candidate
    assert by_external.selection["selection_bias"] == {"ph2": SELECTION_BIAS_NOTE}

    by_worst = board("worst", seed)
    assert by_worst.candidate == "B"  # A fails externally, C out-of-fold
    scores = by_worst.table.set_index("backbone")[SELECTION_SCORE]
    assert scores["B"] == pytest.approx(
        min(by_worst.table.set_index("backbone").loc["B", ["auc_lo", external_column("ph2", "auc_lo")]])
    )


def test_leaderboard_rows_carry_each_external_sets_auc_and_gap(tmp_path) -> None:
    ranked = board("oof")
    row = ranked.table.set_index("backbone").loc["A"]
    auc = Estimate(row["ext_ph2_auc"], row["ext_ph2_auc_lo"], row["ext_ph2_auc_hi"], 0.95)
    oof = Estimate(row["auc"], row["auc_lo"], row["auc_hi"], 0.95)
    assert 0.5 < auc.value < 0.7 and oof.value > 0.95
    gap = auc_gap(auc, oof)
    assert (row["ext_ph2_gap"], row["ext_ph2_gap_lo"], row["ext_ph2_gap_hi"]) == pytest.approx(
        (gap.value, gap.lo, gap.hi)
    )
    assert row["ext_ph2_gap_hi"] < -0.2  # A is significantly worse on the other clinic
    ranked.save(tmp_path)
    saved = pd.read_json(tmp_path / "leaderboard.json", typ="series")
    assert {e["test_set"] for e in saved["external"]} == {"ph2"} and saved["selection"]["select_on"] == "oof"


def test_max_external_gap_blocks_only_a_gap_whose_whole_ci_lies_below_it() -> None:
    below = Estimate(-0.30, -0.40, -0.15, 0.95)
    straddles = Estimate(-0.20, -0.35, -0.05, 0.95)
    checks = gap_checks({"ph2": below, "derm7pt": straddles}, 0.10)
    assert checks["ph2"]["blocks"] and not checks["derm7pt"]["blocks"]
    assert not any(c["blocks"] for c in gap_checks({"ph2": below}, None).values())  # reported only


def test_external_selection_without_an_external_auc_says_what_to_fix() -> None:
    with pytest.raises(InputValueError, match="select_on=external needs .* data.test_sources"):
        selection_score("external", Estimate(0.9, 0.8, 0.95, 0.95), [])
    with pytest.raises(ValueError, match="data.test_sources is empty"):
        load_config("tiny", {"evaluation": {"select_on": "worst"}})
    with pytest.raises(ValueError, match="max_external_gap=0.1 read external test sets"):
        load_config("tiny", {"evaluation": {"max_external_gap": 0.1}})
