"""Cleaning one metadata table in SIIM-ISIC 2020 column naming into ``schema.CLEAN_COLUMNS``.

Adapters in ``layouts`` map ISIC 2019, HAM10000 and isic-cli tables onto the 2020 naming first.
Harmonization is vectorized (the 33,126-row ISIC 2020 table cleans in well under a second without
images); only finding, decoding and hashing image files touch rows one by one.

Rules, in the order they are applied (a row is quarantined for the first rule it fails):

1. ``image_name`` blank -> quarantined (``missing_image_name``). A trailing ``.jpg``/``.jpeg``/``.png``
   is removed with a warning.
2. Same ``image_name`` again -> the first row is kept, the others quarantined (``duplicate_image_name``).
3. ``target`` filled in but not 0/1 (e.g. "yes") -> quarantined (``invalid_target``); it is never
   reinterpreted.
4. The label columns contradict each other -> quarantined (``label_conflict``, the reason names both
   values). ``target`` is melanoma-vs-rest (as in ISIC 2020), so a malignant non-melanoma (basal cell
   carcinoma, ``benign_malignant`` "malignant") with target 0 agrees. Contradictions: target 1 with a
   stated non-melanoma diagnosis or with ``benign_malignant`` "benign"; target 0 with a melanoma diagnosis;
   a diagnosis that is benign/malignant (``vocabulary.diagnosis_malignancy``) with the other
   ``benign_malignant``. A missing or undecided value ("unknown", "indeterminate") contradicts nothing.
5. No label (``target`` blank, diagnosis missing or "unknown", ``benign_malignant`` not "benign") ->
   quarantined (``no_label``) unless ``require_labels=False``.
6. Age outside 0-120 years (``ages.out_of_range``), only with ``age_out_of_range="quarantine"``
   (``age_out_of_range``); by default the age is set missing with a warning instead.
7. Image file not found / found only with an extension that is not accepted / not decodable
   (``probe_image``) -> quarantined (``image_missing`` / ``image_extension_not_accepted`` /
   ``image_unreadable``), only with ``check_images=True``.
8. Same file content (sha256) as an earlier kept row -> quarantined (``duplicate_content``).

A table whose column names repeat (ignoring case and surrounding spaces) is refused as a whole; otherwise
column names are stripped and the 2020 names matched ignoring case (``" Patient_ID"`` is ``patient_id``),
so a differently written header never drops the patient/lesion grouping.

Value fixes, each recorded in ``warnings``: sex m/f/M/F -> male/female (other unrecognized values ->
missing); age non-numeric -> missing, then ``ages.normalize_ages`` (0, ISIC's code for unknown, or
outside 0-120 -> missing, above 85 -> 85, ISIC's top code for 85+; the app applies the same rule to a
typed-in age and refuses one outside 0-120); site mapped onto ``schema.SITES`` (``vocabulary.SITE_MAP``),
an unknown site -> missing. Values that mean "not recorded" (blank, "unknown", ...) become missing
silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from melanoma_ml import schema
from melanoma_ml.ages import normalize_ages, out_of_range
from melanoma_ml.images.hdf5 import is_hdf5_file
from melanoma_ml.metadata import vocabulary as vocab
from melanoma_ml.metadata.image_files import (
    IMAGE_EXTENSIONS,
    check_images_in,
    expected_location,
    find_image,
    index_image_files,
    unaccepted_files,
)
from melanoma_ml.metadata.io import MetadataError, require_columns, require_unique_columns
from melanoma_ml.metadata.result import (
    QUARANTINE_COLUMNS,
    WARNING_COLUMNS,
    CleaningResult,
    empty_frame,
    summarize,
)

FILE_STEM = "image_file_stem"
"""Optional raw column: the image file's name without extension when it differs from ``image_name``
(ISIC 2019 ``ISIC_0000000_downsampled.jpg`` for image ``ISIC_0000000``)."""

ImageDirs = Path | str | Sequence[Path | str] | None

RAW_COLUMNS: tuple[str, ...] = (
    schema.IMAGE,
    schema.PATIENT,
    schema.LESION,
    schema.SEX,
    schema.AGE,
    schema.SITE,
    schema.DIAGNOSIS,
    schema.BENIGN_MALIGNANT,
    schema.TARGET,
    FILE_STEM,
)
"""Raw columns cleaning reads (2020 naming); matched ignoring case and surrounding spaces."""

AGE_OUT_OF_RANGE_CHOICES = ("missing", "quarantine")
"""What ``clean_metadata`` does with an age outside 0-120 (``DataConfig.age_out_of_range``)."""


def clean_metadata(
    raw: pd.DataFrame,
    *,
    image_dir: ImageDirs,
    source: str,
    is_external: bool = False,
    check_images: bool = True,
    hash_images: bool = True,
    image_ext: str = ".jpg",
    require_labels: bool = True,
    age_out_of_range: str = "missing",
) -> CleaningResult:
    """Clean ``raw`` (2020 column naming) into one row per usable image.

    Args:
        raw: Table as read by ``read_table`` (strings). Its integer index is taken as the source row
            number (``read_table`` gives 0-based data rows); any other index is replaced by positions.
        image_dir: Folder (or folders) holding ``<image_name><ext>`` files; needed when
            ``check_images``.
        source: Name written to the ``source`` column (e.g. ``"ISIC2020"``).
        is_external: Marks rows used for training only (never validation), see ``folds``.
        check_images: Find and decode every image; False for metadata-only tables (``image_path`` and
            ``image_sha256`` are then "").
        hash_images: sha256 every found image (content duplicates are quarantined).
        image_ext: Extension tried first when looking for a file.
        require_labels: Quarantine rows without a label; False keeps them with ``target`` NaN (for a
            supplementary source whose labels come from another source in ``merge_sources``).
        age_out_of_range: ``"missing"`` (an age outside 0-120 is set missing, with a warning) or
            ``"quarantine"`` (the row is set aside).

    Returns:
        CleaningResult; ``clean.target`` is int64 unless ``require_labels=False``.

    Raises:
        MetadataError: ``image_name`` column missing, column names repeated, no label column while labels
            are required, ``check_images`` without an existing ``image_dir``, or an unknown
            ``age_out_of_range``.
    """
    if age_out_of_range not in AGE_OUT_OF_RANGE_CHOICES:
        raise MetadataError(
            f"data.age_out_of_range must be one of {list(AGE_OUT_OF_RANGE_CHOICES)}, got {age_out_of_range!r}"
        )
    require_unique_columns(raw.columns)
    raw = _canonical_columns(raw)
    require_columns(raw, [schema.IMAGE], layout="SIIM-ISIC 2020 column naming")
    label_columns = (schema.TARGET, schema.DIAGNOSIS, schema.BENIGN_MALIGNANT)
    if require_labels and not any(c in raw.columns for c in label_columns):
        raise MetadataError(
            f"source {source!r} has no label column (one of {list(label_columns)}); found "
            f"{list(raw.columns)}. Add the ground truth, or load it with require_labels=False as a "
            "supplementary source for merge_sources"
        )
    dirs = _image_dirs(image_dir) if check_images else []
    raw = _with_row_index(raw)
    rows = raw.index.to_numpy()
    names, had_extension = _image_names(raw[schema.IMAGE])
    log = _Log(source, rows, names)
    log.warn(had_extension, schema.IMAGE, raw[schema.IMAGE], "file extension removed from image_name")
    stems = _text(raw[FILE_STEM]) if FILE_STEM in raw.columns else names
    values, age_invalid = _harmonize(raw, log)
    checked = _labels(raw, values[schema.DIAGNOSIS])
    labels = checked.label

    keep = names.notna().to_numpy().copy()
    log.quarantine(~keep, "missing_image_name", "row has no image_name; fill it in or delete the row")

    first_row = pd.Series(rows, index=raw.index).groupby(names).transform("min")
    duplicate = keep & names.duplicated(keep="first").to_numpy()
    log.quarantine(
        duplicate,
        "duplicate_image_name",
        "duplicate image_name, first seen at row " + first_row.astype("Int64").astype("str"),
    )
    keep &= ~duplicate

    keep = log.set_aside(keep, checked.invalid, "invalid_target", checked.invalid_reason)
    keep = log.set_aside(keep, checked.conflict, "label_conflict", checked.conflict_reason)
    if require_labels:
        dx = values[schema.DIAGNOSIS].fillna("").astype("str")
        keep = log.set_aside(
            keep,
            labels.isna().to_numpy(),
            "no_label",
            "no label: target is not 0/1 and diagnosis '" + dx + "' does not decide melanoma; add "
            "the target or diagnosis, or delete the row",
        )
    if age_out_of_range == "quarantine":
        keep = log.set_aside(
            keep,
            age_invalid,
            "age_out_of_range",
            "age '"
            + _column(raw, schema.AGE).astype("str").str.strip()
            + f"' is outside {schema.MIN_VALID_AGE}-{schema.MAX_VALID_AGE} years, so not a person's age: "
            "correct it or leave it blank (or set data.age_out_of_range: missing to keep the row with the "
            "age missing)",
        )

    paths = pd.Series("", index=raw.index, dtype="object")
    digests = pd.Series("", index=raw.index, dtype="object")
    if check_images:
        keep = _attach_images(raw.index, stems, keep, dirs, image_ext, hash_images, paths, digests, log)
        if hash_images:
            keep = _drop_content_duplicates(names, digests, keep, rows, log)

    clean = pd.DataFrame(
        {
            schema.IMAGE: names,
            schema.PATIENT: values[schema.PATIENT],
            schema.LESION: values[schema.LESION],
            schema.SEX: values[schema.SEX],
            schema.AGE: values[schema.AGE],
            schema.SITE: values[schema.SITE],
            schema.DIAGNOSIS: values[schema.DIAGNOSIS],
            schema.TARGET: labels,
            schema.SOURCE: source,
            schema.IS_EXTERNAL: bool(is_external),
            schema.IMAGE_PATH: paths.astype("str"),
            schema.IMAGE_SHA256: digests.astype("str"),
        },
        index=raw.index,
    )[list(schema.CLEAN_COLUMNS)]
    clean = clean[keep].reset_index(drop=True)
    source_rows = rows[keep]
    if require_labels:
        clean[schema.TARGET] = clean[schema.TARGET].astype("int64")
    quarantine = log.quarantine_frame()
    warnings = log.warning_frame(kept_rows=set(rows[keep].tolist()))
    summary = summarize(clean, quarantine, warnings, rows_in=len(raw))
    summary["source"] = source
    return CleaningResult(
        clean=clean, quarantine=quarantine, warnings=warnings, summary=summary, source_rows=source_rows
    )


class _Log:
    """Collects quarantined rows and value warnings as frames (one frame per rule, vectorized)."""

    def __init__(self, source: str, rows: np.ndarray, names: pd.Series) -> None:
        self.source = source
        self.rows = rows
        self.names = names.to_numpy(dtype=object)
        self._quarantine: list[pd.DataFrame] = []
        self._warnings: list[pd.DataFrame] = []

    def set_aside(
        self, keep: np.ndarray, mask: np.ndarray, check: str, reason: str | pd.Series
    ) -> np.ndarray:
        """Quarantine the kept rows in ``mask`` (first failed rule wins); returns the rows still kept."""
        hit = keep & np.asarray(mask, dtype=bool)
        self.quarantine(hit, check, reason)
        return keep & ~hit

    def quarantine(self, mask: np.ndarray, check: str, reason: str | pd.Series) -> None:
        if not mask.any():
            return
        reasons = reason[mask].to_numpy() if isinstance(reason, pd.Series) else reason
        self._quarantine.append(
            pd.DataFrame(
                {
                    "source": self.source,
                    schema.Q_ROW: self.rows[mask],
                    schema.IMAGE: self.names[mask],
                    "check": check,
                    schema.Q_REASON: reasons,
                }
            )
        )

    def warn(self, mask: pd.Series, column: str, raw_values: pd.Series, action: str | pd.Series) -> None:
        m = mask.to_numpy(dtype=bool)
        if not m.any():
            return
        actions = action[m].to_numpy() if isinstance(action, pd.Series) else action
        self._warnings.append(
            pd.DataFrame(
                {
                    "source": self.source,
                    schema.Q_ROW: self.rows[m],
                    schema.IMAGE: self.names[m],
                    "column": column,
                    "value": raw_values[m].astype("str").to_numpy(),
                    "action": actions,
                }
            )
        )

    def quarantine_frame(self) -> pd.DataFrame:
        if not self._quarantine:
            return empty_frame(QUARANTINE_COLUMNS)
        frame = pd.concat(self._quarantine, ignore_index=True)
        return frame.sort_values(schema.Q_ROW, kind="stable").reset_index(drop=True)[list(QUARANTINE_COLUMNS)]

    def warning_frame(self, kept_rows: set[int]) -> pd.DataFrame:
        if not self._warnings:
            return empty_frame(WARNING_COLUMNS)
        frame = pd.concat(self._warnings, ignore_index=True)
        frame = frame[frame[schema.Q_ROW].isin(kept_rows)]
        return frame.sort_values(schema.Q_ROW, kind="stable").reset_index(drop=True)[list(WARNING_COLUMNS)]


def _canonical_columns(raw: pd.DataFrame) -> pd.DataFrame:
    """Column names stripped, and ``RAW_COLUMNS`` spelled as in the schema whatever their case."""
    known = {name.casefold(): name for name in RAW_COLUMNS}
    names = [str(c).strip() for c in raw.columns]
    names = [known.get(n.casefold(), n) for n in names]
    return raw if names == list(raw.columns) else raw.set_axis(names, axis=1)


def _with_row_index(raw: pd.DataFrame) -> pd.DataFrame:
    index = raw.index
    if pd.api.types.is_integer_dtype(index) and index.is_unique and (len(index) == 0 or index.min() >= 0):
        return raw
    return raw.reset_index(drop=True)


def _text(values: pd.Series) -> pd.Series:
    """Stripped strings, blank or missing -> NaN (case kept)."""
    text = values.astype("str").str.strip()
    return text.mask(values.isna() | (text == ""))


def _ids(values: pd.Series) -> pd.Series:
    """Identifiers: stripped, "not recorded" tokens -> NaN."""
    text = _text(values)
    return text.mask(text.str.lower().isin(vocab.MISSING_TOKENS))


def _column(raw: pd.DataFrame, name: str) -> pd.Series:
    if name in raw.columns:
        return raw[name]
    return pd.Series(np.nan, index=raw.index, dtype="object")


def _image_names(values: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Stripped names without a trailing image extension, and which rows had one."""
    names = _text(values)
    lower = names.str.lower()
    has_ext = lower.str.endswith(IMAGE_EXTENSIONS, na=False)
    stripped = names.where(~has_ext, names.str.replace(r"\.[^.]*$", "", regex=True))
    return stripped, has_ext


def _harmonize(raw: pd.DataFrame, log: _Log) -> tuple[dict[str, pd.Series], np.ndarray]:
    """Harmonized value columns, and which rows had an age outside 0-120."""
    age, age_invalid = _age(_column(raw, schema.AGE), log)
    values = {
        schema.PATIENT: _ids(_column(raw, schema.PATIENT)),
        schema.LESION: _ids(_column(raw, schema.LESION)),
        schema.SEX: _sex(_column(raw, schema.SEX), log),
        schema.AGE: age,
        schema.SITE: _site(_column(raw, schema.SITE), log),
        schema.DIAGNOSIS: _text(_column(raw, schema.DIAGNOSIS)),
    }
    return values, age_invalid


def _sex(values: pd.Series, log: _Log) -> pd.Series:
    norm = vocab.normalized(values)
    sex = norm.map(vocab.SEX_MAP)
    log.warn(
        norm.notna() & sex.isna(), schema.SEX, values, "unrecognized sex set missing (expected male/female)"
    )
    return sex.astype("str")


def _age(values: pd.Series, log: _Log) -> tuple[pd.Series, np.ndarray]:
    norm = vocab.normalized(values)
    age = pd.to_numeric(norm, errors="coerce").astype("float64")
    age = age.where(np.isfinite(age))
    log.warn(norm.notna() & age.isna(), schema.AGE, values, "non-numeric age set missing")
    normalized, fixes = normalize_ages(age.to_numpy())
    for mask, note in fixes:
        log.warn(pd.Series(mask, index=age.index), schema.AGE, values, note)
    return pd.Series(normalized, index=age.index, dtype="float64"), out_of_range(age.to_numpy())


def _site(values: pd.Series, log: _Log) -> pd.Series:
    norm = vocab.normalized(values)
    site = norm.map(vocab.SITE_MAP)
    unknown = norm.notna() & site.isna()
    log.warn(
        unknown,
        schema.SITE,
        values,
        "unknown anatomic site '"
        + values.astype("str").str.strip()
        + f"' set missing (known: {list(schema.SITES)})",
    )
    return site.astype("str")


@dataclass(frozen=True)
class _LabelCheck:
    """Labels and the rows whose label columns cannot be trusted (masks aligned with the table)."""

    label: pd.Series
    invalid: np.ndarray
    invalid_reason: pd.Series
    conflict: np.ndarray
    conflict_reason: pd.Series


def _labels(raw: pd.DataFrame, diagnosis: pd.Series) -> _LabelCheck:
    """target 0/1 (float, NaN = no label): ``target`` column, else diagnosis, else benign_malignant.

    Also finds a ``target`` that is not 0/1 and label columns that contradict each other (rules 3-4 of the
    module docstring); those rows are quarantined, so their label is never used.
    """
    index = raw.index
    from_dx = vocab.melanoma_flags(diagnosis)
    raw_bm = _column(raw, schema.BENIGN_MALIGNANT)
    bm = vocab.normalized(raw_bm)
    from_bm = pd.Series(np.where(bm == "benign", 0.0, np.nan), index=index)
    raw_target = _column(raw, schema.TARGET)
    target_text = _text(raw_target).fillna("")
    norm = vocab.normalized(raw_target)
    target = pd.to_numeric(norm, errors="coerce")
    valid = target.isin([0, 1])
    target = target.where(valid)
    invalid = (norm.notna() & ~valid).to_numpy()
    invalid_reason = (
        "target '"
        + target_text
        + "' is not 0 or 1 (1 = melanoma, 0 = any other diagnosis); correct it, or leave it blank to take "
        "the label from the diagnosis"
    )

    dx_text = "diagnosis '" + diagnosis.fillna("").astype("str") + "'"
    bm_text = "benign_malignant='" + _text(raw_bm).fillna("").astype("str") + "'"
    says = "target=" + target_text
    malignancy = vocab.diagnosis_malignancy(diagnosis)
    checks = [
        (valid & (target == 1) & (from_dx == 0), says + " (melanoma) but " + dx_text + " is not a melanoma"),
        (valid & (target == 0) & (from_dx == 1), says + " (not melanoma) but " + dx_text + " is a melanoma"),
        (valid & (target == 1) & (bm == "benign"), says + " (melanoma) but " + bm_text),
        ((malignancy == "benign") & (bm == "malignant"), dx_text + " is benign but " + bm_text),
        ((malignancy == "malignant") & (bm == "benign"), dx_text + " is malignant but " + bm_text),
    ]
    masks = np.column_stack([m.to_numpy(dtype=bool) for m, _ in checks])
    conflict = masks.any(axis=1)
    conflict_reason = pd.Series("", index=index, dtype="object")
    for row in np.flatnonzero(conflict):
        parts = [text.iat[row] for (_, text), hit in zip(checks, masks[row], strict=True) if hit]
        conflict_reason.iat[row] = (
            "label columns disagree: "
            + "; ".join(parts)
            + ". Correct the wrong value in the source table, or delete the row"
        )
    label = target.fillna(from_dx).fillna(from_bm).astype("float64")
    return _LabelCheck(label, invalid, invalid_reason, conflict, conflict_reason)


def _image_dirs(image_dir: ImageDirs) -> list[Path]:
    if image_dir is None:
        raise MetadataError(
            "check_images=True needs an image folder: set data.image_dir (image_dir=...) to the folder "
            "holding <image_name>.jpg, or pass check_images=False for a metadata-only table"
        )
    dirs = [image_dir] if isinstance(image_dir, str | Path) else list(image_dir)
    paths = [Path(d).expanduser().resolve() for d in dirs]
    missing = [str(p) for p in paths if not (p.is_dir() or is_hdf5_file(p))]  # HDF5: ISIC 2024 images
    if missing:
        raise MetadataError(
            f"image folder not found: {', '.join(missing)}; set data.image_dir to the folder holding the "
            "images, or pass check_images=False for a metadata-only table"
        )
    return paths


def _attach_images(
    index: pd.Index,
    stems: pd.Series,
    keep: np.ndarray,
    dirs: list[Path],
    image_ext: str,
    hash_images: bool,
    paths: pd.Series,
    digests: pd.Series,
    log: _Log,
) -> np.ndarray:
    files = index_image_files(dirs)
    positions = np.flatnonzero(keep)
    found: list[Path | None] = [find_image(files, str(stems.iat[i]), image_ext) for i in positions]
    missing = np.zeros(len(keep), dtype=bool)
    missing[positions[[f is None for f in found]]] = True
    _report_missing_images(missing, stems, dirs, image_ext, log)
    present = [(i, p) for i, p in zip(positions, found, strict=True) if p is not None]
    results = check_images_in([p for _, p in present], hash_images=hash_images)
    unreadable = np.zeros(len(keep), dtype=bool)
    problems = pd.Series("", index=index, dtype="object")
    for (i, path), result in zip(present, results, strict=True):
        if result.problem is None:
            paths.iat[i] = str(path)
            digests.iat[i] = result.sha256
        else:
            unreadable[i] = True
            problems.iat[i] = (
                f"image file unusable: {path} (row {log.rows[i]}): {result.problem}; replace the file "
                "or delete the row"
            )
    log.quarantine(unreadable, "image_unreadable", problems)
    return keep & ~missing & ~unreadable


def _report_missing_images(
    missing: np.ndarray, stems: pd.Series, dirs: list[Path], image_ext: str, log: _Log
) -> None:
    """Quarantine rows without an image file, telling a file with an unaccepted suffix from no file."""
    if not missing.any():
        return
    accepted = "/".join(IMAGE_EXTENSIONS)
    looked_in = ", ".join(str(d) for d in dirs)
    stem_values = stems.to_numpy(dtype=object)
    others = unaccepted_files(dirs, [str(stem_values[i]) for i in np.flatnonzero(missing)])
    wrong_ext = np.zeros(len(missing), dtype=bool)
    reasons = pd.Series("", index=stems.index, dtype="object")
    for i in np.flatnonzero(missing):
        stem, row = str(stem_values[i]), log.rows[i]
        names = others.get(stem.lower())
        if names:
            wrong_ext[i] = True
            reasons.iat[i] = (
                f"found {', '.join(names)}, which is not an accepted extension: images must be {accepted} "
                f"(row {row}, in {looked_in}); convert the file (e.g. to {stem}.png) or delete the row"
            )
        else:
            reasons.iat[i] = (
                f"image file missing: {expected_location(dirs[0], stem, image_ext)} (row {row}); looked in {looked_in} for "
                f"{accepted}. Set data.image_dir to the folder holding the images, or pass "
                "check_images=False for a metadata-only table"
            )
    log.quarantine(wrong_ext, "image_extension_not_accepted", reasons)
    log.quarantine(missing & ~wrong_ext, "image_missing", reasons)


def _drop_content_duplicates(
    names: pd.Series, digests: pd.Series, keep: np.ndarray, rows: np.ndarray, log: _Log
) -> np.ndarray:
    hashed = pd.Series(np.where(keep, digests.to_numpy(dtype=object), None), index=names.index)
    hashed = hashed.mask(hashed == "")
    dup = (hashed.notna() & hashed.duplicated(keep="first")).to_numpy()
    if not dup.any():
        return keep
    first = ~hashed.duplicated(keep="first") & hashed.notna()
    first_name = dict(zip(hashed[first], names[first], strict=True))
    first_row = dict(zip(hashed[first], rows[first.to_numpy()], strict=True))
    reasons = pd.Series(
        [
            f"same image content as {first_name.get(h)} (row {first_row.get(h)}, sha256 {str(h)[:12]}...); "
            "one image is stored twice under two names: delete one of the rows"
            for h in hashed.to_numpy(dtype=object)
        ],
        index=names.index,
    )
    log.quarantine(dup, "duplicate_content", reasons)
    return keep & ~dup
