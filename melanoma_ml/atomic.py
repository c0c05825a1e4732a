"""Atomic file and directory writes: readers never see a half-written checkpoint, bundle or pointer.

Temp names carry the writer's identity (``.<name>.<host>-<boot>-<pid>-<start>-<random>.tmp``), so every
writer first sweeps what a killed writer of the same target left behind (``sweep_stale_temps``) without
touching a live concurrent writer's temp.

Also the one place that turns Python values into strict JSON (``to_jsonable``) and tables into Parquet
bytes (``parquet_bytes``), so every artifact written through here is readable by any JSON/Parquet reader.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import date, datetime
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


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
    sweep_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
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
    renamed back. On error the temp folder is removed and ``final`` is untouched. Leftovers of a writer
    that was killed (``kill -9``, OOM, power cut) are swept first (``sweep_stale_temps``).
    """
    final = Path(final)
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(final)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(final), suffix=".tmp", dir=parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists():
            # An empty, uniquely named folder that ``final`` can be renamed over (POSIX rename semantics).
            trash = Path(tempfile.mkdtemp(prefix=_temp_prefix(final, OLD_MARK), suffix=".tmp", dir=parent))
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


# --- temp names that say whose they are, and the sweep of dead writers' leftovers ---------------------------

OLD_MARK = "old-"  # the previous folder, moved aside while ``atomic_directory`` renames the new one in
_TOKEN = re.compile(
    r"^(?P<old>old-)?(?P<host>[0-9a-f]{8})-(?P<boot>[0-9a-f]{8})-(?P<pid>\d+)-(?P<start>\d+)-[a-z0-9_]+$"
)


@dataclasses.dataclass(frozen=True)
class _Writer:
    """Who wrote a temp: host, boot and (pid, process start time), which together outlive pid reuse."""

    host: str
    boot: str
    pid: int
    start: int


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


def _boot_id() -> str:
    """8 hex digits naming this boot of the machine (Linux), or ``00000000`` where the OS does not say."""
    try:
        return _short_hash(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    except OSError:
        return "0" * 8


def _process_start(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux ``/proc/<pid>/stat``).

    Returns ``None`` if the process does not exist or is a zombie (killed, not yet reaped), and ``0`` where
    the OS has no ``/proc`` (then only the pid tells writers apart).
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
        return 0 if _pid_exists(pid) else None
    except OSError:
        return 0 if _pid_exists(pid) else None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])  # field 22 of proc_pid_stat(5); fields[0] is field 3


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    return True


def _this_writer() -> _Writer:
    pid = os.getpid()
    return _Writer(_short_hash(socket.gethostname()), _boot_id(), pid, _process_start(pid) or 0)


def _temp_prefix(target: Path, mark: str = "") -> str:
    """``.<name>.[old-]<host>-<boot>-<pid>-<start>-``: tempfile appends a random part and ``.tmp``."""
    me = _this_writer()
    return f".{target.name}.{mark}{me.host}-{me.boot}-{me.pid}-{me.start}-"


def _writer_is_gone(writer: _Writer, me: _Writer) -> bool | None:
    """True if ``writer`` is dead, False if it may be alive, None if this machine cannot tell."""
    if writer.host != me.host:
        return None  # another host or container sharing the folder: its processes are not visible here
    if writer.boot != me.boot:
        return True  # written before the last reboot
    start = _process_start(writer.pid)
    if start is None:
        return True
    return (
        writer.start != 0 and start != 0 and start != writer.start
    )  # the pid now belongs to another process


def sweep_stale_temps(target: str | Path) -> list[Path]:
    """Remove the temp files and folders that killed writers of ``target`` left beside it.

    Only siblings named ``.<target name>.<writer id>-<random>.tmp`` (as the writers in this module name
    them) are looked at; one is swept when its writer is gone: the machine rebooted since, its pid is not
    alive (or is a zombie), or the pid now belongs to a process with another start time. A live writer's
    temp, one written on another host or container, and names without a writer id are left alone. A folder
    that ``atomic_directory`` had moved aside (``.<name>.old-...tmp``) is renamed back to ``target`` if the
    writer died before the new folder was renamed in, so the previous version is never lost.

    Every writer here calls it before writing; call it too before writing ``target`` by other means.

    Args:
        target: The file or folder whose leftovers to sweep.

    Returns:
        The leftover paths removed or restored, sorted.
    """
    target = Path(target)
    prefix = f".{target.name}."
    try:
        siblings = sorted(target.parent.iterdir())
    except FileNotFoundError:
        return []
    me = _this_writer()
    swept = []
    for path in siblings:
        name = path.name
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        match = _TOKEN.match(name[len(prefix) : -len(".tmp")])
        if match is None:
            continue
        writer = _Writer(match["host"], match["boot"], int(match["pid"]), int(match["start"]))
        if not _writer_is_gone(writer, me):
            continue
        if _clear_leftover(path, target, restore=bool(match["old"])):
            swept.append(path)
    return swept


def _clear_leftover(path: Path, target: Path, restore: bool) -> bool:
    """Restore (a moved-aside previous folder with no ``target``) or delete one leftover; False if it failed."""
    try:
        if restore and not os.path.lexists(target):
            os.replace(path, target)
            _fsync_path(target.parent)
            log.warning("restored %s from %s, left by a writer that was killed mid-replace", target, path)
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
            log.info("removed %s, left by a writer that was killed", path)
        else:
            path.unlink()
            log.info("removed %s, left by a writer that was killed", path)
    except FileNotFoundError:
        return False  # another writer swept it first
    except OSError as exc:
        log.warning("could not remove %s, left by a killed writer (%s); delete it by hand", path, exc)
        return False
    return True
