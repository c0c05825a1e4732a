"""The one "missing" rule, and every layer that reads metadata asking it (cleaning, encoder, request)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from melanoma_ml import schema
from melanoma_ml.ages import normalize_age
from melanoma_ml.features import MetadataEncoder, metadata_dict
from melanoma_ml.metadata.vocabulary import normalized
from melanoma_ml.missing import MISSING_TOKENS, is_missing, text_key, text_keys
from melanoma_ml.serving.request_fields import (
    UNKNOWN,
    parse_age,
    parse_category,
)

MISSING = [None, np.nan, np.float32("nan"), pd.NA, pd.NaT, "", "   ", "unknown", " Unknown ", "N/A", "nan",
           "None", "null", "-", "?", "not provided"]  # fmt: skip
RECORDED = [("male", "male"), (" Female ", "female"), ("HEAD/NECK", "head/neck"), (0, "0"), (45.0, "45.0"),
            ("0", "0"), ("unknownish", "unknownish"), (np.int64(3), "3")]  # fmt: skip


@pytest.mark.parametrize("value", MISSING)
def test_missing_values(value):
    assert is_missing(value)
    assert text_key(value) is None


@pytest.mark.parametrize(("value", "key"), RECORDED)
def test_recorded_values_and_their_key(value, key):
    assert not is_missing(value)
    assert text_key(value) == key


def test_a_list_is_a_recorded_value_not_an_array_of_answers():
    assert not is_missing([45])


def test_the_column_rule_is_the_scalar_rule_value_by_value():
    values = pd.Series([*MISSING, *(v for v, _ in RECORDED), "male", None], dtype=object, index=range(5, 31))
    keys = text_keys(values)
    assert list(keys.index) == list(values.index)
    assert [None if pd.isna(k) else k for k in keys] == [text_key(v) for v in values]
    assert keys.isna().tolist() == [is_missing(v) for v in values]


def test_column_rule_on_typed_and_empty_columns():
    ages = text_keys(pd.Series([45.0, np.nan, 0.0]))
    assert ages.tolist()[0] == "45.0" and pd.isna(ages[1]) and ages[2] == "0.0"
    strings = text_keys(pd.Series(["Male", pd.NA, " "], dtype="string"))
    assert strings[0] == "male" and strings[1:].isna().all()
    assert text_keys(pd.Series([], dtype=object)).empty


def test_cleaning_uses_the_rule():
    assert normalized(pd.Series(["N/A", " Torso ", None])).tolist()[1] == "torso"
    assert normalized(pd.Series(["N/A", " Torso ", None])).isna().tolist() == [True, False, True]


def test_the_app_placeholder_is_missing():
    assert UNKNOWN in MISSING_TOKENS and is_missing(UNKNOWN)


@pytest.mark.parametrize("value", MISSING)
def test_train_and_serve_read_the_same_values_as_missing(value):
    """Encoder (training), cleaned row -> request (gallery, checks) and a typed request (app) agree."""
    table = pd.DataFrame(
        {schema.AGE: [40.0, value], schema.SEX: ["male", value], schema.SITE: ["torso", value]}
    )
    encoder = MetadataEncoder.fit(table)
    assert (encoder.age_mean, encoder.sexes, encoder.sites) == (40.0, ("male",), ("torso",))
    row = SimpleNamespace(age_approx=value, sex=value, anatom_site_general_challenge=value)
    assert metadata_dict(row) == {"age": None, "sex": None, "site": None}
    assert parse_age(value, 0, 120) is None
    assert parse_category(value, encoder.sites, "site") is None
    assert normalize_age(value) == (None, None)
    names = encoder.feature_names
    vec = encoder.encode_one(value, value, value)
    assert [vec[names.index(f)] for f in ("age_missing", "sex_missing", "site_missing")] == [1, 1, 1]
    np.testing.assert_array_equal(encoder.transform(table)[1], vec)


def test_a_cleaned_row_and_a_typed_request_encode_identically():
    encoder = MetadataEncoder(age_mean=50.0, age_std=10.0, sexes=("female", "male"), sites=("torso",))
    row = SimpleNamespace(age_approx=55.0, sex="male", anatom_site_general_challenge="torso")
    typed = {"age": parse_age(" 55 ", 0, 120), "sex": parse_category(" Male", encoder.sexes, "sex"),
             "site": parse_category("TORSO", encoder.sites, "site")}  # fmt: skip
    assert metadata_dict(row) == typed
    np.testing.assert_array_equal(encoder.encode_one(**metadata_dict(row)), encoder.encode_one(**typed))
