"""The real 1,391-image HAM10000 sample: two disagreeing metadata sources merged, images checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from melanoma_ml import schema
from melanoma_ml.folds import assign_folds, fold_problems
from melanoma_ml.metadata import CleaningResult, load_dataset, merge_sources

pytestmark = pytest.mark.real_data


@pytest.fixture(scope="module")
def merged(isic_sample_dir: Path) -> CleaningResult:
    ham = load_dataset(isic_sample_dir / "metadata_raw_ham10000.csv")  # explicit CSV: a non-standard name
    isic2019 = load_dataset(isic_sample_dir / "metadata_raw_isic2019.csv", require_labels=False)
    return merge_sources([ham, isic2019], primary="HAM10000")


def test_sample_sources_load_with_images(merged: CleaningResult) -> None:
    ham = merged.summary["sources"]["HAM10000"]
    assert (ham["layout"], ham["rows_clean"], ham["melanoma"], ham["rows_quarantined"]) == (
        "ham10000",
        1391,
        330,
        0,
    )
    assert ham["image_dirs"][0].endswith("isic_sample/images")
    assert ham["warnings"] == {"age_approx": 6}  # six HAM ages of 0.0 -> missing
    isic2019 = merged.summary["sources"]["ISIC2019"]
    assert (isic2019["layout"], isic2019["rows_clean"]) == ("isic2019", 1391)


def test_sample_merged_table(merged: CleaningResult, isic_sample_dir: Path) -> None:
    clean = merged.clean
    assert tuple(clean.columns) == schema.CLEAN_COLUMNS
    assert (len(clean), int(clean[schema.TARGET].sum())) == (1391, 330)
    assert (clean[schema.SOURCE] == "HAM10000").all() and not clean[schema.IS_EXTERNAL].any()
    assert merged.summary["quarantine_reasons"] == {"cross_source_duplicate": 1391}
    assert clean[schema.LESION].nunique() == 960
    expected = dict(
        line.split()[::-1]
        for line in (isic_sample_dir / "images.sha256").read_text().splitlines()
        if line.strip()
    )
    by_file = {
        Path(p).name: h for p, h in zip(clean[schema.IMAGE_PATH], clean[schema.IMAGE_SHA256], strict=True)
    }
    assert by_file == {Path(name).name: h for name, h in expected.items()}


def test_sample_disagreements_recorded(merged: CleaningResult) -> None:
    conflicts = merged.conflicts
    sex = conflicts[conflicts["column"] == schema.SEX]
    age = conflicts[conflicts["column"] == schema.AGE]
    assert len(sex) > 0 and len(age) > 0
    # HAM says unknown, ISIC 2019 gives a sex: the value is filled from ISIC 2019 and says so
    assert sex["HAM10000"].isna().all() and (sex["chosen"] == sex["ISIC2019"]).all()
    assert (sex["chosen_from"] == "ISIC2019").all()
    assert set(conflicts["column"]) <= {schema.SEX, schema.AGE, schema.SITE, schema.TARGET}
    assert merged.summary["conflicts"] == conflicts["column"].value_counts().to_dict()
    chosen = merged.clean.set_index(schema.IMAGE).loc[sex[schema.IMAGE], schema.SEX]
    assert chosen.tolist() == sex["chosen"].tolist()


def test_sample_lesion_grouped_folds(merged: CleaningResult) -> None:
    folded = assign_folds(merged.clean, n_folds=5, seed=0)
    assert folded[schema.GROUP].str.startswith("lesion:").all()  # no patient ids in HAM10000
    assert (folded.groupby(schema.LESION)[schema.FOLD].nunique() == 1).all()
    assert fold_problems(folded) == []


def test_sample_metadata_csv_autodetected(isic_sample_dir: Path) -> None:
    result = load_dataset(isic_sample_dir, hash_images=False)
    assert result.summary["layout"] == "isic2020"
    assert (result.summary["rows_clean"], result.summary["melanoma"]) == (1391, 330)
