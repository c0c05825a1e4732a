"""Subgroup table (sex, age band, site) of melanoma_ml.evaluation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from melanoma_ml import schema
from melanoma_ml.config import EvaluationConfig
from melanoma_ml.evaluation.metrics import roc_auc, threshold_metrics
from melanoma_ml.evaluation.subgroups import SUBGROUP_COLUMNS, subgroup_table

CONFIG = EvaluationConfig(n_bootstrap=100, subgroup_min_cases=5)


def predictions(n_patients: int = 120, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_patients), 3)
    y = (rng.random(groups.size) < 0.25).astype(int)
    n = groups.size
    return pd.DataFrame(
        {
            "image_name": [f"ISIC_{i:05d}" for i in range(n)],
            "group_id": [f"IP_{g}" for g in groups],
            "target": y,
            "prob": 1 / (1 + np.exp(-(1.5 * y + rng.normal(size=n) - 1))),
            "fold": groups % 3,
            schema.SEX: rng.choice(np.array(["female", "male", None], dtype=object), n, p=[0.45, 0.45, 0.1]),
            schema.AGE: rng.choice([np.nan, 25, 35, 50, 65, 80], n),
            schema.SITE: rng.choice(
                np.array(["torso", "head/neck", "lower extremity", None], dtype=object), n
            ),
        }
    )


def test_table_lists_every_level_and_loses_no_row():
    oof = predictions()
    table = subgroup_table(oof, CONFIG)
    assert list(table.columns) == list(SUBGROUP_COLUMNS)
    levels = table.groupby("variable", sort=False)["level"].apply(list).to_dict()
    assert levels == {
        "sex": ["female", "male", "unknown"],
        "age": ["<30", "30-44", "45-59", "60-74", "75+", "unknown"],
        "site": [*schema.SITES, "unknown"],
    }
    assert (table.groupby("variable")["n"].sum() == len(oof)).all()
    assert (table.groupby("variable")["n_melanoma"].sum() == oof["target"].sum()).all()
    empty = table[(table["variable"] == "site") & (table["level"] == "palms/soles")].iloc[0]
    assert empty["n"] == 0 and empty["note"] == "no images" and np.isnan(empty["auc"])


def test_values_are_the_subgroup_metrics_at_the_global_threshold():
    oof = predictions()
    table = subgroup_table(oof, CONFIG, threshold=0.4)
    row = table[(table["variable"] == "sex") & (table["level"] == "female")].iloc[0]
    part = oof[oof[schema.SEX] == "female"]
    y, p = part["target"].to_numpy(), part["prob"].to_numpy()
    assert row["n"] == len(part)
    assert row["auc"] == pytest.approx(roc_auc(y, p))
    assert row["sensitivity"] == pytest.approx(threshold_metrics(y, p, 0.4)["sensitivity"])
    assert row["specificity"] == pytest.approx(threshold_metrics(y, p, 0.4)["specificity"])
    for metric in ("auc", "sensitivity", "specificity"):
        assert row[f"{metric}_lo"] <= row[metric] <= row[f"{metric}_hi"]


@pytest.mark.parametrize(
    ("age", "band"),
    [
        (0, "<30"),
        (29, "<30"),
        (30, "30-44"),
        (44, "30-44"),
        (45, "45-59"),
        (74, "60-74"),
        (75, "75+"),
        (85, "75+"),
    ],
)
def test_age_band_edges(age, band):
    oof = predictions(30)
    oof[schema.AGE] = age
    table = subgroup_table(oof, CONFIG)
    ages = table[table["variable"] == "age"].set_index("level")["n"]
    assert ages[band] == len(oof) and ages.drop(band).sum() == 0


def test_small_subgroups_get_nan_auc_with_a_note_and_odd_values_keep_their_own_level():
    oof = predictions()
    oof[schema.SEX] = "female"
    oof.loc[:3, schema.SEX] = "Other "  # 4 images: below subgroup_min_cases
    table = subgroup_table(oof, CONFIG)
    other = table[(table["variable"] == "sex") & (table["level"] == "other")].iloc[0]
    assert other["n"] == 4
    assert np.isnan(other["auc"]) and "AUC not reported" in other["note"]
    assert list(table[table["variable"] == "sex"]["level"]) == ["female", "male", "other", "unknown"]


def test_subgroup_without_melanoma_says_sensitivity_is_undefined():
    oof = predictions()
    oof[schema.SITE] = "torso"
    benign = oof.index[oof["target"] == 0][:10]
    oof.loc[benign, schema.SITE] = "palms/soles"
    row = subgroup_table(oof, CONFIG).query("level == 'palms/soles'").iloc[0]
    assert np.isnan(row["sensitivity"]) and row["specificity"] >= 0
    assert "no melanoma: sensitivity undefined" in row["note"]


def test_missing_metadata_columns_leave_their_variable_out():
    table = subgroup_table(predictions().drop(columns=[schema.SEX, schema.SITE]), CONFIG)
    assert set(table["variable"]) == {"age"}


def test_non_numeric_age_is_an_error_naming_the_row():
    oof = predictions()
    oof[schema.AGE] = oof[schema.AGE].astype(object)
    oof.loc[7, schema.AGE] = "forty"
    with pytest.raises(ValueError, match=r"age_approx is not a number in row 7 \(ISIC_00007\)"):
        subgroup_table(oof, CONFIG)
