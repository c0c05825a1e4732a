"""The one image normalisation: uint8 RGB pixels -> the network's float input.

Training (the albumentations pipelines in ``melanoma_ml.images.transforms``) and serving
(``melanoma_ml.serving.inference``) both call ``normalize_pixels``, so a served image is scaled exactly as
the training images were. It works on one image or a whole batch at once (any leading dimensions).
The model spec's colour constancy (``ModelSpec.color_constancy``, from ``data.color_constancy``) is applied
here too, first, so it cannot be on in training and off in serving.

A uint8 channel has only 256 values, so the rule is written once as a ``(256, 3)`` table of normalized
values and applied with OpenCV's table lookup: the same numbers as ``(x / 255 - mean) / std`` computed
per pixel, several times faster than float arithmetic on the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from melanoma_ml.errors import InputValueError
from melanoma_ml.images.color_constancy import apply_color_constancy, check_method

MAX_PIXEL_VALUE = 255


def check_normalization(mean: Sequence[float], std: Sequence[float]) -> None:
    """Refuse a mean/std that cannot normalize RGB images.

    Raises:
        InputValueError: not 3 values each, or a std that is not positive.
    """
    if len(mean) != 3 or len(std) != 3:
        raise InputValueError(f"mean and std need 3 values (RGB), got mean={list(mean)} std={list(std)}")
    if any(s <= 0 for s in std):
        raise InputValueError(f"std values must be positive, got {list(std)}")


def normalization_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``table[v, c]`` = ``(v / 255 - mean[c]) / std[c]`` for every uint8 value ``v``: ``(256, 3)`` float32."""
    check_normalization(mean, std)
    values = np.arange(MAX_PIXEL_VALUE + 1, dtype=np.float64)[:, None] / MAX_PIXEL_VALUE
    return ((values - np.asarray(mean, dtype=np.float64)) / np.asarray(std, dtype=np.float64)).astype(
        np.float32
    )


def normalize_pixels(
    pixels: np.ndarray, mean: Sequence[float], std: Sequence[float], color_constancy: str = "none"
) -> np.ndarray:
    """``(..., H, W, 3)`` uint8 RGB -> float32 ``(pixels / 255 - mean) / std`` of the same shape.

    Args:
        pixels: One ``(H, W, 3)`` image or a ``(B, H, W, 3)`` batch.
        mean: Per-channel mean on the 0-1 scale (from ``model.normalization_for``).
        std: Per-channel std on the 0-1 scale.
        color_constancy: ``ModelSpec.color_constancy``: ``"none"`` or ``"shades_of_gray"`` (each image of a
            batch white-balanced on its own pixels before scaling).

    Raises:
        InputValueError: not uint8 RGB with channels last, a bad mean/std, or an unknown colour constancy.
    """
    if pixels.dtype != np.uint8 or pixels.ndim < 3 or pixels.shape[-1] != 3:
        raise InputValueError(
            f"expected uint8 RGB pixels shaped (..., H, W, 3), got {pixels.dtype} {pixels.shape}; "
            "decode images with melanoma_ml.images.io.load_rgb"
        )
    table = normalization_table(mean, std)
    check_method(color_constancy)
    if pixels.size == 0:
        return np.zeros(pixels.shape, dtype=np.float32)
    pixels = apply_color_constancy(pixels, color_constancy)
    rows = np.ascontiguousarray(pixels).reshape(-1, pixels.shape[-2], 3)  # OpenCV takes 2-D images
    return cv2.LUT(rows, table.reshape(1, 256, 3)).reshape(pixels.shape)
