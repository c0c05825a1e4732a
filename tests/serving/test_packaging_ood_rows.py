"""What the served model's out-of-distribution detector is fitted on: every image its member trained on,
external training sources included, never the locked test split (``packaging.ood_fit_rows``)."""

from __future__ import annotations

import pandas as pd
import pytest

from melanoma_ml import schema
from melanoma_ml.folds import EXTERNAL_FOLD, TEST_FOLD, assign_folds
from melanoma_ml.serving.packaging import ood_fit_rows


def test_a_constructed_folds_table_gives_the_known_training_rows() -> None:
    rows = [  # (image, fold, is_external, trained on by the fold-1 model)
        ("p_fold0", 0, False, True),
        ("p_fold1", 1, False, False),  # its own validation fold
        ("p_fold2", 2, False, True),
        ("ext_alone", EXTERNAL_FOLD, True, True),  # a clinic added through data.external_sources
        ("ext_with_fold0", 0, True, True),  # shares a patient with fold 0: trained on when 1 is validated
        ("ext_with_fold1", 1, True, False),  # shares a patient with fold 1: held out with it
        ("p_test", TEST_FOLD, False, False),  # the locked test split
        ("ext_with_test", TEST_FOLD, True, False),  # shares a patient with the test split
    ]
    table = pd.DataFrame(
        {
            schema.IMAGE: [r[0] for r in rows],
            schema.FOLD: [r[1] for r in rows],
            schema.IS_EXTERNAL: [r[2] for r in rows],
        }
    )
    fitted = ood_fit_rows(table, 1)
    assert sorted(fitted[schema.IMAGE]) == sorted(r[0] for r in rows if r[3])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_assigned_folds_with_external_rows_include_them_and_never_the_test_split(seed: int) -> None:
    n_primary, n_external = 60, 20
    table = pd.DataFrame(
        {
            schema.IMAGE: [f"img{i}" for i in range(n_primary + n_external)],
            schema.PATIENT: [f"P{i // 2}" for i in range(n_primary)] + [f"X{i}" for i in range(n_external)],
            schema.TARGET: [int(i % 5 == 0) for i in range(n_primary + n_external)],
            schema.IS_EXTERNAL: [False] * n_primary + [True] * n_external,
        }
    )
    folds = assign_folds(table, n_folds=3, seed=seed, test_fraction=0.2)
    external_alone = set(folds.loc[folds[schema.FOLD] == EXTERNAL_FOLD, schema.IMAGE])
    assert external_alone == {f"img{i}" for i in range(n_primary, n_primary + n_external)}
    test = set(folds.loc[folds[schema.FOLD] == TEST_FOLD, schema.IMAGE])
    assert test, "the locked test split is not empty"
    for fold in range(3):
        fitted = set(ood_fit_rows(folds, fold)[schema.IMAGE])
        assert external_alone <= fitted  # the external training images are in distribution
        assert not fitted & test
        own = set(folds.loc[folds[schema.FOLD] == fold, schema.IMAGE])
        assert not fitted & own
        assert fitted | own | test == set(folds[schema.IMAGE])
