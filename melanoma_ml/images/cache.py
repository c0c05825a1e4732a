"""The pre-resized image cache: decode every original once, reuse the small copies in every epoch and fold.

Layout of a cache folder (``<artifact_root>/cache/<size>px/``):

* ``images.npy`` – one uint8 array (N, size, size, 3), opened as a read-only memory map;
* ``index.parquet`` – ``image_name``, ``row`` (into ``images.npy``), ``image_path`` and ``fingerprint`` of the
  source (``sha256:<hex>`` when the table has ``image_sha256``, else ``file:<path>|<bytes>|<mtime_ns>``);
* ``manifest.json`` – size, count, resize policy and a fingerprint of the whole image list.

The folder is built in a temp folder and renamed into place (``atomic_directory``), so a reader never sees
a half-written cache. A later build with the same images and fingerprints returns the existing cache
untouched; when some images changed, unchanged ones are copied from the old cache instead of re-decoded.

Resize policy: the short side is scaled to ``size`` and the centre square is cropped. Dermoscopy centres the
lesion, so cropping loses only the periphery (vignette, ruler), keeps the lesion at full resolution and its
shape undistorted (asymmetry and border are diagnostic, so squashing is out), and adds no padding bars whose
width would tell the model which camera or source an image came from.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from melanoma_ml import __version__, schema
from melanoma_ml.atomic import atomic_directory, atomic_write_json
from melanoma_ml.errors import InputFileNotFoundError, InputValueError
from melanoma_ml.images import hdf5
from melanoma_ml.images.io import DEFAULT_MAX_PIXELS, ImageDecodeError, image_size, load_rgb

CACHE_FORMAT_VERSION = 1
"""Bump when the pixels a cache holds would change (resize policy, decoding): old caches are rebuilt."""

ARRAY_NAME = "images.npy"
INDEX_NAME = "index.parquet"
MANIFEST_NAME = "manifest.json"
RESIZE_POLICY = "short side to size (Lanczos), centre crop"

_DECODE_MARGIN = 2
"""JPEGs are decoded at reduced scale but at least this many times the target size, so Lanczos still has
enough pixels to antialias."""

_COPY_CHUNK = 256  # rows copied at a time from a previous cache, so memory stays small


@dataclass(frozen=True)
class ImageCache:
    """A built image cache. Build with ``build_image_cache``, reopen with ``ImageCache.open``.

    Attributes:
        root: the cache folder.
        size: side of every cached image in pixels.
        names: image names, in the row order of ``array()``.
    """

    root: Path
    size: int
    names: list[str]
    _rows: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_rows", {name: row for row, name in enumerate(self.names)})

    @property
    def n_images(self) -> int:
        return len(self.names)

    @property
    def array_path(self) -> Path:
        return self.root / ARRAY_NAME

    def array(self) -> np.memmap:
        """All cached images as a read-only memory map (N, size, size, 3) uint8.

        Opening is cheap, but keep the result rather than calling this per item.
        """
        return np.load(self.array_path, mmap_mode="r")

    def rows_for(self, image_names: Iterable[str]) -> np.ndarray:
        """Row numbers (int64) of ``image_names`` in ``array()``, in the order given.

        Raises:
            KeyError: some names are not in the cache (the message lists them and what to do).
        """
        names = list(image_names)
        missing = [name for name in names if name not in self._rows]
        if missing:
            shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
            raise KeyError(
                f"{len(missing)} image(s) not in the image cache {self.root}: {shown}; rebuild the cache "
                "with build_image_cache for the current table (the table and the cache are out of step)"
            )
        return np.fromiter((self._rows[name] for name in names), dtype=np.int64, count=len(names))

    @classmethod
    def open(cls, cache_dir: str | Path) -> ImageCache:
        """Open a complete cache folder.

        Raises:
            FileNotFoundError: no complete cache there (``manifest.json`` is written last).
            ValueError: the files disagree with each other (rebuild the cache).
        """
        root = Path(cache_dir)
        manifest = _read_manifest(root)
        if manifest is None:
            raise InputFileNotFoundError(
                f"no complete image cache at {root} (manifest.json missing or unreadable); "
                "build it with build_image_cache(table, cache_dir, size)"
            )
        index = pd.read_parquet(root / INDEX_NAME).sort_values("row")
        size, n_images = int(manifest["size"]), int(manifest["n_images"])
        if len(index) != n_images or index["row"].tolist() != list(range(n_images)):
            raise InputValueError(
                f"image cache {root} is inconsistent (index vs manifest); delete the folder and rebuild"
            )
        cache = cls(root=root, size=size, names=index[schema.IMAGE].astype(str).tolist())
        shape = cache.array().shape
        if shape != (n_images, size, size, 3):
            raise InputValueError(
                f"image cache {root} holds an array of shape {shape}, expected {(n_images, size, size, 3)}; "
                "delete the folder and rebuild"
            )
        return cache


def build_image_cache(
    table: pd.DataFrame, cache_dir: str | Path, size: int, *, workers: int = 1
) -> ImageCache:
    """Decode, resize and store every image of ``table`` once; reuse the cache when nothing changed.

    Args:
        table: rows with ``schema.IMAGE`` and ``schema.IMAGE_PATH`` (and optionally ``schema.IMAGE_SHA256``,
            which then fingerprints the source instead of file size + mtime).
        cache_dir: the cache folder, e.g. ``<artifact_root>/cache/64px``.
        size: output side in pixels.
        workers: decoding threads (Pillow releases the GIL while decoding and resizing).

    Returns:
        The cache. If an existing cache at ``cache_dir`` has the same size and holds every image of ``table``
        with the same fingerprint, it is returned as is (it may hold extra images; use ``rows_for``).

    Raises:
        ValueError: the table lacks columns, has no rows, blank paths or duplicate image names.
        ImageDecodeError: an image is missing or cannot be decoded (the message names file, row and fix).
    """
    if size < 1 or workers < 1:
        raise InputValueError(f"size and workers must be positive, got size={size}, workers={workers}")
    cache_dir = Path(cache_dir)
    _check_table(table)
    labels = [str(label) for label in table.index]
    names = table[schema.IMAGE].astype(str).tolist()
    paths = table[schema.IMAGE_PATH].astype(str).tolist()
    fingerprints = _fingerprints(table, labels)

    previous = _existing_cache(cache_dir, size)
    previous_prints = previous[1] if previous is not None else {}
    unchanged = [
        i for i, (n, fp) in enumerate(zip(names, fingerprints, strict=True)) if previous_prints.get(n) == fp
    ]
    if previous is not None and len(unchanged) == len(names):
        return previous[0]

    with atomic_directory(cache_dir) as tmp:
        images = np.lib.format.open_memmap(
            tmp / ARRAY_NAME, mode="w+", dtype=np.uint8, shape=(len(names), size, size, 3)
        )
        if previous is not None and unchanged:
            _copy_rows(previous[0], [names[i] for i in unchanged], images, unchanged)
        decode_rows = sorted(set(range(len(names))) - set(unchanged))
        for row, pixels in _decode_all(decode_rows, paths, labels, names, size, workers):
            images[row] = pixels
        images.flush()
        del images
        pd.DataFrame(
            {
                schema.IMAGE: names,
                "row": np.arange(len(names), dtype=np.int64),
                schema.IMAGE_PATH: paths,
                "fingerprint": fingerprints,
            }
        ).to_parquet(tmp / INDEX_NAME, index=False)
        atomic_write_json(tmp / MANIFEST_NAME, _manifest(size, names, fingerprints, len(decode_rows)))
    return ImageCache(root=cache_dir, size=size, names=names)


def resize_centre_crop(rgb: np.ndarray, size: int) -> np.ndarray:
    """Scale the short side to ``size`` (Lanczos) and crop the centre square: (size, size, 3) uint8."""
    fitted = ImageOps.fit(
        Image.fromarray(rgb), (size, size), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5)
    )
    return np.asarray(fitted, dtype=np.uint8)


def load_resized(
    source: str | Path | bytes, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode one image straight to the network's square view, at reduced JPEG scale where that is safe.

    The single decode + resize path of the project: the cache builds training pixels with it and the
    serving app decodes uploads with it, so a served image gets exactly the pixels training saw.
    """
    width, height = image_size(source)
    longest_needed = math.ceil(_DECODE_MARGIN * size * max(width, height) / max(1, min(width, height)))
    return resize_centre_crop(load_rgb(source, max_pixels=max_pixels, max_side=longest_needed), size)


# --- helpers ---------------------------------------------------------------------------------------------


def _check_table(table: pd.DataFrame) -> None:
    missing = [c for c in (schema.IMAGE, schema.IMAGE_PATH) if c not in table.columns]
    if missing:
        raise InputValueError(
            f"image table lacks column(s) {missing}; it needs {schema.IMAGE!r} and {schema.IMAGE_PATH!r} "
            "(run metadata cleaning first, which adds absolute image paths)"
        )
    if table.empty:
        raise InputValueError(
            "image table has no rows; nothing to cache (check the metadata cleaning summary)"
        )
    blank = table.index[
        table[schema.IMAGE_PATH].isna() | (table[schema.IMAGE_PATH].astype(str).str.strip() == "")
    ]
    if len(blank):
        raise InputValueError(
            f"{len(blank)} row(s) have no {schema.IMAGE_PATH} (rows {list(blank[:5])}); "
            "set data.image_dir or quarantine those rows"
        )
    duplicated = table[schema.IMAGE][table[schema.IMAGE].duplicated()].unique()
    if len(duplicated):
        raise InputValueError(
            f"duplicate image names {list(duplicated[:5])}; each {schema.IMAGE} must appear once "
            "(metadata cleaning drops duplicates)"
        )


def _fingerprints(table: pd.DataFrame, labels: list[str]) -> list[str]:
    """Per image: its sha256 when the table has one, else path + byte size + mtime (no file read)."""
    shas = (
        table[schema.IMAGE_SHA256].fillna("").astype(str).tolist()
        if schema.IMAGE_SHA256 in table.columns
        else [""] * len(table)
    )
    prints = []
    for path, sha, label in zip(table[schema.IMAGE_PATH].astype(str), shas, labels, strict=True):
        if sha.strip():
            prints.append(f"sha256:{sha.strip().lower()}")
            continue
        if hdf5.is_ref(path):  # an image inside an HDF5 file: the file's size + mtime stand for its bytes
            try:
                file_size, mtime_ns = hdf5.stat_key(hdf5.parse_ref(path)[0])
            except hdf5.HDF5ImageError as err:
                raise ImageDecodeError(f"{path} (row {label})", err.problem, err.fix) from err
            prints.append(f"file:{path}|{file_size}|{mtime_ns}")
            continue
        try:
            stat = Path(path).stat()
        except FileNotFoundError as err:
            raise ImageDecodeError(
                f"{path} (row {label})", "image file missing", "set data.image_dir or quarantine the row"
            ) from err
        prints.append(f"file:{path}|{stat.st_size}|{stat.st_mtime_ns}")
    return prints


def _decode_all(
    rows: list[int], paths: list[str], labels: list[str], names: list[str], size: int, workers: int
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (row, pixels) in row order; the first undecodable image raises, naming its row."""

    def one(row: int) -> tuple[int, np.ndarray]:
        try:
            return row, load_resized(paths[row], size)
        except ImageDecodeError as err:
            source = f"{paths[row]} (row {labels[row]}, {schema.IMAGE} {names[row]})"
            raise err.with_source(source) from err

    if workers == 1:
        yield from map(one, rows)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="image-cache") as pool:
        yield from pool.map(one, rows)


def _copy_rows(previous: ImageCache, names: list[str], target: np.ndarray, target_rows: list[int]) -> None:
    """Copy unchanged images from a previous cache, chunk by chunk."""
    source = previous.array()
    source_rows = previous.rows_for(names)
    for start in range(0, len(target_rows), _COPY_CHUNK):
        chunk = slice(start, start + _COPY_CHUNK)
        target[target_rows[chunk]] = source[source_rows[chunk]]
    del source


def _existing_cache(cache_dir: Path, size: int) -> tuple[ImageCache, dict[str, str]] | None:
    """An existing complete cache of the same size and format, with its fingerprints; else None."""
    manifest = _read_manifest(cache_dir)
    if (
        manifest is None
        or manifest.get("format_version") != CACHE_FORMAT_VERSION
        or manifest.get("size") != size
    ):
        return None
    try:
        cache = ImageCache.open(cache_dir)
        index = pd.read_parquet(cache_dir / INDEX_NAME, columns=[schema.IMAGE, "fingerprint"])
    except (OSError, ValueError, KeyError):
        return None  # a damaged cache is simply rebuilt
    return cache, dict(zip(index[schema.IMAGE].astype(str), index["fingerprint"].astype(str), strict=True))


def _read_manifest(root: Path) -> dict[str, Any] | None:
    path = root / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _manifest(size: int, names: list[str], fingerprints: list[str], n_decoded: int) -> dict[str, Any]:
    listing = "\n".join(f"{n}\t{fp}" for n, fp in sorted(zip(names, fingerprints, strict=True)))
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "package_version": __version__,
        "size": size,
        "n_images": len(names),
        "shape": [len(names), size, size, 3],
        "dtype": "uint8",
        "resize": RESIZE_POLICY,
        "images_fingerprint": hashlib.sha256(listing.encode("utf-8")).hexdigest(),
        "n_decoded": n_decoded,
        "n_copied_from_previous": len(names) - n_decoded,
    }
