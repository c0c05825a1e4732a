"""Patient-grouped stratified folds: no leaks, balanced, deterministic, clear errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from melanoma_ml import schema
from melanoma_ml.folds import (
    EXTERNAL_FOLD,
    FoldError,
    assign_folds,
    fold_problems,
    fold_summary,
    group_ids,
    split_masks,
)


def make_table(n_patients: int = 60, seed: int = 0, external: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        melanoma_patient = p % 5 == 0
        for i in range(int(rng.integers(1, 5))):
            rows.append(
                {
                    schema.IMAGE: f"ISIC_{p:03d}_{i}",
                    schema.PATIENT: f"IP_{p}",
                    schema.LESION: f"IL_{p}_{i}",
                    schema.TARGET: int(melanoma_patient and i == 0),
                    schema.IS_EXTERNAL: False,
                }
            )
    for e in range(external):
        rows.append(
            {
                schema.IMAGE: f"EXT_{e}",
                schema.PATIENT: np.nan,
                schema.LESION: f"EL_{e}",
                schema.TARGET: e % 2,
                schema.IS_EXTERNAL: True,
            }
        )
    return pd.DataFrame(rows)


def test_group_ids_fall_back_per_row_with_prefixes() -> None:
    table = pd.DataFrame(
        {
            schema.IMAGE: ["a", "b", "c", "d"],
            schema.PATIENT: ["X1", np.nan, "", np.nan],
            schema.LESION: ["L1", "X1", np.nan, np.nan],
        }
    )
    assert group_ids(table).tolist() == ["patient:X1", "lesion:X1", "image:c", "image:d"]


def test_assign_folds_groups_balance_and_determinism() -> None:
    table = make_table()
    folded = assign_folds(table, n_folds=4, seed=7)
    assert len(folded) == len(table) and list(folded.columns[-2:]) == [schema.GROUP, schema.FOLD]
    assert set(folded[schema.FOLD]) == {0, 1, 2, 3}
    assert (folded.groupby(schema.GROUP)[schema.FOLD].nunique() == 1).all()
    assert fold_problems(folded) == []
    summary = fold_summary(folded)
    assert summary["images"].sum() == len(table) and (summary["melanoma"] >= 2).all()
    assert list(summary.columns) == [schema.FOLD, "images", "groups", "melanoma", "prevalence"]
    again = assign_folds(table, n_folds=4, seed=7)
    assert again[schema.FOLD].tolist() == folded[schema.FOLD].tolist()
    other = assign_folds(table, n_folds=4, seed=8)
    assert other[schema.FOLD].tolist() != folded[schema.FOLD].tolist()
    assert table.columns.tolist() == make_table().columns.tolist()  # input not modified


def test_external_rows_train_only_and_never_leak() -> None:
    table = make_table(external=6)
    # one external image of a primary patient: must follow that patient's fold
    shared = {
        schema.IMAGE: "EXT_shared",
        schema.PATIENT: "IP_3",
        schema.LESION: np.nan,
        schema.TARGET: 0,
        schema.IS_EXTERNAL: True,
    }
    table = pd.concat([table, pd.DataFrame([shared])], ignore_index=True)
    folded = assign_folds(table, n_folds=3, seed=0)
    external = folded[folded[schema.IS_EXTERNAL] & (folded[schema.IMAGE] != "EXT_shared")]
    assert (external[schema.FOLD] == EXTERNAL_FOLD).all()
    patient_fold = folded.loc[folded[schema.PATIENT] == "IP_3", schema.FOLD].unique()
    assert len(patient_fold) == 1 and patient_fold[0] >= 0
    for k in range(3):
        train, valid = split_masks(folded, k)
        assert not folded.loc[valid, schema.IS_EXTERNAL].any()
        assert folded.loc[train & folded[schema.IS_EXTERNAL], schema.IMAGE].str.startswith("EXT_").all()
        assert set(folded.loc[train, schema.GROUP]).isdisjoint(folded.loc[valid, schema.GROUP])
        assert external.index.isin(np.flatnonzero(train)).all()
    assert fold_problems(folded) == []
    with pytest.raises(FoldError, match="fold 5 not in the table"):
        split_masks(folded, 5)


@pytest.mark.parametrize(
    ("table", "n_folds", "message"),
    [
        (make_table(), 1, "at least 2"),
        (make_table(n_patients=3), 5, "only 3 patient/lesion groups"),
        (make_table(n_patients=12), 4, "only 3 groups .* with a melanoma"),
        (make_table().assign(target=np.nan), 3, "target must be 0 or 1"),
    ],
)
def test_assign_folds_errors(table: pd.DataFrame, n_folds: int, message: str) -> None:
    with pytest.raises(FoldError, match=message):
        assign_folds(table, n_folds=n_folds, seed=0)


def test_fold_problems_finds_leaks_empty_folds_and_skew() -> None:
    folded = assign_folds(make_table(), n_folds=3, seed=0)
    leaked = folded.copy()
    patient_rows = leaked.index[leaked[schema.PATIENT] == leaked[schema.PATIENT].value_counts().index[0]]
    leaked.loc[patient_rows[0], schema.FOLD] = (leaked.loc[patient_rows[0], schema.FOLD] + 1) % 3
    assert any("more than one fold" in p for p in fold_problems(leaked))

    no_melanoma = folded.copy()
    no_melanoma.loc[no_melanoma[schema.FOLD] == 0, schema.TARGET] = 0
    problems = fold_problems(no_melanoma)
    assert any("fold 0 has no melanoma" in p for p in problems)
    assert any("fold 0 melanoma rate" in p for p in problems)

    all_melanoma = folded.copy()
    all_melanoma.loc[all_melanoma[schema.FOLD] == 1, schema.TARGET] = 1
    assert any("fold 1 has no benign image" in p for p in fold_problems(all_melanoma))
    assert fold_problems(folded.drop(columns=[schema.GROUP])) == [
        "column 'group_id' missing; run assign_folds first"
    ]
    assert fold_problems(folded, prevalence_tolerance=1e-9)  # a tiny tolerance flags any deviation
