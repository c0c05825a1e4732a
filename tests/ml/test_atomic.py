"""Atomic writes leave either the old or the new content, never a mix."""

from __future__ import annotations

import dataclasses
import json
import os
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
