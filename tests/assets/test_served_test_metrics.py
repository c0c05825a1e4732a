"""A bundle's test metrics are the bundle's own: ``batch.served_test_metrics`` equals ``predict``'s functions
(``load_scoring_model`` + ``score_path``) run on the same images, for the locked test split (given as a CSV of
its rows) and for an external ``data.test_sources`` set (given as its dataset folder, a different reading
path). No training: a random-weight bundle, rows whose labels and folds are set by hand.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from app_helpers import register_tiny
from test_pipeline_sources import write_isic2020

from melanoma_ml import pipeline, schema
from melanoma_ml.config import load_config
from melanoma_ml.evaluation.metrics import roc_auc
from melanoma_ml.folds import TEST_FOLD
from melanoma_ml.serving.batch import load_scoring_model, score_path, served_test_metrics
from melanoma_ml.serving.registry import ModelRegistry


def _auc_and_decisions(scores: pd.DataFrame, labels: pd.DataFrame) -> tuple[float, float, float, float]:
    """AUC, sensitivity, specificity and Brier score of a scores table (``predict``'s columns)."""
    joined = scores.merge(labels.rename(columns={schema.TARGET: "label"}), on=schema.IMAGE, validate="1:1")
    y, prob = joined["label"].to_numpy(dtype=int), joined["target"].to_numpy(dtype=float)
    positive = (joined["decision"] == "positive").to_numpy()
    return roc_auc(y, prob), positive[y == 1].mean(), (~positive[y == 0]).mean(), np.mean((prob - y) ** 2)


def test_the_bundles_test_metrics_equal_predict_on_the_same_images(tmp_path: Path) -> None:
    primary = write_isic2020(tmp_path / "primary", "ISIC", 16, seed=0)
    clinic = write_isic2020(tmp_path / "clinic", "HAM", 12, seed=3)
    config = load_config(
        "tiny",
        {
            "artifact_root": str(tmp_path / "artifacts"),
            "data": {"source_dir": str(primary), "test_sources": [{"path": str(clinic), "name": "clinic2"}]},
        },
    )
    cleaning = pipeline.clean_source(config, pipeline.prepare_source(config))
    folds = pipeline.make_folds(config, cleaning.clean)
    locked = folds[schema.IMAGE].str[-4:].astype(int) < 8  # ISIC_0000..0007: melanoma at 0 and 4
    folds.loc[locked, schema.FOLD] = TEST_FOLD
    registry = ModelRegistry(tmp_path / "registry")
    version = register_tiny(registry, seed=5, size=32, threshold=0.5)

    stored = served_test_metrics(config, registry.version_path(version), folds_table=folds, name="tiny")
    assert stored is not None and set(stored) == {"internal", "clinic2"}

    bundle = load_scoring_model(registry, version)
    test_rows = folds[locked]
    csv = tmp_path / "locked.csv"
    test_rows[[schema.IMAGE_PATH, *schema.METADATA_FEATURES]].to_csv(csv, index=False)
    external = pd.read_csv(clinic / "metadata.csv")
    for name, path, labels in (
        ("internal", csv, test_rows[[schema.IMAGE, schema.TARGET]]),
        ("clinic2", clinic, external[[schema.IMAGE, schema.TARGET]]),
    ):
        scores = score_path(path, bundle).scored
        assert len(scores) == len(labels) == stored[name]["n_images"]
        auc, sensitivity, specificity, brier = _auc_and_decisions(scores, labels)
        metrics = stored[name]["metrics"]
        assert abs(metrics["auc"]["value"] - auc) <= 1e-6, name
        assert metrics["sensitivity"]["value"] == pytest.approx(sensitivity, abs=1e-12), name
        assert metrics["specificity"]["value"] == pytest.approx(specificity, abs=1e-12), name
        assert metrics["brier"]["value"] == pytest.approx(brier, abs=1e-6), name
        assert stored[name]["n_melanoma"] == int(labels[schema.TARGET].sum())
        # the same images scored once, without TTA, give other numbers: TTA is part of what the card shows
        plain = score_path(path, bundle, views=1).scored
        assert not np.allclose(plain["target"].to_numpy(), scores["target"].to_numpy(), atol=1e-6), name
