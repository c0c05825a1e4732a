"""Albumentations pipelines: random augmentation for training, deterministic resize + normalize for eval.

Both take a ``(H, W, 3)`` uint8 RGB array (``transform(image=array)["image"]``) and return a ``(3, size,
size)`` float32 tensor normalized with the backbone's mean/std (given on the 0-1 scale) by
``normalize_pixels``, the function serving uses too, after the spec's colour constancy (``color_constancy``:
applied last, to the augmented pixels, exactly as serving applies it to the resized upload).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2

from melanoma_ml.config import AugmentationConfig
from melanoma_ml.errors import InputValueError
from melanoma_ml.images.color_constancy import check_method
from melanoma_ml.images.normalization import check_normalization, normalize_pixels


class NormalizePixels(A.ImageOnlyTransform):
    """``normalize_pixels`` as an albumentations step (always applied; draws no random numbers)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], color_constancy: str = "none") -> None:
        super().__init__(p=1.0)
        check_normalization(mean, std)
        check_method(color_constancy)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.color_constancy = color_constancy

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return normalize_pixels(img, self.mean, self.std, self.color_constancy)

    def apply_to_images(self, images: np.ndarray, **params: Any) -> np.ndarray:
        return normalize_pixels(images, self.mean, self.std, self.color_constancy)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("mean", "std", "color_constancy")


def _normalize(mean: Sequence[float], std: Sequence[float], color_constancy: str) -> list[A.BasicTransform]:
    return [NormalizePixels(mean, std, color_constancy), ToTensorV2()]


def _check_size(size: int) -> None:
    if size < 1:
        raise InputValueError(f"image size must be a positive number of pixels, got {size}")


def train_transform(
    size: int,
    aug: AugmentationConfig,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int | None = None,
    color_constancy: str = "none",
) -> A.Compose:
    """Random (resized) crop, flips, 90-degree turns, shift/scale/rotate, colour, white balance and gamma
    jitter, coarse dropout.

    Args:
        size: Output side in pixels (inputs of another size are resized first).
        aug: Probabilities and magnitudes of each augmentation.
        mean: Per-channel mean on the 0-1 scale (from ``normalization_for``).
        std: Per-channel std on the 0-1 scale.
        seed: Seed of the pipeline's own random state. Albumentations ignores global seeds, so a fixed
            seed is what makes two training runs see the same augmentations.
        color_constancy: ``ModelSpec.color_constancy``, applied to the augmented pixels.
    """
    _check_size(size)
    low_holes, high_holes = aug.dropout_holes
    low_side, high_side = aug.dropout_size
    strength = aug.jitter_strength
    framing = (
        A.Resize(size, size)
        if aug.crop_scale is None
        else A.RandomResizedCrop(size=(size, size), scale=aug.crop_scale, p=1.0)
    )
    return A.Compose(
        [
            framing,
            A.HorizontalFlip(p=aug.hflip),
            A.VerticalFlip(p=aug.vflip),
            A.RandomRotate90(p=aug.rotate90),
            A.Affine(
                scale=(1 - aug.scale_limit, 1 + aug.scale_limit),
                translate_percent=(-aug.shift_limit, aug.shift_limit),
                rotate=(-aug.rotate_limit, aug.rotate_limit),
                border_mode=cv2.BORDER_REFLECT_101,  # lesions near the edge keep skin, not black corners
                p=aug.affine,
            ),
            A.ColorJitter(
                brightness=strength,
                contrast=strength,
                saturation=strength,
                hue=aug.jitter_hue,
                p=aug.color_jitter,
            ),
            A.PlanckianJitter(mode="blackbody", p=aug.white_balance),
            A.RandomGamma(gamma_limit=aug.gamma_limit, p=aug.gamma),
            A.CoarseDropout(
                num_holes_range=(low_holes, high_holes),
                hole_height_range=(low_side, high_side),
                hole_width_range=(low_side, high_side),
                fill=0,
                p=aug.coarse_dropout,
            ),
            *_normalize(mean, std, color_constancy),
        ],
        seed=seed,
    )


def eval_transform(
    size: int, mean: Sequence[float], std: Sequence[float], color_constancy: str = "none"
) -> A.Compose:
    """Resize to ``size`` (a no-op for cached images of that size), colour constancy (``ModelSpec``'s),
    normalize, convert to a tensor."""
    _check_size(size)
    return A.Compose([A.Resize(size, size), *_normalize(mean, std, color_constancy)])
