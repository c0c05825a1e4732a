"""Atomic writes leave either the old or the new content, never a mix."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from melanoma_ml import atomic
from melanoma_ml.atomic import (
    atomic_directory,
    atomic_write_json,
    parquet_bytes,
    sha256_file,
    to_jsonable,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_atomic_write_json_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "pointer.json"
    atomic_write_json(target, {"version": "v1"})
    atomic_write_json(target, {"version": "v2"})
    assert json.loads(target.read_text()) == {"version": "v2"}
    assert [p.name for p in tmp_path.iterdir()] == ["pointer.json"]


def test_atomic_directory_failure_keeps_the_old_folder(tmp_path):
    final = tmp_path / "bundle"
    with atomic_directory(final) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(final) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("crash mid-write")
    assert (final / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_atomic_directory_replaces_existing(tmp_path):
    final = tmp_path / "bundle"
    for text in ("one", "two"):
        with atomic_directory(final) as tmp:
            (tmp / "a.txt").write_text(text)
    assert (final / "a.txt").read_text() == "two"


def test_sha256_file_known_value(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"abc")
    assert sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def _strict_loads(text: str):
    def refuse(token: str):
        raise AssertionError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def test_to_jsonable_converts_numpy_nan_paths_and_dates():
    @dataclasses.dataclass
    class Point:
        x: float
        where: Path

    value = {
        "nan": float("nan"),
        "inf": np.float32("inf"),
        "i": np.int64(3),
        "f": np.float32(0.5),
        "b": np.bool_(True),
        "arr": np.array([[1.0, np.nan]]),
        "path": Path("/a/b"),
        "when": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        "day": date(2026, 1, 2),
        "tuple": (1, "x"),
        "point": Point(1.5, Path("p")),
        7: "int key",
    }
    out = to_jsonable(value)
    assert out == {
        "nan": None,
        "inf": None,
        "i": 3,
        "f": 0.5,
        "b": True,
        "arr": [[1.0, None]],
        "path": "/a/b",
        "when": "2026-01-02T03:04:05+00:00",
        "day": "2026-01-02",
        "tuple": [1, "x"],
        "point": {"x": 1.5, "where": "p"},
        "7": "int key",
    }
    assert type(out["i"]) is int and type(out["f"]) is float and type(out["b"]) is bool


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"rows": [{"ok": 1}, {"bad": object()}]}, r"board\.rows\[1\]\.bad holds a object"),
        ({"s": {1, 2}}, r"board\.s holds a set"),
        ({("a", "b"): 1}, r"board has a key \('a', 'b'\) of type tuple"),
    ],
)
def test_to_jsonable_refuses_unknown_objects_naming_the_key(value, message):
    with pytest.raises(TypeError, match=message):
        to_jsonable(value, "board")


def test_atomic_write_json_writes_strict_json(tmp_path):
    target = tmp_path / "leaderboard.json"
    atomic_write_json(target, {"rows": [{"auc": np.float64("nan"), "n": np.int32(4)}]})
    assert _strict_loads(target.read_text()) == {"rows": [{"auc": None, "n": 4}]}


def test_atomic_write_json_refuses_unknown_objects_and_writes_nothing(tmp_path):
    target = tmp_path / "leaderboard.json"
    with pytest.raises(TypeError, match=r"leaderboard\.json\.rows\[0\]\.model holds a object"):
        atomic_write_json(target, {"rows": [{"model": object()}]})
    assert list(tmp_path.iterdir()) == []


def test_parquet_bytes_round_trips(tmp_path):
    frame = pd.DataFrame({"a": [1, 2], "b": ["x", "y"]}, index=[5, 6])
    path = tmp_path / "t.parquet"
    path.write_bytes(parquet_bytes(frame))
    pd.testing.assert_frame_equal(pd.read_parquet(path), frame.reset_index(drop=True))


def test_atomic_directory_restores_the_old_folder_when_the_second_rename_fails(tmp_path, monkeypatch):
    final = tmp_path / "bundle"
    with atomic_directory(final) as tmp:
        (tmp / "a.txt").write_text("old")
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # old folder moved aside; now the new one cannot be renamed in
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"), atomic_directory(final) as tmp:
        (tmp / "a.txt").write_text("new")
    assert len(calls) == 3 and calls[2] == (calls[0][1], "bundle")  # the rollback rename
    assert (final / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_atomic_directory_fsyncs_the_files_and_the_parent_after_the_rename(tmp_path, monkeypatch):
    final = tmp_path / "bundle"
    real_open, real_fsync, real_replace = os.open, os.fsync, os.replace
    opened: dict[int, Path] = {}
    events: list[tuple[str, str]] = []

    def open_(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        opened[fd] = Path(path)
        return fd

    def fsync(fd):
        if fd in opened:
            events.append(("fsync", str(opened[fd].relative_to(tmp_path))))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(dst).name))
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "open", open_)
    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    with atomic_directory(final) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.txt").write_text("x")
    synced = [name for kind, name in events if kind == "fsync"]
    assert any(name.endswith("sub/a.txt") for name in synced)  # a file written with plain write_text
    assert events.index(("replace", "bundle")) < events.index(("fsync", "."))  # parent synced after


# --- leftovers of a writer killed with SIGKILL --------------------------------------------------------------

# A writer that stops inside the atomic block: it reports its temp path in argv[2], then sleeps until killed.
# ``mode`` picks where it stops: inside ``atomic_directory``, between the two renames of a replacement
# (the previous folder moved aside, the new one not yet in), or inside ``atomic_write_bytes`` before the rename.
SLEEPING_WRITER = """
import os, sys, time
from pathlib import Path
from melanoma_ml import atomic

final, report, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

def stop(where):
    report.write_text(str(where))
    time.sleep(300)

if mode == "directory":
    with atomic.atomic_directory(final) as tmp:
        (tmp / "a.txt").write_text("half")
        stop(tmp)
elif mode == "between-renames":
    real_replace = os.replace
    def replace(src, dst):
        if Path(dst) == final:
            stop(src)
        return real_replace(src, dst)
    atomic.os.replace = replace
    with atomic.atomic_directory(final) as tmp:
        (tmp / "a.txt").write_text("new")
elif mode == "file":
    atomic.os.fsync = lambda fd: stop(final)
    atomic.atomic_write_text(final, "half")
"""


def _start_writer(final: Path, mode: str, tmp_path: Path) -> tuple[subprocess.Popen, list[Path]]:
    """Start a writer that stops inside its atomic block; returns it and the temp paths beside ``final``."""
    report = tmp_path / f"report-{mode}-{time.monotonic_ns()}.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-c", SLEEPING_WRITER, str(final), str(report), mode],
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while not report.exists() or not report.read_text():
        if process.poll() is not None:
            pytest.fail(f"the writer exited with {process.returncode} before reaching its atomic block")
        if time.monotonic() > deadline:
            _kill(process)
            pytest.fail("the writer did not reach its atomic block within 60 s")
        time.sleep(0.05)
    temps = [p for p in final.parent.iterdir() if p.name.startswith(f".{final.name}.")]
    report.unlink()
    return process, temps


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_the_next_writer_sweeps_a_killed_writers_temp_folder(tmp_path):
    out = tmp_path / "out"
    final = out / "bundle"
    with atomic_directory(final) as tmp:
        (tmp / "a.txt").write_text("old")
    process, temps = _start_writer(final, "directory", tmp_path)
    _kill(process)  # kill -9 inside the atomic block
    assert len(temps) == 1 and temps[0].is_dir() and temps[0].name.endswith(".tmp")
    assert (final / "a.txt").read_text() == "old"

    with atomic_directory(final) as tmp:
        (tmp / "a.txt").write_text("new")
    assert (final / "a.txt").read_text() == "new"
    assert _listing(out) == ["bundle"]


def test_a_live_writers_temp_folder_is_not_swept(tmp_path):
    out = tmp_path / "out"
    final = out / "bundle"
    process, temps = _start_writer(final, "directory", tmp_path)
    try:
        with atomic_directory(final) as tmp:
            (tmp / "a.txt").write_text("mine")
        assert (final / "a.txt").read_text() == "mine"
        assert temps[0].is_dir() and (temps[0] / "a.txt").read_text() == "half"
        assert atomic.sweep_stale_temps(final) == []
        assert temps[0].is_dir()
    finally:
        _kill(process)
    assert atomic.sweep_stale_temps(final) == [temps[0]]
    assert _listing(out) == ["bundle"]


def test_a_reused_pid_is_told_apart_by_its_start_time(tmp_path):
    out = tmp_path / "out"
    final = out / "bundle"
    process, temps = _start_writer(final, "directory", tmp_path)
    try:
        live = temps[0]
        match = re.search(r"-(\d+)-(\d+)-[a-z0-9_]+\.tmp$", live.name)
        assert match and int(match.group(1)) == process.pid, live.name
        # Same (alive) pid, another start time: the leftover of an earlier process that had this pid.
        reused = out / live.name.replace(f"-{match.group(2)}-", f"-{int(match.group(2)) + 1000}-")
        reused.mkdir()
        assert atomic.sweep_stale_temps(final) == [reused]
        assert live.is_dir() and not reused.exists()
    finally:
        _kill(process)


def test_sweeping_touches_only_this_targets_temp_names(tmp_path):
    out = tmp_path / "out"
    final = out / "bundle"
    process, temps = _start_writer(final, "directory", tmp_path)
    _kill(process)
    dead = temps[0]
    token = dead.name[len(".bundle.") : -len(".tmp")]
    keep = [
        out / f".bundle-2.{token}.tmp",  # another target's leftover
        out / f".other.{token}.tmp",
        out / ".bundle.abc123xy.tmp",  # no writer id in the name: whose it is cannot be told, so it stays
        out / f".bundle.{token}.partial",
        out / "notes.txt",
    ]
    for path in keep:
        path.mkdir()
    assert atomic.sweep_stale_temps(final) == [dead]
    assert _listing(out) == sorted(p.name for p in keep)


def test_a_writer_killed_between_the_renames_gets_the_previous_folder_back(tmp_path):
    out = tmp_path / "out"
    final = out / "bundle"
    with atomic_directory(final) as tmp:
        (tmp / "a.txt").write_text("old")
    process, _temps = _start_writer(final, "between-renames", tmp_path)
    _kill(process)
    assert not final.exists()  # the previous folder is moved aside, the new one is not in place
    assert len(_listing(out)) == 2

    swept = atomic.sweep_stale_temps(final)
    assert len(swept) == 2
    assert (final / "a.txt").read_text() == "old"
    assert _listing(out) == ["bundle"]


def test_the_next_file_writer_sweeps_a_killed_writers_temp_file(tmp_path):
    out = tmp_path / "out"
    target = out / "pointer.json"
    atomic_write_json(target, {"version": "v1"})
    process, temps = _start_writer(target, "file", tmp_path)
    _kill(process)
    assert len(temps) == 1 and temps[0].is_file()
    assert json.loads(target.read_text()) == {"version": "v1"}

    atomic_write_json(target, {"version": "v2"})
    assert json.loads(target.read_text()) == {"version": "v2"}
    assert _listing(out) == ["pointer.json"]
