"""The official ISIC 2020 / 2019 and HAM10000 tables (metadata only) load with the published counts."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from melanoma_ml import schema
from melanoma_ml.folds import assign_folds, fold_problems, fold_summary
from melanoma_ml.metadata import clean_metadata, detect_layout, load_dataset, read_table

pytestmark = pytest.mark.real_data

GT_V1 = "ISIC_2020_Training_GroundTruth.csv"
GT_V2 = "ISIC_2020_Training_GroundTruth_v2.csv"


@pytest.mark.parametrize("name", [GT_V1, GT_V2])
def test_isic2020_ground_truth_cleans_to_published_counts(isic_metadata_dir: Path, name: str) -> None:
    raw = read_table(isic_metadata_dir / name)  # CRLF file
    start = time.perf_counter()
    result = clean_metadata(raw, image_dir=None, source="ISIC2020", check_images=False)
    elapsed = time.perf_counter() - start
    s = result.summary
    assert (s["rows_in"], s["rows_clean"], s["rows_quarantined"]) == (33126, 33126, 0)
    assert (s["patients"], s["melanoma"]) == (2056, 584)
    assert abs(s["prevalence"] - 584 / 33126) < 1e-12
    assert s["warnings"] == {"age_approx": 82}  # 2 ages of 0 -> missing, 80 ages of 90 -> 85
    clean = result.clean
    assert clean[schema.SEX].isna().sum() == 65
    assert clean[schema.AGE].isna().sum() == 68 + 2
    assert clean[schema.SITE].isna().sum() == 527
    assert clean[schema.SITE].value_counts()["torso"] == 16845
    assert (
        clean.loc[clean[schema.DIAGNOSIS] == "atypical melanocytic proliferation", schema.TARGET] == 0
    ).all()
    assert elapsed < 60.0, f"cleaning 33,126 rows took {elapsed:.1f} s"  # pathological only (~1 s idle)


@pytest.mark.parametrize("name", [GT_V1, GT_V2])
def test_isic2020_official_duplicates_quarantined(isic_metadata_dir: Path, name: str) -> None:
    result = load_dataset(isic_metadata_dir / name, layout="isic2020", check_images=False)
    s = result.summary
    assert s["quarantine_reasons"] == {"official_duplicate": 425}
    assert (s["rows_in"], s["rows_clean"]) == (33126, 33126 - 425)
    assert s["melanoma"] == 584 - 3  # 3 duplicate pairs are melanoma
    reasons = result.quarantine["reason"]
    assert reasons.str.startswith("official duplicate of ISIC_").all()


def test_auto_detection_prefers_isic2020_v2(isic_metadata_dir: Path) -> None:
    match = detect_layout(isic_metadata_dir)
    assert match.name == "isic2020" and match.files["table"].name == GT_V2
    assert match.files["duplicates"].name == "ISIC_2020_Training_Duplicates.csv"
    assert "isic2019" in match.reason and "ham10000" in match.reason


def test_isic2019_official_tables(isic_metadata_dir: Path) -> None:
    result = load_dataset(isic_metadata_dir, layout="isic2019", check_images=False)
    s = result.summary
    assert (s["rows_in"], s["rows_clean"], s["melanoma"]) == (25331, 25331, 4522)
    clean = result.clean
    assert not clean[schema.IMAGE].str.endswith("_downsampled").any()
    assert clean[schema.IMAGE].is_unique
    assert clean[schema.DIAGNOSIS].value_counts()["nevus"] == 12875
    assert clean[schema.LESION].notna().sum() == 23247
    assert set(clean[schema.SITE].dropna()) <= set(schema.SITES)


def test_ham10000_official_table(isic_metadata_dir: Path) -> None:
    result = load_dataset(isic_metadata_dir / "HAM10000_metadata.csv", check_images=False)
    s = result.summary
    assert (s["rows_in"], s["rows_clean"], s["melanoma"], s["lesions"]) == (10015, 10015, 1113, 7470)
    assert result.clean[schema.SEX].isna().sum() == 57
    assert set(result.clean[schema.SITE].dropna()) <= set(schema.SITES)


def test_real_2020_folds_patient_disjoint_balanced_deterministic(isic_metadata_dir: Path) -> None:
    table = clean_metadata(
        read_table(isic_metadata_dir / GT_V2), image_dir=None, source="ISIC2020", check_images=False
    ).clean
    start = time.perf_counter()
    folded = assign_folds(table, n_folds=5, seed=42)
    elapsed = time.perf_counter() - start
    assert (folded.groupby(schema.PATIENT)[schema.FOLD].nunique() == 1).all()
    overall = 584 / 33126
    summary = fold_summary(folded)
    assert len(summary) == 5
    assert ((summary["prevalence"] - overall).abs() < 0.005).all(), summary
    assert fold_problems(folded) == []
    assert assign_folds(table, n_folds=5, seed=42)[schema.FOLD].tolist() == folded[schema.FOLD].tolist()
    assert elapsed < 120.0, (
        f"assign_folds on 33,126 rows took {elapsed:.1f} s"
    )  # pathological only (~5 s idle)
