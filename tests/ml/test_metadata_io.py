"""read_table / require_columns: clear errors for bad files, CRLF and BOM accepted."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from melanoma_ml.errors import MelanomaInputError
from melanoma_ml.metadata.io import (
    MetadataError,
    MetadataFileNotFound,
    read_header,
    read_table,
    require_columns,
)

HEADER = "image_name,patient_id,sex,age_approx,anatom_site_general_challenge,diagnosis,target"
ROWS = ["ISIC_1,IP_1,male,45,torso,nevus,0", "ISIC_2,IP_2,,,,melanoma,1"]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("lf", ("\n".join([HEADER, *ROWS]) + "\n").encode()),
        ("crlf", ("\r\n".join([HEADER, *ROWS]) + "\r\n").encode()),
        ("crlf_no_final_newline", "\r\n".join([HEADER, *ROWS]).encode()),
        ("bom_crlf", b"\xef\xbb\xbf" + ("\r\n".join([HEADER, *ROWS]) + "\r\n").encode()),
    ],
)
def test_read_table_accepts_line_endings_and_bom(tmp_path: Path, name: str, data: bytes) -> None:
    table = read_table(_write(tmp_path / f"{name}.csv", data))
    assert list(table.columns) == HEADER.split(",")
    assert table["target"].tolist() == ["0", "1"]  # no stray "\r"
    assert table["sex"].tolist() == ["male", ""]  # blanks stay text, cleaning decides
    assert table["image_name"].iloc[0] == "ISIC_1"  # no BOM glued to the first name


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty (0 bytes)"),
        ((HEADER + "\r\n").encode(), "header but no data rows"),
        (b"\n\n", "no header or rows"),
        (HEADER.encode() + b"\nISIC_1,\xff\xfe,male,45,torso,nevus,0\n", "not UTF-8"),
        (b'image_name,target\n"ISIC_1,0\nISIC_2,1\n', "cannot parse"),
        (b"image_name,target\nISIC_1,0,extra,fields\nISIC_2,1\n", "cannot parse"),
    ],
)
def test_read_table_bad_files_name_the_problem(tmp_path: Path, data: bytes, message: str) -> None:
    path = _write(tmp_path / "bad.csv", data)
    with pytest.raises(MetadataError, match=re.escape(message)) as err:
        read_table(path)
    assert str(path) in str(err.value)


def test_read_table_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(MetadataFileNotFound, match="not found: .*nope.csv"):
        read_table(tmp_path / "nope.csv")
    with pytest.raises(MetadataError, match="is a folder"):
        read_table(tmp_path)


def test_read_table_parquet(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pd.DataFrame({"image_name": ["ISIC_1", "ISIC_2"], "age_approx": [45.0, None]}).to_parquet(path)
    table = read_table(path)
    assert table["age_approx"].tolist() == ["45.0", ""]


def test_require_columns_names_missing_found_and_layout() -> None:
    table = pd.DataFrame({"image_name": ["a"], "sex": ["male"]})
    require_columns(table, ["image_name"], "x.csv", "ISIC 2020")
    with pytest.raises(MetadataError) as err:
        require_columns(table, ["image_name", "target", "diagnosis"], "x.csv", "ISIC 2020")
    message = str(err.value)
    for part in ("['target', 'diagnosis']", "x.csv", "ISIC 2020", "['image_name', 'sex']"):
        assert part in message


@pytest.mark.parametrize(
    ("header", "row", "repeated"),
    [
        ("image_name,patient_id,image_name,target", "ISIC_1,IP_1,ISIC_2,0", "image_name"),
        ("image_name,patient_id, Image_Name ,target", "ISIC_1,IP_1,ISIC_2,0", "image_name"),
        ("image_name,target,patient_id,TARGET,patient_id", "ISIC_1,0,IP_1,1,IP_2", "patient_id"),
    ],
)
def test_read_table_rejects_repeated_column_names(
    tmp_path: Path, header: str, row: str, repeated: str
) -> None:
    """pandas would rename the second column (``image_name.1``) and the ids in it would be lost."""
    path = _write(tmp_path / "dup.csv", f"{header}\r\n{row}\r\n".encode())
    with pytest.raises(MetadataError, match="repeated column name") as err:
        read_table(path)
    message = str(err.value)
    assert str(path) in message and repeated in message and "rename or delete" in message
    assert isinstance(err.value, MelanomaInputError)


def test_read_table_rejects_repeated_parquet_columns_after_stripping(tmp_path: Path) -> None:
    path = tmp_path / "dup.parquet"
    pd.DataFrame({"image_name": ["ISIC_1"], " image_name": ["ISIC_2"], "target": ["0"]}).to_parquet(path)
    with pytest.raises(MetadataError, match=r"repeated column name.*image_name"):
        read_table(path)


@pytest.mark.parametrize(("delimiter", "word"), [(";", "semicolon"), ("\t", "tab"), ("|", "pipe")])
def test_read_header_names_a_wrong_delimiter(tmp_path: Path, delimiter: str, word: str) -> None:
    text = (
        delimiter.join(["image_name", "patient_id", "target"])
        + "\nISIC_1"
        + delimiter
        + "IP_1"
        + delimiter
        + "0\n"
    )
    path = _write(tmp_path / "t.csv", text.encode())
    for read in (read_header, read_table):
        with pytest.raises(MetadataError, match=f"{word}-separated") as err:
            read(path)
        assert str(path) in str(err.value) and "comma-separated" in str(err.value)


def test_read_header_returns_stripped_names_and_names_the_problem(tmp_path: Path) -> None:
    path = _write(tmp_path / "ok.csv", b"\xef\xbb\xbf image_name ,target\r\nISIC_1,0\r\n")
    assert read_header(path) == ["image_name", "target"]
    latin = _write(tmp_path / "latin.csv", "image_name,target,diagnóstico\nISIC_1,0,x\n".encode("latin-1"))
    with pytest.raises(MetadataError, match="not UTF-8"):
        read_header(latin)
    with pytest.raises(MetadataError, match=r"empty \(0 bytes\)"):
        read_header(_write(tmp_path / "empty.csv", b""))
