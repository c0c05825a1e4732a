"""The one pixel normalisation used by the training transforms and by serving."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from melanoma_ml.errors import MelanomaInputError
from melanoma_ml.images.normalization import normalization_table, normalize_pixels

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _pixels(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def test_it_is_the_imagenet_formula_to_float32_precision():
    pixels = _pixels(4, 9, 7)
    expected = (pixels / 255.0 - np.array(MEAN)) / np.array(STD)
    out = normalize_pixels(pixels, MEAN, STD)
    assert out.dtype == np.float32 and out.shape == pixels.shape
    np.testing.assert_allclose(out, expected, rtol=0, atol=5e-7)


def test_the_table_covers_every_uint8_value_per_channel():
    table = normalization_table(MEAN, STD)
    assert table.shape == (256, 3) and table.dtype == np.float32
    np.testing.assert_allclose(table[0], -np.array(MEAN) / np.array(STD), atol=1e-6)
    np.testing.assert_allclose(table[255], (1 - np.array(MEAN)) / np.array(STD), atol=1e-6)


def test_a_batch_is_normalized_like_each_of_its_images():
    batch = _pixels(3, 16, 12)
    out = normalize_pixels(batch, MEAN, STD)
    for image, normalized in zip(batch, out, strict=True):
        np.testing.assert_array_equal(normalize_pixels(image, MEAN, STD), normalized)


def test_read_only_and_strided_inputs_give_fresh_writable_arrays():
    batch = _pixels(2, 8, 8)
    batch.setflags(write=False)
    strided = batch[:, ::2, 1:]
    out = normalize_pixels(strided, MEAN, STD)
    assert out.shape == strided.shape and out.flags.writeable
    np.testing.assert_array_equal(out, normalize_pixels(np.ascontiguousarray(strided), MEAN, STD))
    torch.from_numpy(out)  # serving wraps it without a copy


def test_an_empty_batch_stays_empty():
    assert normalize_pixels(np.zeros((0, 4, 4, 3), np.uint8), MEAN, STD).shape == (0, 4, 4, 3)


@pytest.mark.parametrize(
    "pixels", [np.zeros((4, 4, 3), np.float32), np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8)]
)
def test_only_uint8_rgb_is_accepted(pixels):
    with pytest.raises(MelanomaInputError, match="uint8 RGB"):
        normalize_pixels(pixels, MEAN, STD)


@pytest.mark.parametrize(
    ("mean", "std", "match"), [((0.5, 0.5), STD, "3 values"), (MEAN, (0.2, 0, 0.2), "positive")]
)
def test_bad_mean_or_std_is_refused(mean, std, match):
    with pytest.raises(MelanomaInputError, match=match):
        normalize_pixels(_pixels(2, 2), mean, std)
