"""What to score: turn a folder of images, a CSV of images or a dataset folder into one table of images.

``read_scoring_input(path)`` accepts, in this order:

* a dataset folder or metadata CSV in a layout ``metadata.layouts.detect_layout`` recognizes (ISIC
  2020/2019, HAM10000, isic-cli, ISIC 2024): its cleaned table (labels not required), with the images
  found and probed by the cleaner; rows the cleaner sets aside are reported with its reason;
* any other CSV with an ``image_path`` column (paths absolute or relative to the CSV's folder) or an
  ``image_name`` column (looked up like a layout's images, in the CSV's image folder), plus optional
  metadata columns: ``age_approx``/``sex``/``anatom_site_general_challenge`` or ``age``/``gender``/
  ``anatom_site_general``/``localization``/``site``, harmonized by ``metadata.clean.clean_metadata`` as
  in training (``m`` -> male, "lower limb" -> lower extremity, an age of 0 -> missing);
* a folder without a recognized layout: the one CSV in it when that CSV names its images as above, else
  every image file directly in it, scored without metadata (every field missing, as the model was
  trained to handle); every other file in it (``.gif``, a text file, a FIFO or device) gets a row in
  ``rejected`` with the reason.

Each table row also keeps its age, sex and site *as given* (``ScoringInput.given``) where cleaning set a
value it could not read missing, so ``batch.score_inputs`` reads every value with the app's own rules
(``request_fields.parse_metadata_leniently``) and says which it could not use.

Nothing is decoded here except by the layout reader's probe; ``batch.score_inputs`` decodes each image
once, with the training cache's decoder, and reports the ones that fail.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from melanoma_ml import schema
from melanoma_ml.errors import InputFileNotFoundError, InputValueError
from melanoma_ml.metadata import MetadataError, clean_metadata, detect_layout, load_dataset, read_table
from melanoma_ml.metadata.image_files import IMAGE_EXTENSIONS, find_image, index_image_files
from melanoma_ml.metadata.io import read_header
from melanoma_ml.metadata.layouts import find_image_dirs

ERROR = "error"
"""Column of ``ScoringInput.rejected`` (and of the scores table): why an image was not scored."""

IMAGE_COLUMNS = (schema.IMAGE_PATH, schema.IMAGE)
"""Columns a plain CSV may name its images by: a file path, or an image name looked up in its folder."""

METADATA_ALIASES: dict[str, tuple[str, ...]] = {
    schema.AGE: (schema.AGE, "age"),
    schema.SEX: (schema.SEX, "gender"),
    schema.SITE: (schema.SITE, "anatom_site_general", "localization", "site"),
}
"""Metadata columns of a plain CSV (first present wins, matched ignoring case and spaces) -> cleaned name."""

_PLAIN_SOURCE = "batch"


@dataclass(frozen=True)
class ScoringInput:
    """The images at a path, ready to decode and score.

    Attributes:
        kind: ``"folder"``, ``"csv"`` or the detected layout name (``"ham10000"``, ...).
        description: One line saying what was read and how, for the user.
        table: One row per image to score, in input order, with at least ``image_name``, ``image_path``,
            ``age_approx``, ``sex`` and ``anatom_site_general_challenge`` (missing as NaN); further columns
            (a layout's tabular features, a CSV's other columns) follow.
        rejected: ``image_name``, ``image_path``, ``error``: rows that cannot be scored before any
            decoding (set aside by the cleaner, no image file found, an image name twice, a file of a
            folder that is no accepted image).
        given: ``age_approx``, ``sex``, ``anatom_site_general_challenge`` of each ``table`` row as the
            input gave them where cleaning set the value missing (unreadable, out of range, unknown),
            else as cleaned; None: ``table``'s own columns.
    """

    kind: str
    description: str
    table: pd.DataFrame
    rejected: pd.DataFrame
    given: pd.DataFrame | None = None

    def metadata_as_given(self) -> pd.DataFrame:
        """``given``, or ``table``'s metadata columns when there is none."""
        if self.given is not None:
            return self.given
        return self.table[list(schema.METADATA_FEATURES)].astype(object)


def read_scoring_input(path: str | Path) -> ScoringInput:
    """Find the images (and metadata) at ``path``; see the module docstring for what is accepted.

    Raises:
        InputFileNotFoundError: ``path`` does not exist.
        InputValueError: a CSV without an image column, a folder with neither a layout nor image files,
            or a layout whose table cannot be read (the message names the file and the fix).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise InputFileNotFoundError(
            f"nothing to score at {path}: pass a folder of images, a CSV with an image_path or image_name "
            "column, or a dataset folder (ISIC 2020/2019, HAM10000, isic-cli, ISIC 2024 layout)"
        )
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise InputValueError(
                f"{path} is not a CSV; pass the folder that holds it, or a CSV listing the images"
            )
        read_header(path)  # an unreadable CSV (encoding, separator, repeated columns) says so here
    try:
        match = detect_layout(path)
    except MetadataError as err:
        if path.is_file():
            return _from_plain_csv(path, layout_problem=str(err))
        return _from_plain_folder(path, layout_problem=str(err))
    return _from_layout(path, match.name, match.reason)


def _from_layout(path: Path, layout: str, reason: str) -> ScoringInput:
    result = load_dataset(path, layout=layout, require_labels=False, check_images=True, hash_images=False)
    table = result.clean.drop(columns=[schema.TARGET], errors="ignore")
    quarantine = result.quarantine
    rejected = _rejected(
        quarantine[schema.IMAGE].fillna("").astype(str),
        [""] * len(quarantine),
        quarantine[schema.Q_REASON].astype(str),
    )
    description = (
        f"{layout} dataset ({reason}): {len(table)} images with metadata, "
        f"{len(rejected)} set aside by cleaning"
    )
    table = table.reset_index(drop=True)
    return ScoringInput(layout, description, table, rejected, _as_given(table, result.warnings))


def _from_plain_folder(folder: Path, layout_problem: str) -> ScoringInput:
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and not p.is_dir())
    files = [p for p in entries if p.is_file()]
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    tables = [p for p in files if p.suffix.lower() == ".csv"]
    if len(tables) == 1 and _image_column(read_header(tables[0])) is not None:
        return _from_plain_csv(tables[0], layout_problem="")
    if not images:
        raise InputValueError(
            f"nothing to score in {folder}: no {'/'.join(IMAGE_EXTENSIONS)} files directly in it, no CSV "
            f"naming images (an {' or '.join(IMAGE_COLUMNS)} column), and no dataset layout ({layout_problem})"
        )
    names = pd.Series([p.stem for p in images], dtype="object")
    paths = [str(p.resolve()) for p in images]
    table = _scoring_table(names, paths, pd.DataFrame(index=names.index))
    table, repeated = _split_repeated_names(table)
    skipped = [p for p in entries if p not in images]
    rejected = pd.concat(
        [
            repeated,
            _rejected(
                [p.stem for p in skipped],
                [str(p.absolute()) for p in skipped],
                [_not_an_image(p) for p in skipped],
            ),
        ],
        ignore_index=True,
    )
    note = f"; {len(skipped)} other file(s) not scored (reasons in the error column)" if skipped else ""
    description = (
        f"folder of images {folder}: {len(images)} files, scored without metadata (no dataset layout, "
        f"no CSV naming the images){note}"
    )
    return ScoringInput("folder", description, table, rejected)


def _not_an_image(path: Path) -> str:
    """Why a file of a scored folder is not scored (as a dataset folder's quarantine says it)."""
    if not path.is_file():
        return (
            f"{path.name} is not a regular file (a FIFO, device, socket or broken link): nothing to decode; "
            "remove it from the folder"
        )
    if path.suffix.lower() == ".csv":
        return (
            f"{path.name} is a CSV that names no images (no {' or '.join(IMAGE_COLUMNS)} column) or is one of "
            "several CSVs: only image files were scored; give the CSV itself to score its rows"
        )
    return (
        f"found {path.name}, which is not an accepted extension: images must be {'/'.join(IMAGE_EXTENSIONS)}; "
        f"convert the file (e.g. to {path.stem}.png) or remove it from the folder"
    )


def _from_plain_csv(csv: Path, layout_problem: str) -> ScoringInput:
    raw = read_table(csv)
    columns = {c.strip().lower(): c for c in raw.columns}
    image_column = _image_column(list(raw.columns))
    if image_column is None:
        why = f" (and no dataset layout: {layout_problem})" if layout_problem else ""
        raise InputValueError(
            f"{csv} has no column naming the images: add {schema.IMAGE_PATH} (file paths, absolute or relative "
            f"to the CSV) or {schema.IMAGE} (looked up in the CSV's folder); found {list(raw.columns)}{why}"
        )
    given = raw[columns[image_column]].fillna("").astype(str).str.strip()
    if image_column == schema.IMAGE_PATH:
        paths = [str((csv.parent / p).resolve()) if p else "" for p in given]
        names = pd.Series([Path(p).stem if p else "" for p in given], index=raw.index, dtype="object")
        if schema.IMAGE in columns:
            names = (
                raw[columns[schema.IMAGE]].fillna("").astype(str).str.strip().where(lambda s: s != "", names)
            )
    else:
        names, paths = given, None
    metadata = pd.DataFrame(index=raw.index)
    for target, aliases in METADATA_ALIASES.items():
        present = next((columns[a] for a in aliases if a in columns), None)
        if present is not None:
            metadata[target] = raw[present]
    cleaned = clean_metadata(
        metadata.assign(**{schema.IMAGE: names}),
        image_dir=None,
        source=_PLAIN_SOURCE,
        check_images=False,
        require_labels=False,
    )
    kept = cleaned.source_rows
    clean = cleaned.clean
    if paths is None:
        paths = _look_up(clean[schema.IMAGE].tolist(), csv.parent)
    else:
        by_row = dict(zip(raw.index, paths, strict=True))
        paths = [by_row[row] for row in kept]
    used = {columns[a] for aliases in METADATA_ALIASES.values() for a in aliases if a in columns}
    used |= {columns[c] for c in IMAGE_COLUMNS if c in columns}
    extras = raw.loc[kept, [c for c in raw.columns if c not in used and c not in clean.columns]]
    extras = extras.reset_index(drop=True)
    table = _scoring_table(clean[schema.IMAGE], paths, clean.join(extras))
    missing = table[schema.IMAGE_PATH] == ""
    rejected = pd.concat(
        [
            _rejected(
                cleaned.quarantine[schema.IMAGE].fillna("").astype(str),
                [""] * len(cleaned.quarantine),
                cleaned.quarantine[schema.Q_REASON].astype(str),
            ),
            _rejected(
                table.loc[missing, schema.IMAGE],
                [""] * int(missing.sum()),
                [_not_found(name, csv.parent) for name in table.loc[missing, schema.IMAGE]],
            ),
        ],
        ignore_index=True,
    )
    table = table[~missing].reset_index(drop=True)
    how = "its image_path column" if image_column == schema.IMAGE_PATH else "image_name looked up beside it"
    meta = [c for c in METADATA_ALIASES if c in metadata.columns]
    description = (
        f"CSV {csv}: {len(table)} images by {how}, metadata {', '.join(meta) or 'none (all missing)'}; "
        f"{len(rejected)} row(s) not scorable"
    )
    return ScoringInput("csv", description, table, rejected, _as_given(table, cleaned.warnings))


def _as_given(table: pd.DataFrame, warnings: pd.DataFrame) -> pd.DataFrame:
    """``table``'s metadata columns, with the raw value back wherever cleaning warned about a value.

    Cleaning warns when it sets a value missing or changes it (an unreadable or out-of-range age, an
    unknown sex or site, an age capped at 85); the app's parser then reads the raw value by its own rules
    (and caps or refuses it the same way).
    """
    given = table[list(schema.METADATA_FEATURES)].astype(object)
    if warnings.empty:
        return given
    position = {name: i for i, name in enumerate(table[schema.IMAGE].astype(str))}
    for name, column, value in zip(
        warnings[schema.IMAGE].astype(str), warnings["column"], warnings["value"], strict=True
    ):
        if column in given.columns and name in position:
            given.iat[position[name], given.columns.get_loc(column)] = value
    return given


def _image_column(columns: list[str]) -> str | None:
    lowered = {c.strip().lower() for c in columns}
    return next((c for c in IMAGE_COLUMNS if c in lowered), None)


def _look_up(names: list[str], folder: Path) -> list[str]:
    """Absolute path of each image name in the CSV folder's image folder(s); "" when not found."""
    index = index_image_files(find_image_dirs(folder) or [folder.resolve()])
    return [str(found) if (found := find_image(index, name, ".jpg")) else "" for name in names]


def _not_found(name: str, folder: Path) -> str:
    dirs = ", ".join(str(d) for d in find_image_dirs(folder)) or str(folder.resolve())
    return f"no image file named {name} with {'/'.join(IMAGE_EXTENSIONS)} in {dirs}; add it or fix the row"


def _scoring_table(names: pd.Series, paths: list[str], metadata: pd.DataFrame) -> pd.DataFrame:
    """``image_name``, ``image_path``, the three metadata columns (NaN when absent), then the other columns."""
    table = pd.DataFrame(
        {schema.IMAGE: names.astype(str).to_numpy(), schema.IMAGE_PATH: list(paths)}, index=metadata.index
    )
    for column in schema.METADATA_FEATURES:
        table[column] = metadata[column] if column in metadata.columns else np.nan
    extras = [c for c in schema.extra_columns(metadata) if c not in table.columns]
    return pd.concat([table, metadata[extras]], axis=1).reset_index(drop=True)


def _split_repeated_names(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Files of a folder that share a name (``a.jpg`` and ``a.png``): the first is scored, the rest reported."""
    repeated = table[schema.IMAGE].duplicated(keep="first")
    first = table.drop_duplicates(schema.IMAGE).set_index(schema.IMAGE)[schema.IMAGE_PATH]
    reasons = [
        f"image name {name} is also {Path(first[name]).name}, which is scored; rename one of them"
        for name in table.loc[repeated, schema.IMAGE]
    ]
    rejected = _rejected(table.loc[repeated, schema.IMAGE], table.loc[repeated, schema.IMAGE_PATH], reasons)
    return table[~repeated].reset_index(drop=True), rejected


def _rejected(names, paths, errors) -> pd.DataFrame:  # noqa: ANN001 - any sequences of equal length
    return pd.DataFrame(
        {schema.IMAGE: list(names), schema.IMAGE_PATH: list(paths), ERROR: list(errors)}, dtype="object"
    )
