"""merge_sources: primary wins, duplicates across sources removed, disagreements recorded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from melanoma_ml import schema
from melanoma_ml.metadata import CleaningResult, MetadataError, clean_metadata, merge_sources


def write_jpeg(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)


def source(
    rows: list[dict[str, str]], name: str, image_dir: Path | None = None, **kw: object
) -> CleaningResult:
    raw = pd.DataFrame(rows).fillna("")
    return clean_metadata(raw, image_dir=image_dir, source=name, check_images=image_dir is not None, **kw)


def test_primary_wins_conflicts_recorded_and_missing_values_filled() -> None:
    primary = source(
        [
            {
                "image_name": "ISIC_1",
                "sex": "male",
                "age_approx": "45",
                "anatom_site_general_challenge": "torso",
                "target": "0",
            },
            {
                "image_name": "ISIC_2",
                "sex": "",
                "age_approx": "0",
                "anatom_site_general_challenge": "",
                "target": "1",
            },
        ],
        "P",
    )
    other = source(
        [
            {
                "image_name": "ISIC_1_downsampled",
                "sex": "female",
                "age_approx": "45",
                "anatom_site_general_challenge": "anterior torso",
                "target": "1",
            },
            {
                "image_name": "ISIC_2",
                "sex": "m",
                "age_approx": "50",
                "anatom_site_general_challenge": "hand",
                "target": "",
            },
            {
                "image_name": "ISIC_3",
                "sex": "f",
                "age_approx": "30",
                "anatom_site_general_challenge": "torso",
                "target": "0",
            },
        ],
        "X",
        require_labels=False,
    )
    merged = merge_sources([other, primary], primary="P")
    clean = merged.clean.set_index("image_name")
    assert list(clean.index) == ["ISIC_1", "ISIC_2", "ISIC_3"]
    assert clean["source"].tolist() == ["P", "P", "X"]
    assert clean["is_external"].tolist() == [False, False, True]
    assert clean.loc["ISIC_1", "sex"] == "male" and clean.loc["ISIC_1", "target"] == 0  # primary wins
    assert clean.loc["ISIC_2", "sex"] == "male" and clean.loc["ISIC_2", "age_approx"] == 50.0  # filled
    assert clean.loc["ISIC_2", schema.SITE] == "upper extremity"
    assert clean["target"].dtype == np.int64

    c = merged.conflicts.set_index(["image_name", "column"])
    assert c.loc[("ISIC_1", "sex"), ["P", "X", "chosen", "chosen_from"]].tolist() == [
        "male",
        "female",
        "male",
        "P",
    ]
    assert c.loc[("ISIC_1", "target"), ["P", "X", "chosen"]].tolist() == ["0", "1", "0"]
    assert c.loc[("ISIC_2", "age_approx"), ["X", "chosen", "chosen_from"]].tolist() == ["50", "50", "X"]
    assert pd.isna(c.loc[("ISIC_2", "age_approx"), "P"])  # age 0 was set missing in P
    assert ("ISIC_2", "target") not in c.index  # an unlabeled supplementary row is not a disagreement
    assert ("ISIC_1", schema.SITE) not in c.index  # "anterior torso" and "torso" agree after cleaning

    q = merged.quarantine
    assert q[["source", "row", "image_name", "check"]].values.tolist() == [
        ["X", 0, "ISIC_1_downsampled", "cross_source_duplicate"],
        ["X", 1, "ISIC_2", "cross_source_duplicate"],
    ]
    assert "same image id as P row 0" in q["reason"].iloc[0]
    s = merged.summary
    assert (s["rows_in"], s["rows_clean"], s["primary"], s["rows_external"]) == (5, 3, "P", 1)
    assert s["conflicts"]["sex"] == 2
    assert merged.source_rows.tolist() == [0, 1, 2]


def test_content_duplicates_and_unlabeled_leftovers(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "A.jpg", 1)
    (tmp_path / "B.jpg").write_bytes((tmp_path / "A.jpg").read_bytes())
    write_jpeg(tmp_path / "C.jpg", 2)
    primary = source([{"image_name": "A", "diagnosis": "nevus"}], "P", tmp_path)
    other = source(
        [{"image_name": "B", "diagnosis": "melanoma"}, {"image_name": "C", "diagnosis": ""}],
        "X",
        tmp_path,
        require_labels=False,
    )
    merged = merge_sources([primary, other], primary="P")
    assert merged.clean["image_name"].tolist() == ["A"]
    q = merged.quarantine.set_index("image_name")
    assert (
        q.loc["B", "check"] == "duplicate_content"
        and "same image content as A from P" in q.loc["B", "reason"]
    )
    assert q.loc["C", "check"] == "no_label"


def test_bad_source_names() -> None:
    a = source([{"image_name": "A", "diagnosis": "nevus"}], "P")
    b = source([{"image_name": "B", "diagnosis": "nevus"}], "P")
    with pytest.raises(MetadataError, match="distinct names"):
        merge_sources([a, b], primary="P")
    with pytest.raises(MetadataError, match="not among the sources"):
        merge_sources([a], primary="Q")
