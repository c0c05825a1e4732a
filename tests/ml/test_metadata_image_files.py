"""One list of accepted image extensions: cleaning finds them, the cache decodes them, the fingerprint sees them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from melanoma_ml.config import DataConfig
from melanoma_ml.images.cache import build_image_cache
from melanoma_ml.metadata import load_dataset
from melanoma_ml.metadata.fingerprint import source_fingerprint
from melanoma_ml.metadata.image_files import IMAGE_EXTENSIONS, find_image, index_image_files, unaccepted_files


def _save(path: Path, seed: int) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 255, (20, 28, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize("ext", IMAGE_EXTENSIONS)
def test_each_accepted_extension_is_cleaned_cached_and_fingerprinted(tmp_path: Path, ext: str) -> None:
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "train.csv").write_text("image_name,patient_id,target\nISIC_1,IP_1,0\nISIC_2,IP_2,1\n")
    _save(root / "images" / "ISIC_1.jpg", 1)
    data = DataConfig(source_dir=str(root))
    before = source_fingerprint(data)
    _save(root / "images" / f"ISIC_2{ext.upper()}", 2)
    assert source_fingerprint(data) != before

    result = load_dataset(root)
    assert result.clean["image_name"].tolist() == ["ISIC_1", "ISIC_2"]
    assert result.clean["image_path"].iloc[1].endswith(f"ISIC_2{ext.upper()}")
    cache = build_image_cache(result.clean, tmp_path / "cache", 16)
    assert cache.n_images == 2 and cache.array().shape[1:] == (16, 16, 3)


def test_unaccepted_extensions_are_listed_by_stem_and_never_indexed(tmp_path: Path) -> None:
    _save(tmp_path / "A.gif", 1)
    _save(tmp_path / "B.png", 2)
    (tmp_path / "notes.txt").write_text("x")
    index = index_image_files([tmp_path])
    assert (
        find_image(index, "A", ".jpg") is None
        and find_image(index, "b", ".jpg") == (tmp_path / "B.png").resolve()
    )
    assert unaccepted_files([tmp_path], ["a", "B", "notes", "C"]) == {"a": ["A.gif"], "notes": ["notes.txt"]}
