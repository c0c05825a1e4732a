"""Finding, probing and hashing the image file of every metadata row."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from melanoma_ml.atomic import sha256_file
from melanoma_ml.images.io import probe_image

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png")


def index_image_files(image_dirs: Sequence[Path]) -> dict[str, Path]:
    """Lower-cased file name -> absolute path for every image file directly inside ``image_dirs``.

    When two folders hold the same file name the first folder wins.
    """
    index: dict[str, Path] = {}
    for folder in image_dirs:
        with os.scandir(folder) as entries:
            for entry in entries:
                name = entry.name.lower()
                if name.endswith(IMAGE_EXTENSIONS) and name not in index and entry.is_file():
                    index[name] = Path(entry.path).resolve()
    return index


def find_image(index: dict[str, Path], stem: str, preferred_ext: str) -> Path | None:
    """The file for ``stem`` trying ``preferred_ext`` first, then .jpg/.jpeg/.png (case-insensitive)."""
    key = stem.lower()
    for ext in (preferred_ext.lower(), *IMAGE_EXTENSIONS):
        found = index.get(key + ext)
        if found is not None:
            return found
    return None


@dataclass(frozen=True)
class ImageCheck:
    """Probe outcome of one file: ``problem`` is None when it decodes; ``sha256`` is "" when not hashed."""

    problem: str | None
    sha256: str


def check_images_in(paths: Sequence[Path], *, hash_images: bool) -> list[ImageCheck]:
    """Decode (``probe_image``) and optionally hash every file, a few files at a time in threads."""

    def one(path: Path) -> ImageCheck:
        problem = probe_image(path)
        digest = sha256_file(path) if hash_images and problem is None else ""
        return ImageCheck(problem, digest)

    if not paths:
        return []
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, paths))
