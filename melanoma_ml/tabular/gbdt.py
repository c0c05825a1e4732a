"""A gradient-boosted baseline on the tabular features alone, trained on the image models' folds.

For every validation fold, one scikit-learn ``HistGradientBoostingClassifier`` learns from the fold's
training rows (``training.train.split_fold``: the same rows an image model of that fold trains on) and
predicts its validation rows. The out-of-fold table has the image models' ``OOF_COLUMNS`` with
``backbone = GBDT_NAME``, so ``evaluate_predictions``, the leaderboard and ``blend.rank_blend`` read it as
they read an image model's.

Inputs: ``model.tabular_features`` as numbers (missing and non-finite values stay NaN: the trees learn
where missing rows go), age as a number, and sex and site as categories whose codes come from the training
fold (a category unseen there is missing). Why HistGradientBoosting and not LightGBM: on a synthetic
ISIC-2024-like table both reached the same AUC and pAUC within noise at the same settings and fitted in
about the same time, which does not pay for a new dependency (numbers: README, ISIC 2024 table, printed by
``benchmarks/tabular_gbdt.py``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingClassifier

from melanoma_ml import schema
from melanoma_ml.config import PipelineConfig, TabularBaselineConfig
from melanoma_ml.errors import InputValueError
from melanoma_ml.features import numeric_column  # the encoder's rule for a number vs missing
from melanoma_ml.missing import text_keys
from melanoma_ml.training.train import BACKBONE, OOF_COLUMNS, PROB, split_fold

GBDT_NAME = "gbdt_tabular"
"""The ``backbone`` value of the baseline's out-of-fold rows (its leaderboard name)."""

CATEGORICAL = (schema.SEX, schema.SITE)


@dataclass(frozen=True)
class GBDTResult:
    """Out-of-fold predictions of the baseline and what it cost.

    Attributes:
        oof: ``OOF_COLUMNS`` rows, one per validation image of every fold, ``backbone == GBDT_NAME``.
        features: The model's input columns, in order.
        fit_seconds: Fit wall time per fold, ``{fold: seconds}``.
    """

    oof: pd.DataFrame
    features: tuple[str, ...]
    fit_seconds: dict[int, float]


def feature_frame(
    table: pd.DataFrame, tabular: Sequence[str], categories: dict[str, list[str]]
) -> pd.DataFrame:
    """The model's inputs: tabular columns and age as float64 (NaN = missing), then sex and site as the
    codes of ``categories`` (NaN for missing or unseen).

    Raises:
        InputValueError: a tabular column the table lacks.
    """
    absent = [c for c in tabular if c not in table.columns]
    if absent:
        raise InputValueError(
            f"model.tabular_features names columns {absent} that the table does not have; use a dataset "
            "with them (e.g. the isic2024 layout) or remove them from model.tabular_features"
        )
    out = pd.DataFrame(index=table.index)
    for column in (*tabular, schema.AGE):
        out[column] = numeric_column(table[column], column)
    for column in CATEGORICAL:
        codes = pd.Categorical(text_keys(table[column]), categories=categories[column]).codes
        out[column] = np.where(codes < 0, np.nan, codes).astype("float64")
    return out


def gbdt_model(
    params: TabularBaselineConfig, categorical: np.ndarray | None = None
) -> HistGradientBoostingClassifier:
    """The tabular baseline's classifier for ``params`` (``categorical``: a boolean mask of category
    columns, None for all numeric). ``benchmarks/tabular_gbdt.py`` times this same model."""
    return HistGradientBoostingClassifier(
        learning_rate=params.learning_rate,
        max_iter=params.max_iter,
        max_leaf_nodes=params.max_leaf_nodes,
        min_samples_leaf=params.min_samples_leaf,
        l2_regularization=params.l2_regularization,
        categorical_features=categorical,
        early_stopping=False,  # a fixed number of rounds: no inner split of an already small positive class
        random_state=params.seed,
    )


def validation_folds(table: pd.DataFrame) -> list[int]:
    """The fold numbers that have validation rows (primary rows with fold >= 0), sorted."""
    primary = ~table.get(schema.IS_EXTERNAL, pd.Series(False, index=table.index)).fillna(False).astype(bool)
    folds = pd.to_numeric(table.loc[primary, schema.FOLD], errors="coerce").dropna()
    return sorted(int(f) for f in folds.unique() if f >= 0)


def train_gbdt_folds(
    config: PipelineConfig, table: pd.DataFrame, folds: Sequence[int] | None = None
) -> GBDTResult:
    """Train the baseline on every fold (or ``folds``) of a cleaned, folded table; returns its OOF rows.

    Args:
        config: ``model.tabular_features`` picks the columns; ``tabular_baseline`` the boosting settings.
        table: The folds table (``training.train.REQUIRED_COLUMNS`` plus the tabular columns).
        folds: Validation folds to run; None runs every fold.

    Raises:
        InputValueError: a fold that cannot be trained (``split_fold``) or a tabular column the table lacks.
    """
    tabular = list(config.model.tabular_features)
    parts, seconds = [], {}
    for fold in validation_folds(table) if folds is None else [int(f) for f in folds]:
        train, val = split_fold(table, fold)
        categories = {c: sorted(set(text_keys(train[c]).dropna())) for c in CATEGORICAL}
        x_train = feature_frame(train, tabular, categories)
        categorical = np.zeros(x_train.shape[1], dtype=bool)
        categorical[-len(CATEGORICAL) :] = True
        model = gbdt_model(config.tabular_baseline, categorical)
        started = time.perf_counter()
        model.fit(x_train.to_numpy(), train[schema.TARGET].astype(int).to_numpy())
        seconds[fold] = time.perf_counter() - started
        oof = val[[c for c in OOF_COLUMNS if c in val.columns]].reset_index(drop=True).copy()
        oof[PROB] = model.predict_proba(feature_frame(val, tabular, categories).to_numpy())[:, 1]
        oof[BACKBONE] = GBDT_NAME
        parts.append(oof[list(OOF_COLUMNS)])
    if not parts:
        raise InputValueError("the table has no validation folds; run assign_folds first")
    features = (*tabular, schema.AGE, *CATEGORICAL)
    return GBDTResult(oof=pd.concat(parts, ignore_index=True), features=features, fit_seconds=seconds)
