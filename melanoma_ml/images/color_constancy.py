"""Colour constancy: take the camera's and the light's colour cast out of a dermoscopy image.

Shades of Gray (Finlayson & Trezzi, 2004) estimates the illuminant of each channel as the Minkowski
p-norm mean of its pixels, ``(mean(v ** p)) ** (1 / p)``, and scales each channel so that this estimate
becomes grey. ``p = 1`` is Grey World, ``p -> inf`` is max-RGB (White Patch); ``p = 6`` is what the leading
ISIC 2018 and 2019 entries used (e.g. Gessert et al. 2019). The gains are normalised so that a neutral
illuminant leaves the image unchanged and the overall brightness is kept, as in the widely copied ISIC
implementation (``rgb_vec / ||rgb_vec|| * sqrt(3)``). That implementation's optional gamma step is not
applied: it changes the image's tone curve, not its colour balance, and would have to be undone.

The only caller in the project is ``melanoma_ml.images.normalization.normalize_pixels``, the one path
training, evaluation and serving share, driven by ``ModelSpec.color_constancy``.
"""

from __future__ import annotations

from typing import get_args

import numpy as np

from melanoma_ml.config import ColorConstancy
from melanoma_ml.errors import InputValueError

METHODS: tuple[str, ...] = get_args(ColorConstancy)
"""Accepted ``data.color_constancy`` / ``ModelSpec.color_constancy`` values."""

DEFAULT_POWER = 6


def check_method(method: str) -> None:
    """Refuse an unknown colour constancy name (the message lists the known ones).

    Raises:
        InputValueError: ``method`` is not one of ``METHODS``.
    """
    if method not in METHODS:
        raise InputValueError(
            f"unknown colour constancy {method!r}; set data.color_constancy to one of {list(METHODS)}"
        )


def shades_of_gray(rgb: np.ndarray, power: float = DEFAULT_POWER) -> np.ndarray:
    """Shades of Gray white balance of one ``(H, W, 3)`` uint8 image or a ``(..., H, W, 3)`` batch.

    Each image gets its own three gains (estimated over its own pixels); the result is rounded and clipped
    back to uint8, same shape. An all-black image (no light to estimate) is returned unchanged.

    Args:
        rgb: uint8 RGB pixels, channels last.
        power: The Minkowski norm ``p`` (6: the ISIC 2018/2019 choice; 1: Grey World).

    Raises:
        InputValueError: not uint8 RGB with channels last, or ``power`` not positive.
    """
    if rgb.dtype != np.uint8 or rgb.ndim < 3 or rgb.shape[-1] != 3:
        raise InputValueError(
            f"shades_of_gray expects uint8 RGB pixels shaped (..., H, W, 3), got {rgb.dtype} {rgb.shape}"
        )
    if not power > 0:
        raise InputValueError(f"shades_of_gray power must be positive, got {power}")
    if rgb.size == 0:
        return rgb.copy()
    # v ** p for the 256 possible values once, then a lookup (float64: 255 ** 6 ~ 2.7e14).
    powered = (np.arange(256, dtype=np.float64) / 255.0) ** power
    illuminant = powered[rgb].mean(axis=(-3, -2)) ** (1.0 / power)  # (..., 3)
    norm = np.linalg.norm(illuminant, axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        gains = norm / (np.sqrt(3.0) * illuminant)  # 1 for a grey illuminant (e, e, e)
    # 0/0 (an all-black image) and x/0 (a channel that is 0 everywhere, and stays 0): leave as they are
    gains = np.where(np.isfinite(gains), gains, 1.0)
    out = rgb * gains[..., None, None, :].astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def apply_color_constancy(rgb: np.ndarray, method: str) -> np.ndarray:
    """``rgb`` corrected by ``method`` (``"none"`` returns the input itself, no copy).

    Raises:
        InputValueError: unknown method, or pixels that are not uint8 RGB.
    """
    check_method(method)
    if method == "shades_of_gray":
        return shades_of_gray(rgb)
    return rgb
