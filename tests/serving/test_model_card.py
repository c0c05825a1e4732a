"""The model card: metric lines in the evaluation report's shape, times, and the card of a served bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from app_helpers import SIZE, register_tiny

from melanoma_ml import schema
from melanoma_ml.config import ServingConfig, load_config
from melanoma_ml.evaluation.calibration import fit_served_calibration
from melanoma_ml.evaluation.estimate import Estimate
from melanoma_ml.serving.bundle import load_bundle, read_manifest
from melanoma_ml.serving.manifest import BundleManifest
from melanoma_ml.serving.model_card import (
    NOT_CALIBRATED,
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


def _oof(n_patients: int, melanoma_patients: int, seed: int) -> pd.DataFrame:
    """Two images per patient; the first ``melanoma_patients`` patients have melanoma, scored higher."""
    rng = np.random.default_rng(seed)
    target = np.repeat((np.arange(n_patients) < melanoma_patients).astype(int), 2)
    prob = np.clip(0.2 + 0.5 * target + rng.normal(0, 0.1, target.size), 0.01, 0.99)
    return pd.DataFrame(
        {
            schema.IMAGE: [f"ISIC_{i:05d}" for i in range(target.size)],
            schema.GROUP: np.repeat([f"P{p}" for p in range(n_patients)], 2),
            schema.TARGET: target,
            "prob": prob,
        }
    )


def test_a_bundle_without_enough_oof_rows_to_calibrate_says_why_in_manifest_and_card(tmp_path: Path) -> None:
    config = load_config("tiny")
    skipped = fit_served_calibration(config, _oof(10, 1, seed=0), raw_threshold=0.37)
    assert skipped.stored is None and skipped.threshold == 0.37
    assert "only 1 patients with melanoma" in skipped.uncalibrated_reason
    assert "20 out-of-fold rows of 10 patients" in skipped.uncalibrated_reason
    fitted = fit_served_calibration(config, _oof(40, 10, seed=0), raw_threshold=0.37)
    assert fitted.stored is not None and fitted.uncalibrated_reason is None

    registry = ModelRegistry(tmp_path / "registry")
    bundle = load_bundle(registry.version_path(register_tiny(registry, seed=6, promote=False)))
    version = registry.register_bundle(
        bundle.net,
        bundle.spec,
        threshold=skipped.threshold,
        metrics=bundle.manifest.metrics,
        data_version="test-6",
        code_version="test",
        calibration=skipped.stored,
        uncalibrated_reason=skipped.uncalibrated_reason,
    )
    registry.promote(version, reason="test")
    manifest = read_manifest(registry.version_path(version))
    assert manifest.calibration is None and manifest.uncalibrated_reason == skipped.uncalibrated_reason
    card = model_card_markdown(ModelService(registry, ServingConfig()).status().model)
    assert f"| Probabilities | {NOT_CALIBRATED} (raw network output: calibration skipped on 20" in card
    assert "only 1 patients with melanoma" in card and "predates calibration" not in card


def test_a_manifest_cannot_carry_both_a_calibrator_and_a_reason_for_none(tmp_path: Path) -> None:
    config = load_config("tiny")
    stored = fit_served_calibration(config, _oof(40, 10, seed=1), raw_threshold=0.5).stored
    registry = ModelRegistry(tmp_path / "registry")
    manifest = read_manifest(registry.version_path(register_tiny(registry, seed=7, promote=False)))
    fields = {**manifest.to_json(), "calibration": stored, "uncalibrated_reason": "too few patients"}
    with pytest.raises(ValueError, match="keep one of them"):
        BundleManifest.model_validate(fields)
