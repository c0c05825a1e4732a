"""Evaluation on the real ISIC 2020 patient structure (33,126 images, 2,056 patients), synthetic scores.

The labels, patients, sexes, ages and sites are the official ones; only the probabilities are simulated
(no trained model is needed), so this checks the subgroup vocabulary and the bootstrap at full scale.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from melanoma_ml import schema
from melanoma_ml.config import EvaluationConfig
from melanoma_ml.evaluation import evaluate_predictions


@pytest.mark.real_data
def test_full_isic_2020_scale_evaluation(isic_metadata_dir, record_property):
    table = pd.read_csv(isic_metadata_dir / "ISIC_2020_Training_GroundTruth.csv")
    rng = np.random.default_rng(0)
    y = table["target"].to_numpy()
    oof = table.assign(
        group_id=table["patient_id"],
        prob=1 / (1 + np.exp(-(2.0 * y + rng.normal(size=len(table)) - 3))),
        fold=0,
    )
    start = time.perf_counter()
    report = evaluate_predictions(oof, EvaluationConfig(n_bootstrap=1000))
    elapsed = time.perf_counter() - start
    record_property("evaluate_isic2020_seconds", round(elapsed, 2))
    print(
        f"\nevaluate_predictions, ISIC 2020 (33,126 images, 2,056 patients), 1000 resamples: {elapsed:.2f} s"
    )

    assert (report.n_images, report.n_groups, report.n_melanoma) == (33126, 2056, 584)
    assert report.incomplete_metrics() == []
    sites = report.subgroups[report.subgroups["variable"] == "site"]
    assert list(sites["level"]) == [*schema.SITES, "unknown"]  # the official vocabulary, nothing extra
    assert (sites["n"].sum(), sites["n_melanoma"].sum()) == (33126, 584)
    torso = sites[sites["level"] == "torso"].iloc[0]
    assert torso["auc_lo"] <= torso["auc"] <= torso["auc_hi"]
