"""Atomic writes leave either the old or the new content, never a mix."""

from __future__ import annotations

import json

import pytest

from melanoma_ml.atomic import atomic_directory, atomic_write_json, sha256_file


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
