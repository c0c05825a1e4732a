"""CAM mass inside the lesion mask: exact values on constructed maps, the bootstrap CI, the mask's input view."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from melanoma_ml.errors import InputValueError
from melanoma_ml.evaluation.localisation import (
    bootstrap_mean,
    lesion_mask_view,
    mask_area,
    mass_inside,
    paired_difference,
)


def square_mask(side: int = 8, lo: int = 2, hi: int = 6) -> np.ndarray:
    mask = np.zeros((side, side), bool)
    mask[lo:hi, lo:hi] = True  # 16 of 64 pixels
    return mask


def test_all_heat_inside_the_mask_is_one_and_all_outside_is_zero() -> None:
    mask = square_mask()
    assert mass_inside(mask.astype(float), mask) == 1.0
    assert mass_inside((~mask).astype(float), mask) == 0.0


def test_a_uniform_map_gives_the_mask_area() -> None:
    mask = square_mask()
    assert mask_area(mask) == 0.25
    assert mass_inside(np.full(mask.shape, 0.7), mask) == pytest.approx(0.25, abs=1e-12)


def test_mass_is_weighted_by_heat() -> None:
    mask = square_mask()
    heat = np.zeros(mask.shape)
    heat[3, 3] = 1.0  # inside
    heat[0, 0] = 0.5  # outside
    heat[7, 7] = 0.5  # outside
    assert mass_inside(heat, mask) == pytest.approx(0.5, abs=1e-12)


def test_an_all_zero_map_has_no_mass_fraction() -> None:
    assert np.isnan(mass_inside(np.zeros((8, 8)), square_mask()))


@pytest.mark.parametrize(
    ("heat", "message"),
    [
        (np.ones((8, 9)), "same shape"),
        (-np.ones((8, 8)), "negative"),
        (np.full((8, 8), np.nan), "non-finite"),
    ],
)
def test_bad_maps_say_what_to_pass(heat: np.ndarray, message: str) -> None:
    with pytest.raises(InputValueError, match=message):
        mass_inside(heat, square_mask())


def test_bootstrap_mean_of_constant_values_has_a_zero_width_ci() -> None:
    estimate = bootstrap_mean([0.25, 0.25, 0.25], n_bootstrap=200, seed=0, level=0.95)
    assert (estimate.value, estimate.lo, estimate.hi, estimate.level) == (0.25, 0.25, 0.25, 0.95)


def test_bootstrap_mean_drops_nans_and_brackets_the_mean() -> None:
    values = [0.0, 1.0] * 20 + [float("nan")]
    estimate = bootstrap_mean(values, n_bootstrap=2000, seed=1, level=0.95)
    assert estimate.value == 0.5
    # the sd of a mean of 40 fair 0/1 values is 0.079: the 95% interval is about 0.5 +- 0.155
    assert 0.30 < estimate.lo < 0.40 and 0.60 < estimate.hi < 0.70
    assert bootstrap_mean(values, 2000, 1, 0.95) == estimate  # seeded


def test_paired_difference_resamples_pairs() -> None:
    a = np.linspace(0.2, 0.9, 30)
    estimate = paired_difference(a + 0.1, a, n_bootstrap=500, seed=0, level=0.9)
    assert estimate.value == pytest.approx(0.1) and estimate.lo == pytest.approx(0.1)
    assert estimate.hi == pytest.approx(0.1)  # a shared per-image offset: no spread once paired
    with pytest.raises(InputValueError, match="one per image"):
        paired_difference([0.1, 0.2], [0.1], n_bootstrap=10, seed=0, level=0.9)


def test_nothing_to_average_is_refused() -> None:
    with pytest.raises(InputValueError, match="no finite"):
        bootstrap_mean([float("nan")], n_bootstrap=10, seed=0, level=0.95)


def test_lesion_mask_view_crops_like_the_image(tmp_path) -> None:
    """A 40x20 (W x H) mask whose lesion sits in the centre half: the centre square crop keeps it centred."""
    mask = np.zeros((20, 40), np.uint8)
    mask[5:15, 15:25] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    view = lesion_mask_view(tmp_path / "m.png", 20)
    assert view.shape == (20, 20) and view.dtype == bool
    expected = np.zeros((20, 20), bool)
    expected[5:15, 5:15] = True
    np.testing.assert_array_equal(view, expected)
    np.testing.assert_array_equal(lesion_mask_view(mask, 20), expected)
