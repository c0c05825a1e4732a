"""The prediction log: one JSON line per image the app or ``melanoma-ml predict`` scored.

Where: ``<artifact_root>/monitoring/predictions/YYYY-MM-DD.jsonl`` (``ArtifactPaths.predictions``), one
file per UTC day. With ``serving.keep_images`` the uploaded bytes are also kept, content-addressed, as
``<artifact_root>/monitoring/images/<sha256>.<ext>``; without it no pixels are stored, only the sha256.

What (``PREDICTION_COLUMNS``): time (UTC, ISO 8601 with ``Z``), model_version, case_id (shown to the user,
``new_case_id``), image_sha256, probability (calibrated, as served), decision and positive, threshold,
ood_score and ood_flag (null without a detector), age/sex/anatom_site as the model read them (null when
missing or refused), latency_ms, source (``app`` or ``predict``) and image_path (the kept copy, or null).
This is health data: folders are created 0o700 and files 0o600 (owner only).

How: each record is a single ``os.write`` of one whole line on a descriptor opened with ``O_APPEND``, under
an exclusive ``flock`` of the day file, so records of concurrent writers (app threads, a ``predict`` run
beside the app) never interleave and a crash leaves at most a torn last line, which ``read_predictions``
skips with a warning. The next writer ends that line before its own record, under the same lock: the
check and the append are one step, so a writer still in the middle of its record (it holds the lock) is
never taken for a torn line, and two writers never both end one (an empty line). There is no fsync per
record (the answer is already on its way): a power cut can lose the last records the kernel had not yet
written out. Kept images are written to a temp file, fsynced and renamed (never half an image).

It never breaks or slows a request: the app hashes the upload on a worker thread while the model runs
(``predict_and_log``), so a request waits only for one ``O_APPEND`` write (p50 about 0.3 ms inside a
request, ``benchmarks/prediction_log_overhead.py``); a write that fails (full disk, read-only or
unwritable folder) costs that record only: ``append`` returns None, the failure is counted
(``lost_records``) and logged once as a warning until a record is written again. Retention: when the log opens a new UTC day's file it deletes day
files older than ``serving.prediction_log_retention_days`` days, and kept images not scored again for that
long (an image scored again has its mtime refreshed).

The app and ``melanoma-ml predict`` both write through ``PredictionLog.append`` (``predict_and_log`` /
``log_served_prediction`` and ``log_batch_scores`` map their answers onto it).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import secrets
import stat
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from melanoma_ml.artifacts import ArtifactPaths, artifact_paths
from melanoma_ml.config import PipelineConfig, ServingConfig

if TYPE_CHECKING:
    from melanoma_ml.serving.batch import BatchScores
    from melanoma_ml.serving.service import ModelService, Prediction, PredictionRequest

log = logging.getLogger(__name__)

PREDICTION_COLUMNS: tuple[str, ...] = (
    "time",
    "model_version",
    "case_id",
    "image_sha256",
    "probability",
    "decision",
    "positive",
    "threshold",
    "ood_score",
    "ood_flag",
    "age",
    "sex",
    "anatom_site",
    "latency_ms",
    "source",
    "image_path",
)
"""The keys of a record, and the columns of ``read_predictions``, in order."""

SOURCES = ("app", "predict")
CASE_ID = "case_id"
"""The column ``melanoma-ml predict`` adds to its scores CSV (empty when the row was not logged)."""

CASE_ID_PATTERN = re.compile(r"C-\d{8}-[0-9a-f]{12}")
"""A case id: ``C-`` + the UTC day + 8 random hex digits (``new_case_id``); use ``fullmatch``."""

FOLDER_MODE = 0o700
FILE_MODE = 0o600
DEFAULT_RETENTION_DAYS: int = ServingConfig.model_fields["prediction_log_retention_days"].default

_DAY_FILE = re.compile(r"(\d{4}-\d{2}-\d{2})\.jsonl")
_EXTENSION = re.compile(r"[a-z0-9]{1,5}")
_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"BM", "bmp"), (b"II*\x00", "tif"))


def new_case_id(now: datetime | None = None) -> str:
    """``C-YYYYMMDD-xxxxxxxxxxxx``: the UTC day and 48 random bits (``secrets``); no patient data in it.

    48 bits keep two cases of one day apart: at 100,000 images a day the chance that any two share an id is
    about 2e-5 (32 bits would give 69%); an id is still short enough to read out over the phone."""
    now = datetime.now(UTC) if now is None else now.astimezone(UTC)
    return f"C-{now:%Y%m%d}-{secrets.token_hex(6)}"


def utc_text(moment: datetime) -> str:
    """``2026-12-07T16:31:02.123Z``: a record's ``time``."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class PredictionLog:
    """Appends prediction records under an artifact root; see the module docstring for the guarantees.

    Args:
        root: The artifact root (``config.artifact_root``); records go to ``<root>/monitoring/predictions``.
        enabled: False: ``append`` writes nothing and returns None (``serving.prediction_log: false``).
        keep_images: Also keep the scored image's bytes (``serving.keep_images``).
        retention_days: Day files and kept images older than this are deleted when a new day's file is
            opened (``serving.prediction_log_retention_days``).
        clock: Returns the current UTC time (injectable for tests of day files and retention).

    Attributes:
        written_records, lost_records: Records written, and records lost to a failed write, by this object.
        lost_images: Kept-image copies that failed (their record was still written, ``image_path`` null).
    """

    def __init__(
        self,
        root: str | Path,
        *,
        enabled: bool = True,
        keep_images: bool = False,
        retention_days: int = DEFAULT_RETENTION_DAYS,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        if retention_days < 1:
            raise ValueError(f"retention_days must be at least 1, got {retention_days}")
        self.paths = ArtifactPaths(Path(root).expanduser().resolve())
        self.enabled = enabled
        self.keep_images = keep_images
        self.retention_days = retention_days
        self._clock = clock or (lambda: datetime.now(UTC))
        self._lock = threading.Lock()  # guards the counters, _day and _failing
        self._day: str | None = None  # the UTC day whose folders and retention sweep are done
        self._failing = False
        self._hasher: ThreadPoolExecutor | None = None
        self.written_records = 0
        self.lost_records = 0
        self.lost_images = 0

    @classmethod
    def from_config(cls, config: PipelineConfig, *, enabled: bool | None = None) -> PredictionLog:
        """The log of ``config``'s artifact root with its ``serving`` settings (``enabled`` overrides)."""
        serving = config.serving
        return cls(
            artifact_paths(config).root,
            enabled=serving.prediction_log if enabled is None else enabled,
            keep_images=serving.keep_images,
            retention_days=serving.prediction_log_retention_days,
        )

    @property
    def folder(self) -> Path:
        return self.paths.predictions

    # ------------------------------------------------------------------ writing
    def hash_soon(self, image: str | Path | bytes | None) -> Future[tuple[bytes | None, str]] | None:
        """Start reading and hashing ``image`` on the log's worker thread; None when there is nothing to do.

        The app calls it before the forward pass (``predict_and_log``), so the sha256 of a large upload
        (about 3 ms for 5 MB with SHA-NI) overlaps the model instead of adding to the request. The result
        is ``(bytes to keep or None, sha256)`` for ``append(image=..., image_sha256=...)``.
        """
        if not self.enabled or image is None:
            return None
        with self._lock:
            if self._hasher is None:
                self._hasher = ThreadPoolExecutor(1, thread_name_prefix="prediction-log-hash")
            hasher = self._hasher
        return hasher.submit(self._digest, image)

    def _digest(self, image: str | Path | bytes) -> tuple[bytes | None, str]:
        data = _image_bytes(image)
        return (data if self.keep_images else None), hashlib.sha256(data).hexdigest()

    def append(
        self,
        *,
        source: str,
        model_version: str | None,
        probability: float,
        decision: str,
        positive: bool,
        threshold: float,
        image: str | Path | bytes | None = None,
        image_sha256: str | None = None,
        ood_score: float | None = None,
        ood_flag: bool | None = None,
        age: float | None = None,
        sex: str | None = None,
        anatom_site: str | None = None,
        latency_ms: float | None = None,
    ) -> str | None:
        """Record one scored image; return its case id, or None when disabled or the record was lost.

        Args:
            source: ``"app"`` or ``"predict"``.
            image: The scored file (path or bytes): hashed, and kept with ``keep_images``.
            image_sha256: The image's sha256 when already known (then ``image`` is read only to keep it).
            Others: as the answer gave them (see ``PREDICTION_COLUMNS``); NaN is recorded as null.

        Never raises for a failed write, an unreadable image or a value JSON cannot hold: the record is
        counted in ``lost_records`` and the first failure of a run of failures is logged as a warning.
        """
        if not self.enabled:
            return None
        try:
            if source not in SOURCES:
                raise ValueError(f"source {source!r} is not one of {', '.join(SOURCES)}")
            now = self._clock()
            case_id = new_case_id(now)
            data = (
                _image_bytes(image) if image is not None and (self.keep_images or not image_sha256) else None
            )
            if image_sha256 is None and data is not None:
                image_sha256 = hashlib.sha256(data).hexdigest()
            day = f"{now.astimezone(UTC):%Y-%m-%d}"
            self._open_day(day)
            kept = self._keep(data, image_sha256, image) if self.keep_images and data is not None else None
            record = {
                "time": utc_text(now),
                "model_version": model_version,
                "case_id": case_id,
                "image_sha256": image_sha256,
                "probability": _number(probability),
                "decision": decision,
                "positive": bool(positive),
                "threshold": _number(threshold),
                "ood_score": _number(ood_score),
                "ood_flag": None if _missing(ood_flag) else bool(ood_flag),
                "age": _number(age),
                "sex": None if _missing(sex) else str(sex),
                "anatom_site": None if _missing(anatom_site) else str(anatom_site),
                "latency_ms": None if latency_ms is None else round(float(latency_ms), 3),
                "source": source,
                "image_path": None if kept is None else str(kept),
            }
            line = json.dumps(record, separators=(",", ":"), allow_nan=False, ensure_ascii=False) + "\n"
            self._write_line(day, line.encode("utf-8"))
        except (OSError, ValueError, TypeError) as exc:
            self._count_lost(exc)
            return None
        with self._lock:
            self.written_records += 1
            recovered, self._failing = self._failing, False
        if recovered:
            log.warning(
                "prediction log %s is written again; %d record(s) were lost before",
                self.folder,
                self.lost_records,
            )
        return case_id

    def _write_line(self, day: str, line: bytes) -> None:
        """One ``os.write`` of ``line`` on an ``O_APPEND`` descriptor, after ending a torn last line, both
        under one exclusive ``flock`` (closing the descriptor releases it); the folder is re-made once if
        gone."""
        path = self.paths.predictions_day(day)
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, FILE_MODE)
        except FileNotFoundError:  # the folder was removed while serving: make it again, once
            with self._lock:
                self._day = None
            self._open_day(day)
            fd = os.open(path, flags, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            _end_torn_line(fd, path)
            written = os.write(fd, line)
            if written != len(line):
                # The disk filled mid-line: end the fragment so the next record starts a line of its own.
                os.write(fd, b"\n")
                raise OSError(f"short write: {written} of {len(line)} bytes (disk full?)")
        finally:
            os.close(fd)

    def _open_day(self, day: str) -> None:
        """Once per UTC day and object: make the folders (0o700) and delete what retention has expired."""
        with self._lock:
            if self._day == day:
                return
        self.paths.root.mkdir(parents=True, exist_ok=True)
        for folder in (self.paths.monitoring, self.folder):
            _private_folder(folder)
        self._expire(date.fromisoformat(day))
        _owner_only(self.paths.predictions_day(day))
        with self._lock:
            self._day = day

    def _expire(self, today: date) -> None:
        """Delete day files older than ``retention_days`` and kept images untouched for that long."""
        cutoff = today - timedelta(days=self.retention_days)
        removed = 0
        for path in self.folder.iterdir():
            match = _DAY_FILE.fullmatch(path.name)
            if match and date.fromisoformat(match.group(1)) < cutoff:
                path.unlink(missing_ok=True)
                removed += 1
        images = self.paths.monitoring_images
        if images.is_dir():
            oldest = datetime.combine(cutoff, datetime.min.time(), tzinfo=UTC).timestamp()
            for path in images.iterdir():
                if path.is_file() and path.stat().st_mtime < oldest:
                    path.unlink(missing_ok=True)
                    removed += 1
        if removed:
            log.info(
                "prediction log: deleted %d file(s) older than %d days (before %s; "
                "serving.prediction_log_retention_days)",
                removed,
                self.retention_days,
                cutoff,
            )

    def _keep(self, data: bytes, sha256: str | None, image: str | Path | bytes | None) -> Path | None:
        """Keep ``data`` as ``images/<sha256>.<ext>`` (temp file, fsync, rename; 0o600); None if that failed."""
        if sha256 is None:
            return None
        try:
            folder = _private_folder(self.paths.monitoring_images)
            target = folder / f"{sha256}.{_extension(image, data)}"
            if target.exists():
                os.utime(target)  # scored again: retention counts from now
                return target
            temp = folder / f".{sha256}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
                os.close(fd)
                fd = -1
                os.replace(temp, target)
            finally:
                if fd >= 0:
                    os.close(fd)
                temp.unlink(missing_ok=True)
            return target
        except OSError as exc:
            with self._lock:
                self.lost_images += 1
                first = self.lost_images == 1
            (log.warning if first else log.debug)(
                "prediction log: could not keep the scored image in %s (%s); the record is written without "
                "it. Free space or make the folder writable by this user",
                self.paths.monitoring_images,
                exc,
            )
            return None

    def _count_lost(self, exc: Exception) -> None:
        with self._lock:
            self.lost_records += 1
            lost = self.lost_records
            first, self._failing = not self._failing, True
        if first:
            log.warning(
                "prediction log: a record was not written to %s (%s: %s); the answer was still returned. "
                "Free disk space or make the folder writable by the user serving the model; further "
                "failures are counted (%d lost so far) and not logged again until a write succeeds",
                self.folder,
                type(exc).__name__,
                exc,
                lost,
            )
        else:
            log.debug("prediction log: record lost (%s), %d lost so far", exc, lost)


# ---------------------------------------------------------------------- what the app and predict log
def predict_and_log(
    service: ModelService, request: PredictionRequest, log_: PredictionLog | None
) -> tuple[Prediction, str | None]:
    """The app's request: ``service.predict(request)``, recorded in ``log_`` (when given); the answer and its
    case id (None: not recorded). The upload is hashed while the model runs (``hash_soon``).

    Raises:
        What ``service.predict`` raises (nothing is recorded then); never a logging failure.
    """
    pending = None if log_ is None else log_.hash_soon(request.image)
    prediction = service.predict(request)
    case_id = None if log_ is None else log_served_prediction(log_, prediction, request.image, pending)
    return prediction, case_id


def log_served_prediction(
    log_: PredictionLog,
    prediction: Prediction,
    image: str | Path | bytes | None,
    pending: Future[tuple[bytes | None, str]] | None = None,
) -> str | None:
    """Record one app answer (``service.Prediction``) for the uploaded ``image``; return its case id or None.

    ``pending``: ``log_.hash_soon(image)`` started before the forward pass (then the upload is not read again).
    """
    data, sha256 = image, None
    if pending is not None:
        try:
            kept, sha256 = pending.result()
        except OSError:  # unreadable upload: ``append`` reads it again and counts the lost record
            sha256 = None
        else:
            data = image if kept is None else kept
    metadata = prediction.metadata
    return log_.append(
        source="app",
        model_version=prediction.model_version,
        probability=prediction.probability,
        decision=prediction.decision,
        positive=prediction.positive,
        threshold=prediction.threshold,
        ood_score=prediction.ood_score,
        ood_flag=prediction.ood_flag,
        age=metadata.get("age"),
        sex=metadata.get("sex"),
        anatom_site=metadata.get("site"),
        latency_ms=prediction.seconds * 1000.0,
        image=data,
        image_sha256=sha256,
    )


def log_batch_scores(log_: PredictionLog, scores: BatchScores) -> BatchScores:
    """Record every scored row of ``scores`` (``source="predict"``) and add their ``case_id`` column.

    A row that was not scored, or whose record was lost or not written (log disabled), has ``""``. A row's
    ``latency_ms`` is the batch's wall time divided by its scored images.
    """
    table = scores.table
    scored = (table["error"] == "").to_numpy()
    case_ids = [""] * len(table)
    if log_.enabled and scored.any():
        per_image_ms = scores.seconds * 1000.0 / int(scored.sum())
        metadata = scores.metadata or (None,) * len(table)
        for row, (ok, record, meta) in enumerate(
            zip(scored, table.itertuples(index=False), metadata, strict=True)
        ):
            if not ok:
                continue
            meta = meta or {}
            case_ids[row] = (
                log_.append(
                    source="predict",
                    model_version=record.model_version,
                    probability=record.target,
                    decision=record.decision,
                    positive=record.decision == "positive",
                    threshold=record.threshold,
                    ood_score=record.ood_score,
                    ood_flag=record.ood_flag,
                    age=meta.get("age"),
                    sex=meta.get("sex"),
                    anatom_site=meta.get("site"),
                    latency_ms=per_image_ms,
                    image=record.image_path,
                )
                or ""
            )
    return dataclasses.replace(scores, table=table.assign(**{CASE_ID: case_ids}))


# ---------------------------------------------------------------------- reading
def read_predictions(
    root: str | Path, start: date | str | None = None, end: date | str | None = None
) -> pd.DataFrame:
    """The records of the UTC days ``start`` to ``end`` (inclusive; None: unbounded) under artifact ``root``.

    Returns:
        One row per record, columns ``PREDICTION_COLUMNS`` (``time`` as a UTC ``Timestamp``, ``ood_flag``
        pandas' nullable boolean), in file-day then written order; empty (same columns) when nothing is
        logged. A line that is not a JSON record (a torn last line of a crash or of a write in progress,
        or a fragment a full disk cut short) is skipped with a warning naming the file and line.
    """
    first, last = _as_day(start, "start"), _as_day(end, "end")
    folder = ArtifactPaths(Path(root).expanduser().resolve()).predictions
    rows: list[dict[str, Any]] = []
    days = []
    if folder.is_dir():
        for path in folder.iterdir():
            match = _DAY_FILE.fullmatch(path.name)
            if match:
                day = date.fromisoformat(match.group(1))
                if (first is None or day >= first) and (last is None or day <= last):
                    days.append((day, path))
    for _day, path in sorted(days):
        lines = path.read_bytes().split(b"\n")
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError:  # JSONDecodeError and UnicodeDecodeError
                record = None
            if not isinstance(record, dict):
                what = (
                    "torn last line (a crash or a write in progress)"
                    if number == len(lines)
                    else "not a JSON record (a write cut short, e.g. by a full disk)"
                )
                log.warning("prediction log %s line %d: %s; skipped", path, number, what)
                continue
            rows.append({column: record.get(column) for column in PREDICTION_COLUMNS})
    frame = pd.DataFrame(rows, columns=list(PREDICTION_COLUMNS))
    frame["time"] = pd.to_datetime(frame["time"], utc=True, format="ISO8601")
    for column in ("probability", "threshold", "ood_score", "age", "latency_ms"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
    frame["positive"] = frame["positive"].astype(bool)
    frame["ood_flag"] = frame["ood_flag"].astype("boolean")
    return frame


# ---------------------------------------------------------------------- helpers
def _private_folder(folder: Path) -> Path:
    """Make ``folder`` (its parent must exist) owner-only; warn once per process if it pre-existed wider."""
    try:
        folder.mkdir(mode=FOLDER_MODE)
    except FileExistsError:
        mode = stat.S_IMODE(folder.stat().st_mode)
        if mode & 0o077 and folder not in _WARNED_MODES:
            _WARNED_MODES.add(folder)
            log.warning(
                "%s holds health data but is readable by others (mode %o); run `chmod 700 %s`",
                folder,
                mode,
                folder,
            )
    return folder


_WARNED_MODES: set[Path] = set()


def _owner_only(path: Path) -> None:
    """Make an existing day file owner-only (0o600) if it was not."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if mode & 0o077:
        path.chmod(FILE_MODE)


def _end_torn_line(fd: int, path: Path) -> None:
    """If ``path`` (open as ``fd``, its flock held) ends mid-record, end that line so the next record
    starts its own. Only a crash leaves such a line: a live writer holds the lock until its line is whole."""
    size = os.fstat(fd).st_size
    if size and os.pread(fd, 1, size - 1) != b"\n":
        os.write(fd, b"\n")
        log.warning(
            "prediction log %s ended in a torn record (a writer stopped mid-line); ended that line so new "
            "records start on their own (the reader skips the torn one)",
            path,
        )


def _image_bytes(image: str | Path | bytes) -> bytes:
    return bytes(image) if isinstance(image, bytes | bytearray) else Path(image).read_bytes()


def _extension(image: str | Path | bytes | None, data: bytes) -> str:
    """The kept copy's extension: the upload's own (lower case, 1-5 letters/digits), else sniffed, else bin."""
    if isinstance(image, str | Path):
        suffix = Path(image).suffix.lower().lstrip(".")
        if _EXTENSION.fullmatch(suffix):
            return suffix
    for magic, extension in _MAGIC:
        if data.startswith(magic):
            return extension
    return "bin"


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _number(value: Any) -> float | None:
    """``value`` as a float, or None when missing or not finite."""
    if _missing(value):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _as_day(value: date | str | None, name: str) -> date | None:
    if value is None or isinstance(value, date) and not isinstance(value, datetime):
        return value
    if isinstance(value, datetime):
        return value.astimezone(UTC).date()
    try:
        return date.fromisoformat(str(value))
    except ValueError as exc:
        raise ValueError(f"{name} {value!r} is not a day; give YYYY-MM-DD") from exc
