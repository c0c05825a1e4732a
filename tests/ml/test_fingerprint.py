"""Data versions: source fingerprints follow metadata bytes and image listings, table ones the content."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from melanoma_ml.config import DataConfig
from melanoma_ml.metadata.fingerprint import source_fingerprint, table_fingerprint
from melanoma_ml.metadata.image_files import IMAGE_EXTENSIONS


def dataset(folder: Path) -> Path:
    (folder / "jpeg" / "train").mkdir(parents=True)
    (folder / "train.csv").write_text("image_name,target\nISIC_1,0\nISIC_2,1\n")
    for name in ("ISIC_1", "ISIC_2"):
        (folder / "jpeg" / "train" / f"{name}.jpg").write_bytes(name.encode())
    return folder


@pytest.mark.parametrize(
    ("change", "changes_fingerprint"),
    [
        (lambda d: None, False),
        (lambda d: (d / "train.csv").write_text("image_name,target\nISIC_1,1\nISIC_2,1\n"), True),
        (lambda d: (d / "jpeg" / "train" / "ISIC_3.jpg").write_bytes(b"x"), True),
        (lambda d: (d / "jpeg" / "train" / "ISIC_2.jpg").unlink(), True),
        (lambda d: (d / "jpeg" / "train" / "ISIC_1.jpg").write_bytes(b"longer content"), True),
        (lambda d: (d / "notes.txt").write_text("ignored"), False),
        # files the loader does not read (suffix not in metadata.image_files.IMAGE_EXTENSIONS) are not data
        (lambda d: (d / "jpeg" / "train" / "ISIC_3.gif").write_bytes(b"x"), False),
        (lambda d: (d / "jpeg" / "train" / "ISIC_3.PNG").write_bytes(b"x"), True),
    ],
)
def test_fingerprint_follows_metadata_and_image_listing(
    tmp_path: Path, change, changes_fingerprint: bool
) -> None:
    folder = dataset(tmp_path / "isic")
    data = DataConfig(source_dir=str(folder))
    before = source_fingerprint(data)
    change(folder)
    assert (source_fingerprint(data) != before) is changes_fingerprint


@pytest.mark.parametrize("suffix", IMAGE_EXTENSIONS)
def test_fingerprint_lists_every_image_suffix_the_loader_reads(tmp_path: Path, suffix: str) -> None:
    folder = dataset(tmp_path / "isic")
    data = DataConfig(source_dir=str(folder))
    before = source_fingerprint(data)
    (folder / "jpeg" / "train" / f"ISIC_3{suffix}").write_bytes(b"x")
    assert source_fingerprint(data) != before


def test_fingerprint_covers_external_sources_and_an_outside_image_dir(tmp_path: Path) -> None:
    primary = dataset(tmp_path / "isic")
    external = dataset(tmp_path / "isic2019")
    images = tmp_path / "elsewhere"
    images.mkdir()
    (images / "ISIC_1.jpg").write_bytes(b"a")
    data = DataConfig(
        source_dir=str(primary), image_dir=str(images), external_sources=[{"path": str(external)}]
    )
    before = source_fingerprint(data)

    (external / "train.csv").write_text("image_name,target\nISIC_1,1\nISIC_2,1\n")
    relabelled = source_fingerprint(data)
    assert relabelled != before
    (external / "jpeg" / "train" / "ISIC_9.jpg").write_bytes(b"new")
    new_external_image = source_fingerprint(data)
    assert new_external_image != relabelled
    (images / "ISIC_2.jpg").write_bytes(b"b")
    assert source_fingerprint(data) != new_external_image


def test_fingerprint_covers_test_sources(tmp_path: Path) -> None:
    """A changed external test set changes the data version, so the sensor has it scored again."""
    primary = dataset(tmp_path / "isic")
    held_out = dataset(tmp_path / "other_clinic")
    without = DataConfig(source_dir=str(primary))
    data = DataConfig(source_dir=str(primary), test_sources=[{"path": str(held_out)}])
    before = source_fingerprint(data)
    assert before != source_fingerprint(without)

    (held_out / "train.csv").write_text("image_name,target\nISIC_1,1\nISIC_2,1\n")
    relabelled = source_fingerprint(data)
    assert relabelled != before
    (held_out / "jpeg" / "train" / "ISIC_9.jpg").write_bytes(b"new")
    assert source_fingerprint(data) != relabelled
    # a test set and an external training set at the same path are told apart
    as_training = DataConfig(source_dir=str(primary), external_sources=[{"path": str(held_out)}])
    assert source_fingerprint(as_training) != source_fingerprint(data)


@pytest.mark.parametrize(
    ("change", "changes_fingerprint"),
    [
        (lambda d: None, False),
        (lambda d: (d / "metadata.csv").write_text("image_name,target\nISIC_1,1\n"), True),
        (lambda d: (d / "images" / "ISIC_2.jpg").write_bytes(b"new"), True),
        (lambda d: (d / "ISIC_2020_Training_Duplicates.csv").write_text("image_name_1,image_name_2\n"), True),
        (lambda d: (d / "unrelated" / "ISIC_2.jpg").write_bytes(b"not an image folder"), False),
    ],
)
def test_fingerprint_of_a_metadata_file_covers_it_and_its_image_folder(
    tmp_path: Path, change, changes_fingerprint: bool
) -> None:
    folder = tmp_path / "export"
    (folder / "images").mkdir(parents=True)
    (folder / "unrelated").mkdir()
    (folder / "metadata.csv").write_text("image_name,target\nISIC_1,0\n")
    (folder / "images" / "ISIC_1.jpg").write_bytes(b"x")
    data = DataConfig(source_dir=str(folder / "metadata.csv"))
    before = source_fingerprint(data)
    change(folder)
    assert (source_fingerprint(data) != before) is changes_fingerprint


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (lambda t: DataConfig(source_dir=str(t / "nope")), "data folder not found.*data.source_dir"),
        (
            lambda t: DataConfig(source_dir=str(t / "isic"), external_sources=[{"path": str(t / "gone")}]),
            r"data.external_sources\[0\].path not found.*remove the entry",
        ),
        (
            lambda t: DataConfig(source_dir=str(t / "isic"), image_dir=str(t / "pics")),
            "data.source_dir image_dir not found",
        ),
        (
            lambda t: DataConfig(source_dir=str(t / "isic"), test_sources=[{"path": str(t / "gone")}]),
            r"data.test_sources\[0\].path not found.*MELANOMA_DATA__TEST_SOURCES",
        ),
    ],
)
def test_fingerprint_of_a_missing_path_names_the_setting(tmp_path: Path, data, message: str) -> None:
    dataset(tmp_path / "isic")
    with pytest.raises(FileNotFoundError, match=message):
        source_fingerprint(data(tmp_path))


def test_table_fingerprint_changes_with_content() -> None:
    table = pd.DataFrame({"image_name": ["ISIC_1", "ISIC_2"], "target": [0, 1]})
    assert table_fingerprint(table) == table_fingerprint(table.copy())
    assert table_fingerprint(table) != table_fingerprint(table.assign(target=[1, 1]))
    assert table_fingerprint(table) != table_fingerprint(table.iloc[::-1])  # row order is content
