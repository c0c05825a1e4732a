"""clean_metadata: harmonization, labels, duplicates and image checks, each asserted with its reason."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from melanoma_ml import schema
from melanoma_ml.metadata import CleaningResult, MetadataError, clean_metadata


def write_jpeg(path: Path, seed: int, size: int = 32) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path, quality=90)
    return path


def table(rows: list[dict[str, object]]) -> pd.DataFrame:
    columns = ["image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge", "diagnosis"]
    frame = pd.DataFrame(rows)
    for column in columns:
        if column not in frame.columns:
            frame[column] = ""
    return frame.fillna("").astype("str")


def clean_one_column(column: str, values: list[str], **extra: str) -> CleaningResult:
    rows = [
        {"image_name": f"ISIC_{i}", "diagnosis": "nevus", column: v, **extra} for i, v in enumerate(values)
    ]
    return clean_metadata(table(rows), image_dir=None, source="test", check_images=False)


def _same(a: object, b: object) -> bool:
    if isinstance(b, float) and math.isnan(b):
        return isinstance(a, float) and math.isnan(a)
    return a == b


SEX_CASES = [
    ("male", "male", None),
    ("M", "male", None),
    ("f", "female", None),
    (" Female ", "female", None),
    ("unknown", float("nan"), None),
    ("", float("nan"), None),
    ("x", float("nan"), "unrecognized sex"),
]
AGE_CASES = [
    ("45", 45.0, None),
    ("45.0", 45.0, None),
    (" 60 ", 60.0, None),
    ("", float("nan"), None),
    ("unknown", float("nan"), None),
    ("forty", float("nan"), "non-numeric age"),
    ("0", float("nan"), "age 0"),
    ("0.0", float("nan"), "age 0"),
    ("-5", float("nan"), "negative age"),
    ("90", 85.0, "capped at 85"),
    ("inf", float("nan"), "non-numeric age"),
]
SITE_CASES = [
    ("torso", "torso", None),
    ("anterior torso", "torso", None),
    ("Posterior Torso", "torso", None),
    ("lateral torso", "torso", None),
    ("back", "torso", None),
    ("trunk", "torso", None),
    ("abdomen", "torso", None),
    ("chest", "torso", None),
    ("face", "head/neck", None),
    ("ear", "head/neck", None),
    ("neck", "head/neck", None),
    ("scalp", "head/neck", None),
    ("head/neck", "head/neck", None),
    ("hand", "upper extremity", None),
    ("upper extremity", "upper extremity", None),
    ("foot", "lower extremity", None),
    ("lower extremity", "lower extremity", None),
    ("acral", "palms/soles", None),
    ("palms/soles", "palms/soles", None),
    ("genital", "oral/genital", None),
    ("oral/genital", "oral/genital", None),
    ("unknown", float("nan"), None),
    ("", float("nan"), None),
    ("elbow pit", float("nan"), "unknown anatomic site 'elbow pit'"),
]


@pytest.mark.parametrize(
    ("column", "cases"),
    [(schema.SEX, SEX_CASES), (schema.AGE, AGE_CASES), (schema.SITE, SITE_CASES)],
    ids=["sex", "age", "site"],
)
def test_harmonization_table(column: str, cases: list[tuple[str, object, str | None]]) -> None:
    result = clean_one_column(column, [raw for raw, _, _ in cases])
    assert len(result.clean) == len(cases)
    for i, (raw, expected, warning) in enumerate(cases):
        got = result.clean[column].iloc[i]
        assert _same(got, expected), f"{column} {raw!r} -> {got!r}, expected {expected!r}"
        warned = result.warnings[(result.warnings["row"] == i) & (result.warnings["column"] == column)]
        if warning is None:
            assert warned.empty, f"{column} {raw!r} should not warn: {warned['action'].tolist()}"
        else:
            assert len(warned) == 1 and warning in warned["action"].iloc[0], (raw, warned["action"].tolist())
            assert warned["value"].iloc[0] == raw
    assert result.summary["warnings"].get(column, 0) == sum(w is not None for _, _, w in cases)


LABEL_CASES = [
    ("melanoma", 1),
    ("MEL", 1),
    ("mel", 1),
    ("melanoma in situ", 1),
    ("Melanoma Invasive", 1),
    ("Melanoma, NOS", 1),
    ("melanoma metastasis", 1),
    ("Malignant melanocytic proliferations (Melanoma)", 1),
    ("lentigo maligna", 1),
    ("atypical melanocytic proliferation", 0),
    ("Indeterminate melanocytic proliferations", 0),
    ("lentigo NOS", 0),
    ("nevus", 0),
    ("basal cell carcinoma", 0),
]


def test_diagnosis_decides_target_when_no_target_column() -> None:
    raw = table([{"image_name": f"ISIC_{i}", "diagnosis": dx} for i, (dx, _) in enumerate(LABEL_CASES)])
    result = clean_metadata(raw, image_dir=None, source="t", check_images=False)
    assert result.clean[schema.TARGET].tolist() == [t for _, t in LABEL_CASES]
    assert result.clean[schema.TARGET].dtype == np.int64


def test_target_column_kept_and_disagreement_warned() -> None:
    raw = table(
        [
            {"image_name": "A", "diagnosis": "unknown", "target": "0"},  # unknown diagnosis: no disagreement
            {"image_name": "B", "diagnosis": "melanoma", "target": "1"},
            {"image_name": "C", "diagnosis": "nevus", "target": "1"},  # disagree -> target kept
            {"image_name": "D", "diagnosis": "melanoma", "target": "1.0"},
            {"image_name": "E", "diagnosis": "melanoma", "target": "yes"},  # invalid target -> diagnosis
            {"image_name": "F", "diagnosis": "unknown", "target": "", "benign_malignant": "benign"},
            {"image_name": "G", "diagnosis": "unknown", "target": ""},  # no label
        ]
    )
    result = clean_metadata(raw, image_dir=None, source="t", check_images=False)
    assert dict(zip(result.clean.image_name, result.clean.target, strict=True)) == {
        "A": 0, "B": 1, "C": 1, "D": 1, "E": 1, "F": 0
    }  # fmt: skip
    target_warnings = result.warnings[result.warnings["column"] == "target"]
    assert set(target_warnings["image_name"]) == {"C", "E"}
    assert "disagree" in target_warnings.set_index("image_name").loc["C", "action"]
    assert result.quarantine[["image_name", "check"]].values.tolist() == [["G", "no_label"]]
    assert "no label" in result.quarantine["reason"].iloc[0]


def test_unlabeled_rows_kept_when_labels_not_required() -> None:
    raw = table([{"image_name": "A", "diagnosis": ""}, {"image_name": "B", "diagnosis": "melanoma"}])
    result = clean_metadata(raw, image_dir=None, source="t", check_images=False, require_labels=False)
    assert len(result.clean) == 2
    assert math.isnan(result.clean["target"].iloc[0]) and result.clean["target"].iloc[1] == 1


def test_duplicate_ids_and_missing_names_quarantined_with_row() -> None:
    raw = table(
        [
            {"image_name": "ISIC_1", "diagnosis": "nevus"},
            {"image_name": "ISIC_2", "diagnosis": "nevus"},
            {"image_name": "ISIC_1", "diagnosis": "melanoma"},
            {"image_name": " ", "diagnosis": "nevus"},
            {"image_name": "ISIC_2.jpg", "diagnosis": "nevus"},
        ]
    )
    result = clean_metadata(raw, image_dir=None, source="t", check_images=False)
    assert result.clean["image_name"].tolist() == ["ISIC_1", "ISIC_2"]
    assert result.clean["target"].tolist() == [0, 0]  # the first ISIC_1 row wins
    q = result.quarantine.set_index("row")
    assert q.loc[2, "reason"] == "duplicate image_name, first seen at row 0"
    assert q.loc[3, "check"] == "missing_image_name"
    assert q.loc[4, "reason"] == "duplicate image_name, first seen at row 1"  # extension removed first
    assert result.summary["rows_in"] == 5 and result.summary["rows_quarantined"] == 3
    assert result.summary["quarantine_reasons"] == {"duplicate_image_name": 2, "missing_image_name": 1}
    assert result.source_rows.tolist() == [0, 1]


def test_clean_table_shape_and_types_metadata_only() -> None:
    raw = table(
        [
            {
                "image_name": "ISIC_1",
                "patient_id": "IP_1",
                "diagnosis": "melanoma",
                "sex": "f",
                "age_approx": "50",
            }
        ]
    )
    result = clean_metadata(raw, image_dir=None, source="ISIC2020", is_external=True, check_images=False)
    assert tuple(result.clean.columns) == schema.CLEAN_COLUMNS
    row = result.clean.iloc[0]
    assert row[schema.IMAGE_PATH] == "" and row[schema.IMAGE_SHA256] == ""
    assert row[schema.SOURCE] == "ISIC2020" and bool(row[schema.IS_EXTERNAL]) is True
    assert math.isnan(row[schema.LESION])
    assert result.summary["melanoma"] == 1 and result.summary["patients"] == 1


def test_missing_label_columns_and_image_name_are_errors() -> None:
    with pytest.raises(MetadataError, match=r"missing column\(s\) \['image_name'\]"):
        clean_metadata(pd.DataFrame({"name": ["a"]}), image_dir=None, source="t", check_images=False)
    with pytest.raises(MetadataError, match="no label column"):
        clean_metadata(pd.DataFrame({"image_name": ["a"]}), image_dir=None, source="t", check_images=False)


def test_check_images_needs_a_folder(tmp_path: Path) -> None:
    raw = table([{"image_name": "A", "diagnosis": "nevus"}])
    with pytest.raises(MetadataError, match="data.image_dir"):
        clean_metadata(raw, image_dir=None, source="t")
    with pytest.raises(MetadataError, match="image folder not found"):
        clean_metadata(raw, image_dir=tmp_path / "nope", source="t")


def test_images_found_checked_hashed_and_bad_ones_quarantined(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    write_jpeg(images / "ISIC_ok.jpg", 1)
    write_jpeg(images / "ISIC_upper.JPG", 2)
    write_jpeg(images / "ISIC_jpeg.jpeg", 3)
    Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(images / "ISIC_png.png")
    whole = write_jpeg(images / "ISIC_whole.jpg", 4, size=64).read_bytes()
    (images / "ISIC_truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (images / "ISIC_empty.jpg").write_bytes(b"")
    (images / "ISIC_copy.jpg").write_bytes((images / "ISIC_ok.jpg").read_bytes())
    names = [
        "ISIC_ok",
        "ISIC_upper",
        "ISIC_jpeg",
        "ISIC_png",
        "ISIC_truncated",
        "ISIC_empty",
        "ISIC_missing",
        "ISIC_copy",
    ]
    raw = table([{"image_name": n, "diagnosis": "nevus"} for n in names])
    result = clean_metadata(raw, image_dir=images, source="t")

    assert result.clean["image_name"].tolist() == ["ISIC_ok", "ISIC_upper", "ISIC_jpeg", "ISIC_png"]
    paths = [Path(p) for p in result.clean["image_path"]]
    assert all(p.is_absolute() and p.is_file() for p in paths)
    assert paths[1].name == "ISIC_upper.JPG" and paths[3].suffix == ".png"
    assert all(len(h) == 64 for h in result.clean["image_sha256"])
    q = result.quarantine.set_index("image_name")
    assert q.loc["ISIC_truncated", "check"] == "image_unreadable"
    assert "ISIC_truncated.jpg" in q.loc["ISIC_truncated", "reason"]
    assert q.loc["ISIC_empty", "check"] == "image_unreadable"
    assert q.loc["ISIC_missing", "check"] == "image_missing"
    reason = q.loc["ISIC_missing", "reason"]
    assert f"image file missing: {images.resolve() / 'ISIC_missing.jpg'} (row 6)" in reason
    assert "data.image_dir" in reason
    assert q.loc["ISIC_copy", "check"] == "duplicate_content"
    assert "same image content as ISIC_ok (row 0" in q.loc["ISIC_copy", "reason"]


def test_hashing_off_keeps_content_duplicates(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "A.jpg", 1)
    (tmp_path / "B.jpg").write_bytes((tmp_path / "A.jpg").read_bytes())
    raw = table([{"image_name": n, "diagnosis": "nevus"} for n in ("A", "B")])
    result = clean_metadata(raw, image_dir=tmp_path, source="t", hash_images=False)
    assert result.clean["image_name"].tolist() == ["A", "B"]
    assert result.clean["image_sha256"].tolist() == ["", ""]


def test_file_stem_column_finds_renamed_files(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "ISIC_1_downsampled.jpg", 1)
    raw = table([{"image_name": "ISIC_1", "diagnosis": "nevus", "image_file_stem": "ISIC_1_downsampled"}])
    result = clean_metadata(raw, image_dir=[tmp_path], source="t")
    assert result.clean["image_name"].tolist() == ["ISIC_1"]
    assert result.clean["image_path"].iloc[0].endswith("ISIC_1_downsampled.jpg")


def test_large_table_is_vectorized_fast() -> None:
    import time

    n = 40_000
    rng = np.random.default_rng(0)
    raw = pd.DataFrame(
        {
            "image_name": [f"ISIC_{i:07d}" for i in range(n)],
            "patient_id": [f"IP_{i // 15}" for i in range(n)],
            "sex": rng.choice(["male", "female", "", "M"], n),
            "age_approx": rng.choice(["45", "50.0", "", "0", "90", "x"], n),
            "anatom_site_general_challenge": rng.choice(["torso", "anterior torso", "", "back", "zz"], n),
            "diagnosis": rng.choice(["nevus", "melanoma", "unknown"], n),
            "target": rng.choice(["0", "1"], n),
        }
    )
    start = time.perf_counter()
    result = clean_metadata(raw, image_dir=None, source="t", check_images=False)
    assert time.perf_counter() - start < 5.0
    assert len(result.clean) == n


def test_typed_input_and_extension_warning() -> None:
    raw = pd.DataFrame(
        {
            "image_name": ["ISIC_1.JPG", "ISIC_2"],
            "age_approx": [45.0, np.nan],
            "target": [1, 0],
            "sex": ["female", None],
        }
    )
    result = clean_metadata(raw, image_dir=None, source="t", check_images=False)
    assert result.clean["image_name"].tolist() == ["ISIC_1", "ISIC_2"]
    assert result.clean["age_approx"].iloc[0] == 45.0 and math.isnan(result.clean["age_approx"].iloc[1])
    assert result.clean["target"].tolist() == [1, 0]
    warned = result.warnings.set_index("image_name")
    assert warned.loc["ISIC_1", "action"] == "file extension removed from image_name"
    assert warned.loc["ISIC_1", "value"] == "ISIC_1.JPG"
