"""ISIC 2024 (SLICE-3D): layout detection, images read from train-image.hdf5, the synthetic 2024 layout."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from melanoma_ml import checks, schema
from melanoma_ml.config import TABULAR_PRESETS, DataConfig, PipelineConfig, SyntheticConfig
from melanoma_ml.errors import MelanomaInputError
from melanoma_ml.folds import assign_folds
from melanoma_ml.images import hdf5
from melanoma_ml.images.cache import build_image_cache, load_resized
from melanoma_ml.images.io import ImageDecodeError, load_rgb
from melanoma_ml.metadata.fingerprint import source_fingerprint
from melanoma_ml.metadata.io import MetadataError
from melanoma_ml.metadata.layouts import detect_layout, load_dataset
from melanoma_ml.metadata.sources import load_configured_data
from melanoma_ml.synthetic_isic2024 import generate_isic2024_dataset

SMALL = SyntheticConfig(n_patients=10, images_per_patient=(2, 3), image_size=64, melanoma_rate=0.3)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return generate_isic2024_dataset(tmp_path_factory.mktemp("isic2024") / "set", SMALL)


def _copy(made, tmp_path: Path) -> Path:
    folder = tmp_path / "copy"
    shutil.copytree(made.root, folder)
    return folder


def _as_jpeg_folder(hdf5_path: Path, folder: Path) -> Path:
    """The same JPEG bytes as files: ISIC 2024's train-image/image/<isic_id>.jpg form."""
    images = folder / "train-image" / "image"
    images.mkdir(parents=True)
    with h5py.File(hdf5_path, "r") as store:
        for key in store:
            (images / f"{key}.jpg").write_bytes(store[key][()].tobytes())
    return images


def test_folder_is_detected_as_isic2024_with_its_hdf5(made):
    match = detect_layout(made.root)
    assert match.name == "isic2024"
    assert match.files["images"] == made.hdf5_path
    assert "train-metadata.csv" in match.reason and "train-image.hdf5" in match.reason


def test_table_file_is_detected_by_its_columns(made):
    match = detect_layout(made.csv_path)
    assert match.name == "isic2024"
    assert match.files["images"] == made.hdf5_path


def test_synthetic_columns_have_isic2024_names_and_dtypes(made):
    table = pd.read_csv(made.csv_path)
    for column in (*TABULAR_PRESETS["isic2024_tbp"], "iddx_full", "tbp_lv_location", "tbp_tile_type"):
        assert column in table.columns
    numeric = [c for c in TABULAR_PRESETS["isic2024_tbp"] if c != "tbp_lv_symm_2axis_angle"]
    assert all(table[c].dtype == np.float64 for c in numeric)
    assert table["tbp_lv_symm_2axis_angle"].dtype == np.int64
    by_label = table.groupby("target")[
        ["tbp_lv_areaMM2", "tbp_lv_color_std_mean", "tbp_lv_symm_2axis"]
    ].mean()
    assert (by_label.loc[1] > by_label.loc[0]).all()  # melanomas: larger, more varied, less symmetric


def test_hdf5_image_decodes_pixel_equal_to_the_same_jpeg_file(made, tmp_path):
    images = _as_jpeg_folder(made.hdf5_path, tmp_path)
    key = hdf5.list_keys(made.hdf5_path)[0]
    ref = hdf5.make_ref(made.hdf5_path, key)
    np.testing.assert_array_equal(load_rgb(ref), load_rgb(images / f"{key}.jpg"))
    np.testing.assert_array_equal(load_resized(ref, 32), load_resized(images / f"{key}.jpg", 32))


def test_fixed_length_bytes_datasets_are_read_too(tmp_path):
    source = generate_isic2024_dataset(tmp_path / "set", SMALL.model_copy(update={"n_patients": 2}))
    key = hdf5.list_keys(source.hdf5_path)[0]
    with h5py.File(source.hdf5_path, "r") as store:
        jpeg = store[key][()].tobytes()
    other = tmp_path / "bytes.hdf5"
    with h5py.File(other, "w") as store:
        store.create_dataset(key, data=np.bytes_(jpeg))  # dtype |S<n>: read back as bytes
    np.testing.assert_array_equal(load_rgb(hdf5.make_ref(other, key)), load_rgb(jpeg))


def test_cleaning_keeps_tabular_columns_and_points_image_path_into_the_hdf5(made):
    result = load_dataset(made.root)
    clean = result.clean
    assert list(clean.columns[: len(schema.CLEAN_COLUMNS)]) == list(schema.CLEAN_COLUMNS)
    assert schema.extra_columns(clean) == list(TABULAR_PRESETS["isic2024_tbp"])
    assert result.summary["tabular_columns"] == list(TABULAR_PRESETS["isic2024_tbp"])
    assert clean[schema.IMAGE_PATH].str.startswith(f"hdf5://{made.hdf5_path}#").all()
    assert clean[schema.IMAGE_SHA256].str.len().eq(64).all()
    assert checks.clean_table_problems(clean) == []
    assert result.summary["melanoma"] == made.n_melanoma
    assert result.summary["patients"] == made.n_patients


def test_missing_hdf5_key_and_non_image_entry_are_quarantined_with_a_reason(made, tmp_path):
    folder = _copy(made, tmp_path)
    keys = hdf5.list_keys(folder / "train-image.hdf5")
    hdf5.close_files()  # HDF5 will not open a file for writing while this process reads it
    with h5py.File(folder / "train-image.hdf5", "a") as store:
        del store[keys[0]]
        del store[keys[1]]
        store.create_dataset(keys[1], data=np.zeros((3, 3), dtype=np.float32))
    result = load_dataset(folder)
    by_image = result.quarantine.set_index(schema.IMAGE)
    assert by_image.loc[keys[0], "check"] == "image_missing"
    assert f"key '{keys[0]}' in HDF5 file" in by_image.loc[keys[0], schema.Q_REASON]
    assert by_image.loc[keys[1], "check"] == "image_unreadable"
    assert "not encoded image bytes" in by_image.loc[keys[1], schema.Q_REASON]
    assert len(result.clean) == made.n_images - 2


def test_missing_hdf5_file_names_the_setting(made, tmp_path):
    folder = tmp_path / "no-images"
    folder.mkdir()
    shutil.copy(made.csv_path, folder / "train-metadata.csv")
    with pytest.raises(MetadataError, match=r"data\.image_dir.*") as err:
        load_dataset(folder)
    assert "train-image.hdf5" in str(err.value)
    data = DataConfig(source_dir=str(folder), image_dir=str(folder / "gone.hdf5"))
    with pytest.raises(MetadataError, match=r"data\.image_dir"):
        load_configured_data(data)


def test_reference_to_a_vanished_file_is_an_input_error_not_a_traceback(tmp_path):
    with pytest.raises(ImageDecodeError, match="HDF5 image file missing") as err:
        load_rgb(hdf5.make_ref(tmp_path / "gone.hdf5", "ISIC_1"))
    assert isinstance(err.value, MelanomaInputError)
    assert "data.image_dir" in str(err.value)


def test_jpeg_folder_form_is_read_when_there_is_no_hdf5(made, tmp_path):
    folder = tmp_path / "folder-form"
    folder.mkdir()
    shutil.copy(made.csv_path, folder / "train-metadata.csv")
    images = _as_jpeg_folder(made.hdf5_path, folder)
    result = load_dataset(folder)
    assert result.summary["image_dirs"] == [str(images.resolve())]
    assert len(result.clean) == made.n_images
    hdf5_result = load_dataset(made.root)
    assert result.clean[schema.IMAGE_SHA256].tolist() == hdf5_result.clean[schema.IMAGE_SHA256].tolist()


def test_round_trip_clean_folds_cache_from_hdf5_equals_cache_from_jpegs(made, tmp_path):
    clean = load_dataset(made.root).clean
    folds = assign_folds(clean, 2, 0)
    assert "tbp_lv_areaMM2" in folds.columns  # the tabular columns reach the training table
    cache = build_image_cache(folds, tmp_path / "cache-hdf5", 32)
    images = _as_jpeg_folder(made.hdf5_path, tmp_path / "jpegs")
    as_files = folds.assign(
        **{
            schema.IMAGE_PATH: [str(images / f"{n}.jpg") for n in folds[schema.IMAGE]],
            schema.IMAGE_SHA256: "",
        }
    )
    from_files = build_image_cache(as_files, tmp_path / "cache-jpeg", 32)
    np.testing.assert_array_equal(cache.array(), from_files.array())
    assert build_image_cache(folds, tmp_path / "cache-hdf5", 32).root == cache.root  # reused


def test_cache_fingerprint_without_sha_follows_the_hdf5_file(made, tmp_path):
    folder = _copy(made, tmp_path)
    clean = load_dataset(folder, hash_images=False).clean
    assert (clean[schema.IMAGE_SHA256] == "").all()
    first = build_image_cache(clean, tmp_path / "cache", 32)
    assert first.n_images == len(clean)
    store = folder / "train-image.hdf5"
    os.utime(store, ns=(store.stat().st_atime_ns, store.stat().st_mtime_ns + 10**9))
    import json

    build_image_cache(clean, tmp_path / "cache", 32)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["n_decoded"] == len(clean)  # every image re-read after the file changed


def test_source_fingerprint_covers_the_hdf5_file(made, tmp_path):
    folder = _copy(made, tmp_path)
    data = DataConfig(source_dir=str(folder))
    before = source_fingerprint(data)
    store = folder / "train-image.hdf5"
    os.utime(store, ns=(store.stat().st_atime_ns, store.stat().st_mtime_ns + 10**9))
    assert source_fingerprint(data) != before
    assert source_fingerprint(DataConfig(source_dir=str(folder / "train-metadata.csv"))) != before


def test_config_switch_makes_the_pipeline_read_the_2024_layout(tmp_path):
    from melanoma_ml import pipeline

    config = PipelineConfig(
        artifact_root=str(tmp_path / "art"),
        data={"synthetic": SMALL.model_copy(update={"layout": "isic2024"}).model_dump()},
    )
    source = pipeline.prepare_source(config)
    assert source.layout == "isic2024" and source.image_dir.name == "train-image.hdf5"
    result = pipeline.clean_source(config, source)
    assert result.summary["data_sources"][0]["layout"] == "isic2024"
    assert "tbp_lv_x" in pd.read_parquet(tmp_path / "art" / "tables" / "clean.parquet").columns
