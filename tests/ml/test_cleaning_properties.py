"""Property-based tests of reading + cleaning: whatever the table and image folder look like, the step either
raises the project's input error or accounts for every row (clean or quarantined, never both, never
neither) and keeps each clean row's patient/lesion id as written."""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from melanoma_ml import schema
from melanoma_ml.errors import MelanomaInputError
from melanoma_ml.metadata import CleaningResult, clean_metadata, load_dataset, read_table
from melanoma_ml.missing import MISSING_TOKENS

SETTINGS = settings(
    max_examples=80,
    deadline=None,
    database=None,  # no example database; hypothesis still caches constants in .hypothesis/ (git-ignored)
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


CORE_COLUMNS = [
    schema.PATIENT,
    schema.LESION,
    schema.SEX,
    schema.AGE,
    schema.SITE,
    schema.DIAGNOSIS,
    schema.BENIGN_MALIGNANT,
    schema.TARGET,
    "image_file_stem",
    "notes",
]
LABEL_COLUMNS = [schema.TARGET, schema.DIAGNOSIS, schema.BENIGN_MALIGNANT]
ODD_COLUMNS = ["", " Image_Name ", "TARGET", schema.PATIENT, " patient_id", "Lesion_ID", "notes"]
"""Columns that may repeat one already drawn (after stripping and case-folding) or be blank."""
STEMS = [f"ISIC_{i}" for i in range(6)]
MEANINGFUL = [
    *STEMS,
    "ISIC_1.JPG",
    "melanoma",
    "nevus",
    "basal cell carcinoma",
    "unknown",
    "benign",
    "malignant",
    "0",
    "1",
    "1.0",
    "yes",
    "-5",
    "0",
    "90",
    "200",
    "male",
    "F",
    "torso",
    "IP_1",
    "IL_1",
    "",
    " ",
    "NA",
]

meaningful = st.sampled_from(MEANINGFUL)
cell_text = st.one_of(
    meaningful,
    meaningful,
    meaningful,
    st.text(max_size=12),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=6),
    st.integers(-(10**20), 10**20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.just("x" * 70_000),
)
cell_value = st.one_of(cell_text, st.none(), st.integers(-300, 300), st.floats(), st.booleans())


@st.composite
def tables(draw: st.DrawFn, values: st.SearchStrategy) -> tuple[list[str], list[list[object]]]:
    """Mostly plausible tables (image_name + some known columns), sometimes with a repeated, blank or
    missing column, and rows of anything."""
    columns = [schema.IMAGE, *draw(st.lists(st.sampled_from(CORE_COLUMNS), unique=True, max_size=6))]
    if not set(columns) & set(LABEL_COLUMNS) and draw(st.integers(0, 4)):
        columns.append(draw(st.sampled_from(LABEL_COLUMNS)))
    if draw(st.integers(0, 4)) == 0:
        columns.append(draw(st.sampled_from(ODD_COLUMNS)))
    if draw(st.integers(0, 9)) == 0:
        columns.remove(schema.IMAGE)
    columns = draw(st.permutations(columns))
    n_rows = draw(st.integers(0, 8))
    rows = [[draw(values) for _ in columns] for _ in range(n_rows)]
    return columns, rows


def _csv_bytes(columns: list[str], rows: list[list[object]], delimiter: str, crlf: bool, bom: bool) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator="\r\n" if crlf else "\n")
    writer.writerow(columns)
    writer.writerows(["" if v is None else v for v in row] for row in rows)
    data = buffer.getvalue().encode("utf-8", errors="surrogatepass")
    return (b"\xef\xbb\xbf" if bom else b"") + data


IMAGE_KINDS = ["jpg", "png", "tif", "gif", "garbage", "empty"]


def _write_image(folder: Path, stem: str, kind: str, ext: str, seed: int) -> None:
    path = folder / f"{stem}{ext}"
    if kind == "garbage":
        path.write_bytes(np.random.default_rng(seed).bytes(64))
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        pixels = np.full((8, 8, 3), seed % 256, np.uint8)
        Image.fromarray(pixels).save(
            path, format={"jpg": "JPEG", "png": "PNG", "tif": "TIFF", "gif": "GIF"}[kind]
        )


images = st.lists(
    st.tuples(
        st.sampled_from(STEMS),
        st.sampled_from(IMAGE_KINDS),
        st.sampled_from([".jpg", ".JPG", ".png", ".tif", ".gif", ".txt"]),
        st.integers(0, 3),
    ),
    max_size=8,
)


def _ids(values: pd.Series) -> pd.Series:
    text = values.astype("str").str.strip()
    return text.mask(values.isna() | text.str.lower().isin(MISSING_TOKENS))


def assert_every_row_accounted_for(result: CleaningResult, raw: pd.DataFrame) -> None:
    clean, quarantine = result.clean, result.quarantine
    n = result.summary["rows_in"]
    assert n == len(raw) == len(clean) + len(quarantine), (n, len(raw), len(clean), len(quarantine))
    rows = [int(r) for r in result.source_rows] + [int(r) for r in quarantine[schema.Q_ROW]]
    assert sorted(rows) == list(range(n)), rows
    assert clean[schema.IMAGE].is_unique
    assert set(clean[schema.TARGET].dropna().unique()) <= {0, 1}
    raw = raw.reset_index(drop=True)

    def key(name: object) -> str:
        return str(name).strip().casefold()

    for column in (schema.PATIENT, schema.LESION):
        matching = [c for c in raw.columns if key(c) == column]
        if not matching:
            assert clean[column].isna().all()
            continue
        source = raw[matching[0]]
        expected = _ids(source.iloc[result.source_rows]).reset_index(drop=True)
        got = clean[column].reset_index(drop=True)
        same = (got.isna() & expected.isna()) | (got.astype("str") == expected.astype("str"))
        assert same.all(), pd.DataFrame({"expected": expected, "got": got})[~same]


MIN_CLEANED = 5
"""Examples that must get through the input checks to cleaning for a run to count: a strategy or library
change that turned every drawn table into an input error would otherwise pass while checking nothing.
Measured (5 runs of 80 examples each): 24-50 reached cleaning from csv + folder, 49-64 from frames."""


def assert_cleaning_was_reached(outcomes: Counter[str], test: str) -> None:
    total = outcomes["cleaned"] + outcomes["input error"]
    print(f"{test}: {outcomes['cleaned']} of {total} examples reached cleaning")
    assert outcomes["cleaned"] >= MIN_CLEANED, (
        f"{test}: only {outcomes['cleaned']} of {total} examples got past the input checks to cleaning; "
        "the strategies no longer exercise cleaning (widen them in tests/ml/test_cleaning_properties.py)"
    )


def test_reading_and_cleaning_a_csv_folder_accounts_for_every_row(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    outcomes: Counter[str] = Counter()

    @given(
        table=tables(cell_text),
        delimiter=st.sampled_from([","] * 8 + [";", "\t"]),
        crlf=st.booleans(),
        bom=st.booleans(),
        files=images,
        layout=st.sampled_from(["isic2020", "isic2020", "auto"]),
        out_of_range=st.sampled_from(["missing", "quarantine"]),
    )
    @SETTINGS
    def check(table, delimiter, crlf, bom, files, layout, out_of_range) -> None:
        root = tmp_path_factory.mktemp("case")
        columns, rows = table
        path = root / "train.csv"
        path.write_bytes(_csv_bytes(columns, rows, delimiter, crlf, bom))
        image_dir = root / "images"
        image_dir.mkdir()
        for stem, kind, ext, seed in files:
            _write_image(image_dir, stem, kind, ext, seed)
        try:
            result = load_dataset(path, layout=layout, image_dir=image_dir, age_out_of_range=out_of_range)
        except MelanomaInputError as err:
            assert str(err)
            event(f"input error: {str(err).split(':')[0][:40]}")
            outcomes["input error"] += 1
            return
        event(f"cleaned: {len(result.clean)} clean, {len(result.quarantine)} quarantined")
        assert_every_row_accounted_for(result, read_table(path))
        for image_path in result.clean[schema.IMAGE_PATH]:
            assert Path(image_path).is_file()
        outcomes["cleaned"] += 1

    check()
    assert_cleaning_was_reached(outcomes, "csv + image folder")


def test_cleaning_a_frame_of_mixed_types_accounts_for_every_row() -> None:
    outcomes: Counter[str] = Counter()

    @given(table=tables(cell_value), require_labels=st.booleans())
    @SETTINGS
    def check(table, require_labels: bool) -> None:
        columns, rows = table
        raw = pd.DataFrame(rows, columns=columns) if rows else pd.DataFrame(columns=columns)
        try:
            result = clean_metadata(
                raw, image_dir=None, source="t", check_images=False, require_labels=require_labels
            )
        except MelanomaInputError as err:
            assert str(err)
            event(f"input error: {str(err).split(':')[0][:40]}")
            outcomes["input error"] += 1
            return
        event(f"cleaned: {len(result.clean)} clean, {len(result.quarantine)} quarantined")
        assert_every_row_accounted_for(result, raw)
        ages = result.clean[schema.AGE].dropna()
        assert ((ages > 0) & (ages <= schema.MAX_AGE)).all() and not any(math.isinf(a) for a in ages)
        outcomes["cleaned"] += 1

    check()
    assert_cleaning_was_reached(outcomes, "mixed-type frame")
