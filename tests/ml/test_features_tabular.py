"""Tabular features in the metadata encoder: the config presets, the fold-fitted scaling, the missing rule,
and the JSON round trip through the model spec (old specs without them read unchanged)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from melanoma_ml import schema
from melanoma_ml.config import TABULAR_PRESETS, ModelConfig, load_config, tabular_columns
from melanoma_ml.errors import MelanomaInputError
from melanoma_ml.features import TABULAR_CLIP, MetadataEncoder, metadata_dict
from melanoma_ml.spec import ModelSpec

COLUMNS = ("tbp_lv_areaMM2", "tbp_lv_deltaLB")


@pytest.fixture
def table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            schema.AGE: [30.0, 50.0, np.nan, 70.0, 40.0],
            schema.SEX: ["male", "female", None, "male", "female"],
            schema.SITE: ["torso", "head/neck", "torso", None, "torso"],
            # median 2.5, IQR 3.25 - 1.75 = 1.5; the last one missing
            "tbp_lv_areaMM2": [1.0, 2.0, 3.0, 4.0, np.nan],
            # constant: IQR 0 and std 0 -> scale 1; "unknown" is a missing token
            "tbp_lv_deltaLB": [5.0, 5.0, np.inf, "unknown", 5.0],
        }
    )


# ---- config --------------------------------------------------------------------------------------------


def test_the_isic2024_preset_is_the_numeric_tbp_columns_plus_the_long_diameter():
    preset = TABULAR_PRESETS["isic2024_tbp"]
    assert preset[0] == "clin_size_long_diam_mm" and len(preset) == len(set(preset)) == 34
    assert all(c.startswith("tbp_lv_") for c in preset[1:])
    assert not {"tbp_lv_location", "tbp_lv_location_simple", "tbp_tile_type"} & set(preset)  # categorical


def test_a_preset_name_resolves_to_its_columns_and_the_default_is_none(monkeypatch):
    assert ModelConfig().tabular_features == []
    assert ModelConfig(tabular_features="isic2024_tbp").tabular_features == list(
        TABULAR_PRESETS["isic2024_tbp"]
    )
    assert tabular_columns(None) == [] and tabular_columns(["b", "a"]) == ["b", "a"]
    monkeypatch.setenv("MELANOMA_MODEL__TABULAR_FEATURES", "isic2024_tbp")
    assert load_config("tiny").model.tabular_features == list(TABULAR_PRESETS["isic2024_tbp"])


@pytest.mark.parametrize(
    "value,match", [("isic2099", "unknown tabular feature preset"), (["a", "a"], "once")]
)
def test_bad_tabular_settings_say_what_to_use(value, match):
    with pytest.raises(ValidationError, match=match):
        ModelConfig(tabular_features=value)


# ---- fit / transform -----------------------------------------------------------------------------------


def test_without_tabular_columns_the_encoding_is_unchanged(table):
    enc = MetadataEncoder.fit(table)
    assert enc.tabular == () and enc.n_features == 2 + 3 + 3
    assert "tabular" not in enc.to_dict()
    assert MetadataEncoder.fit(table, tabular=[]) == enc


def test_fit_learns_median_and_iqr_of_the_training_rows(table):
    enc = MetadataEncoder.fit(table, tabular=COLUMNS)
    assert enc.tabular == COLUMNS
    assert enc.tabular_median == (pytest.approx(2.5), pytest.approx(5.0))
    assert enc.tabular_scale == (pytest.approx(1.5), 1.0)  # IQR of 1..4; constant column falls back to 1
    assert enc.feature_names[-4:] == [*COLUMNS, "tbp_lv_areaMM2_missing", "tbp_lv_deltaLB_missing"]
    assert enc.n_features == 8 + 4


def test_transform_standardises_and_flags_missing_with_the_fold_median(table):
    enc = MetadataEncoder.fit(table, tabular=COLUMNS)
    block = enc.transform(table)[:, -4:]
    np.testing.assert_allclose(block[:, 0], [-1.0, -1 / 3, 1 / 3, 1.0, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(block[:, 2], [0, 0, 0, 0, 1])
    np.testing.assert_array_equal(block[:, 1], [0, 0, 0, 0, 0])  # recorded 5s and the median fill
    np.testing.assert_array_equal(block[:, 3], [0, 0, 1, 1, 0])  # inf and "unknown" are missing


def test_a_table_without_stats_for_a_column_encodes_every_value_as_missing():
    empty = pd.DataFrame({schema.AGE: [1.0], schema.SEX: ["male"], schema.SITE: ["torso"], "x": [np.nan]})
    enc = MetadataEncoder.fit(empty, tabular=["x"])
    assert (enc.tabular_median, enc.tabular_scale) == ((0.0,), (1.0,))
    np.testing.assert_array_equal(enc.transform(empty)[0, -2:], [0.0, 1.0])


def test_extreme_values_are_clipped(table):
    enc = MetadataEncoder.fit(table, tabular=COLUMNS)
    vec = enc.encode_one(40, "male", "torso", {"tbp_lv_areaMM2": 1e9, "tbp_lv_deltaLB": -1e9})
    assert vec[enc.feature_names.index("tbp_lv_areaMM2")] == TABULAR_CLIP
    assert vec[enc.feature_names.index("tbp_lv_deltaLB")] == -TABULAR_CLIP


def test_encode_one_matches_transform_row_by_row(table):
    enc = MetadataEncoder.fit(table, tabular=COLUMNS)
    matrix = enc.transform(table)
    for i, row in enumerate(table.itertuples(index=False)):
        one = enc.encode_one(**{k: v for k, v in metadata_dict(row, enc.tabular).items()})
        np.testing.assert_array_equal(one, matrix[i])


def test_encode_one_with_tabular_left_out_is_all_missing(table):
    enc = MetadataEncoder.fit(table, tabular=COLUMNS)
    for given in (None, {}, {"tbp_lv_areaMM2": None, "tbp_lv_deltaLB": ""}):
        vec = enc.encode_one(40, "male", "torso", given)
        np.testing.assert_array_equal(vec[-4:], [0, 0, 1, 1])


@pytest.mark.parametrize(
    "given,match",
    [
        ({"tbp_lv_area": 1.0}, "unknown tabular features"),
        ({"tbp_lv_areaMM2": "big"}, "not a number"),
    ],
)
def test_encode_one_refuses_unknown_columns_and_text(table, given, match):
    enc = MetadataEncoder.fit(table, tabular=COLUMNS)
    with pytest.raises(MelanomaInputError, match=match):
        enc.encode_one(40, "male", "torso", given)


def test_tabular_values_for_an_encoder_without_them_are_refused(table):
    with pytest.raises(MelanomaInputError, match="trained without"):
        MetadataEncoder.fit(table).encode_one(40, "male", "torso", {"tbp_lv_areaMM2": 1.0})


def test_fit_names_absent_columns_and_text_values(table):
    with pytest.raises(MelanomaInputError, match=r"\['tbp_lv_x'\].*model.tabular_features"):
        MetadataEncoder.fit(table, tabular=["tbp_lv_areaMM2", "tbp_lv_x"])
    bad = table.assign(tbp_lv_areaMM2=["1", "2", "large", "4", None])
    with pytest.raises(MelanomaInputError, match=r"'tbp_lv_areaMM2' row 2 holds 'large'"):
        MetadataEncoder.fit(bad, tabular=COLUMNS)
    enc = MetadataEncoder.fit(table, tabular=COLUMNS)
    with pytest.raises(MelanomaInputError, match="lacks the tabular columns"):
        enc.transform(table.drop(columns=["tbp_lv_deltaLB"]))


# ---- serialisation -------------------------------------------------------------------------------------


def test_json_round_trip_with_tabular_encodes_identically(table):
    enc = MetadataEncoder.fit(table, tabular=COLUMNS)
    again = MetadataEncoder.from_dict(json.loads(json.dumps(enc.to_dict())))
    assert again == enc
    np.testing.assert_array_equal(again.transform(table), enc.transform(table))


def test_a_spec_round_trip_keeps_the_tabular_columns_in_the_encoder_and_the_network(table):
    enc = MetadataEncoder.fit(table, tabular=COLUMNS)
    config = ModelConfig(
        backbone="test_efficientnet", pretrained=False, meta_hidden=[8], tabular_features=COLUMNS
    )
    spec = ModelSpec(config, 32, [0.5] * 3, [0.25] * 3, enc)
    stored = json.loads(json.dumps(spec.to_dict()))
    assert "tabular_features" not in stored  # one record of the columns: the encoder's
    again = ModelSpec.from_dict(stored)
    assert again.encoder == enc and again.network.tabular_features == list(COLUMNS)
    assert again == spec
    net = again.build_network()
    assert net.n_meta_features == enc.n_features == 12
