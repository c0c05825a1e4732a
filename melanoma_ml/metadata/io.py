"""Reading metadata tables with errors that say what is wrong and how to fix it."""

from __future__ import annotations

import csv
import io
import warnings
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from melanoma_ml.errors import InputValueError


class MetadataError(InputValueError):
    """A metadata table or dataset folder cannot be used as given; the message names the fix."""


class MetadataFileNotFound(MetadataError, FileNotFoundError):
    """A metadata file named by the user or a layout is not there."""


OTHER_DELIMITERS: dict[str, str] = {";": "semicolon", "\t": "tab", "|": "pipe"}
"""Separators of a CSV saved with another list separator (e.g. by a spreadsheet in a comma-decimal locale),
named in the error: tables are read comma-separated only."""

_CSV_FIX = (
    "check that it is a comma-separated file with one header line and the same number of fields on every line"
)

_HEADER_BYTES = 1 << 20
"""``read_header`` decodes at most this much of the file's start to find the header line."""


def read_header(path: str | Path) -> list[str]:
    """Column names of a metadata CSV, stripped, read from its header line only.

    The dialect is ``read_table``'s (comma-separated, double quotes, UTF-8 with or without BOM, blank lines
    before the header skipped), so both see the same columns.

    Raises:
        MetadataFileNotFound: ``path`` does not exist.
        MetadataError: ``path`` is a folder, is empty, is not UTF-8 text, has no header line, is separated
            by another character than a comma, or repeats a column name.
    """
    path = _existing_file(path)
    if path.stat().st_size == 0:
        raise MetadataError(f"metadata CSV is empty (0 bytes): {path}; re-download or re-export the table")
    with open(path, "rb") as fh:
        head = fh.read(_HEADER_BYTES)
    try:
        text = head.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        cut_char = len(head) == _HEADER_BYTES and err.start >= len(head) - 3
        if not cut_char:
            raise MetadataError(
                f"metadata CSV is not UTF-8 text: {path} (undecodable byte at offset {err.start}); "
                "re-save it as UTF-8 CSV"
            ) from err
        text = head[: err.start].decode("utf-8-sig")
    try:
        row = next((r for r in csv.reader(io.StringIO(text, newline="")) if any(c.strip() for c in r)), None)
    except csv.Error as err:
        raise MetadataError(
            f"cannot parse the header line of metadata CSV {path}: {err}; {_CSV_FIX}"
        ) from err
    if row is None:
        raise MetadataError(f"metadata CSV has no header or rows: {path}; re-download or re-export the table")
    columns = [c.strip() for c in row]
    if len(columns) == 1:
        for delimiter, name in OTHER_DELIMITERS.items():
            if delimiter in columns[0]:
                raise MetadataError(
                    f"metadata CSV {path} looks {name}-separated (its header {columns[0][:80]!r} is one "
                    f"column); re-save it comma-separated (spreadsheets: CSV UTF-8 with ',' as separator)"
                )
    require_unique_columns(columns, path)
    return columns


def require_unique_columns(columns: Iterable[object], path: str | Path | None = None) -> None:
    """Raise when two column names are the same once stripped and case-folded.

    A reader keeps only one of two equal names (pandas renames the second ``image_name.1``), so the values
    of the other, e.g. a second column of patient ids, would be lost without a word. Blank names are
    not compared (they name no field).

    Raises:
        MetadataError: naming the repeated names and ``path``.
    """
    names = [str(c).strip() for c in columns]
    counts = Counter(n.casefold() for n in names if n)
    repeated = [n for n in dict.fromkeys(names) if n and counts[n.casefold()] > 1]
    if not repeated:
        return
    where = f"metadata table {path}" if path is not None else "metadata table"
    raise MetadataError(
        f"{where} has repeated column name(s) {repeated} (compared ignoring case and surrounding spaces); "
        "only one of each could be read and the values in the other would be lost: rename or delete the "
        "extra column(s) so that every name appears once"
    )


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
    path = _existing_file(path)
    if path.suffix.lower() == ".parquet":
        table = pd.read_parquet(path).astype("str").where(lambda t: t.notna(), "")
    else:
        read_header(path)  # wrong separator and repeated names, which pandas would hide
        table = _read_csv(path)
    table.columns = [str(c).strip() for c in table.columns]
    require_unique_columns(table.columns, path)
    if len(table) == 0:
        raise MetadataError(
            f"metadata file has a header but no data rows: {path}; export the table again with its rows"
        )
    return table


def _existing_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise MetadataFileNotFound(
            f"metadata file not found: {path}; check the path (data.source_dir) or point it at the "
            "dataset's CSV"
        )
    if path.is_dir():
        raise MetadataError(f"expected a metadata CSV file but {path} is a folder; use load_dataset(folder)")
    return path


def _read_csv(path: Path) -> pd.DataFrame:
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
        raise MetadataError(f"cannot parse metadata CSV {path}: {err}; {_CSV_FIX}") from err


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
