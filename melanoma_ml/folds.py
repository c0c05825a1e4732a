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

Use ``split_masks(table, k)``: training = ``fold != k``, validation = ``fold == k`` and not external.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from melanoma_ml import schema
from melanoma_ml.config import DataConfig

EXTERNAL_FOLD = -1
"""``fold`` value of external rows: always training, never validation."""


class FoldError(ValueError):
    """The table cannot be split into the requested folds; the message says why and what to change."""


def group_ids(table: pd.DataFrame) -> pd.Series:
    """``patient:<id>``, else ``lesion:<id>``, else ``image:<name>`` per row."""
    patient = _present(table, schema.PATIENT)
    lesion = _present(table, schema.LESION)
    image = "image:" + table[schema.IMAGE].astype("str")
    groups = ("lesion:" + lesion).where(lesion.notna(), image)
    return ("patient:" + patient).where(patient.notna(), groups).astype("str")


def assign_folds(table: pd.DataFrame, n_folds: int, seed: int) -> pd.DataFrame:
    """A copy of ``table`` with ``group_id`` and ``fold`` (0..n_folds-1; ``EXTERNAL_FOLD`` for external rows).

    Deterministic for a given table, ``n_folds`` and ``seed``.

    Raises:
        FoldError: ``n_folds`` < 2, missing/invalid targets, fewer primary groups than folds, or fewer
            groups with a melanoma than folds.
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
    internal = ~external
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
    folds = np.full(len(out), EXTERNAL_FOLD, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    internal_positions = np.flatnonzero(internal.to_numpy())
    for fold, (_, valid) in enumerate(splitter.split(np.zeros(len(y)), y.to_numpy(), groups.to_numpy())):
        folds[internal_positions[valid]] = fold
    fold_of_group = pd.Series(folds[internal_positions], index=groups.to_numpy()).groupby(level=0).first()
    external_groups = out.loc[external, schema.GROUP]
    shared = external_groups.map(fold_of_group)
    folds[np.flatnonzero(external.to_numpy())] = shared.fillna(EXTERNAL_FOLD).astype("int64").to_numpy()
    out[schema.FOLD] = folds
    return out


def split_masks(table: pd.DataFrame, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean ``(train, valid)`` row masks for validating on ``fold``: the one train/validation rule.

    valid: ``fold == k`` and not external. train: ``fold != k`` (external rows without a fold included).
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
    if fold == EXTERNAL_FOLD or not valid.any():
        known = sorted(int(f) for f in folds[~external].unique() if f != EXTERNAL_FOLD)
        raise FoldError(
            f"fold {fold} not in the table (folds present: {known}); validate on one of them or run "
            "assign_folds with the wanted data.n_folds"
        )
    return (folds != fold).to_numpy(), valid


def fold_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per fold (external rows as fold -1): images, groups, melanoma, prevalence."""
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

    Checks: a group in two folds (patient/lesion leak), a validation fold (primary rows) without
    melanoma or without benign images, a fold whose melanoma rate differs from the overall (primary)
    rate by more than ``prevalence_tolerance`` times that rate.

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
    folds_per_group = table.groupby(schema.GROUP)[schema.FOLD].nunique()
    leaked = folds_per_group[folds_per_group > 1]
    if len(leaked):
        problems.append(
            f"{len(leaked)} group(s) in more than one fold (patient/lesion leak), e.g. {leaked.index[:5].tolist()}"
        )
    internal = table[(table[schema.FOLD] != EXTERNAL_FOLD) & ~_external(table)]
    target = pd.to_numeric(internal[schema.TARGET], errors="coerce")
    overall = float(target.mean()) if len(target) else float("nan")
    for fold, rows in target.groupby(internal[schema.FOLD]):
        positives = int((rows == 1).sum())
        if positives == 0:
            problems.append(f"fold {fold} has no melanoma: its AUC cannot be computed")
        if positives == len(rows):
            problems.append(f"fold {fold} has no benign image: its AUC cannot be computed")
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
