"""Merge several cleaned sources into one table: one row per image, the primary source first.

Rules:

* ``is_external`` is False for the primary source's rows and True for every other source (external
  rows are used for training only; ``folds`` never puts them in a validation fold).
* Same image id in several sources (ids compared without ISIC 2019's ``_downsampled`` suffix): the
  primary's row is kept (else the first source in the order given); the others are quarantined
  (``cross_source_duplicate``).
* For a kept image, sex, age, site and target are compared across its rows: the primary's value wins
  where it has one; a value the primary lacks is filled from the next source that has it. Every
  disagreement (including "missing here, present there") is listed in ``conflicts`` with the value per
  source, the chosen value and where it came from.
* Same image content (sha256) under different ids: the earlier row (primary first) is kept, the later
  quarantined (``duplicate_content``).
* A row still without a label (a supplementary source loaded with ``require_labels=False`` whose image
  no labelled source lists) is quarantined (``no_label``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from melanoma_ml import schema
from melanoma_ml.metadata.adapters import strip_downsampled
from melanoma_ml.metadata.io import MetadataError
from melanoma_ml.metadata.result import (
    QUARANTINE_COLUMNS,
    WARNING_COLUMNS,
    CleaningResult,
    empty_frame,
    summarize,
)

COMPARED_COLUMNS: tuple[str, ...] = (schema.SEX, schema.AGE, schema.SITE, schema.TARGET)

_KEY, _ORDER, _ROW = "_key", "_order", "_row"


def merge_sources(results: Sequence[CleaningResult], primary: str) -> CleaningResult:
    """One table from several ``CleaningResult`` s (see the module docstring for the rules).

    Args:
        results: Cleaned sources; each one's ``summary["source"]`` names it.
        primary: Name of the source that is evaluated on and wins disagreements.

    Raises:
        MetadataError: ``primary`` is not among the sources, or two sources have the same name.
    """
    names = [str(r.summary.get("source", "")) for r in results]
    if len(set(names)) != len(names):
        raise MetadataError(f"sources must have distinct names to be merged, got {names}; pass source=...")
    if primary not in names:
        raise MetadataError(f"primary source {primary!r} is not among the sources {names}")
    ordered = sorted(results, key=lambda r: r.summary["source"] != primary)
    table = _stack(ordered, primary)

    keep = ~table[_KEY].duplicated(keep="first").to_numpy()
    conflicts = _resolve_conflicts(table, [r.summary["source"] for r in ordered])
    quarantined = [_id_duplicates(table, keep)]

    content_dup = _content_duplicates(table, keep)
    quarantined.append(_quarantine(table, content_dup, "duplicate_content", _content_reasons(table, keep)))
    keep &= ~content_dup

    unlabeled = keep & table[schema.TARGET].isna().to_numpy()
    quarantined.append(
        _quarantine(
            table,
            unlabeled,
            "no_label",
            "no label for this image in any source: add its ground truth to "
            + table[schema.SOURCE]
            + " or drop that source",
        )
    )
    keep &= ~unlabeled

    merged = table[keep].reset_index(drop=True)
    extras = [c for c in schema.extra_columns(merged) if c not in (_KEY, _ORDER, _ROW)]  # ISIC 2024 tbp_lv_*
    clean = merged[[*schema.CLEAN_COLUMNS, *extras]].copy()
    clean[schema.TARGET] = clean[schema.TARGET].astype("int64")
    quarantine = pd.concat(
        [r.quarantine for r in ordered] + [q for q in quarantined if len(q)], ignore_index=True
    )[list(QUARANTINE_COLUMNS)]
    warnings = (
        pd.concat([r.warnings for r in ordered], ignore_index=True)[list(WARNING_COLUMNS)]
        if ordered
        else empty_frame(WARNING_COLUMNS)
    )
    rows_in = sum(int(r.summary.get("rows_in", len(r.clean))) for r in ordered)
    summary = summarize(clean, quarantine, warnings, rows_in=rows_in)
    summary.update(
        source="+".join(r.summary["source"] for r in ordered),
        primary=primary,
        sources={r.summary["source"]: r.summary for r in ordered},
        rows_primary=int((~clean[schema.IS_EXTERNAL]).sum()),
        rows_external=int(clean[schema.IS_EXTERNAL].sum()),
        conflicts={str(k): int(v) for k, v in conflicts["column"].value_counts().items()},
    )
    return CleaningResult(
        clean=clean,
        quarantine=quarantine,
        warnings=warnings,
        summary=summary,
        conflicts=conflicts,
        source_rows=merged[_ROW].to_numpy(),
    )


def _stack(ordered: Sequence[CleaningResult], primary: str) -> pd.DataFrame:
    frames = []
    for rank, result in enumerate(ordered):
        frame = result.clean.copy()
        frame[schema.TARGET] = frame[schema.TARGET].astype("float64")
        frame[schema.IS_EXTERNAL] = result.summary["source"] != primary
        frame[_ORDER] = rank
        rows = result.source_rows if len(result.source_rows) == len(frame) else np.arange(len(frame))
        frame[_ROW] = rows
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    table[_KEY] = strip_downsampled(table[schema.IMAGE].astype("str"))
    return table


def _resolve_conflicts(table: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """Fill the kept rows in place and return the disagreements as a table."""
    shared = table[table[_KEY].duplicated(keep=False)]
    if shared.empty:
        return empty_frame((schema.IMAGE, "column", *order, "chosen", "chosen_from"))
    kept_index = shared.index[~shared[_KEY].duplicated(keep="first")]
    kept_keys = table.loc[kept_index, _KEY]
    records = []
    for column in COMPARED_COLUMNS:
        grouped = shared.groupby(_KEY, sort=False)[column]
        # A missing label is not a disagreement (supplementary sources have none); a missing sex/age/site is.
        differs = grouped.nunique(dropna=column == schema.TARGET) > 1
        chosen = grouped.first()
        present = shared[shared[column].notna()]
        chosen_from = present.groupby(_KEY, sort=False)[schema.SOURCE].first()
        table.loc[kept_index, column] = kept_keys.map(chosen).to_numpy()
        keys = differs[differs].index
        if len(keys) == 0:
            continue
        subset = shared[shared[_KEY].isin(keys)]
        wide = subset.pivot(index=_KEY, columns=schema.SOURCE, values=column).reindex(columns=order)
        frame = pd.DataFrame({schema.IMAGE: keys, "column": column})
        for source in order:
            frame[source] = _format(wide[source].reindex(keys)).to_numpy()
        frame["chosen"] = _format(chosen.reindex(keys)).to_numpy()
        frame["chosen_from"] = chosen_from.reindex(keys).to_numpy()
        records.append(frame)
    if not records:
        return empty_frame((schema.IMAGE, "column", *order, "chosen", "chosen_from"))
    return pd.concat(records, ignore_index=True)


def _format(values: pd.Series) -> pd.Series:
    """Values as text for the conflicts table (whole numbers without ``.0``; missing stays missing)."""
    numeric = pd.to_numeric(values, errors="coerce")
    whole = numeric.notna() & (numeric == numeric.round())
    text = values.astype("object").where(values.notna(), None)
    text = text.where(~whole, numeric.round().astype("Int64").astype("str"))
    return text.astype("str")


def _id_duplicates(table: pd.DataFrame, keep: np.ndarray) -> pd.DataFrame:
    kept = table[keep].set_index(_KEY)
    dup = ~keep
    keys = table[_KEY]
    reasons = (
        "same image id as "
        + keys.map(kept[schema.SOURCE]).astype("str")
        + " row "
        + keys.map(kept[_ROW]).astype("str")
        + " (kept: the primary source wins, then the order given); values compared in conflicts"
    )
    return _quarantine(table, dup, "cross_source_duplicate", reasons)


def _content_duplicates(table: pd.DataFrame, keep: np.ndarray) -> np.ndarray:
    sha = table[schema.IMAGE_SHA256].astype("str").where(keep, "")
    sha = sha.mask(sha == "")
    return (sha.notna() & sha.duplicated(keep="first")).to_numpy()


def _content_reasons(table: pd.DataFrame, keep: np.ndarray) -> pd.Series:
    sha = table[schema.IMAGE_SHA256].astype("str").where(keep, "")
    first = sha.ne("") & ~sha.duplicated(keep="first")
    owner = table[first].set_index(schema.IMAGE_SHA256)
    return (
        "same image content as "
        + sha.map(owner[schema.IMAGE]).astype("str")
        + " from "
        + sha.map(owner[schema.SOURCE]).astype("str")
        + "; one image is listed under two ids: the earlier source's row is kept"
    )


def _quarantine(table: pd.DataFrame, mask: np.ndarray, check: str, reason: pd.Series) -> pd.DataFrame:
    if not mask.any():
        return empty_frame(QUARANTINE_COLUMNS)
    return pd.DataFrame(
        {
            "source": table.loc[mask, schema.SOURCE].to_numpy(),
            schema.Q_ROW: table.loc[mask, _ROW].to_numpy(),
            schema.IMAGE: table.loc[mask, schema.IMAGE].to_numpy(),
            "check": check,
            schema.Q_REASON: reason[mask].to_numpy(),
        }
    )
