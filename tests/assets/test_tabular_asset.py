"""The tabular baseline asset called directly: an "off" materialization says why, an on one reports AUC."""

from __future__ import annotations

import json
from pathlib import Path

from tabular_helpers import TABULAR, folds_table

from melanoma_assets.assets.tabular import tabular_baseline
from melanoma_assets.resources import ArtifactStorage, DataSource, PipelineSettings, TrainingHardware
from melanoma_ml.artifacts import ArtifactPaths


def settings(tmp_path: Path, tabular: list[str]) -> PipelineSettings:
    overrides = {"model": {"tabular_features": tabular}, "tabular_baseline": {"max_iter": 20}}
    return PipelineSettings(
        profile="tiny",
        overrides_json=json.dumps(overrides),
        storage=ArtifactStorage(root=str(tmp_path / "artifacts")),
        hardware=TrainingHardware(),
        source=DataSource(),
    )


def test_off_without_tabular_features_with_a_note_saying_how_to_turn_it_on(tmp_path: Path) -> None:
    result = tabular_baseline(settings=settings(tmp_path, []), patient_folds=folds_table())
    assert result.value.report is None
    assert result.metadata["enabled"] is False and "model.tabular_features" in result.metadata["note"]
    assert "auc" not in result.metadata


def test_on_it_reports_the_out_of_fold_auc_with_its_ci(tmp_path: Path) -> None:
    result = tabular_baseline(settings=settings(tmp_path, TABULAR), patient_folds=folds_table())
    assert result.metadata["enabled"] is True
    assert result.metadata["auc_lo"] <= result.metadata["auc"] <= result.metadata["auc_hi"]
    assert ArtifactPaths(tmp_path / "artifacts").oof("gbdt_tabular").is_file()
