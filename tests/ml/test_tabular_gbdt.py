"""The tabular GBDT baseline (same folds, OOF shape the evaluation reads) and the rank blend."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from melanoma_ml import schema
from melanoma_ml.config import load_config
from melanoma_ml.errors import MelanomaInputError
from melanoma_ml.evaluation.blend import BLEND_NAME, rank_blend
from melanoma_ml.evaluation.report import evaluate_predictions
from melanoma_ml.folds import EXTERNAL_FOLD
from melanoma_ml.tabular.gbdt import GBDT_NAME, feature_frame, train_gbdt_folds, validation_folds
from melanoma_ml.training.train import OOF_COLUMNS, split_fold

TABULAR = ["tbp_lv_areaMM2", "tbp_lv_deltaLB", "tbp_lv_noise"]


def _table(n_patients: int = 300, seed: int = 0) -> pd.DataFrame:
    """A folds table like ISIC 2024's: many images per patient, ~3% melanoma, one informative tabular
    column with gaps, one weak, one noise; three folds and two external training-only rows."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        for _ in range(4):
            target = int(rng.random() < 0.03)
            rows.append(
                {
                    schema.IMAGE: f"ISIC_{len(rows):06d}",
                    schema.PATIENT: f"P{p:04d}",
                    schema.FOLD: p % 3,
                    schema.TARGET: target,
                    schema.AGE: float(rng.integers(20, 85)),
                    schema.SEX: ("male", "female", None)[p % 3],
                    schema.SITE: ("torso", "head/neck", "lower extremity")[len(rows) % 3],
                    "tbp_lv_areaMM2": np.nan if rng.random() < 0.1 else rng.normal(9 if target else 3, 2),
                    "tbp_lv_deltaLB": rng.normal(1 if target else 0, 1),
                    "tbp_lv_noise": rng.normal(),
                }
            )
    table = pd.DataFrame(rows)
    table[schema.IS_EXTERNAL] = False
    external = table.head(2).assign(
        **{schema.IMAGE: ["EXT_0", "EXT_1"], schema.PATIENT: ["X0", "X1"], schema.FOLD: EXTERNAL_FOLD,
           schema.IS_EXTERNAL: True, schema.TARGET: 1}
    )  # fmt: skip
    table = pd.concat([table, external], ignore_index=True)
    table[schema.GROUP] = table[schema.PATIENT]
    return table


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return _table()


@pytest.fixture(scope="module")
def result(table):
    config = load_config(
        "tiny", {"model": {"tabular_features": TABULAR}, "tabular_baseline": {"max_iter": 40}}
    )
    return train_gbdt_folds(config, table)


def test_oof_has_the_image_models_shape_and_rows(table, result):
    oof = result.oof
    assert list(oof.columns) == list(OOF_COLUMNS)
    assert (oof["backbone"] == GBDT_NAME).all() and oof["prob"].between(0, 1).all()
    expected = pd.concat([split_fold(table, f)[1] for f in (0, 1, 2)])
    assert sorted(oof[schema.IMAGE]) == sorted(expected[schema.IMAGE])  # external rows never validated
    assert validation_folds(table) == [0, 1, 2] and set(result.fit_seconds) == {0, 1, 2}
    assert result.features == (*TABULAR, schema.AGE, schema.SEX, schema.SITE)


def test_the_baseline_learns_from_the_tabular_columns_and_the_evaluation_reads_it(table, result):
    assert roc_auc_score(result.oof[schema.TARGET], result.oof["prob"]) > 0.85
    report = evaluate_predictions(result.oof, load_config("tiny").evaluation)
    assert report.name == GBDT_NAME and report.n_images == len(result.oof)
    assert 0.85 < report.metric("auc").value <= 1.0 and report.metric("pauc").value > 0


def test_without_tabular_features_it_uses_age_sex_and_site_only(table):
    result = train_gbdt_folds(load_config("tiny", {"tabular_baseline": {"max_iter": 5}}), table, folds=[1])
    assert result.features == (schema.AGE, schema.SEX, schema.SITE)
    assert set(result.oof[schema.FOLD]) == {1}


def test_features_use_the_training_folds_categories_and_keep_missing_as_nan(table):
    frame = feature_frame(table.head(4), ["tbp_lv_areaMM2"], {schema.SEX: ["male"], schema.SITE: ["torso"]})
    assert list(frame.columns) == ["tbp_lv_areaMM2", schema.AGE, schema.SEX, schema.SITE]
    assert frame[schema.SEX].tolist()[:2] == [0.0, 0.0] and np.isnan(frame[schema.SITE].iloc[1])
    with pytest.raises(MelanomaInputError, match=r"\['tbp_lv_x'\]"):
        feature_frame(table, ["tbp_lv_x"], {schema.SEX: [], schema.SITE: []})


def test_same_seed_same_predictions(table):
    config = load_config(
        "tiny", {"model": {"tabular_features": TABULAR}, "tabular_baseline": {"max_iter": 20}}
    )
    a = train_gbdt_folds(config, table, folds=[0]).oof
    b = train_gbdt_folds(config, table, folds=[0]).oof
    pd.testing.assert_frame_equal(a, b)


# ---- rank blend ----------------------------------------------------------------------------------------


def _image_oof(gbdt_oof: pd.DataFrame, seed: int = 1) -> pd.DataFrame:
    """A weak "image model" over the same rows, in another order and on another probability scale."""
    rng = np.random.default_rng(seed)
    oof = gbdt_oof.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    oof["prob"] = 1 / (1 + np.exp(-(2.0 * oof[schema.TARGET] + rng.normal(0, 1.2, len(oof)) - 6)))
    oof["backbone"] = "test_efficientnet"
    return oof


def test_rank_blend_averages_percentile_ranks_per_image():
    a = pd.DataFrame(
        {schema.IMAGE: ["a", "b", "c", "d"], schema.TARGET: [0, 1, 0, 1], "prob": [0.1, 0.9, 0.2, 0.3]}
    )
    b = pd.DataFrame(
        {schema.IMAGE: ["d", "c", "b", "a"], schema.TARGET: [1, 0, 1, 0], "prob": [1e-4, 2e-4, 3e-4, 4e-4]}
    )
    for frame in (a, b):
        frame[schema.GROUP] = frame[schema.IMAGE]
        frame["backbone"] = "m"
    blended = rank_blend([a, b])
    # percentile ranks in a, then b: a 1/4, 4/4; b 4/4, 3/4; c 2/4, 2/4; d 3/4, 1/4
    np.testing.assert_allclose(blended["prob"], [0.625, 0.875, 0.5, 0.5])
    assert (
        blended[schema.IMAGE].tolist() == ["a", "b", "c", "d"] and (blended["backbone"] == BLEND_NAME).all()
    )
    np.testing.assert_allclose(rank_blend([a, b], weights=[1, 0])["prob"], [0.25, 1.0, 0.5, 0.75])


def test_blend_of_image_and_gbdt_oof_is_evaluated_on_the_oof_rows(result):
    image = _image_oof(result.oof)
    blended = rank_blend([image, result.oof])
    assert len(blended) == len(result.oof) and list(blended.columns) == list(OOF_COLUMNS)
    auc = {
        name: roc_auc_score(frame[schema.TARGET], frame["prob"])
        for name, frame in {"image": image, "gbdt": result.oof, "blend": blended}.items()
    }
    assert auc["blend"] > auc["image"]  # the tabular model adds what the weak image model misses
    report = evaluate_predictions(blended, load_config("tiny").evaluation)
    assert report.name == BLEND_NAME and report.metric("auc").value == pytest.approx(auc["blend"])


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda o: o.iloc[1:], "not the same images"),
        (lambda o: o.assign(target=1 - o["target"]), "targets"),
    ],
)
def test_blend_refuses_tables_over_other_rows(result, change, match):
    with pytest.raises(MelanomaInputError, match=match):
        rank_blend([result.oof, change(result.oof.copy())])


def test_blend_needs_two_tables_and_sane_weights(result):
    with pytest.raises(MelanomaInputError, match="at least two"):
        rank_blend([result.oof])
    with pytest.raises(MelanomaInputError, match="weights"):
        rank_blend([result.oof, result.oof], weights=[1, -1])
