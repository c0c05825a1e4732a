"""The tabular baseline as a pipeline step (trained and reported, or off) and its leaderboard rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tabular_helpers import TABULAR, folds_table

from melanoma_ml import schema
from melanoma_ml.artifacts import artifact_paths
from melanoma_ml.cli import _leaderboard_lines
from melanoma_ml.config import load_config
from melanoma_ml.errors import InputValueError
from melanoma_ml.evaluation.ranking import (
    BLEND,
    IMAGE,
    KIND,
    TABULAR_ONLY,
    Leaderboard,
    TabularRows,
)
from melanoma_ml.evaluation.report import evaluate_predictions
from melanoma_ml.tabular.baseline import OFF_NOTE, run_tabular_baseline
from melanoma_ml.tabular.gbdt import GBDT_NAME


def config_for(tmp_path: Path, tabular: list[str]):
    return load_config(
        "tiny",
        {
            "artifact_root": str(tmp_path / "artifacts"),
            "model": {"tabular_features": tabular},
            "tabular_baseline": {"max_iter": 30, "min_samples_leaf": 5},
        },
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("baseline")
    config = config_for(tmp, TABULAR)
    return config, run_tabular_baseline(config, folds_table())


def test_without_tabular_features_the_baseline_is_off_and_writes_nothing(tmp_path: Path) -> None:
    config = config_for(tmp_path, [])
    baseline = run_tabular_baseline(config, folds_table())
    assert not baseline.enabled and baseline.report is None and baseline.note == OFF_NOTE
    assert "model.tabular_features" in baseline.note
    assert not (tmp_path / "artifacts" / "reports").exists()


def test_the_baseline_writes_its_oof_and_report_under_reports_gbdt_tabular(trained) -> None:
    config, baseline = trained
    folder = artifact_paths(config).report(GBDT_NAME)
    oof = pd.read_parquet(folder / "oof.parquet")
    assert baseline.enabled and baseline.report.name == GBDT_NAME
    assert len(oof) == baseline.report.n_images == len(folds_table())
    assert json.loads((folder / "report.json").read_text())["name"] == GBDT_NAME
    assert baseline.features == (*TABULAR, schema.AGE, schema.SEX, schema.SITE)
    assert set(baseline.fit_seconds) == {0, 1}
    assert baseline.report.metric("auc").value > 0.8  # the tabular column carries the label


def image_model(gbdt_oof: pd.DataFrame, seed: int = 1) -> pd.DataFrame:
    """A weak image model over the same images: a noisy copy of the label."""
    rng = np.random.default_rng(seed)
    oof = gbdt_oof.copy()
    oof["prob"] = np.clip(0.3 * oof[schema.TARGET] + rng.random(len(oof)) * 0.8, 0, 1)
    oof["backbone"] = "test_efficientnet"
    return oof


def test_the_board_shows_the_gbdt_and_the_blend_beside_the_image_model_but_never_as_candidate(
    trained, tmp_path: Path
) -> None:
    config, baseline = trained
    gbdt_oof = pd.read_parquet(artifact_paths(config).oof(GBDT_NAME))
    image_oof = image_model(gbdt_oof)
    reports = {"test_efficientnet": evaluate_predictions(image_oof, config.evaluation)}
    rows = TabularRows(baseline.report, gbdt_oof, blend_dir=tmp_path / "blend")
    board = Leaderboard.rank(
        reports, {"test_efficientnet": image_oof}, config.evaluation, tabular=rows, tabular_note=baseline.note
    )

    table = board.table
    assert table["rank"].tolist() == [1, 2, 3] and table["auc"].is_monotonic_decreasing
    by_kind = table.set_index(KIND)
    assert by_kind.loc[TABULAR_ONLY, "backbone"] == GBDT_NAME
    assert by_kind.loc[BLEND, "backbone"] == f"test_efficientnet+{GBDT_NAME}"
    assert by_kind.loc[TABULAR_ONLY, "auc"] > by_kind.loc[IMAGE, "auc"]  # better, still not the candidate
    assert board.candidate == "test_efficientnet" and table["candidate"].tolist().count(True) == 1
    assert by_kind.loc[IMAGE, "candidate"] and by_kind.loc[IMAGE, "auc_diff_vs_best"] == 0
    blend = by_kind.loc[BLEND]
    assert blend["auc_lo"] <= blend["auc"] <= blend["auc_hi"]
    assert blend["diff_lo"] < blend["auc_diff_vs_best"] < blend["diff_hi"]
    assert blend["auc_diff_vs_best"] > 0  # the GBDT adds to the weak image model

    vs_image, vs_gbdt = board.comparisons
    assert (vs_image["b"], vs_gbdt["b"]) == ("test_efficientnet", GBDT_NAME)
    assert vs_image["diff"] == pytest.approx(blend["auc_diff_vs_best"])
    assert "does gbdt_tabular add" in vs_image["question"]
    assert (tmp_path / "blend" / "report.json").is_file() and (tmp_path / "blend" / "oof.parquet").is_file()

    lines = _leaderboard_lines(reports, table)  # the demo summary prints every row, labelled
    assert len(lines) == 3 and sum(TABULAR_ONLY in line or BLEND in line for line in lines) == 2

    board.save(tmp_path / "board")
    saved = json.loads((tmp_path / "board" / "leaderboard.json").read_text())
    assert saved["candidate"] == "test_efficientnet" and saved["tabular_note"] == baseline.note
    assert [r[KIND] for r in saved["rows"]] == table[KIND].tolist() and len(saved["comparisons"]) == 2


def test_without_the_baseline_every_row_is_an_image_row(trained) -> None:
    config, baseline = trained
    gbdt_oof = pd.read_parquet(artifact_paths(config).oof(GBDT_NAME))
    image_oof = image_model(gbdt_oof)
    reports = {"test_efficientnet": evaluate_predictions(image_oof, config.evaluation)}
    board = Leaderboard.rank(reports, {"test_efficientnet": image_oof}, config.evaluation)
    assert board.table[KIND].tolist() == [IMAGE] and board.comparisons == () and board.tabular_note == ""


def test_a_baseline_on_other_images_is_refused_naming_the_folds_table(trained) -> None:
    config, baseline = trained
    gbdt_oof = pd.read_parquet(artifact_paths(config).oof(GBDT_NAME))
    image_oof = image_model(gbdt_oof).iloc[10:]
    reports = {"test_efficientnet": evaluate_predictions(image_oof, config.evaluation)}
    rows = TabularRows(baseline.report, gbdt_oof)
    with pytest.raises(InputValueError, match="same folds table"):
        Leaderboard.rank(reports, {"test_efficientnet": image_oof}, config.evaluation, tabular=rows)
