"""Configured data sources: one primary dataset plus training-only external ones, merged and folded."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pandas as pd
import pytest
from pydantic import ValidationError

from melanoma_ml import schema
from melanoma_ml.config import DataConfig, ExternalSource, SyntheticConfig, load_config
from melanoma_ml.folds import EXTERNAL_FOLD, assign_folds, fold_problems, split_masks
from melanoma_ml.metadata import CleaningResult, MetadataError, MetadataFileNotFound
from melanoma_ml.metadata.sources import load_configured_data
from melanoma_ml.synthetic import SyntheticDataset, generate_synthetic_dataset

TINY = SyntheticConfig(n_patients=16, images_per_patient=(2, 3), image_size=64, melanoma_rate=0.3, seed=5)


# ------------------------------------------------------------------------------------------ config only
@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ('[{"path": "/data/isic2019"}]', [ExternalSource(path="/data/isic2019")]),
        (
            '[{"path": "/a", "layout": "isic_cli", "name": "archive-mel"}, '
            '{"path": "/b.csv", "require_labels": false, "image_dir": "/imgs"}]',
            [
                ExternalSource(path="/a", layout="isic_cli", name="archive-mel"),
                ExternalSource(path="/b.csv", require_labels=False, image_dir="/imgs"),
            ],
        ),
        ("[]", []),
    ],
)
def test_external_sources_from_env(monkeypatch: pytest.MonkeyPatch, env: str, expected: list) -> None:
    monkeypatch.setenv("MELANOMA_DATA__EXTERNAL_SOURCES", env)
    monkeypatch.setenv("MELANOMA_DATA__SOURCE_DIR", "/data/isic2020")
    config = load_config("demo")
    assert config.data.external_sources == expected
    assert config.data.source_dir == "/data/isic2020"
    assert config.data.n_folds == 3  # the rest of the profile is kept


def test_external_sources_default_empty_and_strict() -> None:
    assert DataConfig().external_sources == []
    with pytest.raises(ValidationError, match="layout"):
        ExternalSource(path="/x", layout="isic2018")
    with pytest.raises(ValidationError, match="Extra inputs"):
        ExternalSource(path="/x", lables="auto")


# ------------------------------------------------------------------------------------------ data on disk
@pytest.fixture(scope="module")
def primary(tmp_path_factory: pytest.TempPathFactory) -> SyntheticDataset:
    return generate_synthetic_dataset(tmp_path_factory.mktemp("primary") / "synthetic", TINY)


@pytest.fixture(scope="module")
def archive_export(tmp_path_factory: pytest.TempPathFactory, primary: SyntheticDataset) -> Path:
    """An isic-cli style export (metadata.csv keyed by isic_id, images beside it) with new ids and patients,
    plus one image the primary lists under the same id and one the primary has under another id."""
    other = generate_synthetic_dataset(
        tmp_path_factory.mktemp("other") / "synthetic", TINY.model_copy(update={"seed": 6})
    )
    out = tmp_path_factory.mktemp("archive")
    table = pd.read_csv(other.csv_path, dtype=str, keep_default_na=False)
    rows = []
    for row in table.itertuples(index=False):
        isic_id = row.image_name.replace("SYN_", "ISIC_9")
        shutil.copy(other.image_dir / f"{row.image_name}.jpg", out / f"{isic_id}.jpg")
        rows.append(_archive_row(isic_id, "EXT" + row.patient_id, row.target, row.sex, row.age_approx))
    listed = pd.read_csv(primary.csv_path, dtype=str, keep_default_na=False)
    first = listed[(listed[schema.SEX] != "") & (listed[schema.AGE] != "")].iloc[0]
    # Same id as a primary image (its file is the primary's), sex and age left blank: a cross-source
    # duplicate by id whose missing values are recorded as disagreements.
    shutil.copy(primary.image_dir / f"{first.image_name}.jpg", out / f"{first.image_name}.jpg")
    rows.append(_archive_row(first.image_name, first.patient_id, first.target, "", ""))
    # The same primary image again under a new id: a duplicate by content.
    shutil.copy(primary.image_dir / f"{first.image_name}.jpg", out / "ISIC_8000001.jpg")
    rows.append(_archive_row("ISIC_8000001", "EXTP_copy", first.target, "", ""))
    with open(out / "metadata.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def _archive_row(isic_id: str, patient: str, target: str, sex: str, age: str) -> dict[str, str]:
    melanoma = target == "1"
    return {
        "isic_id": isic_id,
        "patient_id": patient,
        "lesion_id": "",
        "sex": sex,
        "age_approx": age,
        "anatom_site_general": "posterior torso",
        "diagnosis_1": "Malignant" if melanoma else "Benign",
        "diagnosis_2": "Malignant melanocytic proliferations (Melanoma)"
        if melanoma
        else "Benign melanocytic proliferations",
        "diagnosis_3": "Melanoma Invasive" if melanoma else "Nevus",
    }


def test_synthetic_default_folder_alone(primary: SyntheticDataset) -> None:
    result = load_configured_data(DataConfig(), default_source_dir=primary.root)
    assert len(result.clean) == primary.n_images
    assert int(result.clean[schema.TARGET].sum()) == primary.n_melanoma
    assert not result.clean[schema.IS_EXTERNAL].any()
    (described,) = result.summary["data_sources"]
    assert (described["setting"], described["layout"], described["external"]) == (
        "data.source_dir",
        "isic2020",
        False,
    )
    assert "train.csv" in described["layout_reason"]


def test_external_archive_export_merged_train_only(primary: SyntheticDataset, archive_export: Path) -> None:
    data = DataConfig(
        source_dir=str(primary.root),
        n_folds=2,
        external_sources=[ExternalSource(path=str(archive_export), name="archive")],
    )
    result = load_configured_data(data)
    clean = result.clean
    n_external = len(pd.read_csv(archive_export / "metadata.csv")) - 2
    assert (result.summary["rows_primary"], result.summary["rows_external"]) == (primary.n_images, n_external)
    assert set(clean.loc[clean[schema.IS_EXTERNAL], schema.SOURCE]) == {"archive"}
    assert set(clean.loc[~clean[schema.IS_EXTERNAL], schema.SOURCE]) == {"ISIC2020"}
    assert result.summary["quarantine_reasons"] == {"cross_source_duplicate": 1, "duplicate_content": 1}
    assert [d["layout"] for d in result.summary["data_sources"]] == ["isic2020", "isic_cli"]
    # The id duplicate had no sex/age in the export: recorded as a disagreement, primary values kept.
    sex_age = result.conflicts[result.conflicts["column"].isin([schema.SEX, schema.AGE])]
    assert sorted(sex_age["column"]) == [schema.AGE, schema.SEX]
    assert (sex_age["chosen_from"] == "ISIC2020").all() and sex_age["archive"].isna().all()

    folded = assign_folds(clean, data.n_folds, data.fold_seed)
    assert (folded.loc[folded[schema.IS_EXTERNAL], schema.FOLD] == EXTERNAL_FOLD).all()
    assert fold_problems(folded) == []
    for fold in range(data.n_folds):
        train, valid = split_masks(folded, fold)
        assert not folded.loc[valid, schema.IS_EXTERNAL].any()
        assert folded.loc[train, schema.IS_EXTERNAL].sum() == n_external


def test_two_sources_with_one_name_must_be_renamed(primary: SyntheticDataset) -> None:
    data = DataConfig(source_dir=str(primary.root), external_sources=[ExternalSource(path=str(primary.root))])
    with pytest.raises(MetadataError, match=r"both named 'ISIC2020'.*data.external_sources\[0\].name"):
        load_configured_data(data)


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (DataConfig(), MetadataError, "data.source_dir is not set and no default"),
        (
            DataConfig(source_dir="{tmp}/nowhere"),
            MetadataFileNotFound,
            "data.source_dir does not exist: .*nowhere; set MELANOMA_DATA__SOURCE_DIR",
        ),
        (
            DataConfig(source_dir="{tmp}/junk"),
            MetadataError,
            r"data.source_dir \(.*junk\): no known dataset layout .*notes.txt.*ham10000 needs",
        ),
        (
            DataConfig(source_dir="{tmp}/junk", layout="ham10000"),
            MetadataError,
            "is not in the ham10000 layout: it needs HAM10000_metadata.csv",
        ),
        (
            DataConfig(external_sources=[ExternalSource(path="{tmp}/gone")]),
            MetadataFileNotFound,
            r"data.external_sources\[0\].path does not exist: .*gone",
        ),
        (
            DataConfig(external_sources=[ExternalSource(path="{tmp}/junk")]),
            MetadataError,
            r"data.external_sources\[0\] \(.*junk\): no known dataset layout",
        ),
    ],
)
def test_errors_name_the_setting_and_the_fix(
    tmp_path: Path, primary: SyntheticDataset, data: DataConfig, error: type, message: str
) -> None:
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("not a dataset\n")
    dumped = data.model_dump()
    dumped["source_dir"] = dumped["source_dir"] and dumped["source_dir"].format(tmp=tmp_path)
    for entry in dumped["external_sources"]:
        entry["path"] = entry["path"].format(tmp=tmp_path)
    default = None if "not set" in message else primary.root
    with pytest.raises(error, match=message):
        load_configured_data(DataConfig(**dumped), default_source_dir=default)


# ------------------------------------------------------------------------------------------ real files
@pytest.mark.real_data
def test_real_sample_ham_primary_with_isic2019_metadata(isic_sample_dir: Path) -> None:
    data = DataConfig(
        source_dir=str(isic_sample_dir / "metadata_raw_ham10000.csv"),
        external_sources=[ExternalSource(path=str(isic_sample_dir / "metadata_raw_isic2019.csv"))],
    )
    result: CleaningResult = load_configured_data(data)
    assert (len(result.clean), int(result.clean[schema.TARGET].sum())) == (1391, 330)
    assert not result.clean[schema.IS_EXTERNAL].any()  # every ISIC 2019 row is a HAM image again
    assert result.summary["quarantine_reasons"] == {"cross_source_duplicate": 1391}
    ham, isic2019 = result.summary["data_sources"]
    assert (ham["layout"], ham["labels_required"]) == ("ham10000", True)
    assert (isic2019["layout"], isic2019["labels_required"], isic2019["external"]) == (
        "isic2019",
        False,
        True,
    )
    assert {schema.SEX, schema.AGE, schema.SITE} <= set(result.conflicts["column"])
    assert result.summary["conflicts"] == result.conflicts["column"].value_counts().to_dict()


@pytest.mark.real_data
def test_real_isic2019_metadata_forced_to_need_labels(isic_sample_dir: Path) -> None:
    data = DataConfig(
        source_dir=str(isic_sample_dir / "metadata_raw_ham10000.csv"),
        external_sources=[
            ExternalSource(path=str(isic_sample_dir / "metadata_raw_isic2019.csv"), require_labels=True)
        ],
    )
    with pytest.raises(MetadataError, match=r"data.external_sources\[0\].*has no labels.*GroundTruth"):
        load_configured_data(data)


@pytest.mark.parametrize(("setting", "kept"), [("missing", ["ISIC_1", "ISIC_2"]), ("quarantine", ["ISIC_1"])])
def test_age_out_of_range_setting_reaches_cleaning(tmp_path: Path, setting: str, kept: list[str]) -> None:
    from PIL import Image

    (tmp_path / "images").mkdir()
    for i in (1, 2):
        Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(tmp_path / "images" / f"ISIC_{i}.jpg")
    (tmp_path / "train.csv").write_text(
        "image_name,patient_id,age_approx,target\nISIC_1,IP_1,45,0\nISIC_2,IP_2,200,1\n"
    )
    result = load_configured_data(DataConfig(source_dir=str(tmp_path), age_out_of_range=setting))
    assert result.clean[schema.IMAGE].tolist() == kept
    if setting == "missing":
        assert pd.isna(result.clean[schema.AGE].iloc[1])
        assert "outside 0-120" in result.warnings["action"].iloc[0]
    else:
        assert result.quarantine["check"].tolist() == ["age_out_of_range"]
    with pytest.raises(ValidationError, match="age_out_of_range"):
        DataConfig(age_out_of_range="drop")
