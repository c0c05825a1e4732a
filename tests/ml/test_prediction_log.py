"""The prediction log (``monitoring.prediction_log``): one whole JSON line per scored image, owner-only files,
concurrent writers that never interleave, torn lines skipped, failures that cost the record and never the
answer, retention, kept images, and the ``serving`` settings that drive it."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import stat
import threading
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from melanoma_ml.artifacts import ArtifactPaths
from melanoma_ml.config import PipelineConfig, ServingConfig, load_config
from melanoma_ml.monitoring import prediction_log as plog
from melanoma_ml.monitoring.prediction_log import (
    CASE_ID_PATTERN,
    PREDICTION_COLUMNS,
    PredictionLog,
    log_served_prediction,
    new_case_id,
    read_predictions,
)

DAY = datetime(2026, 12, 7, 15, 30, 1, 250000, tzinfo=UTC)
JPEG = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4
LOGGER = "melanoma_ml.monitoring.prediction_log"


def record(log: PredictionLog, **changes) -> str | None:
    fields = {
        "source": "app",
        "model_version": "v0003",
        "probability": 0.625,
        "decision": "positive",
        "positive": True,
        "threshold": 0.5,
        "image": JPEG,
        "ood_score": 3.5,
        "ood_flag": False,
        "age": 45.0,
        "sex": "female",
        "anatom_site": None,
        "latency_ms": 12.5,
    } | changes
    return log.append(**fields)


def clock_at(moment: datetime):
    return lambda: moment


def day_file(root: Path, moment: datetime = DAY) -> Path:
    return ArtifactPaths(root.resolve()).predictions_day(f"{moment:%Y-%m-%d}")


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def test_a_record_is_one_json_line_with_every_column_in_owner_only_files(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path, clock=clock_at(DAY))

    case_id = record(log)

    path = day_file(tmp_path)
    lines = path.read_bytes().splitlines()
    assert len(lines) == 1 and path.read_bytes().endswith(b"\n")
    written = json.loads(lines[0])
    assert tuple(written) == PREDICTION_COLUMNS
    assert written == {
        "time": "2026-12-07T15:30:01.250Z",
        "model_version": "v0003",
        "case_id": case_id,
        "image_sha256": hashlib.sha256(JPEG).hexdigest(),
        "probability": 0.625,
        "decision": "positive",
        "positive": True,
        "threshold": 0.5,
        "ood_score": 3.5,
        "ood_flag": False,
        "age": 45.0,
        "sex": "female",
        "anatom_site": None,
        "latency_ms": 12.5,
        "source": "app",
        "image_path": None,
    }
    assert CASE_ID_PATTERN.fullmatch(case_id) and case_id.startswith("C-20261207-")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for folder in (path.parent, path.parent.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert not (tmp_path / "monitoring" / "images").exists()  # keep_images off: no pixels stored
    assert (log.written_records, log.lost_records) == (1, 0)


def test_read_predictions_returns_the_records_typed_and_filtered_by_day(tmp_path: Path) -> None:
    days = [DAY - timedelta(days=2), DAY - timedelta(days=1), DAY]
    ids = []
    for i, moment in enumerate(days):
        log = PredictionLog(tmp_path, clock=clock_at(moment))
        ids.append(record(log, probability=0.1 * (i + 1), ood_score=None, ood_flag=None, age=None))

    frame = read_predictions(tmp_path)
    assert frame.columns.tolist() == list(PREDICTION_COLUMNS)
    assert frame["case_id"].tolist() == ids
    assert frame["time"].dt.tz is not None and frame["time"].is_monotonic_increasing
    assert frame["probability"].tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert frame["ood_flag"].isna().all() and frame["ood_score"].isna().all() and frame["age"].isna().all()
    assert frame["positive"].dtype == bool
    one = read_predictions(tmp_path, start=date(2026, 12, 6), end="2026-12-06")
    assert one["case_id"].tolist() == [ids[1]]
    assert read_predictions(tmp_path, start="2026-12-06")["case_id"].tolist() == ids[1:]
    empty = read_predictions(tmp_path / "nothing-here")
    assert empty.empty and empty.columns.tolist() == list(PREDICTION_COLUMNS)
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        read_predictions(tmp_path, start="yesterday")


def test_concurrent_writers_never_interleave_records(tmp_path: Path) -> None:
    logs = [PredictionLog(tmp_path) for _ in range(2)]  # two "processes" on one folder
    per_thread, threads = 150, 6

    def work(index: int) -> None:
        for i in range(per_thread):
            record(logs[index % 2], probability=i / per_thread, sex="x" * (index * 300))  # varied lengths

    workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()

    lines = b"".join(p.read_bytes() for p in (tmp_path / "monitoring" / "predictions").iterdir()).splitlines()
    assert len(lines) == per_thread * threads
    parsed = [json.loads(line) for line in lines]  # every line is one whole record
    assert len({r["case_id"] for r in parsed}) == per_thread * threads
    assert sum(log.written_records for log in logs) == per_thread * threads


def test_a_torn_last_line_is_skipped_with_a_warning_and_the_next_writer_starts_a_new_line(
    tmp_path: Path, caplog
) -> None:
    first = record(PredictionLog(tmp_path, clock=clock_at(DAY)))
    path = day_file(tmp_path)
    whole = path.read_bytes()
    with open(path, "ab") as fh:  # a writer killed mid-record
        fh.write(whole[: len(whole) // 2])

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert read_predictions(tmp_path)["case_id"].tolist() == [first]
    assert any("line 2: torn last line" in m for m in warnings_of(caplog))

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        second = record(PredictionLog(tmp_path, clock=clock_at(DAY)))  # after a restart
        assert read_predictions(tmp_path)["case_id"].tolist() == [first, second]
    assert any("ended in a torn record" in m for m in warnings_of(caplog))
    assert any("line 2: not a JSON record" in m for m in warnings_of(caplog))


def test_the_torn_line_check_waits_for_a_writer_holding_the_lock(tmp_path: Path) -> None:
    """A writer in the middle of its record holds the file's flock (as ``append`` does); another writer must
    not take that half line for a crash's torn line and end it, splitting the record in two."""
    first = record(PredictionLog(tmp_path, clock=clock_at(DAY)))
    path = day_file(tmp_path)
    line = path.read_bytes()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line[:40])  # the first part of a record, the rest still to come
        other = threading.Thread(target=record, args=(PredictionLog(tmp_path, clock=clock_at(DAY)),))
        other.start()
        other.join(timeout=1.0)  # without the lock the other writer is done by now, inside our record
        os.write(fd, line[40:])
    finally:
        os.close(fd)  # releases the lock
    other.join()
    lines = path.read_bytes().splitlines()
    assert len(lines) == 3 and all(json.loads(raw) for raw in lines)  # three whole records, no torn one
    ids = read_predictions(tmp_path)["case_id"].tolist()
    assert len(ids) == 3 and ids[:2] == [first, first]  # ours (a copy of the first line), then the other's


def test_writers_on_a_torn_file_end_it_once(tmp_path: Path) -> None:
    """Several writers (each its own object, as after a restart) start together on a file a crash left
    torn: exactly one of them ends the torn line, so no empty line appears between records."""
    record(PredictionLog(tmp_path, clock=clock_at(DAY)))
    path = day_file(tmp_path)
    with open(path, "ab") as fh:  # a writer killed mid-record
        fh.write(path.read_bytes()[:30])
    writers, start = 8, threading.Barrier(8)

    def work() -> None:
        log = PredictionLog(tmp_path, clock=clock_at(DAY))
        start.wait()
        for _ in range(5):
            record(log)

    threads = [threading.Thread(target=work) for _ in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and b"" not in lines[:-1]  # ends with a newline, no empty line inside
    assert len(lines) - 1 == 1 + 1 + writers * 5  # the first record, the torn one, the new ones
    assert len(read_predictions(tmp_path)) == 1 + writers * 5


def test_a_full_disk_costs_the_record_not_the_caller_and_warns_once(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    log = PredictionLog(tmp_path, clock=clock_at(DAY))
    assert record(log) is not None
    real_write = os.write

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(plog.os, "write", full)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert record(log) is None and record(log) is None
    assert log.lost_records == 2 and log.written_records == 1
    lost = warnings_of(caplog)
    assert len(lost) == 1 and "No space left on device" in lost[0] and "answer was still returned" in lost[0]

    monkeypatch.setattr(plog.os, "write", real_write)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert record(log) is not None
    assert any("written again; 2 record(s) were lost" in m for m in warnings_of(caplog))
    assert len(read_predictions(tmp_path)) == 2


def test_a_short_write_ends_its_fragment_so_later_records_stay_readable(tmp_path: Path, monkeypatch) -> None:
    log = PredictionLog(tmp_path, clock=clock_at(DAY))
    real_write = os.write
    calls = []

    def half_then_fine(fd: int, data: bytes) -> int:
        calls.append(len(data))
        return real_write(fd, data[: len(data) // 2] if len(calls) == 1 else data)

    monkeypatch.setattr(plog.os, "write", half_then_fine)
    assert record(log) is None and log.lost_records == 1
    kept = record(log)
    assert read_predictions(tmp_path)["case_id"].tolist() == [kept]


def test_a_read_only_log_folder_costs_the_record_only(tmp_path: Path, monkeypatch, caplog) -> None:
    """Simulated as the kernel reports it on a read-only mount (EROFS), so it holds when run as root too."""
    log = PredictionLog(tmp_path, clock=clock_at(DAY))
    assert record(log) is not None
    real_open = os.open
    folder = str(log.folder)

    def read_only(path, flags, *args, **kwargs):
        if str(path).startswith(folder) and flags & (os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(plog.os, "open", read_only)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert record(log) is None
    assert log.lost_records == 1 and "Read-only file system" in warnings_of(caplog)[0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through a chmod 500 folder; EROFS test above")
def test_an_unwritable_log_folder_costs_the_record_only(tmp_path: Path) -> None:
    now = [DAY]
    log = PredictionLog(tmp_path, clock=lambda: now[0])
    record(log)
    log.folder.chmod(0o500)
    now[0] = DAY + timedelta(days=1)  # the next day's file cannot be created
    try:
        assert record(log) is None
    finally:
        log.folder.chmod(0o700)
    assert log.lost_records == 1 and not day_file(tmp_path, now[0]).exists()


def test_turned_off_it_writes_nothing(tmp_path: Path) -> None:
    config = load_config("tiny", {"artifact_root": str(tmp_path), "serving": {"prediction_log": False}})
    log = PredictionLog.from_config(config)
    assert record(log) is None
    assert not (tmp_path / "monitoring").exists()


def test_from_config_maps_the_serving_settings(tmp_path: Path) -> None:
    defaults = ServingConfig()
    assert defaults.prediction_log is True and defaults.keep_images is False
    assert defaults.prediction_log_retention_days == plog.DEFAULT_RETENTION_DAYS
    config = PipelineConfig(
        artifact_root=str(tmp_path),
        serving={"keep_images": True, "prediction_log_retention_days": 30},
    )
    log = PredictionLog.from_config(config)
    assert (log.enabled, log.keep_images, log.retention_days) == (True, True, 30)
    assert log.folder == tmp_path.resolve() / "monitoring" / "predictions"
    assert PredictionLog.from_config(config, enabled=False).enabled is False
    with pytest.raises(ValueError):
        ServingConfig(prediction_log_retention_days=0)


def test_retention_deletes_day_files_and_images_older_than_the_setting(tmp_path: Path) -> None:
    old, recent = DAY - timedelta(days=31), DAY - timedelta(days=30)
    for moment in (old, recent):
        record(PredictionLog(tmp_path, retention_days=30, keep_images=True, clock=clock_at(moment)))
    images = tmp_path / "monitoring" / "images"
    stale = images / "stale.jpg"
    stale.write_bytes(b"x")
    os.utime(stale, (old.timestamp(), old.timestamp()))
    kept = next(p for p in images.iterdir() if p != stale)

    record(PredictionLog(tmp_path, retention_days=30, clock=clock_at(DAY)))

    days = sorted(p.name for p in (tmp_path / "monitoring" / "predictions").iterdir())
    assert days == [f"{recent:%Y-%m-%d}.jsonl", f"{DAY:%Y-%m-%d}.jsonl"]
    assert not stale.exists() and kept.exists()  # the other image was kept (scored "now", mtime fresh)


def test_one_object_sweeps_when_the_day_changes(tmp_path: Path) -> None:
    now = [DAY - timedelta(days=3)]
    log = PredictionLog(tmp_path, retention_days=1, clock=lambda: now[0])
    record(log)
    now[0] = DAY
    record(log)
    assert [p.name for p in log.folder.iterdir()] == [f"{DAY:%Y-%m-%d}.jsonl"]


def test_kept_images_are_owner_only_content_addressed_copies(tmp_path: Path) -> None:
    upload = tmp_path / "upload.PNG"
    upload.write_bytes(b"\x89PNG\r\n\x1a\n" + b"pixels")
    log = PredictionLog(tmp_path / "root", keep_images=True, clock=clock_at(DAY))

    record(log, image=upload)
    record(log, image=upload)  # same image again: one copy
    record(log, image=JPEG)  # bytes without a name: extension from the magic number

    frame = read_predictions(tmp_path / "root")
    digest = hashlib.sha256(upload.read_bytes()).hexdigest()
    copy = tmp_path.resolve() / "root" / "monitoring" / "images" / f"{digest}.png"
    assert frame["image_path"].tolist()[:2] == [str(copy), str(copy)]
    assert frame["image_sha256"].tolist()[0] == digest
    assert copy.read_bytes() == upload.read_bytes() and stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert Path(frame["image_path"].iloc[2]).name == f"{hashlib.sha256(JPEG).hexdigest()}.jpg"
    assert stat.S_IMODE(copy.parent.stat().st_mode) == 0o700
    assert sorted(p.suffix for p in copy.parent.iterdir()) == [".jpg", ".png"]  # no temp files left


def test_an_image_that_cannot_be_kept_still_leaves_its_record(tmp_path: Path, monkeypatch) -> None:
    log = PredictionLog(tmp_path, keep_images=True, clock=clock_at(DAY))
    real_fsync = os.fsync

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(plog.os, "fsync", broken)
    assert record(log) is not None
    monkeypatch.setattr(plog.os, "fsync", real_fsync)
    frame = read_predictions(tmp_path)
    assert frame["image_path"].isna().all() and log.lost_images == 1
    assert [p.name for p in (tmp_path / "monitoring" / "images").iterdir()] == []  # no half image


def test_nan_values_are_recorded_as_null_and_a_bad_source_is_a_lost_record(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path, clock=clock_at(DAY))
    record(log, ood_score=float("nan"), ood_flag=pd.NA, age=float("nan"), sex=float("nan"))
    written = json.loads(day_file(tmp_path).read_bytes())
    assert (written["ood_score"], written["ood_flag"], written["age"], written["sex"]) == (None,) * 4
    assert record(log, source="email") is None and log.lost_records == 1


def test_case_ids_are_unique_and_carry_only_the_day() -> None:
    ids = {new_case_id(DAY) for _ in range(2000)}
    assert len(ids) == 2000
    assert all(CASE_ID_PATTERN.fullmatch(i) and i.startswith("C-20261207-") for i in ids)


def answer(**changes) -> SimpleNamespace:
    """The fields of a ``service.Prediction`` that the log reads."""
    fields = {
        "model_version": "v0001",
        "probability": 0.25,
        "decision": "negative",
        "positive": False,
        "threshold": 0.5,
        "ood_score": None,
        "ood_flag": None,
        "metadata": {"age": 60.0, "sex": "male", "site": "torso"},
        "seconds": 0.02,
    }
    return SimpleNamespace(**(fields | changes))


def test_an_upload_hashed_during_the_forward_pass_is_recorded_like_one_hashed_after(tmp_path: Path) -> None:
    upload = tmp_path / "upload.jpg"
    upload.write_bytes(JPEG)
    log = PredictionLog(tmp_path / "root", keep_images=True, clock=clock_at(DAY))

    early = log_served_prediction(log, answer(), upload, log.hash_soon(upload))
    late = log_served_prediction(log, answer(), upload)

    frame = read_predictions(tmp_path / "root").set_index("case_id")
    assert frame.loc[[early, late], "image_sha256"].tolist() == [hashlib.sha256(JPEG).hexdigest()] * 2
    assert frame.loc[early, "image_path"] == frame.loc[late, "image_path"]
    assert (frame.loc[early, "sex"], frame.loc[early, "anatom_site"], frame.loc[early, "latency_ms"]) == (
        "male",
        "torso",
        20.0,
    )
    assert log.hash_soon(None) is None and PredictionLog(tmp_path, enabled=False).hash_soon(upload) is None


def test_an_upload_gone_before_it_was_hashed_costs_the_record_only(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path, clock=clock_at(DAY))
    missing = tmp_path / "gone.jpg"

    assert log_served_prediction(log, answer(), missing, log.hash_soon(missing)) is None
    assert log.lost_records == 1 and read_predictions(tmp_path).empty
