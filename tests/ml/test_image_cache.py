"""The pre-resized image cache: layout, resize policy, reuse, incremental rebuilds and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from melanoma_ml import schema
from melanoma_ml.config import SyntheticConfig
from melanoma_ml.images import cache as cache_module
from melanoma_ml.images.cache import ImageCache, build_image_cache, load_resized, resize_centre_crop
from melanoma_ml.images.io import ImageDecodeError, load_rgb, probe_image
from melanoma_ml.synthetic import generate_synthetic_dataset


def write_images(folder: Path, n: int, *, start: int = 0) -> pd.DataFrame:
    """``n`` small images of mixed formats and aspect ratios, each a distinct flat colour."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(start, start + n):
        shape = [(40, 60), (60, 40), (48, 48)][i % 3]
        colour = ((37 * i) % 256, (91 * i) % 256, (53 * i + 100) % 256)
        path = folder / f"IMG_{i:03d}.{'png' if i % 2 else 'jpg'}"
        Image.new("RGB", (shape[1], shape[0]), colour).save(path)
        rows.append({schema.IMAGE: f"IMG_{i:03d}", schema.IMAGE_PATH: str(path), "colour": colour})
    return pd.DataFrame(rows)


def counting_decoder(monkeypatch) -> list[str]:
    """Replace the cache's per-image decoder by a counting wrapper; returns the list of decoded paths."""
    decoded: list[str] = []
    original = cache_module.load_resized

    def counting(path, size):
        decoded.append(str(path))
        return original(path, size)

    monkeypatch.setattr(cache_module, "load_resized", counting)
    return decoded


# --- resize policy --------------------------------------------------------------------------------------


def test_resize_keeps_the_centre_and_drops_the_long_sides():
    wide = np.zeros((40, 80, 3), np.uint8)
    wide[:, :20] = (255, 0, 0)
    wide[:, 20:60] = (0, 0, 255)
    wide[:, 60:] = (0, 255, 0)
    out = resize_centre_crop(wide, 20)
    assert out.shape == (20, 20, 3)
    assert (out[..., 2] > 240).all() and (out[..., :2] < 15).all(), "only the blue centre survives"


def test_resize_does_not_distort_a_round_lesion():
    yy, xx = np.mgrid[0:300, 0:400]
    disc = (np.hypot(yy - 150, xx - 200) < 100)[..., None] * np.full(3, 255, np.uint8)
    out = resize_centre_crop(disc.astype(np.uint8), 60)[..., 0] > 127
    rows, cols = np.nonzero(out)
    assert abs((rows.max() - rows.min()) - (cols.max() - cols.min())) <= 1, "the disc stays round"


def test_reduced_jpeg_decode_matches_full_decode(tmp_path: Path):
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    big = Image.fromarray(coarse).resize((1600, 1200), Image.Resampling.BICUBIC)
    path = tmp_path / "big.jpg"
    big.save(path, quality=92)
    fast = load_resized(path, 64).astype(int)
    exact = resize_centre_crop(load_rgb(path), 64).astype(int)
    assert fast.shape == (64, 64, 3)
    assert np.abs(fast - exact).mean() < 3


# --- building and opening -------------------------------------------------------------------------------


def test_build_layout_and_lookup(tmp_path: Path):
    table = write_images(tmp_path / "img", 7)
    cache = build_image_cache(table, tmp_path / "cache" / "32px", 32)
    assert cache.n_images == 7 and cache.size == 32 and cache.names == table[schema.IMAGE].tolist()
    pixels = cache.array()
    assert isinstance(pixels, np.memmap) and pixels.shape == (7, 32, 32, 3) and pixels.dtype == np.uint8
    with pytest.raises(ValueError, match="read-only"):
        pixels[0, 0, 0, 0] = 1
    for row, colour in zip(cache.rows_for(table[schema.IMAGE]), table["colour"], strict=True):
        np.testing.assert_allclose(pixels[row].reshape(-1, 3).mean(0), colour, atol=3)
    np.testing.assert_array_equal(cache.rows_for(["IMG_004", "IMG_001", "IMG_004"]), [4, 1, 4])
    assert cache.rows_for([]).dtype == np.int64
    for name in ("images.npy", "index.parquet", "manifest.json"):
        assert (cache.root / name).is_file()
    manifest = json.loads((cache.root / "manifest.json").read_text())
    assert manifest["shape"] == [7, 32, 32, 3] and "centre crop" in manifest["resize"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["32px"], "no temp folders left behind"
    assert ImageCache.open(cache.root) == cache


def test_unknown_names_raise_a_clear_key_error(tmp_path: Path):
    cache = build_image_cache(write_images(tmp_path / "img", 3), tmp_path / "cache", 16)
    with pytest.raises(KeyError, match=r"2 image\(s\) not in the image cache .*NOPE_1, NOPE_2; rebuild"):
        cache.rows_for(["IMG_000", "NOPE_1", "NOPE_2"])


def test_open_refuses_a_folder_without_a_complete_cache(tmp_path: Path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "images.npy").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="build it with build_image_cache"):
        ImageCache.open(tmp_path / "half")


def test_threads_give_identical_pixels(tmp_path: Path):
    table = write_images(tmp_path / "img", 9)
    one = build_image_cache(table, tmp_path / "one", 24, workers=1)
    three = build_image_cache(table, tmp_path / "three", 24, workers=3)
    np.testing.assert_array_equal(one.array(), three.array())


def test_synthetic_dataset_round_trip(tmp_path: Path):
    ds = generate_synthetic_dataset(
        tmp_path / "syn", SyntheticConfig(n_patients=4, images_per_patient=(2, 2), image_size=64)
    )
    table = pd.read_csv(ds.csv_path)
    table[schema.IMAGE_PATH] = [str(ds.image_dir / f"{name}.jpg") for name in table[schema.IMAGE]]
    cache = build_image_cache(table, tmp_path / "cache", 32)
    assert cache.array().shape == (8, 32, 32, 3)
    first = cache.array()[cache.rows_for([table[schema.IMAGE][0]])[0]]
    direct = resize_centre_crop(load_rgb(table[schema.IMAGE_PATH][0]), 32)
    assert np.abs(first.astype(int) - direct.astype(int)).mean() < 3


# --- reuse and rebuilds ---------------------------------------------------------------------------------


def test_same_table_reuses_the_cache_without_decoding(tmp_path: Path, monkeypatch):
    table = write_images(tmp_path / "img", 5)
    first = build_image_cache(table, tmp_path / "cache", 16)
    manifest_before = (first.root / "manifest.json").stat().st_mtime_ns
    decoded = counting_decoder(monkeypatch)
    again = build_image_cache(table.iloc[::-1], tmp_path / "cache", 16)  # row order does not matter
    subset = build_image_cache(table.iloc[:2], tmp_path / "cache", 16)  # a subset is served too
    assert decoded == []
    assert again == first and subset == first
    assert (first.root / "manifest.json").stat().st_mtime_ns == manifest_before


def test_changed_and_added_images_are_decoded_the_rest_copied(tmp_path: Path, monkeypatch):
    table = write_images(tmp_path / "img", 5)
    build_image_cache(table, tmp_path / "cache", 16)
    changed = Path(table[schema.IMAGE_PATH][2])
    Image.new("RGB", (50, 50), (250, 250, 0)).save(
        changed, format="PNG" if changed.suffix == ".png" else "JPEG"
    )
    bigger = pd.concat([table, write_images(tmp_path / "img", 1, start=5)], ignore_index=True)
    decoded = counting_decoder(monkeypatch)
    cache = build_image_cache(bigger, tmp_path / "cache", 16)
    assert sorted(decoded) == sorted([str(changed), bigger[schema.IMAGE_PATH][5]])
    pixels = cache.array()
    np.testing.assert_allclose(
        pixels[cache.rows_for(["IMG_002"])[0]].reshape(-1, 3).mean(0), (250, 250, 0), atol=3
    )
    np.testing.assert_allclose(
        pixels[cache.rows_for(["IMG_004"])[0]].reshape(-1, 3).mean(0), table["colour"][4], atol=3
    )
    manifest = json.loads((cache.root / "manifest.json").read_text())
    assert manifest["n_decoded"] == 2 and manifest["n_copied_from_previous"] == 4


@pytest.mark.parametrize(
    ("change", "expect_decoded"),
    [("same sha", 0), ("new sha", 1), ("other size", 4)],
)
def test_sha_column_is_the_fingerprint_when_present(tmp_path: Path, monkeypatch, change, expect_decoded):
    table = write_images(tmp_path / "img", 4)
    table[schema.IMAGE_SHA256] = [f"{i:064x}" for i in range(4)]
    build_image_cache(table, tmp_path / "cache", 16)
    Path(table[schema.IMAGE_PATH][0]).touch()  # mtime changes, but the sha decides
    size = 16
    if change == "new sha":
        table.loc[0, schema.IMAGE_SHA256] = "f" * 64
    elif change == "other size":
        size = 20
    decoded = counting_decoder(monkeypatch)
    cache = build_image_cache(table, tmp_path / "cache", size)
    assert len(decoded) == expect_decoded and cache.size == size


# --- bad input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("no path column", "lacks column"),
        ("empty", "no rows"),
        ("blank path", r"have no image_path \(rows \[11\]\)"),
        ("duplicate", r"duplicate image names \['IMG_000'\]"),
    ],
)
def test_bad_tables_are_refused(tmp_path: Path, damage, message):
    table = write_images(tmp_path / "img", 3)
    table.index = [10, 11, 12]
    if damage == "no path column":
        table = table.drop(columns=[schema.IMAGE_PATH])
    elif damage == "empty":
        table = table.iloc[:0]
    elif damage == "blank path":
        table.loc[11, schema.IMAGE_PATH] = " "
    else:
        table.loc[12, schema.IMAGE] = "IMG_000"
    with pytest.raises(ValueError, match=message):
        build_image_cache(table, tmp_path / "cache", 16)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("damage", "problem"),
    [("truncated", "truncated or corrupt"), ("missing", "image file missing"), ("text", "not a recognised")],
)
def test_bad_image_names_file_row_and_leaves_the_old_cache(tmp_path: Path, damage, problem):
    table = write_images(tmp_path / "img", 4)
    table.index = [20, 21, 22, 23]
    good = build_image_cache(table.iloc[:2], tmp_path / "cache", 16)
    bad = Path(table.loc[22, schema.IMAGE_PATH])
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:60])
    elif damage == "missing":
        bad.unlink()
    else:
        bad.write_text("not an image")
    with pytest.raises(ImageDecodeError, match=problem) as info:
        build_image_cache(table, tmp_path / "cache", 16)
    assert f"{bad} (row 22" in str(info.value)
    assert ImageCache.open(tmp_path / "cache") == good, "a failed rebuild leaves the previous cache intact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "img"], "no temp folders left behind"


# --- real data ------------------------------------------------------------------------------------------


@pytest.mark.real_data
def test_real_isic_images_probe_clean_and_cache_by_sha(isic_sample_dir: Path, tmp_path: Path, monkeypatch):
    lines = (isic_sample_dir / "images.sha256").read_text().split("\n")[:30]
    sha_by_file = dict(reversed(line.split(maxsplit=1)) for line in lines if line.strip())
    table = pd.DataFrame(
        {
            schema.IMAGE: [Path(f).stem for f in sha_by_file],
            schema.IMAGE_PATH: [str(isic_sample_dir / "images" / f) for f in sha_by_file],
            schema.IMAGE_SHA256: list(sha_by_file.values()),
        }
    )
    assert [probe_image(p) for p in table[schema.IMAGE_PATH]] == [None] * len(table)
    cache = build_image_cache(table, tmp_path / "cache", 32, workers=2)
    pixels = cache.array()
    assert pixels.shape == (len(table), 32, 32, 3) and 40 < pixels.mean() < 230
    decoded = counting_decoder(monkeypatch)
    assert build_image_cache(table, tmp_path / "cache", 32) == cache and decoded == []
