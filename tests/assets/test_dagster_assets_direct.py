"""Assets and checks are plain functions: call them directly with a constructed resource."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from melanoma_assets.assets.data import patient_folds
from melanoma_assets.checks import clean_metadata_schema, folds_leak_free_and_balanced
from melanoma_assets.resources import ArtifactStorage, DataSource, PipelineSettings, TrainingHardware
from melanoma_ml import schema
from melanoma_ml.artifacts import ArtifactPaths


def settings(tmp_path: Path) -> PipelineSettings:
    return PipelineSettings(
        profile="tiny",
        storage=ArtifactStorage(root=str(tmp_path / "artifacts")),
        hardware=TrainingHardware(),
        source=DataSource(),
    )


def clean_table(n_patients: int = 40) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    patients = np.repeat(np.arange(n_patients), 3)
    n = len(patients)
    return pd.DataFrame(
        {
            schema.IMAGE: [f"ISIC_{i:05d}" for i in range(n)],
            schema.PATIENT: [f"P{p}" for p in patients],
            schema.LESION: [f"L{i}" for i in range(n)],
            schema.SEX: rng.choice(["male", "female"], n),
            schema.AGE: rng.choice([35.0, 55.0, 75.0], n),
            schema.SITE: rng.choice(list(schema.SITES), n),
            schema.DIAGNOSIS: "nevus",
            schema.TARGET: (patients % 4 == 0).astype("int64"),
            schema.SOURCE: "synthetic",
            schema.IS_EXTERNAL: False,
            schema.IMAGE_PATH: [f"/data/ISIC_{i:05d}.jpg" for i in range(n)],
            schema.IMAGE_SHA256: "",
        }
    )


def test_patient_folds_asset_writes_the_table_and_reports_per_fold_counts(tmp_path: Path) -> None:
    result = patient_folds(settings=settings(tmp_path), clean_metadata=clean_table())
    folds = result.value
    assert sorted(folds[schema.FOLD].unique()) == [0, 1]
    assert folds.groupby(schema.PATIENT)[schema.FOLD].nunique().max() == 1
    assert result.metadata["folds"] == 2
    assert "prevalence" in result.metadata["per_fold"].value
    assert ArtifactPaths(tmp_path / "artifacts").folds_table.is_file()


def test_fold_check_passes_on_grouped_folds_and_names_a_leak(tmp_path: Path) -> None:
    folds = patient_folds(settings=settings(tmp_path), clean_metadata=clean_table()).value
    assert folds_leak_free_and_balanced(settings=settings(tmp_path), patient_folds=folds).passed

    leaked = folds.copy()
    first_patient = leaked[schema.GROUP] == leaked[schema.GROUP].iloc[0]
    leaked.loc[first_patient, schema.FOLD] = [0, 1, 1]
    result = folds_leak_free_and_balanced(settings=settings(tmp_path), patient_folds=leaked)
    assert not result.passed
    assert "leak" in result.metadata["problems"].value


def test_schema_check_returns_evidence() -> None:
    good = clean_metadata_schema(clean_metadata=clean_table())
    assert isinstance(good, dg.AssetCheckResult) and good.passed and good.metadata["rows"].value == 120
    bad = clean_metadata_schema(clean_metadata=clean_table().assign(sex="unknown"))
    assert not bad.passed and "sex has values outside" in bad.metadata["problems"].value
