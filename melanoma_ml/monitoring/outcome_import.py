"""``melanoma-ml outcomes import results.csv``: many outcomes at once, bad rows set aside with their reason.

The file: a header row naming ``case_id`` and ``outcome`` (optional ``reported_by``, ``note``, ``patient_id``,
``supersedes``), matched ignoring case, surrounding spaces and ``-``/space versus ``_`` (``Case ID``), with
``case`` and ``result`` read as ``case_id`` and ``outcome``. Separated by commas, semicolons or tabs (told by the
header); UTF-8 with or without BOM, or UTF-16 with BOM (spreadsheet "Unicode text"). Outcome values as
``outcomes.parse_outcome`` reads them.

Every data row ends in exactly one place: recorded, already recorded (an identical record exists, so
re-importing a file adds nothing), or quarantined. Quarantined rows are written, with their row number as a
spreadsheet shows it (the header is row 1) and the reason, to
``monitoring/outcomes/quarantine/<file>-<UTC time>.csv`` (0o600): every field as given, bytes that are not
UTF-8 kept as they were, and a ``'`` put before a cell a spreadsheet would run as a formula
(``outcomes.spreadsheet_safe``). Reasons: wrong number of fields, a field that is not UTF-8, a text longer
than ``outcomes.MAX_CHARS``, empty or unknown case id, a bad outcome or ``supersedes`` value.

The whole file is refused (``OutcomeError``, nothing written) only when no row can be read: missing or
empty file, bigger than ``MAX_FILE_BYTES``, binary (NUL bytes), a header without ``case_id``/``outcome`` or
naming a column twice. Blank rows and a repeat of the header row (two exports pasted together) are
skipped and counted.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from melanoma_ml.artifacts import ArtifactPaths
from melanoma_ml.atomic import atomic_write_bytes
from melanoma_ml.monitoring.outcomes import (
    CONFLICT,
    RESOLVE_HINT,
    OutcomeError,
    OutcomeRecord,
    append_records,
    case_status,
    known_case_ids,
    new_record,
    private_dir,
    read_outcomes,
    record_key,
    spreadsheet_safe,
    utc_now,
)

MAX_FILE_BYTES = 50 * 2**20
"""Largest import file read (50 MiB, about a million rows): split a bigger one."""

COLUMNS: tuple[str, ...] = ("case_id", "outcome", "reported_by", "note", "patient_id", "supersedes")
QUARANTINE_COLUMNS: tuple[str, ...] = ("row", "reason")
"""Columns a quarantine file puts before the row as given; ignored (not listed) when it is imported again."""
REQUIRED: tuple[str, ...] = ("case_id", "outcome")
ALIASES: dict[str, str] = {"case": "case_id", "caseid": "case_id", "result": "outcome"}
DELIMITERS: tuple[str, ...] = (",", ";", "\t")


@dataclass
class ImportSummary:
    """What an import did; ``rows`` = ``recorded`` + ``already_recorded`` + ``quarantined``."""

    file: Path
    rows: int = 0
    recorded: int = 0
    already_recorded: int = 0
    quarantined: int = 0
    skipped_blank: int = 0
    skipped_header_repeats: list[int] = field(default_factory=list)
    ignored_columns: list[str] = field(default_factory=list)
    quarantine_file: Path | None = None
    conflicts: list[str] = field(default_factory=list)
    encoding: str = "utf-8"

    @property
    def usable(self) -> bool:
        """Whether any row was read as an outcome (recorded now or before)."""
        return self.recorded + self.already_recorded > 0

    def text(self) -> str:
        lines = [
            f"{self.file}: {self.rows} data rows: {self.recorded} recorded, {self.already_recorded} already "
            f"recorded (nothing added), {self.quarantined} quarantined"
        ]
        if self.quarantine_file is not None:
            lines.append(
                f"quarantined rows, each with its row number and reason: {self.quarantine_file} (correct "
                "them there and import that file again: its row and reason columns are ignored)"
            )
        if self.skipped_blank:
            lines.append(f"skipped {self.skipped_blank} blank row(s)")
        if self.skipped_header_repeats:
            rows = ", ".join(map(str, self.skipped_header_repeats[:10]))
            lines.append(f"skipped the header repeated at row(s) {rows}")
        if self.ignored_columns:
            lines.append(f"ignored column(s) {self.ignored_columns} (read: {', '.join(COLUMNS)})")
        if self.conflicts:
            shown = ", ".join(self.conflicts[:10]) + (" ..." if len(self.conflicts) > 10 else "")
            lines.append(
                f"{len(self.conflicts)} case(s) now have conflicting outcomes, left out of the labels until "
                f"resolved: {shown}; {RESOLVE_HINT}"
            )
        return "\n".join(lines)


def import_outcomes(
    root: str | Path, csv_path: str | Path, *, reported_by: str | None = None
) -> ImportSummary:
    """Record every good row of ``csv_path`` for the artifact root ``root`` (module docstring).

    Args:
        root: The artifact root (its prediction log says which case ids exist).
        csv_path: The outcomes file.
        reported_by: Used for rows without a ``reported_by`` value.

    Raises:
        OutcomeError: the file cannot be read at all; nothing is written.
    """
    path = Path(csv_path)
    text, encoding = _read_text(path)
    delimiter, header_fields, columns = _header(path, text)
    summary = ImportSummary(file=path, encoding=encoding)
    summary.ignored_columns = [
        h.strip() or f"(unnamed column {i})"
        for i, (h, c) in enumerate(zip(header_fields, columns, strict=True), start=1)
        if c is None and _normalise(h) not in QUARANTINE_COLUMNS
    ]
    known = known_case_ids(root)
    seen = {record_key(r) for r in read_outcomes(root).itertuples()}
    records: list[OutcomeRecord] = []
    quarantined: list[tuple[int, str, list[str]]] = []
    now = utc_now()
    for number, fields in _rows(text, delimiter):
        if number == 1:
            continue
        if not any(f.strip() for f in fields):
            summary.skipped_blank += 1
            continue
        if [f.strip() for f in fields] == [h.strip() for h in header_fields]:
            summary.skipped_header_repeats.append(number)
            continue
        summary.rows += 1
        try:
            record = _record(fields, header_fields, columns, known, root, now, path.name, number, reported_by)
        except OutcomeError as err:
            quarantined.append((number, str(err), fields))
            continue
        if record_key(record) in seen:
            summary.already_recorded += 1
        else:
            seen.add(record_key(record))
            records.append(record)
    if quarantined:
        summary.quarantine_file = _write_quarantine(root, path, header_fields, quarantined)
        summary.quarantined = len(quarantined)
    summary.recorded = append_records(root, records)
    if records:
        touched = {r.case_id for r in records}
        status = case_status(read_outcomes(root))
        summary.conflicts = sorted(
            status.loc[status["state"] == CONFLICT, "case_id"].loc[lambda s: s.isin(touched)]
        )
    return summary


# ---------------------------------------------------------------------------------------------- reading
def _read_text(path: Path) -> tuple[str, str]:
    """The file's text (undecodable bytes kept as surrogates, ``surrogateescape``) and its encoding."""
    if not path.exists():
        raise OutcomeError(f"outcomes file not found: {path}; check the path")
    if path.is_dir():
        raise OutcomeError(f"{path} is a folder: give the outcomes CSV file")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise OutcomeError(
            f"{path} has {size:,} bytes, more than the {MAX_FILE_BYTES:,} read at once: split it into smaller "
            "files and import each"
        )
    raw = path.read_bytes()
    if not raw.strip():
        raise OutcomeError(
            f"{path} is empty: nothing imported. Expected a CSV with a header row case_id,outcome and one row "
            "per case"
        )
    for bom, name in ((codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be")):
        if raw.startswith(bom):
            try:
                return raw[len(bom) :].decode(name), "utf-16"
            except UnicodeDecodeError as err:
                raise OutcomeError(
                    f"{path} starts as UTF-16 but byte {err.start} is not: re-save it as UTF-8 CSV"
                ) from err
    if b"\x00" in raw:
        offset = raw.index(b"\x00")
        raise OutcomeError(
            f"{path} is not a text file (it holds NUL bytes, the first at offset {offset}): expected a CSV "
            "with a header row case_id,outcome; export the results as CSV (UTF-8)"
        )
    encoding = "utf-8-sig" if raw.startswith(codecs.BOM_UTF8) else "utf-8"
    return raw.decode(encoding, errors="surrogateescape"), encoding


def _normalise(name: str) -> str:
    key = re.sub(r"[\s\-]+", "_", name.strip().lower())
    return ALIASES.get(key, key)


def _header(path: Path, text: str) -> tuple[str, list[str], list[str | None]]:
    """``(delimiter, header fields as given, the column each field is or None)`` of the first non-blank row."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    best: tuple[str, list[str]] | None = None
    for delimiter in DELIMITERS:
        fields = next(csv.reader([first], delimiter=delimiter), [])
        names = [_normalise(f) for f in fields]
        if all(r in names for r in REQUIRED):
            best = (delimiter, fields)
            break
    if best is None:
        shown = first if len(first) <= 120 else first[:117] + "..."
        raise OutcomeError(
            f"{path}: the first row must name the columns case_id and outcome (optional: reported_by, note, "
            f"patient_id, supersedes), separated by commas; found {shown!r}"
        )
    delimiter, fields = best
    names = [_normalise(f) for f in fields]
    for name in set(names):
        where = [i + 1 for i, n in enumerate(names) if n == name]
        if name and len(where) > 1:
            raise OutcomeError(
                f"{path}: column {name!r} is named {len(where)} times in the header (columns "
                f"{', '.join(map(str, where))}): keep one, so that it is clear which one holds the {name}"
            )
    return delimiter, fields, [n if n in COLUMNS else None for n in names]


def _rows(text: str, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """``(row number, fields)`` per CSV record; the first non-blank record is row 1 (the header)."""
    with _field_limit(len(text) + 1):
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
        number = 0
        for fields in reader:
            if number == 0 and not any(f.strip() for f in fields):
                continue  # blank lines before the header
            number += 1
            yield number, fields


@contextmanager
def _field_limit(limit: int) -> Iterator[None]:
    """Let the csv module read a field as long as the file (a too-long field is quarantined, not fatal)."""
    previous = csv.field_size_limit()
    csv.field_size_limit(max(previous, limit))
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _record(
    fields: list[str],
    header: list[str],
    columns: list[str | None],
    known: set[str],
    root: str | Path,
    now: str,
    file_name: str,
    number: int,
    reported_by: str | None,
) -> OutcomeRecord:
    if len(fields) != len(header):
        raise OutcomeError(
            f"row has {len(fields)} fields but the header has {len(header)} columns (a separator inside a "
            "note must be in double quotes)"
        )
    bad = [c or h for c, h, f in zip(columns, header, fields, strict=True) if _has_undecodable(f)]
    if bad:
        raise OutcomeError(
            f"{', '.join(bad)} is not UTF-8 text (kept as given here): re-save the file as UTF-8 CSV and import it again"
        )
    values = {c: f for c, f in zip(columns, fields, strict=True) if c is not None}
    return new_record(
        values.get("case_id"),
        values.get("outcome"),
        source="import",
        reported_by=values.get("reported_by") or reported_by,
        note=values.get("note"),
        patient_id=values.get("patient_id"),
        supersedes=values.get("supersedes"),
        known=known,
        root=root,
        recorded_at=now,
        import_file=file_name,
        row=number,
    )


def _has_undecodable(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


# ---------------------------------------------------------------------------------------------- quarantine
def _write_quarantine(
    root: str | Path, source: Path, header: list[str], rows: list[tuple[int, str, list[str]]]
) -> Path:
    folder = private_dir(ArtifactPaths(Path(root)).outcomes_quarantine)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", source.stem)[:80] or "outcomes"
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    target = folder / f"{stem}-{stamp}.csv"
    serial = 1
    while target.exists():
        serial += 1
        target = folder / f"{stem}-{stamp}-{serial}.csv"
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    width = max([len(header), *(len(f) for _, _, f in rows)])
    names = [h.strip() or f"column_{i + 1}" for i, h in enumerate(header)]
    names += [f"extra_field_{i + 1}" for i in range(width - len(header))]
    writer.writerow([*QUARANTINE_COLUMNS, *(spreadsheet_safe(n) for n in names)])
    for number, reason, fields in rows:  # padded to one width, so the file can be corrected and imported
        cells = [spreadsheet_safe(f) for f in fields] + [""] * (width - len(fields))
        writer.writerow([number, reason, *cells])
    return atomic_write_bytes(target, buffer.getvalue().encode("utf-8", errors="surrogateescape"))


__all__ = ["ImportSummary", "import_outcomes"]
