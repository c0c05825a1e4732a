"""Atomic file and directory writes: readers never see a half-written checkpoint, bundle or pointer.

Also the one place that turns Python values into strict JSON (``to_jsonable``) and tables into Parquet
bytes (``parquet_bytes``), so every artifact written through here is readable by any JSON/Parquet reader.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import date, datetime
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def to_jsonable(value: Any, where: str = "value") -> Any:
    """A strict-JSON copy of ``value``: what ``json.dumps(..., allow_nan=False)`` accepts.

    numpy scalars and arrays become Python numbers and lists, NaN and +-inf become ``None``, paths become
    strings, dates and datetimes ISO 8601 strings, dataclasses dicts, tuples lists; dict keys must be
    strings or integers (integers become strings, as ``json`` would write them).

    Args:
        value: What to convert.
        where: The name of ``value`` in error messages; nested keys are appended (``metrics.auc[2]``).

    Raises:
        TypeError: a value (or dict key) JSON cannot hold, named by its key path, instead of silently
            writing its ``str()``.
    """
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, Mapping):
        return {_json_key(k, where): to_jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist(), where)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return to_jsonable(fields, where)
    raise TypeError(
        f"{where} holds a {type(value).__name__}, which JSON cannot store; convert it to numbers, strings, "
        "lists or dicts before writing"
    )


def _json_key(key: Any, where: str) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, int | np.integer) and not isinstance(key, bool):
        return str(int(key))
    raise TypeError(
        f"{where} has a key {key!r} of type {type(key).__name__}; JSON object keys must be strings "
        "(or integers): convert the key"
    )


def to_json_text(data: Any, where: str = "value") -> str:
    """Strict JSON (no NaN tokens, sorted keys, indented, trailing newline) of ``to_jsonable(data)``."""
    return json.dumps(to_jsonable(data, where), indent=2, sort_keys=True, allow_nan=False) + "\n"


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    """``frame`` as Parquet file bytes (index dropped), ready for ``atomic_write_bytes``."""
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as strict JSON (see ``to_jsonable``: NaN -> null, unknown objects refused)."""
    path = Path(path)
    return atomic_write_text(path, to_json_text(data, where=path.name))


def _fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (deepest first), then ``root`` itself."""
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            _fsync_path(Path(folder, name))
        _fsync_path(Path(folder))


@contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside ``final``; on success rename it to ``final`` in one step.

    The new folder's files are fsynced before the rename and the parent folder after it, so a power cut
    leaves either the old or the new folder. If ``final`` exists it is moved aside, the new folder is
    renamed in, and the old one is removed only then; if that second rename fails, the old folder is
    renamed back. On error the temp folder is removed and ``final`` is untouched.
    """
    final = Path(final)
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists():
            # An empty, uniquely named folder that ``final`` can be renamed over (POSIX rename semantics).
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=parent))
            try:
                os.replace(final, trash)
            except BaseException:
                trash.rmdir()
                raise
            try:
                os.replace(tmp, final)
            except BaseException as exc:
                _restore(trash, final, exc)
                raise
            _fsync_path(parent)
            shutil.rmtree(trash, ignore_errors=True)  # the new folder is in place; leftovers are harmless
        else:
            os.replace(tmp, final)
            _fsync_path(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _restore(trash: Path, final: Path, cause: BaseException) -> None:
    """Rename the previous folder back to ``final`` after the new one could not be renamed in."""
    try:
        os.replace(trash, final)
    except OSError as exc:
        raise OSError(
            f"could not rename the new folder to {final} ({cause}) nor restore the previous one from "
            f"{trash} ({exc}); rename {trash} to {final} by hand"
        ) from exc
    _fsync_path(final.parent)
