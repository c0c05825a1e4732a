"""Reading metadata tables with errors that say what is wrong and how to fix it."""

from __future__ import annotations

import csv
import warnings
from collections.abc import Iterable
from pathlib import Path

import pandas as pd


class MetadataError(ValueError):
    """A metadata table or dataset folder cannot be used as given; the message names the fix."""


class MetadataFileNotFound(MetadataError, FileNotFoundError):
    """A metadata file named by the user or a layout is not there."""


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a CSV (or Parquet) metadata table with every value as a string.

    Values are kept as text (blanks as ``""``) so that cleaning decides how each column is parsed and
    can report the raw value it changed. UTF-8 with or without BOM and LF or CRLF line endings are
    accepted; column names are stripped of surrounding whitespace.

    Raises:
        MetadataFileNotFound: ``path`` does not exist.
        MetadataError: ``path`` is a folder, is empty (0 bytes or header only), is not UTF-8 text or
            cannot be parsed as CSV.
    """
    path = Path(path)
    if not path.exists():
        raise MetadataFileNotFound(
            f"metadata file not found: {path}; check the path (data.source_dir) or point it at the "
            "dataset's CSV"
        )
    if path.is_dir():
        raise MetadataError(f"expected a metadata CSV file but {path} is a folder; use load_dataset(folder)")
    if path.suffix.lower() == ".parquet":
        table = pd.read_parquet(path).astype("str").where(lambda t: t.notna(), "")
    else:
        table = _read_csv(path)
    table.columns = [str(c).strip() for c in table.columns]
    if len(table) == 0:
        raise MetadataError(
            f"metadata file has a header but no data rows: {path}; export the table again with its rows"
        )
    return table


def _read_csv(path: Path) -> pd.DataFrame:
    if path.stat().st_size == 0:
        raise MetadataError(f"metadata CSV is empty (0 bytes): {path}; re-download or re-export the table")
    try:
        with warnings.catch_warnings():
            # A row with more fields than the header would otherwise be silently cut or turned into an index.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            return pd.read_csv(
                path,
                dtype="str",
                keep_default_na=False,
                na_filter=False,
                encoding="utf-8-sig",
                index_col=False,
            )
    except pd.errors.EmptyDataError as err:
        raise MetadataError(
            f"metadata CSV has no header or rows: {path}; re-download or re-export the table"
        ) from err
    except UnicodeDecodeError as err:
        raise MetadataError(
            f"metadata CSV is not UTF-8 text: {path} (undecodable byte at offset {err.start}); "
            "re-save it as UTF-8 CSV"
        ) from err
    except (pd.errors.ParserError, pd.errors.ParserWarning, csv.Error) as err:
        raise MetadataError(
            f"cannot parse metadata CSV {path}: {err}; check that it is a comma-separated file with one "
            "header line and the same number of fields on every line"
        ) from err


def require_columns(
    table: pd.DataFrame, columns: Iterable[str], path: str | Path | None = None, layout: str | None = None
) -> None:
    """Raise naming every missing column, the columns that are there, and the layout that needs them.

    Args:
        table: The table read from ``path``.
        columns: Columns the caller needs.
        path: Where the table came from (for the message).
        layout: Human name of the expected layout, e.g. ``"ISIC 2020 (train.csv)"``.

    Raises:
        MetadataError: one or more columns are missing.
    """
    missing = [c for c in columns if c not in table.columns]
    if not missing:
        return
    where = f" in {path}" if path is not None else ""
    expected = f" for the {layout} layout" if layout else ""
    raise MetadataError(
        f"missing column(s) {missing}{where}{expected}; found columns {list(table.columns)}. "
        "Rename the columns or choose the matching layout (data.layout)"
    )
