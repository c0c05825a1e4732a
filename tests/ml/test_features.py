"""Metadata encoder: fitted on training rows, JSON round trip, unknowns flagged."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from melanoma_ml import schema
from melanoma_ml.features import MetadataEncoder


@pytest.fixture
def train_table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            schema.AGE: [30.0, 50.0, np.nan, 70.0],
            schema.SEX: ["male", "female", None, "male"],
            schema.SITE: ["torso", "head/neck", "torso", None],
        }
    )


def test_fit_learns_scaling_and_vocabulary(train_table):
    enc = MetadataEncoder.fit(train_table)
    assert enc.age_mean == pytest.approx(50.0)
    assert enc.age_std == pytest.approx(np.std([30, 50, 70]))
    assert enc.sexes == ("female", "male")
    assert enc.sites == ("head/neck", "torso")
    assert enc.n_features == 2 + 3 + 3


def test_encoding_has_explicit_missing_flags(train_table):
    enc = MetadataEncoder.fit(train_table)
    vec = enc.encode_one(age=None, sex=None, site=None)
    names = enc.feature_names
    assert vec[names.index("age_missing")] == 1
    assert vec[names.index("sex_missing")] == 1
    assert vec[names.index("site_missing")] == 1
    assert vec[names.index("age_z")] == 0


@pytest.mark.parametrize("bad_age", ["abc", float("nan"), "", float("inf")])
def test_unparseable_age_counts_as_missing(train_table, bad_age):
    enc = MetadataEncoder.fit(train_table)
    vec = enc.encode_one(age=bad_age, sex="male", site="torso")
    assert vec[enc.feature_names.index("age_missing")] == 1


def test_category_unseen_in_training_is_missing_not_an_error(train_table):
    enc = MetadataEncoder.fit(train_table)
    vec = enc.encode_one(age=40, sex="female", site="palms/soles")
    assert vec[enc.feature_names.index("site_missing")] == 1
    assert vec[enc.feature_names.index("sex=female")] == 1


def test_transform_matches_encode_one(train_table):
    enc = MetadataEncoder.fit(train_table)
    matrix = enc.transform(train_table)
    assert matrix.shape == (4, enc.n_features)
    assert matrix.dtype == np.float32
    np.testing.assert_array_equal(matrix[1], enc.encode_one(50.0, "female", "head/neck"))


def test_json_round_trip_encodes_identically(train_table):
    enc = MetadataEncoder.fit(train_table)
    again = MetadataEncoder.from_dict(json.loads(json.dumps(enc.to_dict())))
    assert again == enc
    np.testing.assert_array_equal(again.transform(train_table), enc.transform(train_table))


def test_from_dict_names_the_missing_field():
    with pytest.raises(ValueError, match="age_mean"):
        MetadataEncoder.from_dict({"age_std": 1, "sexes": [], "sites": []})
