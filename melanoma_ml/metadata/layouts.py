"""Recognize a dataset folder's layout by the files in it, and load it into a ``CleaningResult``.

Layouts (checked in this order; the first match wins and the reason says which others also match):

* ``isic2020``: ``ISIC_2020_Training_GroundTruth_v2.csv`` (preferred, has ``lesion_id``) or
  ``ISIC_2020_Training_GroundTruth.csv``, or a ``train.csv`` / ``metadata.csv`` in 2020 naming
  (``image_name`` plus ``target`` or ``diagnosis``). An ``ISIC_2020_Training_Duplicates.csv`` beside it
  (``image_name_1,image_name_2``) quarantines the second image of each pair ("official duplicate of X").
* ``isic2019``: ``ISIC_2019_Training_Metadata.csv``, labelled by ``ISIC_2019_Training_GroundTruth.csv``.
* ``ham10000``: ``HAM10000_metadata.csv``.
* ``isic_cli``: ``metadata.csv`` with an ``isic_id`` column (``isic image download`` export).
* ``isic2024``: ``train-metadata.csv`` (ISIC 2024 / SLICE-3D: ``isic_id``, ``iddx_1..5``, ``tbp_lv_*``), with
  its images as JPEG bytes in ``train-image.hdf5`` beside it (read in place, ``images.hdf5``) or as files in
  ``train-image/image/``. Its numeric ``tbp_lv_*`` columns follow ``schema.CLEAN_COLUMNS`` in the cleaned table.

``load_dataset`` also takes the path of a CSV file (any name, e.g. ``metadata_raw_ham10000.csv``);
its layout is then told by its columns (or ``layout=``), and companion files are looked up beside it.

When nothing matches, the error gives, for every CSV in the folder, the same precise reason naming it
directly would (empty, not UTF-8, another separator, repeated or missing columns, or a usable table under
a name a folder is not searched for).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from melanoma_ml import schema
from melanoma_ml.metadata import adapters
from melanoma_ml.metadata.clean import clean_metadata
from melanoma_ml.metadata.image_files import IMAGE_EXTENSIONS
from melanoma_ml.metadata.io import (
    MetadataError,
    MetadataFileNotFound,
    read_header,
    read_table,
    require_columns,
)
from melanoma_ml.metadata.result import QUARANTINE_COLUMNS, CleaningResult, summarize

LAYOUTS: tuple[str, ...] = ("isic2020", "isic2019", "ham10000", "isic_cli", "isic2024")

SOURCE_NAMES: dict[str, str] = {
    "isic2020": "ISIC2020",
    "isic2019": "ISIC2019",
    "ham10000": "HAM10000",
    "isic_cli": "ISIC-archive",
    "isic2024": "ISIC2024",
}

ISIC2020_TABLES = ("ISIC_2020_Training_GroundTruth_v2.csv", "ISIC_2020_Training_GroundTruth.csv")
ISIC2020_DUPLICATES = "ISIC_2020_Training_Duplicates.csv"
ISIC2019_METADATA = "ISIC_2019_Training_Metadata.csv"
ISIC2019_GROUND_TRUTH = "ISIC_2019_Training_GroundTruth.csv"
HAM10000_METADATA = "HAM10000_metadata.csv"
ISIC2024_METADATA = "train-metadata.csv"
ISIC2024_HDF5 = "train-image.hdf5"
ISIC2024_IMAGE_DIR = "train-image/image"
GENERIC_TABLES = ("train.csv", "metadata.csv")
COMPANION_TABLES = (ISIC2020_DUPLICATES, ISIC2019_GROUND_TRUTH)
MAX_DIAGNOSED_TABLES = 10
"""At most this many CSVs of a folder are named, with their problem, when no layout matches."""

REQUIREMENTS: dict[str, str] = {
    "isic2020": f"{' or '.join(ISIC2020_TABLES)}, or train.csv/metadata.csv with image_name and target "
    f"(optional {ISIC2020_DUPLICATES})",
    "isic2019": f"{ISIC2019_METADATA} (+ {ISIC2019_GROUND_TRUTH} for the labels)",
    "ham10000": f"{HAM10000_METADATA} (lesion_id, image_id, dx, age, sex, localization)",
    "isic_cli": "metadata.csv with an isic_id column (isic-cli export)",
    "isic2024": f"{ISIC2024_METADATA} (+ {ISIC2024_HDF5} or {ISIC2024_IMAGE_DIR}/ for the images)",
}

IMAGE_DIR_CANDIDATES: tuple[tuple[str, ...], ...] = (
    ("jpeg/train",),
    ("train",),
    ("images",),
    ("ISIC_2019_Training_Input/ISIC_2019_Training_Input",),
    ("ISIC_2019_Training_Input",),
    ("HAM10000_images_part_1", "HAM10000_images_part_2", "ham10000_images_part_1", "ham10000_images_part_2"),
    (ISIC2024_IMAGE_DIR,),
    (".",),
)
"""Image folders looked for inside a dataset folder, in order; the first group with images wins (all
folders of a group that hold images are used)."""


@dataclass(frozen=True)
class LayoutMatch:
    """A recognized layout: ``files`` maps roles (``table``, ``ground_truth``, ``duplicates``) to paths."""

    name: str
    files: dict[str, Path] = field(default_factory=dict)
    reason: str = ""


def detect_layout(path: str | Path) -> LayoutMatch:
    """Which layout ``path`` (a dataset folder or a metadata CSV) is in, and why.

    Raises:
        MetadataFileNotFound: ``path`` does not exist.
        MetadataError: nothing matches; the message lists the files found and what each layout needs.
    """
    path = Path(path)
    if not path.exists():
        raise MetadataFileNotFound(f"dataset not found: {path}; set data.source_dir to the dataset folder")
    if path.is_file():
        return _layout_of_file(path)
    matches = [m for m in (_match(path, name) for name in LAYOUTS) if m is not None]
    if not matches:
        raise MetadataError(_nothing_matches(path))
    best = matches[0]
    others = [m.name for m in matches[1:]]
    if others:
        reason = f"{best.reason}; also present: {', '.join(others)} (choose one with data.layout)"
        return LayoutMatch(best.name, best.files, reason)
    return best


def layout_files(path: str | Path, layout: str) -> LayoutMatch:
    """The files of ``layout`` in folder/CSV ``path`` (``layout`` named by the user, not detected)."""
    path = Path(path)
    if layout not in LAYOUTS:
        raise MetadataError(f"unknown layout {layout!r}; choose 'auto' or one of {list(LAYOUTS)}")
    if not path.exists():
        raise MetadataFileNotFound(f"dataset not found: {path}; set data.source_dir to the dataset folder")
    if path.is_file():
        files = {"table": path, **_companions(path.parent, layout)}
        return LayoutMatch(layout, files, f"{path.name} loaded as {layout} (layout given)")
    match = _match(path, layout)
    if match is None:
        raise MetadataError(
            f"{path} is not in the {layout} layout: it needs {REQUIREMENTS[layout]}. "
            + _nothing_matches(path)
        )
    return match


def find_image_dirs(folder: str | Path) -> list[Path]:
    """Image folders inside a dataset folder (``IMAGE_DIR_CANDIDATES``); [] when none holds images."""
    folder = Path(folder)
    for group in IMAGE_DIR_CANDIDATES:
        dirs = [(folder / name).resolve() for name in group]
        with_images = [d for d in dict.fromkeys(dirs) if d.is_dir() and _has_images(d)]
        if with_images:
            return with_images
    return []


def load_dataset(
    path: str | Path,
    *,
    layout: str = "auto",
    image_dir: str | Path | Sequence[str | Path] | None = None,
    check_images: bool = True,
    hash_images: bool = True,
    source: str | None = None,
    is_external: bool = False,
    require_labels: bool = True,
    image_ext: str = ".jpg",
    age_out_of_range: str = "missing",
) -> CleaningResult:
    """Detect (or take) the layout of ``path``, read, adapt and clean it.

    Args:
        path: Dataset folder or one metadata CSV file.
        layout: ``"auto"`` or one of ``LAYOUTS``.
        image_dir: Image folder(s); None finds them inside the dataset folder (``find_image_dirs``).
        check_images: Find and decode every image (False: metadata only).
        hash_images: sha256 every image to find content duplicates.
        source: Name for the ``source`` column; default ``SOURCE_NAMES[layout]``.
        is_external: Rows are training-only (see ``folds``).
        require_labels: False keeps unlabeled rows (e.g. ISIC 2019 metadata without its ground truth,
            used as a supplementary source in ``merge_sources``).
        image_ext: Extension tried first when looking for image files.
        age_out_of_range: ``"missing"`` or ``"quarantine"`` (``DataConfig.age_out_of_range``).

    Returns:
        CleaningResult whose summary also has ``layout``, ``layout_reason``, ``files`` and ``image_dirs``.
    """
    match = detect_layout(path) if layout == "auto" else layout_files(path, layout)
    table_path = match.files["table"]
    table = read_table(table_path)
    raw = _adapt(match, table, require_labels)
    raw, official = _official_duplicates(raw, match.files.get("duplicates"))
    source = source or SOURCE_NAMES[match.name]
    dirs: list[Path] = []
    if check_images:
        if image_dir is None and "images" in match.files:  # ISIC 2024 train-image.hdf5
            image_dir = match.files["images"]
        dirs = _resolve_image_dirs(image_dir, table_path.parent)
    result = clean_metadata(
        raw,
        image_dir=dirs or None,
        source=source,
        is_external=is_external,
        check_images=check_images,
        hash_images=hash_images,
        image_ext=image_ext,
        require_labels=require_labels,
        age_out_of_range=age_out_of_range,
    )
    if official is not None:
        result = _with_quarantined(result, official.assign(source=source), rows_in=len(raw) + len(official))
    if match.name == "isic2024":
        result = _with_tabular(result, adapters.tabular_columns(table))
    result.summary.update(
        layout=match.name,
        layout_reason=match.reason,
        files={role: str(p) for role, p in match.files.items()},
        image_dirs=[str(d) for d in dirs],
    )
    return result


def _adapt(match: LayoutMatch, raw: pd.DataFrame, require_labels: bool) -> pd.DataFrame:
    table_path = match.files["table"]
    if match.name == "isic2020":
        require_columns(raw, [schema.IMAGE], table_path, "ISIC 2020")
        return raw
    if match.name == "ham10000":
        return adapters.from_ham10000(raw, path=table_path)
    if match.name == "isic_cli":
        return adapters.from_isic_cli(raw, path=table_path)
    if match.name == "isic2024":
        return adapters.from_isic2024(raw, path=table_path)
    gt_path = match.files.get("ground_truth")
    if gt_path is None and require_labels:
        raise MetadataError(
            f"ISIC 2019 metadata {table_path} has no labels: {ISIC2019_GROUND_TRUTH} is not beside it. "
            "Put the ground-truth file there, or load it with require_labels=False as a supplementary "
            "source for merge_sources (labels from the primary source)"
        )
    ground_truth = read_table(gt_path) if gt_path is not None else None
    return adapters.from_isic2019(raw, ground_truth, metadata_path=table_path, gt_path=gt_path)


def _official_duplicates(
    raw: pd.DataFrame, duplicates_path: Path | None
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Split off the second image of each official ISIC 2020 duplicate pair whose first image is listed."""
    if duplicates_path is None:
        return raw, None
    pairs = read_table(duplicates_path)
    require_columns(pairs, ["image_name_1", "image_name_2"], duplicates_path, "ISIC 2020 duplicates")
    names = raw[schema.IMAGE].str.strip()
    first_of = dict(zip(pairs["image_name_2"].str.strip(), pairs["image_name_1"].str.strip(), strict=True))
    present = set(names)
    second = names.map(first_of)
    drop = (second.notna() & second.isin(present)).to_numpy()
    quarantine = pd.DataFrame(
        {
            schema.Q_ROW: raw.index[drop],
            schema.IMAGE: names[drop].to_numpy(),
            "check": "official_duplicate",
            schema.Q_REASON: (
                "official duplicate of "
                + second[drop]
                + f" ({duplicates_path.name}); the first image is kept"
            ).to_numpy(),
        }
    )
    return raw[~drop], quarantine


def _with_quarantined(result: CleaningResult, extra: pd.DataFrame, rows_in: int) -> CleaningResult:
    quarantine = pd.concat([result.quarantine, extra[list(QUARANTINE_COLUMNS)]], ignore_index=True)
    quarantine = quarantine.sort_values(schema.Q_ROW, kind="stable").reset_index(drop=True)
    summary = {**result.summary, **summarize(result.clean, quarantine, result.warnings, rows_in=rows_in)}
    return CleaningResult(
        clean=result.clean,
        quarantine=quarantine,
        warnings=result.warnings,
        summary=summary,
        conflicts=result.conflicts,
        source_rows=result.source_rows,
    )


def _with_tabular(result: CleaningResult, tabular: pd.DataFrame) -> CleaningResult:
    """The cleaned table with each kept row's numeric tabular values appended after ``schema.CLEAN_COLUMNS``."""
    values = tabular.loc[result.source_rows].reset_index(drop=True)
    clean = pd.concat([result.clean, values], axis=1)
    result.summary["tabular_columns"] = list(tabular.columns)
    return replace(result, clean=clean)


def _resolve_image_dirs(image_dir: str | Path | Sequence[str | Path] | None, folder: Path) -> list[Path]:
    if image_dir is not None:
        dirs = [image_dir] if isinstance(image_dir, str | Path) else list(image_dir)
        return [Path(d).expanduser().resolve() for d in dirs]
    found = find_image_dirs(folder)
    if not found:
        looked = ", ".join("+".join(group) for group in IMAGE_DIR_CANDIDATES)
        raise MetadataError(
            f"no image folder with {'/'.join(IMAGE_EXTENSIONS)} files found in {folder} (looked for {looked}; "
            f"ISIC 2024: {ISIC2024_HDF5}); set data.image_dir to the image folder or HDF5 file, or pass "
            "check_images=False for a metadata-only table"
        )
    return found


def _has_images(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return any(e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file() for e in entries)


def _header(path: Path) -> list[str]:
    """Column names of a CSV without reading its rows ([] when unusable: ``_table_problems`` says why)."""
    try:
        return read_header(path)
    except (OSError, MetadataError):
        return []


def _layout_by_columns(columns: list[str]) -> str | None:
    cols = set(columns)
    if schema.IMAGE in cols and cols & {schema.TARGET, schema.DIAGNOSIS}:
        return "isic2020"
    if {"image_id", "dx"} <= cols:
        return "ham10000"
    if "isic_id" in cols and any(c.startswith("tbp_lv_") or c.startswith("iddx_") for c in cols):
        return "isic2024"
    if "isic_id" in cols:
        return "isic_cli"
    if "image" in cols and cols & {"anatom_site_general", "age_approx", "sex", "gender", "lesion_id"}:
        return "isic2019"
    return None


def _layout_of_file(path: Path) -> LayoutMatch:
    columns = read_header(path)
    name = _layout_by_columns(columns)
    if name is None:
        raise MetadataError(_columns_problem(path, columns))
    files = {"table": path, **_companions(path.parent, name)}
    return LayoutMatch(name, files, f"{path.name} has {name} columns")


def _columns_problem(path: Path, columns: list[str]) -> str:
    """Why a table with these columns fits no layout, for the layout its columns come closest to."""
    cols = set(columns)
    found = f"found columns {columns}"
    if schema.IMAGE in cols:
        missing = (
            f"it has {schema.IMAGE} but no label column ({schema.TARGET} or {schema.DIAGNOSIS}) for isic2020"
        )
        fix = f"add {schema.TARGET} (1 = melanoma, 0 = not) or {schema.DIAGNOSIS}"
    elif "image_id" in cols:
        missing, fix = "it has image_id but no dx column for ham10000", "add the dx column"
    elif "image" in cols:
        missing = "it has image but no metadata column (age_approx, anatom_site_general, sex, lesion_id) for isic2019"
        fix = "add the metadata columns"
    else:
        needs = "; ".join(f"{k}: {v}" for k, v in REQUIREMENTS.items())
        return (
            f"cannot tell the layout of {path} from its columns {columns}; name it with data.layout "
            f"or use a table with the columns one layout needs ({needs})"
        )
    return f"cannot tell the layout of {path}: {missing}; {found}. {fix.capitalize()}, or name the layout with data.layout"


def _table_problems(folder: Path) -> list[str]:
    """For each CSV directly in ``folder`` (companion tables aside), why detection could not use it."""
    tables = sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() == ".csv" and p.name not in COMPANION_TABLES and p.is_file()
    )
    picked_up = [*ISIC2020_TABLES, *GENERIC_TABLES, ISIC2019_METADATA, HAM10000_METADATA, ISIC2024_METADATA]
    problems = []
    for path in tables[:MAX_DIAGNOSED_TABLES]:
        try:
            columns = read_header(path)
        except MetadataError as err:
            problems.append(str(err))
            continue
        name = _layout_by_columns(columns)
        if name is None:
            problems.append(_columns_problem(path, columns))
        else:
            problems.append(
                f"{path.name} has {name} columns, but a folder is searched only for {', '.join(picked_up)}: "
                f"set data.source_dir to the CSV itself ({path})"
            )
    return problems


def _companions(folder: Path, layout: str) -> dict[str, Path]:
    if layout == "isic2020" and (folder / ISIC2020_DUPLICATES).is_file():
        return {"duplicates": folder / ISIC2020_DUPLICATES}
    if layout == "isic2019" and (folder / ISIC2019_GROUND_TRUTH).is_file():
        return {"ground_truth": folder / ISIC2019_GROUND_TRUTH}
    if layout == "isic2024" and (folder / ISIC2024_HDF5).is_file():
        return {"images": folder / ISIC2024_HDF5}
    return {}


def _match(folder: Path, layout: str) -> LayoutMatch | None:
    if layout == "isic2020":
        for name in ISIC2020_TABLES:
            if (folder / name).is_file():
                return LayoutMatch(
                    layout, {"table": folder / name, **_companions(folder, layout)}, f"found {name}"
                )
        for name in GENERIC_TABLES:
            if (folder / name).is_file() and _layout_by_columns(_header(folder / name)) == "isic2020":
                return LayoutMatch(
                    layout,
                    {"table": folder / name, **_companions(folder, layout)},
                    f"found {name} with image_name and target/diagnosis columns",
                )
        return None
    if layout == "isic2019":
        if (folder / ISIC2019_METADATA).is_file():
            files = {"table": folder / ISIC2019_METADATA, **_companions(folder, layout)}
            label = "with" if "ground_truth" in files else "without"
            return LayoutMatch(layout, files, f"found {ISIC2019_METADATA} ({label} {ISIC2019_GROUND_TRUTH})")
        return None
    if layout == "ham10000":
        if (folder / HAM10000_METADATA).is_file():
            return LayoutMatch(layout, {"table": folder / HAM10000_METADATA}, f"found {HAM10000_METADATA}")
        return None
    if layout == "isic2024":
        if (folder / ISIC2024_METADATA).is_file():
            files = {"table": folder / ISIC2024_METADATA, **_companions(folder, layout)}
            images = f"images in {ISIC2024_HDF5}" if "images" in files else f"no {ISIC2024_HDF5}"
            return LayoutMatch(layout, files, f"found {ISIC2024_METADATA} ({images})")
        return None
    table = folder / "metadata.csv"
    if table.is_file() and "isic_id" in _header(table):
        return LayoutMatch(layout, {"table": table}, "found metadata.csv with an isic_id column (isic-cli)")
    return None


def _nothing_matches(folder: Path) -> str:
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    shown = ", ".join(found[:30]) + (f", ... ({len(found)} in all)" if len(found) > 30 else "")
    needs = "; ".join(f"{name} needs {need}" for name, need in REQUIREMENTS.items())
    problems = "".join(f"{problem}. " for problem in _table_problems(folder))
    return f"no known dataset layout in {folder}: {problems}Found [{shown or 'nothing'}]. {needs}"
