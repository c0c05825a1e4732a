"""Finding, probing and hashing the image file of every metadata row."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from melanoma_ml.atomic import sha256_file
from melanoma_ml.images import hdf5
from melanoma_ml.images.io import probe_image

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
"""Image file suffixes looked for, matched case-insensitively: the formats ``images.io.load_rgb`` is tested
on (``images.io.UPLOAD_FORMATS``), so every file found is probed, cached and served by the same decoder.
``find_image_dirs`` and the source fingerprint use this same list. Other suffixes (``.gif``: 256 colours)
are reported by name (``unaccepted_files``), never silently skipped."""


ImageRef = Path | str
"""Where an image is: a file path, or an ``hdf5://<file>#<key>`` reference (``images.hdf5``)."""


def index_image_files(image_dirs: Sequence[Path]) -> dict[str, ImageRef]:
    """Lower-cased file name -> absolute path for every image file directly inside ``image_dirs``.

    An entry of ``image_dirs`` may also be an HDF5 file (ISIC 2024 ``train-image.hdf5``): each top-level
    dataset ``<key>`` is then indexed as ``<key>.jpg`` (the key as is when it already ends in an image
    suffix) with its ``hdf5://`` reference as the value. When two folders hold the same file name the
    first folder wins.
    """
    index: dict[str, ImageRef] = {}
    for folder in image_dirs:
        if hdf5.is_hdf5_file(folder):
            for key in hdf5.list_keys(folder):
                name = key.lower() if key.lower().endswith(IMAGE_EXTENSIONS) else key.lower() + ".jpg"
                index.setdefault(name, hdf5.make_ref(folder, key))
            continue
        with os.scandir(folder) as entries:
            for entry in entries:
                name = entry.name.lower()
                if name.endswith(IMAGE_EXTENSIONS) and name not in index and entry.is_file():
                    index[name] = Path(entry.path).resolve()
    return index


def find_image(index: dict[str, ImageRef], stem: str, preferred_ext: str) -> ImageRef | None:
    """The file for ``stem`` trying ``preferred_ext`` first, then ``IMAGE_EXTENSIONS`` (case-insensitive)."""
    key = stem.lower()
    for ext in (preferred_ext.lower(), *IMAGE_EXTENSIONS):
        found = index.get(key + ext)
        if found is not None:
            return found
    return None


def unaccepted_files(image_dirs: Sequence[Path], stems: Sequence[str]) -> dict[str, list[str]]:
    """Files named ``<stem>.<other suffix>`` for the given stems, whose suffix is not in ``IMAGE_EXTENSIONS``.

    Returns:
        Lower-cased stem -> sorted file names found for it (only stems with such files), so a row whose
        image is e.g. ``ISIC_1.gif`` can be told apart from one with no file at all.
    """
    wanted = {s.lower() for s in stems}
    found: dict[str, list[str]] = {}
    for folder in image_dirs:
        if hdf5.is_hdf5_file(folder):
            continue  # its keys carry no suffix to be wrong about
        with os.scandir(folder) as entries:
            for entry in entries:
                name = entry.name
                stem = name.rpartition(".")[0].lower()
                if stem in wanted and not name.lower().endswith(IMAGE_EXTENSIONS) and entry.is_file():
                    found.setdefault(stem, []).append(name)
    return {stem: sorted(names) for stem, names in found.items()}


@dataclass(frozen=True)
class ImageCheck:
    """Probe outcome of one file: ``problem`` is None when it decodes; ``sha256`` is "" when not hashed."""

    problem: str | None
    sha256: str


def expected_location(image_dir: Path, stem: str, image_ext: str) -> str:
    """Where the image of ``stem`` was looked for first, as named in a "missing" reason."""
    if hdf5.is_hdf5_file(image_dir):
        return f"key {stem!r} in HDF5 file {image_dir}"
    return str(image_dir / (stem + image_ext))


def check_images_in(paths: Sequence[ImageRef], *, hash_images: bool) -> list[ImageCheck]:
    """Decode (``probe_image``) and optionally hash every image, a few at a time in threads."""

    def one(path: ImageRef) -> ImageCheck:
        problem = probe_image(path)
        digest = _sha256(path) if hash_images and problem is None else ""
        return ImageCheck(problem, digest)

    if not paths:
        return []
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, paths))


def _sha256(path: ImageRef) -> str:
    """sha256 of the encoded image: the file's bytes, or the bytes stored in an HDF5 file."""
    return hdf5.sha256(path) if hdf5.is_ref(path) else sha256_file(path)
