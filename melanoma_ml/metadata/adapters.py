"""Map the raw tables of ISIC 2019, HAM10000, isic-cli exports and ISIC 2024 onto SIIM-ISIC 2020 column naming.

Each adapter keeps the raw table's index (the source row number) and its values as text; harmonizing
values is ``clean_metadata``'s job. ISIC 2020 tables are already in that naming.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from melanoma_ml import schema
from melanoma_ml.config import TABULAR_PRESETS
from melanoma_ml.metadata import vocabulary as vocab
from melanoma_ml.metadata.clean import FILE_STEM
from melanoma_ml.metadata.io import require_columns

DOWNSAMPLED_SUFFIX = "_downsampled"

ISIC2019_METADATA_COLUMNS = ("image",)
ISIC2019_GT_COLUMNS = ("image", "MEL")
HAM10000_COLUMNS = ("lesion_id", "image_id", "dx")
ISIC_CLI_COLUMNS = ("isic_id",)
ISIC_CLI_DIAGNOSIS_LEVELS = tuple(f"diagnosis_{level}" for level in range(1, 6))
"""isic-cli's hierarchical diagnosis (ISIC archive since 2024): diagnosis_1 "Benign"/"Malignant"/
"Indeterminate", diagnosis_2 e.g. "Malignant melanocytic proliferations (Melanoma)", diagnosis_3 e.g.
"Melanoma in situ", diagnosis_4/5 finer subtypes. Older exports have a single ``diagnosis`` column."""


def strip_downsampled(names: pd.Series) -> pd.Series:
    """ISIC 2019 ids without the ``_downsampled`` suffix (the same image as the un-suffixed id)."""
    return names.str.strip().str.removesuffix(DOWNSAMPLED_SUFFIX)


def from_isic2019(
    metadata: pd.DataFrame, ground_truth: pd.DataFrame | None, *, metadata_path: Path, gt_path: Path | None
) -> pd.DataFrame:
    """ISIC 2019 metadata (+ one-hot ground truth) -> 2020 naming.

    ``image_name`` is the id without ``_downsampled`` (so duplicates across sources are found);
    the original id is kept in ``image_file_stem`` to find the file. Diagnosis is the name of the
    one-hot column set to 1 and ``target`` is the ``MEL`` column; a GT row that is not exactly one-hot
    leaves both blank (the row is then quarantined as unlabeled). Without ``ground_truth`` the rows
    carry no label.
    """
    if "gender" in metadata.columns and schema.SEX not in metadata.columns:
        metadata = metadata.rename(columns={"gender": schema.SEX})
    require_columns(metadata, ISIC2019_METADATA_COLUMNS, metadata_path, "ISIC 2019 metadata")
    files = metadata["image"].str.strip()
    out = pd.DataFrame(
        {
            schema.IMAGE: strip_downsampled(files),
            FILE_STEM: files,
            schema.PATIENT: np.nan,
            schema.LESION: _get(metadata, schema.LESION),
            schema.SEX: _get(metadata, schema.SEX),
            schema.AGE: _get(metadata, schema.AGE),
            schema.SITE: _get(metadata, "anatom_site_general", schema.SITE),
        },
        index=metadata.index,
    )
    if ground_truth is None:
        return out
    require_columns(ground_truth, ISIC2019_GT_COLUMNS, gt_path, "ISIC 2019 ground truth (one-hot)")
    classes = [c for c in vocab.ISIC2019_CLASSES if c in ground_truth.columns]
    onehot = ground_truth[classes].apply(pd.to_numeric, errors="coerce").fillna(0.0)
    valid = (onehot.sum(axis=1) == 1) & onehot.isin([0.0, 1.0]).all(axis=1)
    diagnosis = onehot.idxmax(axis=1).map(vocab.ISIC2019_CLASSES).where(valid, "")
    target = onehot["MEL"].astype("int64").astype("str").where(valid, "")
    gt_ids = strip_downsampled(ground_truth["image"])
    first = ~gt_ids.duplicated(keep="first")
    by_id = pd.DataFrame({"diagnosis": diagnosis[first].to_numpy(), "target": target[first].to_numpy()})
    by_id.index = gt_ids[first].to_numpy()
    out[schema.DIAGNOSIS] = out[schema.IMAGE].map(by_id["diagnosis"]).fillna("")
    out[schema.TARGET] = out[schema.IMAGE].map(by_id["target"]).fillna("")
    return out


def from_ham10000(raw: pd.DataFrame, *, path: Path) -> pd.DataFrame:
    """HAM10000_metadata.csv (lesion_id, image_id, dx, dx_type, age, sex, localization) -> 2020 naming.

    ``dx`` codes are spelled out (``vocabulary.HAM10000_DX``; unknown codes kept as written). HAM10000
    has no patient id, so folds group by lesion.
    """
    require_columns(raw, HAM10000_COLUMNS, path, "HAM10000 (HAM10000_metadata.csv)")
    codes = raw["dx"].str.strip()
    return pd.DataFrame(
        {
            schema.IMAGE: raw["image_id"],
            schema.PATIENT: np.nan,
            schema.LESION: raw["lesion_id"],
            schema.SEX: _get(raw, schema.SEX),
            schema.AGE: _get(raw, "age", schema.AGE),
            schema.SITE: _get(raw, "localization", schema.SITE),
            schema.DIAGNOSIS: codes.str.lower().map(vocab.HAM10000_DX).fillna(codes),
        },
        index=raw.index,
    )


def from_isic_cli(raw: pd.DataFrame, *, path: Path) -> pd.DataFrame:
    """An isic-cli ``metadata.csv`` (keyed by ``isic_id``) -> 2020 naming.

    Diagnosis is the most specific filled level of ``diagnosis_1..5`` (or the legacy ``diagnosis``);
    ``target`` is 1 when any level names a melanoma (``vocabulary.melanoma_flags``), 0 when the levels
    name something else. Rows without hierarchical levels fall back to ``diagnosis`` and
    ``benign_malignant`` inside ``clean_metadata``. ``diagnosis_1`` "Benign"/"Malignant" fills a blank
    ``benign_malignant``, so cleaning quarantines a row whose levels contradict each other.
    """
    require_columns(raw, ISIC_CLI_COLUMNS, path, "isic-cli export (metadata.csv)")
    out = pd.DataFrame(
        {
            schema.IMAGE: raw["isic_id"],
            schema.PATIENT: _get(raw, schema.PATIENT),
            schema.LESION: _get(raw, schema.LESION),
            schema.SEX: _get(raw, schema.SEX),
            schema.AGE: _get(raw, schema.AGE),
            schema.SITE: _get(raw, "anatom_site_general", schema.SITE),
            schema.DIAGNOSIS: _get(raw, schema.DIAGNOSIS),
            schema.BENIGN_MALIGNANT: _get(raw, schema.BENIGN_MALIGNANT),
        },
        index=raw.index,
    )
    levels = [c for c in ISIC_CLI_DIAGNOSIS_LEVELS if c in raw.columns]
    if not levels:
        return out
    texts = pd.DataFrame({c: raw[c].str.strip() for c in levels}).replace("", np.nan)
    deepest = texts[levels[::-1]].bfill(axis=1).iloc[:, 0]
    flags = pd.concat([vocab.melanoma_flags(texts[c]) for c in levels], axis=1).max(axis=1)
    has_levels = deepest.notna()
    if "diagnosis_1" in texts.columns:
        stated = texts["diagnosis_1"].where(
            vocab.normalized(texts["diagnosis_1"]).isin(["benign", "malignant"])
        )
        out[schema.BENIGN_MALIGNANT] = out[schema.BENIGN_MALIGNANT].where(
            vocab.normalized(out[schema.BENIGN_MALIGNANT]).notna(), stated
        )
    out[schema.DIAGNOSIS] = deepest.where(has_levels, out[schema.DIAGNOSIS])
    out[schema.TARGET] = flags.map({1.0: "1", 0.0: "0"}).where(has_levels, "").fillna("")
    return out


ISIC2024_COLUMNS = ("isic_id",)
ISIC2024_DIAGNOSIS_LEVELS = tuple(f"iddx_{level}" for level in range(1, 6))
ISIC2024_TABULAR: tuple[str, ...] = TABULAR_PRESETS["isic2024_tbp"]
"""Numeric per-lesion columns of an ISIC 2024 table kept in the cleaned table after ``schema.CLEAN_COLUMNS``
(``model.tabular_features``); the one list is ``config.TABULAR_PRESETS["isic2024_tbp"]``."""


def from_isic2024(raw: pd.DataFrame, *, path: Path) -> pd.DataFrame:
    """An ISIC 2024 (SLICE-3D) ``train-metadata.csv`` -> 2020 naming, read like an isic-cli export.

    ``iddx_1..5`` are the archive's diagnosis levels (``diagnosis_1..5`` of isic-cli), so ``target`` is
    melanoma-vs-rest from them, as for every other source. The challenge's own ``target`` (1 = any
    malignancy: melanoma, basal or squamous cell carcinoma) is not that label: it is used only where no
    level is filled, and then only its 0 (benign, so not a melanoma); a 1 without levels says malignant of
    an unknown kind and the row is quarantined as unlabeled. ``tabular_columns`` reads the tbp_lv_* values.
    """
    require_columns(raw, ISIC2024_COLUMNS, path, "ISIC 2024 (train-metadata.csv)")
    levels = {f"iddx_{level}": f"diagnosis_{level}" for level in range(1, 6)}
    renamed = raw.drop(columns=[c for c in levels.values() if c in raw.columns]).rename(columns=levels)
    out = from_isic_cli(renamed, path=path)
    challenge = _get(raw, schema.TARGET).fillna("").astype("str").str.strip()
    from_levels = _get(out, schema.TARGET).fillna("").astype("str")
    out[schema.TARGET] = from_levels.where(from_levels != "", challenge.where(challenge == "0", ""))
    return out


def tabular_columns(raw: pd.DataFrame) -> pd.DataFrame:
    """The ``ISIC2024_TABULAR`` columns ``raw`` has, as float64 (blank or non-numeric -> NaN), same index."""
    present = [c for c in ISIC2024_TABULAR if c in raw.columns]
    return pd.DataFrame(
        {c: pd.to_numeric(raw[c].str.strip(), errors="coerce").astype("float64") for c in present},
        index=raw.index,
    )


def _get(raw: pd.DataFrame, *names: str) -> pd.Series:
    """The first of ``names`` present in ``raw``, else an all-missing column."""
    for name in names:
        if name in raw.columns:
            return raw[name]
    return pd.Series(np.nan, index=raw.index, dtype="object")
