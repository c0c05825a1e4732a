"""Clinician outcomes of served cases: recorded append-only, read back as labels.

An outcome is the histopathology result for a case id the prediction log holds (the id the app showed, the
``case_id`` column of ``melanoma-ml predict``). Records go to ``<artifact_root>/monitoring/outcomes/outcomes.jsonl``
(folder 0o700, file 0o600: health data), one JSON object per line, each written with a single ``os.write`` on
an ``O_APPEND`` descriptor, so concurrent writers (the app's threads, an import) never interleave a record.
Nothing is ever rewritten or deleted.

A record: ``case_id``, ``outcome`` (``"melanoma"`` or ``"benign"``), ``source`` (``"app"``, ``"import"`` or
``"cli"``), ``recorded_at`` (UTC ISO-8601, ``Z``), ``reported_by`` and ``note`` (free text or null),
``patient_id`` (a pseudonymous patient id or null: groups the feedback source by patient), ``supersedes``
(bool, see below); an imported one also carries ``import_file`` and ``row``.

Outcome values: ``"benign"`` means *not melanoma* (ISIC 2020's ``target`` 0: any other diagnosis, a basal cell
carcinoma included). ``parse_outcome`` reads ``melanoma``/``mel``/``1`` as melanoma and ``benign``/``not
melanoma``/``non-melanoma``/``0`` as benign, ignoring case and surrounding spaces; ``malignant`` is refused
(it does not say melanoma or not), as is anything else.

Conflicts and how to resolve them. A case's records are read in file order. Its *effective* records are all of
them, or, when one has ``supersedes: true``, the last such record and those after it. The case is
*consistent* when every effective record gives the same outcome, else in *conflict*: both records stay, the
case is listed by ``case_status`` (``melanoma-ml outcomes status``) and left out of ``labelled_cases`` until
someone records the right outcome with ``supersedes: true`` (``melanoma-ml outcomes record CASE OUTCOME
--supersedes --note WHY``, the app's "corrects earlier outcomes" box, or a ``supersedes`` column in an
import). A later report that disagrees with a resolution opens the conflict again.

A record identical to one already in the case's history (same case id, outcome and ``supersedes``) is not
written again: re-importing a file, or pressing the button twice, adds nothing.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from melanoma_ml.artifacts import ArtifactPaths
from melanoma_ml.errors import InputValueError
from melanoma_ml.monitoring.prediction_log import CASE_ID_PATTERN, read_predictions

log = logging.getLogger(__name__)

OUTCOMES: tuple[str, ...] = ("melanoma", "benign")
"""The outcome values a record holds; ``TARGETS`` gives each one's label."""

TARGETS: dict[str, int] = {"melanoma": 1, "benign": 0}

SYNONYMS: dict[str, str] = {
    "melanoma": "melanoma",
    "mel": "melanoma",
    "1": "melanoma",
    "benign": "benign",
    "not melanoma": "benign",
    "non-melanoma": "benign",
    "nonmelanoma": "benign",
    "0": "benign",
}
"""Accepted spellings (stripped, lower-cased) of each outcome."""

SOURCES: tuple[str, ...] = ("app", "import", "cli")

RECORD_KEYS: tuple[str, ...] = (
    "case_id",
    "outcome",
    "source",
    "recorded_at",
    "reported_by",
    "note",
    "patient_id",
    "supersedes",
)
"""Keys of every record; ``read_outcomes`` adds ``IMPORT_KEYS`` (null unless imported) and ``line``."""

IMPORT_KEYS: tuple[str, ...] = ("import_file", "row")
"""Keys of an imported record only: the file's name and the row (the header is row 1)."""

MAX_CHARS: dict[str, int] = {"case_id": 100, "reported_by": 200, "note": 2000, "patient_id": 100}
"""Longest text accepted per field; a longer one is refused (an import quarantines the row)."""

CONSISTENT, CONFLICT = "consistent", "conflict"
RESOLVE_HINT = (
    "record the right outcome with supersedes (melanoma-ml outcomes record CASE_ID OUTCOME --supersedes "
    "--note WHY, or tick 'corrects earlier outcomes' in the app)"
)


class OutcomeError(InputValueError):
    """An outcome that cannot be recorded as given; the message says what to change."""


@dataclass(frozen=True)
class OutcomeRecord:
    """One line of ``outcomes.jsonl`` (see the module docstring)."""

    case_id: str
    outcome: str
    source: str
    recorded_at: str
    reported_by: str | None = None
    note: str | None = None
    patient_id: str | None = None
    supersedes: bool = False
    import_file: str | None = None
    row: int | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if self.import_file is None:
            data.pop("import_file")
            data.pop("row")
        return data


@dataclass(frozen=True)
class RecordResult:
    """What ``record_outcome`` did: ``written`` False when an identical record was already there."""

    record: OutcomeRecord
    written: bool
    state: str
    message: str


# ---------------------------------------------------------------------------------------------- values
def parse_outcome(value: Any) -> str:
    """``"melanoma"`` or ``"benign"`` from an accepted spelling (module docstring).

    Raises:
        OutcomeError: anything else, with the accepted values.
    """
    text = "" if value is None else " ".join(str(value).split()).lower()
    if text in SYNONYMS:
        return SYNONYMS[text]
    accepted = ", ".join(sorted(SYNONYMS))
    if text == "malignant":
        raise OutcomeError(
            "outcome 'malignant' does not say whether it is a melanoma (a basal cell carcinoma is malignant "
            "but not melanoma): write melanoma, or benign for any other diagnosis"
        )
    if not text:
        raise OutcomeError(f"outcome is empty: write melanoma or benign (accepted: {accepted})")
    shown = text if len(text) <= 40 else text[:37] + "..."
    raise OutcomeError(
        f"outcome {shown!r} is not one of melanoma/benign (accepted: {accepted}; benign = any diagnosis "
        "other than melanoma)"
    )


def parse_flag(value: Any) -> bool:
    """``supersedes`` from ``true/false``, ``yes/no``, ``1/0`` or blank (False).

    Raises:
        OutcomeError: another value.
    """
    text = "" if value is None else str(value).strip().lower()
    if text in {"", "false", "no", "0", "n"}:
        return False
    if text in {"true", "yes", "1", "y"}:
        return True
    raise OutcomeError(f"supersedes {text[:20]!r} is not true/false (also yes/no, 1/0, or blank for false)")


def clean_text(name: str, value: Any) -> str | None:
    """``value`` stripped (None when blank), refused when longer than ``MAX_CHARS[name]``."""
    if value is None:
        return None
    text = str(value).strip()
    if not text:
        return None
    if len(text) > MAX_CHARS[name]:
        raise OutcomeError(
            f"{name} has {len(text):,} characters, more than the {MAX_CHARS[name]:,} accepted: shorten it"
        )
    return text


def spreadsheet_safe(text: str) -> str:
    """``text`` with a ``'`` in front when a spreadsheet would run it as a formula (=, +, -, @, tab, CR).

    Used for every cell of a CSV this package writes for people to open (quarantined rows, the feedback
    export); the recorded outcomes keep the text exactly as given.
    """
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# ---------------------------------------------------------------------------------------------- files
def outcomes_file(root: str | Path) -> Path:
    """``<root>/monitoring/outcomes/outcomes.jsonl`` for the artifact root ``root``."""
    return ArtifactPaths(Path(root)).outcomes_log


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) owner-only (0o700); an existing folder is left as it is."""
    missing = []
    folder = path
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)  # mkdir's mode is masked by the umask
    return path


def append_records(root: str | Path, records: Iterable[OutcomeRecord]) -> int:
    """Append ``records`` to the outcomes file, one ``os.write`` each; returns how many were written.

    A last line left without its newline (a writer killed mid-record) gets one first, so the torn line
    stays alone on its line (``read_outcomes`` skips it with a warning) and the new record is whole.
    """
    records = list(records)
    if not records:
        return 0
    path = outcomes_file(root)
    private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    written = 0
    try:
        # The torn-line check and the writes are one step under an exclusive lock: without it a concurrent
        # writer's record could land between the check and the newline, which then opens an empty line.
        fcntl.flock(fd, fcntl.LOCK_EX)
        if _ends_without_newline(path):
            os.write(fd, b"\n")
        for record in records:
            line = json.dumps(record.to_json(), ensure_ascii=False, allow_nan=False) + "\n"
            data = line.encode("utf-8", errors="surrogateescape")
            if os.write(fd, data) != len(data):
                raise OSError(f"short write to {path}: the disk may be full")
            written += 1
    finally:
        os.close(fd)
    return written


def _ends_without_newline(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        if fh.tell() == 0:
            return False
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) != b"\n"


def read_outcomes(root: str | Path) -> pd.DataFrame:
    """Every outcome record in file order: ``RECORD_KEYS``, ``IMPORT_KEYS`` and ``line`` (1-based) columns.

    A line that is not a valid record (a torn write, a hand edit) is skipped with a warning naming the line.
    """
    path = outcomes_file(root)
    rows: list[dict[str, Any]] = []
    if path.exists():
        with open(path, "rb") as fh:
            for number, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                record = _parse_line(raw)
                if record is None:
                    log.warning("%s line %d is not a valid outcome record: skipped", path, number)
                    continue
                rows.append({**{k: record.get(k) for k in (*RECORD_KEYS, *IMPORT_KEYS)}, "line": number})
    frame = pd.DataFrame(rows, columns=[*RECORD_KEYS, *IMPORT_KEYS, "line"])
    frame["supersedes"] = frame["supersedes"].fillna(False).astype(bool)
    return frame


def _parse_line(raw: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(raw.decode("utf-8", errors="surrogateescape"))
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    if not isinstance(record.get("case_id"), str) or record.get("outcome") not in OUTCOMES:
        return None
    return record


# ---------------------------------------------------------------------------------------------- state
def case_status(outcomes: pd.DataFrame) -> pd.DataFrame:
    """One row per case of ``read_outcomes``, in order of first record: ``case_id``, ``state``
    (consistent/conflict), ``outcome`` (None in conflict), ``target``, ``records``, ``outcomes`` (the
    effective ones, e.g. "benign, melanoma"), ``recorded_at`` and ``reported_by`` (the last effective
    record's), ``patient_id`` (the last one any record of the case gave)."""
    columns = ["case_id", "state", "outcome", "target", "records", "outcomes", "recorded_at", "reported_by"]
    if outcomes.empty:
        return pd.DataFrame(columns=[*columns, "patient_id"])
    table = outcomes.reset_index(drop=True)
    cases = table["case_id"]
    position = pd.Series(range(len(table)), index=table.index, dtype="float64")
    last_mark = position.where(table["supersedes"].astype(bool)).groupby(cases).transform("max")
    effective = table[last_mark.isna() | (position >= last_mark)]  # from the last supersedes record on
    by_case = effective.groupby("case_id", sort=False)
    melanoma = (effective["outcome"] == "melanoma").groupby(effective["case_id"], sort=False).any()
    benign = (effective["outcome"] == "benign").groupby(effective["case_id"], sort=False).any()
    consistent = melanoma != benign
    outcome = melanoma.map({True: "melanoma", False: "benign"}).where(consistent, None)
    last = by_case.tail(1).set_index("case_id")
    order = pd.unique(cases)
    status = pd.DataFrame(
        {
            "state": consistent.map({True: CONSISTENT, False: CONFLICT}),
            "outcome": outcome,
            "target": outcome.map(TARGETS),
            "records": cases.value_counts(),
            "outcomes": (
                benign.map({True: "benign", False: ""}) + melanoma.map({True: ", melanoma", False: ""})
            ).str.strip(", "),
            "recorded_at": last["recorded_at"],
            "reported_by": last["reported_by"],
            "patient_id": table.groupby("case_id")["patient_id"].last(),
        }
    ).reindex(order)
    status.index.name = "case_id"
    status["records"] = status["records"].astype("int64")
    patients = status["patient_id"].astype("object")
    status["patient_id"] = patients.where(patients.notna(), None)
    return status.reset_index()[[*columns, "patient_id"]]


def labelled_cases(root: str | Path) -> pd.DataFrame:
    """The prediction log's records joined to their case's single consistent outcome.

    Columns: the prediction record's, then ``outcome``, ``target`` (1 melanoma, 0 benign), ``patient_id``,
    ``outcome_recorded_at`` and ``outcome_reported_by``. Cases in conflict are left out (``case_status``
    lists them), as are outcomes whose case is no longer in the log (past its retention).
    """
    predictions = read_predictions(root)
    status = case_status(read_outcomes(root))
    conflicts = int((status["state"] == CONFLICT).sum())
    if conflicts:
        log.warning(
            "%d case(s) with conflicting outcomes left out of the labels; %s", conflicts, RESOLVE_HINT
        )
    labels = status[status["state"] == CONSISTENT].rename(
        columns={"recorded_at": "outcome_recorded_at", "reported_by": "outcome_reported_by"}
    )[["case_id", "outcome", "target", "patient_id", "outcome_recorded_at", "outcome_reported_by"]]
    labels = labels.astype({"target": "int64"})
    return predictions.merge(labels, on="case_id", how="inner", validate="many_to_one")


# ---------------------------------------------------------------------------------------------- recording
def known_case_ids(root: str | Path, case_id: str | None = None) -> set[str]:
    """The case ids of the prediction log: of ``case_id``'s UTC day only when given (a case id names the
    day its record was written), else of every day the log still holds."""
    if case_id is not None and CASE_ID_PATTERN.fullmatch(case_id):
        day = f"{case_id[2:6]}-{case_id[6:8]}-{case_id[8:10]}"
        try:
            predictions = read_predictions(root, day, day)
        except ValueError:  # not a calendar day: the id is unknown
            return set()
    else:
        predictions = read_predictions(root)
    return set(predictions["case_id"].dropna().astype(str))


def canonical_case_id(text: str) -> str:
    """A case id as ``new_case_id`` writes it (``C-20261207-3f9a1c2b0d4e``), whatever its case; other text as given."""
    candidate = text[:1].upper() + text[1:].lower()
    return candidate if CASE_ID_PATTERN.fullmatch(candidate) else text


def unknown_case_message(case_id: str, root: str | Path) -> str:
    shown = case_id if len(case_id) <= 60 else case_id[:57] + "..."
    if not CASE_ID_PATTERN.fullmatch(case_id):
        return (
            f"{shown!r} is not a case id: case ids look like C-20261207-3f9a1c2b0d4e (shown with the result in "
            "the app, and in the case_id column of melanoma-ml predict)"
        )
    if not any(ArtifactPaths(Path(root)).predictions.glob("*.jsonl")):
        return (
            f"unknown case id {shown!r}: the prediction log is empty, and outcomes can only be recorded for "
            "cases it holds (serving.prediction_log must be on when the image is scored)"
        )
    return (
        f"unknown case id {shown!r}: no scored image has it in the prediction log (monitoring/predictions/); "
        "copy the id shown with the result in the app or the case_id column of melanoma-ml predict (the "
        "log forgets cases after serving.prediction_log_retention_days)"
    )


def new_record(
    case_id: Any,
    outcome: Any,
    *,
    source: str,
    reported_by: Any = None,
    note: Any = None,
    patient_id: Any = None,
    supersedes: Any = False,
    known: set[str],
    root: str | Path,
    recorded_at: str | None = None,
    import_file: str | None = None,
    row: int | None = None,
) -> OutcomeRecord:
    """A validated record (not written).

    Raises:
        OutcomeError: empty or unknown case id, a bad outcome or ``supersedes``, a text too long.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    case = clean_text("case_id", case_id)
    case = None if case is None else canonical_case_id(case)
    if case is None:
        raise OutcomeError("case id is empty: give the case id shown with the result")
    value = parse_outcome(outcome)
    flag = supersedes if isinstance(supersedes, bool) else parse_flag(supersedes)
    texts = {name: clean_text(name, v) for name, v in (("reported_by", reported_by), ("note", note))}
    patient = clean_text("patient_id", patient_id)
    if case not in known:
        raise OutcomeError(unknown_case_message(case, root))
    return OutcomeRecord(
        case_id=case,
        outcome=value,
        source=source,
        recorded_at=recorded_at or utc_now(),
        patient_id=patient,
        supersedes=flag,
        import_file=import_file,
        row=row,
        **texts,
    )


def record_key(record: Any) -> tuple[str, str, bool]:
    """What makes two records the same claim: case id, outcome and ``supersedes`` (works on rows too)."""
    return (str(record.case_id), str(record.outcome), bool(record.supersedes))


def already_recorded(history: pd.DataFrame, record: OutcomeRecord) -> pd.Series | None:
    """The first earlier record of the same case with the same outcome and ``supersedes``, else None."""
    same = history[
        (history["case_id"] == record.case_id)
        & (history["outcome"] == record.outcome)
        & (history["supersedes"] == record.supersedes)
    ]
    return None if same.empty else same.iloc[0]


def state_message(history: pd.DataFrame, case_id: str) -> tuple[str, str]:
    """``(state, sentence)`` of one case after its records in ``history``."""
    status = case_status(history[history["case_id"] == case_id])
    row = status.iloc[0]
    if row["state"] == CONSISTENT:
        return CONSISTENT, f"case {case_id} is labelled {row['outcome']}"
    records = history[history["case_id"] == case_id]
    listed = "; ".join(
        f"{r.outcome} on {r.recorded_at} by {r.reported_by or 'unnamed'} ({r.source})"
        for r in records.itertuples()
    )
    return CONFLICT, (
        f"case {case_id} now has conflicting outcomes ({listed}): every record is kept, and the case is left "
        f"out of the labels until resolved; {RESOLVE_HINT}"
    )


def record_outcome(
    root: str | Path,
    case_id: Any,
    outcome: Any,
    *,
    source: str,
    reported_by: Any = None,
    note: Any = None,
    patient_id: Any = None,
    supersedes: Any = False,
) -> RecordResult:
    """Validate and append one outcome (unless an identical one is already recorded).

    Raises:
        OutcomeError: see ``new_record``; nothing is written then.
    """
    record = new_record(
        case_id,
        outcome,
        source=source,
        reported_by=reported_by,
        note=note,
        patient_id=patient_id,
        supersedes=supersedes,
        known=known_case_ids(root, canonical_case_id(str(case_id or "").strip())),
        root=root,
    )
    history = read_outcomes(root)
    earlier = already_recorded(history, record)
    if earlier is not None:
        state, sentence = state_message(history, record.case_id)
        return RecordResult(
            record,
            False,
            state,
            f"already recorded: {record.outcome} for case {record.case_id} on {earlier['recorded_at']}; "
            f"nothing added ({sentence})",
        )
    append_records(root, [record])
    history = pd.concat([history, pd.DataFrame([record.to_json()])], ignore_index=True)
    history["supersedes"] = history["supersedes"].fillna(False).astype(bool)
    state, sentence = state_message(history, record.case_id)
    return RecordResult(
        record, True, state, f"recorded {record.outcome} for case {record.case_id}: {sentence}"
    )


def status_text(root: str | Path, *, max_listed: int = 20) -> str:
    """``melanoma-ml outcomes status``: counts per state and outcome, and every case in conflict."""
    status = case_status(read_outcomes(root))
    labelled = labelled_cases(root)
    consistent = status[status["state"] == CONSISTENT]
    conflicts = status[status["state"] == CONFLICT]
    lines = [
        f"{outcomes_file(root)}: {int(status['records'].sum())} records for {len(status)} cases: "
        f"{len(consistent)} labelled ({int((consistent['outcome'] == 'melanoma').sum())} melanoma, "
        f"{int((consistent['outcome'] == 'benign').sum())} benign), {len(conflicts)} in conflict",
        f"labelled cases still in the prediction log: {labelled['case_id'].nunique()}, of them with a kept "
        f"image: {labelled.loc[labelled['image_path'].notna(), 'case_id'].nunique()}",
    ]
    for row in conflicts.head(max_listed).itertuples():
        lines.append(f"conflict: {row.case_id}: {row.outcomes} ({row.records} records)")
    if len(conflicts) > max_listed:
        lines.append(f"... and {len(conflicts) - max_listed} more in conflict")
    if len(conflicts):
        lines.append(f"to resolve a conflict, {RESOLVE_HINT}")
    return "\n".join(lines)
