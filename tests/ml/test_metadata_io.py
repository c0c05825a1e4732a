"""read_table / require_columns: clear errors for bad files, CRLF and BOM accepted."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from melanoma_ml.metadata.io import MetadataError, MetadataFileNotFound, read_table, require_columns

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
