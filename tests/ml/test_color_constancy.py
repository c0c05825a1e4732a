"""Shades of Gray colour constancy: grey balance restored, shapes kept, black images safe, one shared path."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from melanoma_ml.errors import MelanomaInputError
from melanoma_ml.images.color_constancy import METHODS, apply_color_constancy, shades_of_gray
from melanoma_ml.images.normalization import normalize_pixels

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
CAST = np.array([1.15, 1.0, 0.7])  # a warm camera: red up, blue down


def _neutral(side: int = 48, seed: int = 0) -> np.ndarray:
    """A textured image whose every pixel is grey (R = G = B), between 40 and 200."""
    grey = np.random.default_rng(seed).integers(40, 200, (side, side, 1))
    return np.repeat(grey, 3, axis=2).astype(np.uint8)


def _cast(image: np.ndarray, gains: np.ndarray = CAST) -> np.ndarray:
    return np.clip(np.rint(image * gains), 0, 255).astype(np.uint8)


def test_a_colour_cast_is_removed_and_the_channel_means_agree():
    cast = _cast(_neutral())
    means = cast.reshape(-1, 3).mean(axis=0)
    assert means.max() - means.min() > 40  # the cast is strong before
    balanced = shades_of_gray(cast).reshape(-1, 3).astype(float)
    means = balanced.mean(axis=0)
    assert means.max() - means.min() < 1.5
    # per pixel too: the corrected image is grey again (up to the rounding of the cast)
    assert np.abs(balanced - balanced.mean(axis=1, keepdims=True)).max() <= 2.0


def test_a_neutral_image_is_left_alone_and_the_correction_is_idempotent_within_rounding():
    neutral = _neutral()
    np.testing.assert_array_equal(shades_of_gray(neutral), neutral)
    once = shades_of_gray(_cast(_neutral(seed=1), np.array([0.8, 1.0, 1.2])))
    twice = shades_of_gray(once)
    assert np.abs(twice.astype(int) - once.astype(int)).max() <= 1


@pytest.mark.parametrize("shape", [(20, 30, 3), (4, 16, 16, 3), (2, 3, 8, 8, 3)])
def test_dtype_and_shape_are_kept_and_each_image_of_a_batch_is_corrected_on_its_own(shape):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    out = shades_of_gray(pixels)
    assert out.dtype == np.uint8 and out.shape == shape
    flat_in, flat_out = pixels.reshape(-1, *shape[-3:]), out.reshape(-1, *shape[-3:])
    for image, corrected in zip(flat_in, flat_out, strict=True):
        np.testing.assert_array_equal(shades_of_gray(image), corrected)


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((16, 16, 3), np.uint8),  # no light at all
        np.dstack(
            [np.full((16, 16), 90, np.uint8), np.full((16, 16), 60, np.uint8), np.zeros((16, 16), np.uint8)]
        ),
    ],
    ids=["all black", "one channel all zero"],
)
def test_black_images_and_empty_channels_give_finite_pixels_without_warnings(image):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = shades_of_gray(image)
        normalized = normalize_pixels(image, MEAN, STD, "shades_of_gray")
    assert np.isfinite(normalized).all()
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 2], image[..., 2])  # an empty channel stays empty
    if not image.any():
        np.testing.assert_array_equal(out, image)


def test_empty_batches_pass_through():
    assert shades_of_gray(np.zeros((0, 8, 8, 3), np.uint8)).shape == (0, 8, 8, 3)


@pytest.mark.parametrize(
    "pixels,power",
    [
        (np.zeros((8, 8, 3), np.float32), 6),
        (np.zeros((8, 8, 4), np.uint8), 6),
        (np.zeros((8, 8), np.uint8), 6),
        (np.zeros((8, 8, 3), np.uint8), 0),
    ],
)
def test_bad_pixels_or_power_are_refused(pixels, power):
    with pytest.raises(MelanomaInputError):
        shades_of_gray(pixels, power)


def test_normalize_pixels_applies_the_named_colour_constancy_before_scaling():
    cast = _cast(_neutral(side=16))
    np.testing.assert_array_equal(
        normalize_pixels(cast, MEAN, STD, "shades_of_gray"), normalize_pixels(shades_of_gray(cast), MEAN, STD)
    )
    np.testing.assert_array_equal(
        normalize_pixels(cast, MEAN, STD, "none"), normalize_pixels(cast, MEAN, STD)
    )
    assert apply_color_constancy(cast, "none") is cast
    assert METHODS == ("none", "shades_of_gray")


def test_an_unknown_method_names_the_setting_and_the_choices():
    with pytest.raises(MelanomaInputError, match=r"data.color_constancy.*'none', 'shades_of_gray'"):
        normalize_pixels(_neutral(side=8), MEAN, STD, "grey_world")
