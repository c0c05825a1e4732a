"""Steps of melanoma_ml.pipeline that need no training: config validation, and run_all's blocking checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from melanoma_ml import checks, pipeline
from melanoma_ml.config import load_config
from melanoma_ml.steps import PipelineCheckFailed


def test_validate_config_accepts_a_metadata_file_and_names_a_missing_external(tmp_path: Path) -> None:
    (tmp_path / "isic").mkdir()
    (tmp_path / "isic" / "train.csv").write_text("image_name,target\nISIC_1,0\n")
    data = {"source_dir": str(tmp_path / "isic" / "train.csv")}
    pipeline.validate_config(load_config("tiny", {"artifact_root": str(tmp_path / "a"), "data": data}))
    data["external_sources"] = [{"path": str(tmp_path / "x")}]
    missing = load_config("tiny", {"artifact_root": str(tmp_path / "a"), "data": data})
    with pytest.raises(ValueError, match=r"data.external_sources\[0\].path not found"):
        pipeline.validate_config(missing)


def test_run_all_stops_at_a_failing_check_like_the_blocking_asset_check(tmp_path, monkeypatch):
    """``run_all`` runs the asset checks' functions between steps and stops where Dagster would."""
    monkeypatch.setattr(
        checks, "clean_table_problems", lambda clean: ["site 'moon' is not in the vocabulary"]
    )
    reached = []
    monkeypatch.setattr(pipeline, "make_folds", lambda *a, **k: reached.append("folds"))
    config = load_config("tiny", {"artifact_root": str(tmp_path / "artifacts")})
    with pytest.raises(PipelineCheckFailed, match="clean_metadata_schema.*moon"):
        pipeline.run_all(config, progress=lambda _: None)
    assert reached == []
