"""Patient-grouped, melanoma-stratified cross-validation folds.

Group of a row: its ``patient_id``, else its ``lesion_id``, else its ``image_name``, decided per row and
prefixed (``patient:``, ``lesion:``, ``image:``) so that a lesion id can never collide with a patient id.
All images of a group land in the same fold, so no patient (or lesion) is in training and validation
at once.

Folds are assigned with sklearn's ``StratifiedGroupKFold`` (shuffled, seeded) over the primary rows.
External rows (``is_external`` True, e.g. ISIC 2019 added to ISIC 2020) are never validated on, so every
validation score is measured on the primary dataset only:

* an external row whose group has no primary row gets ``fold = -1`` (training data of every fold);
* an external row sharing its group with primary rows gets that group's fold, so that it is left out
  of training whenever its patient/lesion is validated on (no leak), and still never validated on.

A locked test split (``test_fraction`` > 0) is carved out of the primary groups BEFORE the folds are made:
those rows get ``fold = TEST_FOLD`` (-2) and are never trained on, validated on, tuned on or ranked on;
external rows sharing a group with them get -2 too (kept out of training, never scored). It is one split
of ``StratifiedGroupKFold(n_splits=round(1 / test_fraction))``: like the folds, it keeps groups whole AND
the melanoma rate close to the overall one (``GroupShuffleSplit`` keeps groups whole but ignores labels,
so with ~2% melanoma a small test split can easily miss most of them). The fraction is therefore rounded
to ``1/n`` (0.2 -> 1/5, 0.3 -> 1/3).

Use ``split_masks(table, k)``: training = ``fold != k`` minus the test split, validation = ``fold == k``
and not external; ``locked_test_mask(table)``: the primary rows of the test split.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from melanoma_ml import schema
from melanoma_ml.config import DataConfig
from melanoma_ml.errors import InputValueError

EXTERNAL_FOLD = -1
"""``fold`` value of external rows: always training, never validation."""

TEST_FOLD = -2
"""``fold`` value of the locked test split: never training, validation, tuning or ranking."""


class FoldError(InputValueError):
    """The table cannot be split into the requested folds; the message says why and what to change."""


def group_ids(table: pd.DataFrame) -> pd.Series:
    """``patient:<id>``, else ``lesion:<id>``, else ``image:<name>`` per row."""
    patient = _present(table, schema.PATIENT)
    lesion = _present(table, schema.LESION)
    image = "image:" + table[schema.IMAGE].astype("str")
    groups = ("lesion:" + lesion).where(lesion.notna(), image)
    return ("patient:" + patient).where(patient.notna(), groups).astype("str")


def n_test_splits(test_fraction: float) -> int:
    """``round(1 / test_fraction)``: the ``StratifiedGroupKFold`` splits one of which is the test split."""
    if not 0 < test_fraction <= 0.5:
        raise FoldError(f"data.test_fraction must be in (0, 0.5] to lock a test split, got {test_fraction}")
    return max(2, round(1 / test_fraction))


def assign_folds(table: pd.DataFrame, n_folds: int, seed: int, test_fraction: float = 0.0) -> pd.DataFrame:
    """A copy of ``table`` with ``group_id`` and ``fold`` (0..n_folds-1; ``EXTERNAL_FOLD`` for external rows,
    ``TEST_FOLD`` for the locked test split when ``test_fraction`` > 0).

    Deterministic for a given table, ``n_folds``, ``seed`` and ``test_fraction``.

    Raises:
        FoldError: ``n_folds`` < 2, missing/invalid targets, fewer primary groups than folds, or fewer
            groups with a melanoma than folds (counted after the test split is set aside).
    """
    if n_folds < 2:
        raise FoldError(f"n_folds must be at least 2 (got {n_folds}); set data.n_folds")
    target = pd.to_numeric(table[schema.TARGET], errors="coerce")
    if target.isna().any() or not target.isin([0, 1]).all():
        bad = table.loc[target.isna() | ~target.isin([0, 1]), schema.IMAGE].head(5).tolist()
        raise FoldError(f"target must be 0 or 1 on every row before assigning folds; bad rows e.g. {bad}")
    out = table.copy()
    out[schema.GROUP] = group_ids(out)
    external = _external(out)
    folds = np.full(len(out), EXTERNAL_FOLD, dtype=np.int64)
    if test_fraction > 0:
        test = _lock_test_split(out[schema.GROUP], target, external, test_fraction, seed)
        folds[test] = TEST_FOLD
    internal = ~external & (folds != TEST_FOLD)
    groups = out.loc[internal, schema.GROUP]
    y = target[internal].astype("int64")
    n_groups = groups.nunique()
    positive_groups = groups[y == 1].nunique()
    if n_groups < n_folds:
        raise FoldError(
            f"only {n_groups} patient/lesion groups for {n_folds} folds; lower data.n_folds to at most "
            f"{n_groups} or add data"
        )
    if positive_groups < n_folds:
        raise FoldError(
            f"only {positive_groups} groups (patients/lesions) with a melanoma for {n_folds} folds, so some "
            f"validation fold would have none; lower data.n_folds to at most {max(positive_groups, 2)} or add "
            "melanoma cases"
        )
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    internal_positions = np.flatnonzero(internal.to_numpy())
    for fold, (_, valid) in enumerate(splitter.split(np.zeros(len(y)), y.to_numpy(), groups.to_numpy())):
        folds[internal_positions[valid]] = fold
    primary = np.flatnonzero(~external.to_numpy())
    fold_of_group = (
        pd.Series(folds[primary], index=out[schema.GROUP].to_numpy()[primary]).groupby(level=0).first()
    )
    external_groups = out.loc[external, schema.GROUP]
    shared = external_groups.map(fold_of_group)
    folds[np.flatnonzero(external.to_numpy())] = shared.fillna(EXTERNAL_FOLD).astype("int64").to_numpy()
    out[schema.FOLD] = folds
    return out


def _lock_test_split(
    groups: pd.Series, target: pd.Series, external: pd.Series, test_fraction: float, seed: int
) -> np.ndarray:
    """Row mask of the test split: one stratified, grouped split of the primary rows (module docstring)."""
    n_splits = n_test_splits(test_fraction)
    primary = np.flatnonzero(~external.to_numpy())
    y = target.to_numpy()[primary].astype("int64")
    g = groups.to_numpy()[primary]
    positive_groups = len(set(g[y == 1]))
    if len(set(g)) < n_splits or positive_groups < n_splits:
        raise FoldError(
            f"data.test_fraction={test_fraction} needs at least {n_splits} patient/lesion groups with a "
            f"melanoma to lock a stratified test split, found {positive_groups} (of {len(set(g))} groups); "
            "add data, raise data.test_fraction, or set it to 0 (no untouched test set)"
        )
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, test = next(splitter.split(np.zeros(len(y)), y, g))
    mask = np.zeros(len(groups), dtype=bool)
    mask[primary[test]] = True
    return mask


def locked_test_mask(table: pd.DataFrame) -> np.ndarray:
    """Rows of the locked test split that are scored: ``fold == TEST_FOLD`` and not external."""
    folds = pd.to_numeric(table[schema.FOLD], errors="coerce")
    return (folds == TEST_FOLD).to_numpy() & ~_external(table).to_numpy()


def split_masks(table: pd.DataFrame, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean ``(train, valid)`` row masks for validating on ``fold``: the one train/validation rule.

    valid: ``fold == k`` and not external. train: ``fold != k`` and not ``TEST_FOLD`` (external rows without
    a fold included; the locked test split never).
    An external row carrying fold ``k`` shares its patient/lesion with fold ``k``'s validation rows, so it
    is in neither mask: never validated on, and kept out of training while its group is validated on.

    Raises:
        FoldError: a primary row has no fold, or ``fold`` has no validation rows (the message lists the
            folds present).
    """
    folds = pd.to_numeric(table[schema.FOLD], errors="coerce")
    external = _external(table).to_numpy()
    unassigned = folds.isna().to_numpy() & ~external
    if unassigned.any():
        first = int(np.flatnonzero(unassigned)[0])
        raise FoldError(
            f"{int(unassigned.sum())} rows have no fold (first: row {table.index[first]!r}, image "
            f"{table[schema.IMAGE].iloc[first]!r}); run assign_folds on the whole table"
        )
    valid = (folds == fold).to_numpy() & ~external
    if fold in (EXTERNAL_FOLD, TEST_FOLD) or not valid.any():
        known = sorted(int(f) for f in folds[~external].unique() if f not in (EXTERNAL_FOLD, TEST_FOLD))
        raise FoldError(
            f"fold {fold} not in the table (folds present: {known}); validate on one of them or run "
            "assign_folds with the wanted data.n_folds"
        )
    return ((folds != fold) & (folds != TEST_FOLD)).to_numpy(), valid


def fold_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per fold (external rows as fold -1, the locked test split as -2): images, groups, melanoma, prevalence."""
    target = pd.to_numeric(table[schema.TARGET], errors="coerce")
    frame = pd.DataFrame(
        {schema.FOLD: table[schema.FOLD], schema.GROUP: table[schema.GROUP], "target": target}
    )
    summary = frame.groupby(schema.FOLD).agg(
        images=("target", "size"), groups=(schema.GROUP, "nunique"), melanoma=("target", "sum")
    )
    summary["melanoma"] = summary["melanoma"].astype("int64")
    summary["prevalence"] = summary["melanoma"] / summary["images"]
    return summary.reset_index()


def fold_problems(table: pd.DataFrame, prevalence_tolerance: float | None = None) -> list[str]:
    """Reasons the folds are unsafe to use; [] when they are fine.

    Checks: a group in two folds (patient/lesion leak), in particular one in both the locked test split
    and the CV folds; a validation fold or the test split (primary rows) without melanoma or without
    benign images; a fold whose melanoma rate differs from the overall (primary) rate by more than
    ``prevalence_tolerance`` times that rate.

    Args:
        table: Output of ``assign_folds``.
        prevalence_tolerance: Relative tolerance; None uses ``DataConfig.fold_prevalence_tolerance``.
    """
    if prevalence_tolerance is None:
        prevalence_tolerance = DataConfig.model_fields["fold_prevalence_tolerance"].default
    problems: list[str] = []
    for column in (schema.GROUP, schema.FOLD, schema.TARGET):
        if column not in table.columns:
            return [f"column {column!r} missing; run assign_folds first"]
    is_test = table[schema.FOLD] == TEST_FOLD
    test_groups = set(table.loc[is_test, schema.GROUP])
    straddling = sorted(test_groups & set(table.loc[~is_test, schema.GROUP]))
    if straddling:
        problems.append(
            f"{len(straddling)} group(s) in both the locked test split and the CV folds (test leak), "
            f"e.g. {straddling[:5]}"
        )
    folds_per_group = (
        table[~table[schema.GROUP].isin(straddling)].groupby(schema.GROUP)[schema.FOLD].nunique()
    )
    leaked = folds_per_group[folds_per_group > 1]
    if len(leaked):
        problems.append(
            f"{len(leaked)} group(s) in more than one fold (patient/lesion leak), e.g. {leaked.index[:5].tolist()}"
        )
    internal = table[(table[schema.FOLD] != EXTERNAL_FOLD) & ~_external(table)]
    target = pd.to_numeric(internal[schema.TARGET], errors="coerce")
    overall = float(target.mean()) if len(target) else float("nan")
    for fold, rows in target.groupby(internal[schema.FOLD]):
        name = "the locked test split" if fold == TEST_FOLD else f"fold {fold}"
        positives = int((rows == 1).sum())
        if positives == 0:
            problems.append(f"{name} has no melanoma: its AUC cannot be computed")
        if positives == len(rows):
            problems.append(f"{name} has no benign image: its AUC cannot be computed")
        if fold == TEST_FOLD:
            continue  # a fraction 1/n of the groups: its rate is reported, not held to the folds' tolerance
        rate = float(rows.mean())
        if overall > 0 and abs(rate - overall) > prevalence_tolerance * overall:
            problems.append(
                f"fold {fold} melanoma rate {rate:.2%} differs from the overall {overall:.2%} by more than "
                f"{prevalence_tolerance:.0%} of it"
            )
    return problems


def _present(table: pd.DataFrame, column: str) -> pd.Series:
    if column not in table.columns:
        return pd.Series(np.nan, index=table.index, dtype="object")
    text = table[column].astype("str").str.strip()
    return text.mask(table[column].isna() | (text == ""))


def _external(table: pd.DataFrame) -> pd.Series:
    if schema.IS_EXTERNAL not in table.columns:
        return pd.Series(False, index=table.index)
    return table[schema.IS_EXTERNAL].fillna(False).astype(bool)
