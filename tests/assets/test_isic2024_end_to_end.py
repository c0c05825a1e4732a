"""Issue 13 acceptance: the ISIC 2024 layout through Dagster, from the HDF5 file to an answer with tabular inputs.

Synthetic ISIC 2024 set (train-metadata.csv + train-image.hdf5) -> image cache -> image model with the
``isic2024_tbp`` tabular features (negative down-sampling on) + the GBDT baseline -> leaderboard with the
image row, the tabular-only row and the blend row -> promotion of the image model -> the model service
answers with the tabular features given and left out. Tiny profile: 24 patients, 32 px, 2 folds, 2 epochs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from graph_helpers import materialize_tiny_graph

from melanoma_ml import schema
from melanoma_ml.artifacts import ArtifactPaths
from melanoma_ml.config import TABULAR_PRESETS

OVERRIDES = {
    "data": {"synthetic": {"layout": "isic2024"}},
    "model": {"tabular_features": "isic2024_tbp"},
    "training": {"negative_ratio": 2.0},
    "tabular_baseline": {"max_iter": 30, "min_samples_leaf": 5},
}


@pytest.mark.slow
def test_isic2024_hdf5_to_blend_leaderboard_to_a_served_answer_with_and_without_tabular(
    tmp_path: Path,
) -> None:
    from melanoma_ml.config import ServingConfig
    from melanoma_ml.evaluation.ranking import BLEND, IMAGE, TABULAR_ONLY
    from melanoma_ml.images import hdf5
    from melanoma_ml.serving.registry import ModelRegistry
    from melanoma_ml.serving.service import ModelService, PredictionRequest
    from melanoma_ml.tabular.gbdt import GBDT_NAME

    run, root = materialize_tiny_graph(tmp_path, OVERRIDES)
    assert all(e.passed for e in run.check_evaluations())

    # The images came from the HDF5 file, and the tabular columns reached the folds table.
    folds = pd.read_parquet(ArtifactPaths(root).folds_table)
    assert folds[schema.IMAGE_PATH].map(hdf5.is_ref).all()
    tbp = list(TABULAR_PRESETS["isic2024_tbp"])
    assert set(tbp) <= set(folds.columns)

    # The GBDT baseline: its OOF over exactly the image model's OOF images, and its report.
    baseline = run.results[-1].output_for_node("tabular_baseline")
    assert baseline.enabled and baseline.report.name == GBDT_NAME
    gbdt_oof = pd.read_parquet(ArtifactPaths(root).oof(GBDT_NAME))
    image_oof = pd.read_parquet(ArtifactPaths(root).oof("test_efficientnet"))
    assert sorted(gbdt_oof[schema.IMAGE]) == sorted(image_oof[schema.IMAGE])
    assert (ArtifactPaths(root).report(GBDT_NAME) / "report.json").is_file()

    # The leaderboard: image, tabular-only and blend rows; only the image model is the candidate.
    board = run.results[-1].output_for_node("leaderboard")
    table = board.table.set_index("kind")
    assert sorted(table.index) == sorted([IMAGE, TABULAR_ONLY, BLEND])
    assert board.candidate == "test_efficientnet" == table.loc[IMAGE, "backbone"]
    assert table["candidate"].tolist().count(True) == 1 and table.loc[IMAGE, "candidate"]
    assert table.loc[BLEND, "backbone"] == f"test_efficientnet+{GBDT_NAME}"
    for kind in (TABULAR_ONLY, BLEND):
        row = table.loc[kind]
        assert row["auc_lo"] <= row["auc"] <= row["auc_hi"]
        assert row["diff_lo"] <= row["auc_diff_vs_best"] <= row["diff_hi"]
    assert [(c["a"], c["b"]) for c in board.comparisons] == [
        (table.loc[BLEND, "backbone"], "test_efficientnet"),
        (table.loc[BLEND, "backbone"], GBDT_NAME),
    ]
    assert math.isclose(board.comparisons[0]["diff"], table.loc[BLEND, "auc_diff_vs_best"])
    saved = json.loads((ArtifactPaths(root).leaderboard / "leaderboard.json").read_text())
    assert len(saved["rows"]) == 3 and len(saved["comparisons"]) == 2
    assert (ArtifactPaths(root).report("blend") / "report.json").is_file()

    # The gate served the image model, which reads the tabular features.
    promotion = run.results[-1].output_for_node("serving_model")
    assert promotion.candidate == "test_efficientnet" and promotion.champion_after == "v0001"
    service = ModelService(ModelRegistry(ArtifactPaths(root).registry), ServingConfig(tta=False))
    served = service.status().model
    assert served is not None and list(served.tabular_features) == tbp

    row = folds.iloc[0]
    image = hdf5.read_bytes(row[schema.IMAGE_PATH])
    given = {column: float(row[column]) for column in tbp if pd.notna(row[column])}
    with_tabular = service.predict(
        PredictionRequest(image, age=row[schema.AGE], cam_method="none", tabular=given)
    )
    without = service.predict(PredictionRequest(image, age=row[schema.AGE], cam_method="none"))
    for answer in (with_tabular, without):
        assert 0.0 <= answer.probability <= 1.0 and answer.model_version == "v0001"
    assert with_tabular.metadata["tabular"] == {c: given.get(c) for c in tbp}
    assert without.metadata["tabular"] == dict.fromkeys(tbp)
    assert with_tabular.probability != without.probability  # the tabular inputs reach the network
