"""Images stored as encoded bytes inside an HDF5 file (ISIC 2024 ``train-image.hdf5``), read without unpacking.

An image inside such a file is named by one string, ``hdf5://<absolute file path>#<key>``, which is what the
cleaned table's ``image_path`` column holds for it. A string keeps the clean table's one-column image
reference (a file path for every other layout), so the cache, its fingerprints and the gallery pass it on
unchanged, and ``images.io.load_rgb`` decodes the bytes through the same path as a file or an upload.
The key is what follows the last ``#`` (ISIC ids never hold one).

Each dataset holds the encoded file (JPEG for ISIC 2024) as a scalar: ``bytes`` (fixed-length string
dtype), ``np.void`` (opaque dtype) or a 1-D uint8 array are all read. Open files are kept per process and
reopened when the file's size or modification time changes; h5py serialises reads behind its own lock, so
threads may share them.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from melanoma_ml.errors import InputValueError

SCHEME = "hdf5://"
SUFFIXES: tuple[str, ...] = (".hdf5", ".h5")
"""File suffixes taken for an HDF5 image store (matched case-insensitively)."""

_FIX_KEY = "fix the isic_id in the metadata, or delete the row"
_FIX_FILE = "set data.image_dir to the HDF5 file (e.g. train-image.hdf5) or put it beside the metadata table"

_lock = threading.Lock()
_open_files: dict[tuple[int, str], tuple[tuple[int, int], Any]] = {}


class HDF5ImageError(InputValueError):
    """An HDF5 image reference cannot be read; ``problem`` and ``fix`` become an ``ImageDecodeError``."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem}; {fix}")
        self.problem = problem
        self.fix = fix


def is_ref(source: object) -> bool:
    """Whether ``source`` is an ``hdf5://file#key`` image reference."""
    return isinstance(source, str) and source.startswith(SCHEME)


def make_ref(file: str | Path, key: str) -> str:
    """The reference of image ``key`` inside HDF5 ``file`` (made absolute)."""
    return f"{SCHEME}{Path(file).expanduser().resolve()}#{key}"


def parse_ref(ref: str) -> tuple[Path, str]:
    """(file, key) of a reference.

    Raises:
        HDF5ImageError: ``ref`` is not ``hdf5://<file>#<key>``.
    """
    file, sep, key = ref.removeprefix(SCHEME).rpartition("#")
    if not is_ref(ref) or not sep or not file or not key:
        raise HDF5ImageError(
            f"malformed HDF5 image reference {ref!r} (expected hdf5://<file>#<key>)",
            "fix the image_path column or rerun metadata cleaning",
        )
    return Path(file), key


def is_hdf5_file(path: str | Path) -> bool:
    """Whether ``path`` is a file with an HDF5 suffix (``SUFFIXES``)."""
    path = Path(path)
    return path.suffix.lower() in SUFFIXES and path.is_file()


def list_keys(file: str | Path) -> list[str]:
    """Names of the top-level datasets (images) in ``file``, in the file's order."""
    import h5py

    handle = _handle(Path(file))
    return [name for name, obj in handle.items() if isinstance(obj, h5py.Dataset)]


def read_bytes(ref: str) -> bytes:
    """The encoded image bytes a reference names.

    Raises:
        HDF5ImageError: the file is missing or not HDF5, the key is absent, or the dataset holds no bytes.
    """
    import h5py

    file, key = parse_ref(ref)
    handle = _handle(file)
    try:
        obj = handle.get(key)
        value = obj[()] if isinstance(obj, h5py.Dataset) else None
    except (OSError, ValueError, TypeError) as err:
        raise HDF5ImageError(f"HDF5 dataset {key!r} in {file} is unreadable ({err})", _FIX_KEY) from err
    if obj is None:
        raise HDF5ImageError(f"no image with key {key!r} in HDF5 file {file}", _FIX_KEY)
    data = _as_bytes(value)
    if data is None:
        kind = type(obj).__name__ if value is None else f"a {type(value).__name__} of dtype {obj.dtype}"
        raise HDF5ImageError(
            f"HDF5 entry {key!r} in {file} is {kind}, not encoded image bytes",
            "store each image as the bytes of its JPEG/PNG file, or delete the row",
        )
    return data


def sha256(ref: str) -> str:
    """sha256 (hex) of the encoded bytes a reference names (the same digest the image file would have)."""
    return hashlib.sha256(read_bytes(ref)).hexdigest()


def stat_key(file: str | Path) -> tuple[int, int]:
    """(size in bytes, mtime in ns) of an HDF5 file: what fingerprints it without reading it.

    Raises:
        HDF5ImageError: the file does not exist.
    """
    try:
        stat = Path(file).stat()
    except FileNotFoundError as err:
        raise HDF5ImageError(f"HDF5 image file missing: {file}", _FIX_FILE) from err
    return stat.st_size, stat.st_mtime_ns


def _as_bytes(value: object) -> bytes | None:
    if isinstance(value, bytes):
        return value
    if isinstance(value, np.void):
        return value.tobytes()
    if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 1:
        return value.tobytes()
    return None


def _handle(file: Path) -> Any:
    """An open read-only ``h5py.File`` for ``file``, shared per process, reopened when the file changed."""
    import h5py

    stamp = stat_key(file)
    key = (os.getpid(), str(file))
    with _lock:
        cached = _open_files.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        if cached is not None:
            cached[1].close()
        try:
            handle = h5py.File(file, "r")
        except OSError as err:
            raise HDF5ImageError(f"{file} is not a readable HDF5 file ({err})", _FIX_FILE) from err
        _open_files[key] = (stamp, handle)
        return handle


def close_files() -> None:
    """Close every HDF5 file this process keeps open (HDF5 refuses to open a file for writing meanwhile)."""
    with _lock:
        for _stamp, handle in _open_files.values():
            handle.close()
        _open_files.clear()
