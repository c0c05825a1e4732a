"""Content hashes that version the data: every configured source folder, and a table.

``source_fingerprint`` is what the Dagster sensor compares and what ``source_metadata``'s data version
is built from; ``table_fingerprint`` is the data version stamped into a registered bundle.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from melanoma_ml.config import DataConfig
from melanoma_ml.errors import InputFileNotFoundError
from melanoma_ml.images.hdf5 import SUFFIXES as HDF5_SUFFIXES
from melanoma_ml.images.hdf5 import is_hdf5_file, stat_key
from melanoma_ml.metadata.image_files import IMAGE_EXTENSIONS
from melanoma_ml.metadata.layouts import find_image_dirs

METADATA_SUFFIXES = (".csv", ".json", ".parquet")
PRIMARY_HINT = (
    "set data.source_dir (env MELANOMA_DATA__SOURCE_DIR) to an ISIC-layout folder or metadata CSV file, or "
    "leave it unset to use the built-in synthetic demo set"
)
EXTERNAL_HINT = "fix the path or remove the entry (MELANOMA_DATA__EXTERNAL_SOURCES or data.external_sources)"
FEEDBACK_HINT = (
    "write it with `melanoma-ml outcomes export --out DIR`, fix the path, or remove the entry "
    "(MELANOMA_DATA__FEEDBACK_SOURCES or data.feedback_sources)"
)
TEST_SETTING = "data.test_sources"
TEST_HINT = "fix the path or remove the entry (MELANOMA_DATA__TEST_SOURCES or data.test_sources)"


def source_fingerprint(data: DataConfig, *, default_source_dir: str | Path | None = None) -> str:
    """Content hash of every dataset ``data`` reads: metadata file bytes plus image listings (names, sizes).

    Covers the primary source (``data.source_dir``, else ``default_source_dir``: the synthetic demo set;
    with neither it is left out), ``data.image_dir`` when it lies outside the primary folder, and every
    ``data.external_sources`` and ``data.test_sources`` entry (its path and image_dir), so a change in any
    of them gives a new fingerprint (a changed test set must be scored again). A source may be a folder or one metadata CSV file; for a file, the file, the metadata
    files beside it (duplicate lists, ground truth) and its image folder(s) are hashed. Images are listed
    and stat-ed, not read: cheap enough for a sensor on ISIC 2020 (33k images). Image suffixes are the
    loader's (``metadata.image_files.IMAGE_EXTENSIONS``). An HDF5 image file (ISIC 2024 ``train-image.hdf5``,
    in the folder or as ``image_dir``) counts by its size and modification time (ns), not its bytes: hashing
    ISIC 2024's ~2 GB on every sensor tick would cost what the listing is meant to save.

    Raises:
        FileNotFoundError: a configured path does not exist (the message names the setting to fix).
    """
    digest = hashlib.sha256()
    for setting, path, image_dir, hint in configured_sources(data, default_source_dir):
        digest.update(f"source:{setting}\n".encode())
        _hash_source(digest, existing_source(setting, path, hint), image_dir, setting)
    return digest.hexdigest()


def configured_sources(
    data: DataConfig, default_source_dir: str | Path | None = None
) -> list[tuple[str, str | Path, str | None, str]]:
    """``(setting, path, image_dir, hint)`` of the primary source (when there is one), every external one, every
    feedback source when ``data.train_on_feedback`` (else none: a new export must not start a retraining run
    that does not read it) and every test set (settings ``data.test_sources[i]``, :data:`TEST_SETTING`).

    For checking that the paths exist and for the fingerprint only: training rows come from
    ``metadata.sources.load_configured_data``, which reads the primary and external sources and never the
    test sets (those are read by ``metadata.test_sources.load_test_sources``, for scoring).
    """
    primary = data.source_dir if data.source_dir is not None else default_source_dir
    sources: list[tuple[str, str | Path, str | None, str]] = []
    if primary is not None:
        sources.append(("data.source_dir", primary, data.image_dir, PRIMARY_HINT))
    for i, entry in enumerate(data.external_sources):
        sources.append((f"data.external_sources[{i}]", entry.path, entry.image_dir, EXTERNAL_HINT))
    for i, entry in enumerate(data.feedback_sources if data.train_on_feedback else []):
        sources.append((f"data.feedback_sources[{i}]", entry.path, entry.image_dir, FEEDBACK_HINT))
    for i, entry in enumerate(data.test_sources):
        sources.append((f"{TEST_SETTING}[{i}]", entry.path, entry.image_dir, TEST_HINT))
    return sources


def existing_source(setting: str, path: str | Path, hint: str) -> Path:
    """``path`` resolved, when it is a folder or a file.

    Raises:
        FileNotFoundError: it does not exist (``setting`` and ``hint`` say what to change).
    """
    resolved = Path(path).expanduser().resolve()
    if not resolved.exists():
        what = "data folder" if setting == "data.source_dir" else f"{setting}.path"
        raise InputFileNotFoundError(f"{what} not found: {resolved}; {hint}")
    return resolved


def table_fingerprint(table: pd.DataFrame) -> str:
    """sha256 of a table's content (row order and column names included): a data version."""
    digest = hashlib.sha256(",".join(map(str, table.columns)).encode())
    digest.update(pd.util.hash_pandas_object(table, index=False).to_numpy().tobytes())
    return digest.hexdigest()


def _hash_source(digest: Any, path: Path, image_dir: str | None, setting: str) -> None:
    """Add one source (folder or metadata file) and its image folder(s) to ``digest``."""
    folder = path.parent if path.is_file() else path
    if path.is_file():
        beside = [p for p in path.parent.iterdir() if p.is_file()]
        _hash_metadata(digest, path.parent, beside)
        _hash_image_stores(digest, path.parent, beside)
    else:
        metadata = [p for p in folder.rglob("*") if p.is_file() and len(p.relative_to(folder).parts) <= 2]
        _hash_metadata(digest, folder, metadata)
        _hash_images(digest, folder, folder.rglob("*"))
        _hash_image_stores(digest, folder, metadata)
    if image_dir is not None:
        images = Path(image_dir).expanduser().resolve()
        if is_hdf5_file(images):
            _hash_image_stores(digest, images.parent, [images])
            return
        if not images.is_dir():
            raise InputFileNotFoundError(
                f"{setting} image_dir not found: {images}; point it at the image folder, or unset it to find "
                "the images beside the metadata"
            )
        image_dirs = [] if images.is_relative_to(folder) and path.is_dir() else [images]
    else:
        image_dirs = find_image_dirs(folder) if path.is_file() else []
    for images in image_dirs:
        _hash_images(digest, images, images.iterdir())  # the loader reads only the files directly inside


def _hash_metadata(digest: Any, root: Path, files: Iterable[Path]) -> None:
    for path in sorted(p for p in files if p.suffix.lower() in METADATA_SUFFIXES):
        digest.update(f"meta:{path.relative_to(root).as_posix()}:".encode())
        digest.update(path.read_bytes())


def _hash_images(digest: Any, root: Path, paths: Iterable[Path]) -> None:
    for path in sorted(p for p in paths if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
        digest.update(
            f"image:{root.name}/{path.relative_to(root).as_posix()}:{path.stat().st_size}\n".encode()
        )


def _hash_image_stores(digest: Any, root: Path, paths: Iterable[Path]) -> None:
    """HDF5 image files among ``paths``: name, size and mtime (a rewrite changes the mtime)."""
    for path in sorted(p for p in paths if p.suffix.lower() in HDF5_SUFFIXES and p.is_file()):
        size, mtime_ns = stat_key(path)
        digest.update(f"hdf5:{path.relative_to(root).as_posix()}:{size}:{mtime_ns}\n".encode())
