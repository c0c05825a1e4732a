"""Per-backbone out-of-fold tables: every fold once, one backbone only; the leaderboard reads them back."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest

from melanoma_ml.config import load_config
from melanoma_ml.evaluation.ranking import backbone_oof, report_oof


def fold(backbone: str, k: int) -> SimpleNamespace:
    oof = pd.DataFrame({"image_name": [f"I{k}a", f"I{k}b"], "fold": k, "prob": [0.1, 0.9]})
    return SimpleNamespace(backbone=backbone, fold=k, oof=oof)


def test_backbone_oof_concatenates_every_fold_once() -> None:
    oof = backbone_oof("b", [fold("b", 1), fold("b", 0)], n_folds=2)
    assert oof["image_name"].tolist() == ["I0a", "I0b", "I1a", "I1b"]


@pytest.mark.parametrize(
    ("results", "message"),
    [
        ([fold("b", 0)], r"exactly folds 0\.\.1"),
        ([fold("b", 0), fold("b", 0)], r"got \[0, 0\]"),
        ([fold("b", 0), fold("other", 1)], "results of \\['other'\\]"),
    ],
)
def test_backbone_oof_refuses_incomplete_or_mixed_results(results: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        backbone_oof("b", results, n_folds=2)


def test_report_oof_names_the_backbone_to_evaluate_first(tmp_path) -> None:
    config = load_config("tiny", {"artifact_root": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="evaluate backbone 'b' first"):
        report_oof(config, "b")
