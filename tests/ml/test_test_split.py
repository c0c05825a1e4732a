"""The locked test split (``data.test_fraction``) and external test sets (``data.test_sources``).

Split properties on a table with patients, lesion-only and image-only groups; the one train/validation
rule (``split_masks``) never hands a test row to training; ``fold_problems`` names a group straddling
test and CV; external test rows also in training are excluded and counted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from melanoma_ml import schema
from melanoma_ml.config import SyntheticConfig, load_config
from melanoma_ml.folds import (
    EXTERNAL_FOLD,
    TEST_FOLD,
    FoldError,
    assign_folds,
    fold_problems,
    locked_test_mask,
    split_masks,
)
from melanoma_ml.metadata.test_sources import drop_training_duplicates, load_test_sources

N_FOLDS = 3


def table(n_patients: int = 200, seed: int = 0) -> pd.DataFrame:
    """Patients with 1-4 images each (~10% melanoma patients), plus lesion-only and image-only rows."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        melanoma = rng.random() < 0.1
        for i in range(int(rng.integers(1, 5))):
            rows.append({"patient_id": f"P{p}", "lesion_id": None, "target": int(melanoma and i == 0)})
    for lesion in range(30):
        rows += [{"patient_id": None, "lesion_id": f"L{lesion}", "target": int(lesion % 6 == 0)}] * 2
    rows += [{"patient_id": None, "lesion_id": None, "target": int(k % 5 == 0)} for k in range(40)]
    frame = pd.DataFrame(rows)
    frame[schema.IMAGE] = [f"ISIC_{k:07d}" for k in range(len(frame))]
    return frame


@pytest.mark.parametrize("fraction", [0.2, 0.25, 1 / 3])
def test_the_test_split_keeps_groups_whole_is_stratified_and_near_its_fraction(fraction: float) -> None:
    folds = assign_folds(table(), N_FOLDS, seed=7, test_fraction=fraction)
    test = folds[schema.FOLD] == TEST_FOLD
    assert folds.groupby(schema.GROUP)[schema.FOLD].nunique().max() == 1  # no group straddles
    groups = folds[schema.GROUP].nunique()
    assert abs(folds.loc[test, schema.GROUP].nunique() / groups - fraction) < 0.05
    overall = folds["target"].mean()
    assert abs(folds.loc[test, "target"].mean() - overall) < 0.35 * overall  # stratified within tolerance
    assert set(folds.loc[~test, schema.FOLD]) == set(range(N_FOLDS))
    assert fold_problems(folds) == []
    lesion_rows = folds[folds[schema.GROUP].str.startswith("lesion:")]
    assert (
        lesion_rows.groupby(schema.GROUP)[schema.FOLD].nunique().max() == 1
    )  # lesion-grouped without patient


def test_the_split_is_seeded_and_zero_turns_it_off() -> None:
    data = table()
    a = assign_folds(data, N_FOLDS, seed=3, test_fraction=0.2)
    pd.testing.assert_frame_equal(a, assign_folds(data, N_FOLDS, seed=3, test_fraction=0.2))
    other = assign_folds(data, N_FOLDS, seed=4, test_fraction=0.2)
    assert set(a.loc[a.fold == TEST_FOLD, schema.IMAGE]) != set(
        other.loc[other.fold == TEST_FOLD, schema.IMAGE]
    )
    off = assign_folds(data, N_FOLDS, seed=3, test_fraction=0.0)
    assert TEST_FOLD not in set(off[schema.FOLD])
    pd.testing.assert_frame_equal(off, assign_folds(data, N_FOLDS, seed=3))  # 0 is the old behaviour


def test_no_test_row_is_ever_training_or_validation_and_externals_follow_their_group() -> None:
    data = table()
    data["is_external"] = False
    shared = data.loc[0, "patient_id"]
    extra = pd.DataFrame(
        {"patient_id": [shared, "X1"], "lesion_id": [None, None], "target": [0, 1], "is_external": True}
    )
    extra[schema.IMAGE] = ["EXT_1", "EXT_2"]
    folds = assign_folds(pd.concat([data, extra], ignore_index=True), N_FOLDS, seed=0, test_fraction=0.2)
    test_groups = set(folds.loc[locked_test_mask(folds), schema.GROUP])
    for k in range(N_FOLDS):
        train, valid = split_masks(folds, k)
        assert not set(folds.loc[train | valid, schema.GROUP]) & test_groups
    row = folds.set_index(schema.IMAGE).loc["EXT_1"]
    owner = folds.loc[folds["patient_id"] == shared].iloc[0][schema.FOLD]
    assert row[schema.FOLD] == owner  # the external row follows its patient, into the test split too
    assert folds.set_index(schema.IMAGE).loc["EXT_2", schema.FOLD] == EXTERNAL_FOLD
    assert not locked_test_mask(folds)[folds[schema.IMAGE].eq("EXT_1").to_numpy()].any()  # never scored
    with pytest.raises(FoldError, match="fold -2 not in the table"):
        split_masks(folds, TEST_FOLD)


def test_fold_problems_names_a_group_in_both_test_and_cv() -> None:
    folds = assign_folds(table(), N_FOLDS, seed=0, test_fraction=0.2)
    victim = folds.index[folds[schema.FOLD] == TEST_FOLD][0]
    group = folds.loc[victim, schema.GROUP]
    broken = pd.concat([folds, folds.loc[[victim]].assign(**{schema.FOLD: 0, schema.IMAGE: "DUP"})])
    problems = fold_problems(broken)
    assert any("locked test split and the CV folds" in p and group in p for p in problems), problems


def test_too_few_melanoma_groups_for_the_test_split_says_what_to_change() -> None:
    data = pd.DataFrame(
        {"patient_id": [f"P{i}" for i in range(12)], "target": [1, 1, 1] + [0] * 9, schema.IMAGE: range(12)}
    )
    with pytest.raises(FoldError, match=r"test_fraction=0.2 needs at least 5 .* set it to 0"):
        assign_folds(data, 2, seed=0, test_fraction=0.2)


def test_profiles_lock_a_test_split_except_tiny() -> None:
    assert load_config("demo").data.test_fraction == 0.2
    assert load_config("full").data.test_fraction == 0.2
    assert load_config("tiny").data.test_fraction == 0.0


def test_training_duplicates_are_excluded_and_counted_by_reason() -> None:
    test = pd.DataFrame(
        {
            schema.IMAGE: ["A", "B_downsampled", "C", "D"],
            schema.IMAGE_SHA256: ["a", "b", "same", None],
        }
    )
    training = pd.DataFrame({schema.IMAGE: ["A", "B", "Z"], schema.IMAGE_SHA256: ["x", "y", "same"]})
    kept, excluded = drop_training_duplicates(test, training)
    assert kept[schema.IMAGE].tolist() == ["D"]
    assert dict(zip(excluded[schema.IMAGE], excluded["check"], strict=True)) == {
        "A": "same_image_id",
        "B_downsampled": "same_image_id",
        "C": "same_image_content",
    }
    assert excluded["reason"].str.contains("training").all()


def test_an_external_test_source_loses_the_images_training_holds(tmp_path: Path) -> None:
    from melanoma_ml.metadata.sources import load_configured_data
    from melanoma_ml.synthetic import generate_synthetic_dataset

    made = generate_synthetic_dataset(
        tmp_path / "clinic", SyntheticConfig(n_patients=6, images_per_patient=(2, 2), image_size=32)
    )
    own = load_configured_data(load_config("tiny").data, default_source_dir=made.root).clean
    training = own.head(3).copy()
    training = pd.concat([training, own.iloc[[3]].assign(**{schema.IMAGE: "RENAMED"})])  # same pixels, new id
    entry = {"path": str(made.root), "name": "clinic-b"}
    data = load_config("tiny", {"data": {"source_dir": str(made.root), "test_sources": [entry]}}).data
    (test_set,) = load_test_sources(data, training)
    counts = test_set.counts()
    assert test_set.name == "clinic-b" and test_set.setting == "data.test_sources[0]"
    assert counts["excluded_same_id"] == 3 and counts["excluded_same_content"] == 1
    assert counts["rows_scored"] == len(own) - 4 == len(test_set.rows)
    assert not set(test_set.rows[schema.IMAGE]) & set(own.head(4)[schema.IMAGE])
    assert test_set.rows[schema.GROUP].str.startswith("patient:").all()


def test_a_missing_test_source_names_the_setting(tmp_path: Path) -> None:
    from melanoma_ml.metadata.io import MetadataFileNotFound

    data = load_config("tiny", {"data": {"test_sources": [{"path": str(tmp_path / "nowhere")}]}}).data
    with pytest.raises(MetadataFileNotFound, match=r"data.test_sources\[0\].path does not exist"):
        load_test_sources(data, pd.DataFrame({schema.IMAGE: []}))
