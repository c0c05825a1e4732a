"""The model card: metric lines in the evaluation report's shape, times, and the card of a served bundle."""

from __future__ import annotations

from pathlib import Path

import pytest
from app_helpers import SIZE, register_tiny

from melanoma_ml.config import ServingConfig
from melanoma_ml.evaluation.estimate import Estimate
from melanoma_ml.serving.model_card import (
    headline_metrics,
    known_metric,
    model_card_markdown,
    readable_time,
)
from melanoma_ml.serving.registry import ModelRegistry
from melanoma_ml.serving.service import NO_MODEL_MESSAGE, ModelService


def test_headline_metrics_in_order_with_their_own_level() -> None:
    nan = float("nan")
    metrics = {
        "brier": Estimate(0.12, nan, nan, 0.95),
        "auc": Estimate(0.81, 0.74, 0.88, 0.9),
        "pauc": Estimate(nan, nan, nan, 0.95),  # not estimable: not shown
        "sensitivity": Estimate(0.9, 0.82, 0.96, 0.9),
    }
    lines = headline_metrics(metrics)
    assert [label for label, _ in lines] == [
        "ROC AUC",
        "Sensitivity at the threshold",
        "Brier score (lower is better)",
    ]
    assert lines[0][1].text() == "0.810 [0.740, 0.880] (90% CI)"
    assert lines[2][1].text() == "0.120 (no CI)"
    assert known_metric(metrics, "pauc") is None and known_metric(metrics, "ece") is None


@pytest.mark.parametrize(
    ("iso", "shown"),
    [
        ("2026-11-27T01:42:26.85+00:00", "2026-11-27 01:42 UTC"),
        ("2026-11-27T03:42:00+02:00", "2026-11-27 01:42 UTC"),
        (None, "at an unknown time"),
        ("yesterday", "yesterday"),
    ],
)
def test_readable_time(iso: str | None, shown: str) -> None:
    assert readable_time(iso) == shown


def test_no_model_card_says_how_to_get_one() -> None:
    assert model_card_markdown(None) == f"No model promoted yet. {NO_MODEL_MESSAGE}"


def test_card_of_a_served_bundle(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    version = register_tiny(registry, seed=3, threshold=0.42)
    model = ModelService(registry, ServingConfig()).status().model
    assert model is not None and model.version == version
    card = model_card_markdown(model)
    assert "| Backbone | `test_efficientnet` + metadata MLP (age, sex, site) |" in card
    assert f"| Version | {version} |" in card
    assert "| Training data version | `test-3` |" in card
    assert f"| Input size | {SIZE} px |" in card
    assert "| Decision threshold | 0.420 |" in card
    assert "| ROC AUC, out-of-fold | 0.810 [0.740, 0.880] (95% CI) |" in card  # stored without a level
    assert "No untouched test set exists" in card  # registered without test_metrics
    assert "Partial AUC" not in card  # the bundle has no pauc


def test_card_leads_with_test_numbers_and_labels_the_rest_out_of_fold(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    auc = {"value": 0.77, "lo": 0.65, "hi": 0.86, "level": 0.95}
    tested = {"internal": {"metrics": {"auc": auc}, "n_images": 94, "n_melanoma": 19}}
    register_tiny(registry, seed=4, threshold=0.42, test_metrics=tested)
    model = ModelService(registry, ServingConfig()).status().model
    assert model is not None and model.manifest.test_metrics["internal"].n_melanoma == 19
    card = model_card_markdown(model)
    test_line = "| ROC AUC, test | 0.770 [0.650, 0.860] (95% CI) |"
    oof_line = "| ROC AUC, out-of-fold | 0.810 [0.740, 0.880] (95% CI) |"
    assert "| **Test** (locked test split) | 94 images, 19 melanoma |" in card
    assert card.index(test_line) < card.index(oof_line)
    assert "No untouched test set" not in card and "nothing was trained, tuned or chosen on" in card
