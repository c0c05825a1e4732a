"""Albumentations pipelines: output shape/dtype, exact normalization, config-driven probabilities, seeding."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from melanoma_ml.config import AugmentationConfig, TrainingConfig
from melanoma_ml.images.color_constancy import shades_of_gray
from melanoma_ml.images.normalization import normalize_pixels
from melanoma_ml.images.transforms import NormalizePixels, eval_transform, train_transform

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
NO_AUGMENTATION = AugmentationConfig(hflip=0, vflip=0, rotate90=0, affine=0, color_jitter=0, coarse_dropout=0)


def _image(side: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


def _expected(image: np.ndarray) -> torch.Tensor:
    scaled = image.astype(np.float32) / 255.0
    normalized = (scaled - np.array(MEAN, dtype=np.float32)) / np.array(STD, dtype=np.float32)
    return torch.from_numpy(normalized.transpose(2, 0, 1).copy())


@pytest.mark.parametrize("in_side,out_side", [(32, 32), (48, 32), (20, 64)])
def test_eval_transform_returns_chw_float32_of_the_requested_size(in_side: int, out_side: int) -> None:
    out = eval_transform(out_side, MEAN, STD)(image=_image(in_side))["image"]
    assert isinstance(out, torch.Tensor)
    assert out.dtype == torch.float32
    assert tuple(out.shape) == (3, out_side, out_side)


def test_eval_transform_normalizes_with_the_given_mean_and_std() -> None:
    image = _image(32)
    out = eval_transform(32, MEAN, STD)(image=image)["image"]
    torch.testing.assert_close(out, _expected(image), atol=1e-5, rtol=0)


@pytest.mark.parametrize("in_side", [32, 40])
def test_train_transform_shape_and_dtype(in_side: int) -> None:
    out = train_transform(32, AugmentationConfig(), MEAN, STD, seed=0)(image=_image(in_side))["image"]
    assert out.dtype == torch.float32
    assert tuple(out.shape) == (3, 32, 32)


def test_train_transform_with_zero_probabilities_equals_eval_transform() -> None:
    image = _image(32)
    augmented = train_transform(32, NO_AUGMENTATION, MEAN, STD, seed=0)(image=image)["image"]
    torch.testing.assert_close(augmented, eval_transform(32, MEAN, STD)(image=image)["image"])


@pytest.mark.parametrize(
    "field,flip_dim",
    [("hflip", 2), ("vflip", 1)],  # CHW: width is dim 2, height dim 1
)
def test_flip_probability_comes_from_the_config(field: str, flip_dim: int) -> None:
    image = _image(32)
    aug = NO_AUGMENTATION.model_copy(update={field: 1.0})
    out = train_transform(32, aug, MEAN, STD, seed=0)(image=image)["image"]
    torch.testing.assert_close(out, torch.flip(_expected(image), dims=[flip_dim]), atol=1e-5, rtol=0)


def test_coarse_dropout_blanks_rectangles_to_black() -> None:
    image = np.full((32, 32, 3), 200, dtype=np.uint8)
    aug = NO_AUGMENTATION.model_copy(update={"coarse_dropout": 1.0, "dropout_holes": (2, 2)})
    out = train_transform(32, aug, MEAN, STD, seed=0)(image=image)["image"]
    black = _expected(np.zeros((1, 1, 3), dtype=np.uint8))[:, 0, 0]
    dropped = torch.isclose(out[0], black[0], atol=1e-5)
    assert 0 < int(dropped.sum()) < 32 * 32


def test_same_seed_gives_the_same_augmentations_and_another_seed_does_not() -> None:
    images = [_image(32, seed=i) for i in range(4)]
    first, second, other = (train_transform(32, AugmentationConfig(), MEAN, STD, seed=s) for s in (7, 7, 8))
    a = torch.stack([first(image=im)["image"] for im in images])
    b = torch.stack([second(image=im)["image"] for im in images])
    c = torch.stack([other(image=im)["image"] for im in images])
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize(
    "mean,std,match",
    [((0.5, 0.5), STD, "3 values"), (MEAN, (0.2, 0.0, 0.2), "positive")],
)
def test_bad_normalization_is_refused(mean, std, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        eval_transform(32, mean, std)


@pytest.mark.parametrize(
    "make", [lambda: eval_transform(32, MEAN, STD), lambda: train_transform(32, NO_AUGMENTATION, MEAN, STD)]
)
def test_both_pipelines_normalize_with_the_shared_function(make) -> None:
    steps = list(make())
    assert not any(isinstance(step, A.Normalize) for step in steps)
    normalize = [step for step in steps if isinstance(step, NormalizePixels)]
    assert len(normalize) == 1 and (normalize[0].mean, normalize[0].std) == (MEAN, STD)
    image = _image(32)
    torch.testing.assert_close(
        make()(image=image)["image"], torch.from_numpy(normalize_pixels(image, MEAN, STD)).permute(2, 0, 1)
    )


def _train_without_augmentation(size, mean, std, **kwargs) -> A.Compose:
    return train_transform(size, NO_AUGMENTATION, mean, std, **kwargs)


@pytest.mark.parametrize("make", [eval_transform, _train_without_augmentation], ids=["eval", "train"])
def test_both_pipelines_apply_the_spec_colour_constancy_in_the_shared_function(make) -> None:
    image = _image(32)
    image[..., 2] //= 2  # a blue-poor cast
    out = make(32, MEAN, STD, color_constancy="shades_of_gray")(image=image)["image"]
    expected = normalize_pixels(shades_of_gray(image), MEAN, STD)
    torch.testing.assert_close(out, torch.from_numpy(expected).permute(2, 0, 1), rtol=0, atol=0)
    assert not torch.equal(out, make(32, MEAN, STD)(image=image)["image"])


def test_the_strong_preset_fills_unset_fields_and_explicit_ones_win() -> None:
    strong = AugmentationConfig(preset="strong", hflip=0.0)
    assert strong.crop_scale == (0.5, 1.0) and strong.jitter_strength == 0.4 and strong.gamma == 0.5
    assert strong.hflip == 0.0
    assert TrainingConfig(augmentation="strong").augmentation == AugmentationConfig(preset="strong")
    assert AugmentationConfig().crop_scale is None and AugmentationConfig().white_balance == 0.0
    with pytest.raises(ValidationError, match="crop_scale"):
        AugmentationConfig(crop_scale=(0.8, 0.5))


@pytest.mark.parametrize("field", ["white_balance", "gamma", "crop_scale"])
def test_the_strong_transforms_come_from_the_config(field: str) -> None:
    image = _image(32)
    value = (0.5, 0.5) if field == "crop_scale" else 1.0
    aug = NO_AUGMENTATION.model_copy(update={field: value})
    if field == "gamma":
        aug = aug.model_copy(update={"gamma_limit": (50, 60)})
    out = train_transform(32, aug, MEAN, STD, seed=0)(image=image)["image"]
    assert tuple(out.shape) == (3, 32, 32)
    assert not torch.allclose(out, _expected(image), atol=1e-3)
    assert any(isinstance(step, A.RandomResizedCrop) for step in train_transform(32, aug, MEAN, STD)) == (
        field == "crop_scale"
    )
