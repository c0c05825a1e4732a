"""The whole tiny graph with a locked test split: the test_evaluation asset, its check, and no leak.

One in-process materialization (every partition) with ``data.test_fraction=0.25``. A spy on
``train_fold``'s split records every training and validation image; the test split's patients must be in
none of them, nor in any out-of-fold table (which chose epochs, thresholds and the ranking), nor in the
served bundle's stored predictions. The test reports use the thresholds fixed out-of-fold, and the card's
test numbers equal `melanoma-ml predict` on the same test images (the served bundle scored them).
"""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from graph_helpers import materialize_tiny_graph

from melanoma_ml import schema
from melanoma_ml.artifacts import ArtifactPaths
from melanoma_ml.training import train


@pytest.mark.slow
def test_test_evaluation_asset_scores_the_locked_split_and_nothing_leaks(tmp_path: Path, monkeypatch) -> None:
    from melanoma_ml.cli import main
    from melanoma_ml.evaluation.metrics import roc_auc
    from melanoma_ml.evaluation.threshold import threshold_for_sensitivity
    from melanoma_ml.folds import locked_test_mask
    from melanoma_ml.serving.model_card import model_card_markdown
    from melanoma_ml.serving.registry import ModelRegistry
    from melanoma_ml.serving.service import ModelService

    seen: dict[str, set[str]] = {"train": set(), "valid": set()}
    real_split = train.split_fold

    def spy(table: pd.DataFrame, fold):
        rows = real_split(table, fold)
        seen["train"] |= set(rows[0][schema.IMAGE])
        seen["valid"] |= set(rows[1][schema.IMAGE])
        return rows

    monkeypatch.setattr(train, "split_fold", spy)
    run, root = materialize_tiny_graph(tmp_path, {"data": {"test_fraction": 0.25}})
    evaluations = run.check_evaluations()
    assert all(e.passed for e in evaluations), [
        (e.check_name, e.metadata) for e in evaluations if not e.passed
    ]
    assert "test_split_untouched" in {e.check_name for e in evaluations}

    folds = pd.read_parquet(ArtifactPaths(root).folds_table)
    test_rows = folds[locked_test_mask(folds)]
    test_images, test_groups = set(test_rows[schema.IMAGE]), set(test_rows[schema.GROUP])
    assert len(test_rows) and test_rows["target"].nunique() == 2
    by_image = folds.set_index(schema.IMAGE)[schema.GROUP]
    assert seen["train"] and seen["valid"]
    assert (
        not {by_image[name] for name in seen["train"] | seen["valid"]} & test_groups
    )  # train_fold's loaders
    oof = pd.read_parquet(ArtifactPaths(root).oof("test_efficientnet"))  # OOF report, ranking
    assert not set(oof[schema.IMAGE]) & test_images

    last = run.results[-1]
    tested = last.output_for_node("test_evaluation")
    report = last.output_for_node("evaluation__test_efficientnet")
    ensemble, served = (
        tested.find("test_efficientnet", "folds"),
        tested.find("test_efficientnet", "best_fold"),
    )
    assert ensemble.report.n_images == served.report.n_images == len(test_rows)
    assert ensemble.report.threshold.value == report.threshold.value  # the OOF threshold, not re-tuned
    assert ensemble.oof_auc.value == report.metric("auc").value
    assert ensemble.optimism_gap == pytest.approx(report.metric("auc").value - ensemble.test_auc.value)
    materialization = next(
        e.materialization for e in last.get_asset_materialization_events()
        if e.materialization.asset_key == dg.AssetKey("test_evaluation")
    )  # fmt: skip
    assert "internal/test_efficientnet/folds/test_auc" in materialization.metadata

    board = json.loads((ArtifactPaths(root).leaderboard / "leaderboard.json").read_text())
    assert board["rows"][0]["test_auc"] == pytest.approx(ensemble.test_auc.value)

    registry = ModelRegistry(ArtifactPaths(root).registry)
    manifest = registry.manifest(registry.current())
    bundled = served if manifest.ensemble.kind == "best_fold" else ensemble  # serving.ensemble
    assert not set(manifest.oof.image_name) & test_images
    own = manifest.oof_frame()
    target, raw = own["target"].to_numpy(), own["prob"].to_numpy()  # stored out-of-fold: raw probabilities
    # The test report scores raw probabilities at the raw out-of-fold threshold, fixed before the test ...
    assert bundled.report.threshold.value == threshold_for_sensitivity(target, raw, 0.9)
    # ... and the bundle serves the same operating point on its calibrated scale.
    calibrated = raw if manifest.calibration is None else manifest.calibration.calibrator().apply(raw)
    assert manifest.threshold == threshold_for_sensitivity(target, calibrated, 0.9)
    # The card's test numbers are the served bundle's own: `melanoma-ml predict` on the same test images
    # (8-view TTA, calibrator, threshold) gives the same AUC and decisions, not the fold models' numbers.
    stored = manifest.test_metrics["internal"]
    assert stored.n_images == len(test_rows)
    csv = tmp_path / "test_rows.csv"
    columns = [schema.IMAGE, schema.IMAGE_PATH, *schema.METADATA_FEATURES]
    test_rows[columns].to_csv(csv, index=False)
    out = tmp_path / "predicted.csv"
    assert (
        main(["predict", str(csv), "--out", str(out), "--artifact-root", str(root), "--profile", "tiny"]) == 0
    )
    labels = test_rows[[schema.IMAGE, schema.TARGET]].rename(columns={schema.TARGET: "label"})
    predicted = pd.read_csv(out).merge(labels, on=schema.IMAGE)  # predict's `target`: the probability
    assert len(predicted) == len(test_rows) and (predicted["error"].isna()).all()
    y, served_prob = predicted["label"].to_numpy(), predicted["target"].to_numpy()
    assert abs(stored.metrics["auc"].value - roc_auc(y, served_prob)) <= 1e-6
    positive = (predicted["decision"] == "positive").to_numpy()
    assert stored.metrics["sensitivity"].value == pytest.approx(positive[y == 1].mean(), abs=1e-12)
    assert stored.metrics["specificity"].value == pytest.approx((~positive[y == 0]).mean(), abs=1e-12)
    assert stored.metrics["brier"].value == pytest.approx(np.mean((served_prob - y) ** 2), abs=1e-6)
    # ECE/Brier after calibration on the test split (the comparison rows): the bundle's own calibrator and
    # threshold, applied unchanged, keep the raw operating point.
    assert bundled.calibration.threshold == pytest.approx(manifest.threshold, abs=1e-12)
    assert bundled.calibration.method == (manifest.calibration and manifest.calibration.method)
    assert bundled.calibration.sensitivity == bundled.report.metric("sensitivity").value
    assert bundled.calibration.specificity == bundled.report.metric("specificity").value
    assert tested.table()["ece_after"].notna().all()
    from melanoma_ml.config import ServingConfig

    card = model_card_markdown(ModelService(registry, ServingConfig()).status().model)
    assert "ROC AUC, test" in card and "ROC AUC, out-of-fold" in card
