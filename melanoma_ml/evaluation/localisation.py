"""Does a CAM point at the lesion? The share of CAM mass inside a lesion mask, with a bootstrap CI over images.

For one image, the *mass inside* is ``sum(heatmap * mask) / sum(heatmap)``: 1.0 when all heat lies on the
lesion, the mask's area fraction for a uniform heatmap (the chance level, :func:`mask_area`). Over a set
of images we report the mean with a percentile bootstrap CI that resamples images; for two networks on
the same images, :func:`paired_difference` resamples the per-image differences.

The synthetic generator (``melanoma_ml.synthetic``) writes the lesion mask of every image
(``SyntheticDataset.mask_dir / "<image_name>.png"``, 0/255); :func:`lesion_mask_view` brings one to the
network's input view with the same resize and centre crop as the image. Images of one patient are not
independent, so on real data (several images per lesion) the CI over images is optimistic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from melanoma_ml.errors import InputValueError
from melanoma_ml.evaluation.bootstrap import percentile_interval
from melanoma_ml.evaluation.estimate import Estimate


def _check_pair(heatmap: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    heat = np.asarray(heatmap, dtype=np.float64)
    inside = np.asarray(mask, dtype=bool)
    if heat.shape != inside.shape or heat.ndim != 2:
        raise InputValueError(
            f"heatmap {heat.shape} and mask {inside.shape} must be 2-D maps of the same shape; bring the mask "
            "to the network's input view first (lesion_mask_view)"
        )
    if not np.isfinite(heat).all() or (heat < 0).any():
        raise InputValueError("heatmap has negative or non-finite values; pass the CAM heatmap in [0, 1]")
    return heat, inside


def mass_inside(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Fraction of the heatmap's total mass that lies inside ``mask`` (NaN for an all-zero heatmap).

    Raises:
        InputValueError: shapes differ, or the heatmap has negative / non-finite values.
    """
    heat, inside = _check_pair(heatmap, mask)
    total = heat.sum()
    return float(heat[inside].sum() / total) if total > 0 else float("nan")


def mask_area(mask: np.ndarray) -> float:
    """Fraction of pixels inside ``mask``: what :func:`mass_inside` gives for a uniform heatmap."""
    return float(np.asarray(mask, dtype=bool).mean())


def bootstrap_mean(
    values: Sequence[float] | np.ndarray, n_bootstrap: int, seed: int, level: float
) -> Estimate:
    """Mean of ``values`` (NaNs dropped) with a percentile bootstrap CI that resamples the values.

    Raises:
        InputValueError: no finite value, or ``n_bootstrap`` < 1.
    """
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        raise InputValueError("no finite per-image value to average (every heatmap was all zero?)")
    if n_bootstrap < 1:
        raise InputValueError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, finite.size, size=(n_bootstrap, finite.size))
    lo, hi = percentile_interval(finite[draws].mean(axis=1), level)
    return Estimate(float(finite.mean()), lo, hi, level)


def paired_difference(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    n_bootstrap: int,
    seed: int,
    level: float,
) -> Estimate:
    """Mean of ``a - b`` over the same images, with a bootstrap CI that resamples images (pairs stay together).

    Raises:
        InputValueError: ``a`` and ``b`` differ in length.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise InputValueError(f"paired values need one per image in both: got {a.shape} and {b.shape}")
    return bootstrap_mean(a - b, n_bootstrap, seed, level)


def lesion_mask_view(mask: np.ndarray | str | Path, size: int) -> np.ndarray:
    """A 0/255 lesion mask (array or PNG path) on the network's square input view: ``(size, size)`` bool.

    Uses the image path's own resize + centre crop (``images.cache.resize_centre_crop``, what
    ``serving.network_inputs.square_view`` runs), so mask and heatmap pixels line up.
    """
    from PIL import Image

    from melanoma_ml.images.cache import resize_centre_crop

    if isinstance(mask, str | Path):
        with Image.open(mask) as image:
            mask = np.asarray(image.convert("L"))
    gray = np.asarray(mask, dtype=np.uint8)
    if gray.ndim == 3:
        gray = gray[..., 0]
    view = resize_centre_crop(np.repeat(gray[..., None], 3, axis=2), size)
    return view[..., 0] >= 128


@dataclass(frozen=True)
class CamLocalisation:
    """CAM mass inside the lesion mask for one network on a set of images.

    Attributes:
        inside: Per image, the fraction of CAM mass inside its mask (NaN for an all-zero CAM).
        area: Per image, the mask's area fraction (the chance level of a uniform CAM).
        mean_inside: Mean of ``inside`` with its bootstrap CI over images.
        mean_area: Mean of ``area`` with its bootstrap CI (same resampling seed).
        target_layer: The CAM layer used.
    """

    inside: np.ndarray
    area: np.ndarray
    mean_inside: Estimate
    mean_area: Estimate
    target_layer: str


def localisation_of(
    heatmaps: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    target_layer: str,
    *,
    n_bootstrap: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> CamLocalisation:
    """CAM mass inside the lesion mask of each image, and the mean with a bootstrap CI over images.

    Args:
        heatmaps: One CAM heatmap per image, on the network's input view (``serving.explain.cam_localisation``
            computes them for a network).
        masks: One mask per image on the same view (:func:`lesion_mask_view`).
        target_layer: The CAM layer the heatmaps come from (recorded in the result).
        n_bootstrap, seed, level: The bootstrap over images.

    Raises:
        InputValueError: heatmaps and masks differ in number or shape, or there are none.
    """
    if len(heatmaps) != len(masks) or not len(heatmaps):
        raise InputValueError(
            f"need one mask per heatmap and at least one image; got {len(heatmaps)} heatmaps, {len(masks)} masks"
        )
    inside = np.asarray([mass_inside(h, m) for h, m in zip(heatmaps, masks, strict=True)])
    area = np.asarray([mask_area(m) for m in masks])
    return CamLocalisation(
        inside=inside,
        area=area,
        mean_inside=bootstrap_mean(inside, n_bootstrap, seed, level),
        mean_area=bootstrap_mean(area, n_bootstrap, seed, level),
        target_layer=target_layer,
    )
