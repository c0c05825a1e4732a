"""A request's images and metadata as a network's inputs: the square view, the normalised tensor, the 8
dihedral views and the encoded metadata.

The geometry matches training: the image cache resizes the short side and centre-crops to the spec's size,
and :func:`square_view` reuses that very function. So does the pixel scaling: :func:`normalize` runs
``melanoma_ml.images.normalization.normalize_pixels``, the function the training transforms use, once on
the whole batch. Scoring (``serving.inference``), the bundle's export probe (``serving.bundle``), the OOD
detector (``serving.ood``) and the CAMs (``serving.explain``) all build their inputs here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from melanoma_ml.errors import InputValueError
from melanoma_ml.images.cache import resize_centre_crop
from melanoma_ml.images.normalization import normalize_pixels
from melanoma_ml.spec import ModelSpec

N_VIEWS = 8
METADATA_KEYS = ("age", "sex", "site", "tabular")
"""Keys of a request's metadata dict; ``tabular`` (``{column: value}``) is optional, for models with
``model.tabular_features``."""


def square_view(image: np.ndarray, size: int, *, index: int = 0) -> np.ndarray:
    """Check one decoded image and bring it to the network's square input (uint8, ``size x size x 3``).

    Args:
        image: ``(H, W, 3)`` uint8 RGB array (``melanoma_ml.images.io.load_rgb`` decodes files).
        size: Side in pixels (``spec.image_size``).
        index: Position in the request, for error messages.
    """
    if not isinstance(image, np.ndarray):
        raise TypeError(
            f"image {index} is a {type(image).__name__}; pass (H, W, 3) uint8 RGB numpy arrays "
            "(melanoma_ml.images.io.load_rgb decodes files and bytes)"
        )
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise InputValueError(
            f"image {index} has shape {image.shape} and dtype {image.dtype}; pass (H, W, 3) uint8 RGB "
            "arrays (melanoma_ml.images.io.load_rgb converts grayscale/RGBA/16-bit files)"
        )
    return resize_centre_crop(image, size)


def normalize(views: np.ndarray, spec: ModelSpec) -> torch.Tensor:
    """``(B, S, S, 3)`` uint8 -> ``(B, 3, S, S)`` float32 normalized with the spec's mean/std (0-1 scale).

    The result is a channels-last view of the normalized pixels (no copy), the memory format the network
    runs in.
    """
    pixels = normalize_pixels(views, spec.mean, spec.std, spec.color_constancy)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2)


def preprocess(images: Sequence[np.ndarray], spec: ModelSpec, *, first_index: int = 0) -> torch.Tensor:
    """Resize (short side) + centre-crop to ``spec.image_size`` and normalize: ``(B, 3, S, S)`` float32.

    ``first_index`` is the position of ``images[0]`` in the whole request (for error messages).
    """
    size = spec.image_size
    if len(images) == 0:
        return torch.zeros((0, 3, size, size), dtype=torch.float32)
    views = np.stack([square_view(image, size, index=first_index + i) for i, image in enumerate(images)])
    return normalize(views, spec)


VIEW_SUBSETS: dict[int, tuple[int, ...]] = {1: (0,), 2: (0, 4), 4: (0, 2, 4, 6), 8: tuple(range(N_VIEWS))}
"""Which of the 8 dihedral views ``serving.views`` averages: each subset is a subgroup (the identity; it and
its horizontal flip; those and their 180-degree turns; all 8), so every served view set is symmetric."""


def dihedral_views(x: torch.Tensor, views: int = N_VIEWS) -> torch.Tensor:
    """The dihedral views of a square batch, view-major: ``out[v * B + b]`` is view ``v`` of image ``b``.

    Of the 8 views, 0-3 are turns by 0/90/180/270 degrees and 4-7 the same turns flipped horizontally;
    ``views`` (1, 2, 4 or 8) keeps the subset ``VIEW_SUBSETS[views]``, in that order.
    """
    if x.ndim != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"dihedral views need a square (B, C, S, S) batch, got shape {tuple(x.shape)}")
    if views not in VIEW_SUBSETS:
        raise InputValueError(f"views must be one of {sorted(VIEW_SUBSETS)} (serving.views), got {views!r}")
    out = []
    for v in VIEW_SUBSETS[views]:
        turned = torch.rot90(x, v % 4, dims=(2, 3)) if v % 4 else x
        out.append(torch.flip(turned, dims=(3,)) if v >= 4 else turned)
    return torch.cat(out, dim=0)


def encode_metadata(
    metadata: Sequence[Mapping[str, Any]] | np.ndarray, spec: ModelSpec, n: int
) -> torch.Tensor:
    """Encode per-image metadata with the bundle's encoder: ``(n, k)`` float32.

    Args:
        metadata: One ``{"age", "sex", "site"}`` dict per image (missing keys or None count as missing),
            or an already encoded ``(n, k)`` array.
        spec: Holds the fitted encoder.
        n: Number of images (the lengths must match).
    """
    encoder = spec.encoder
    if isinstance(metadata, np.ndarray):
        if metadata.shape != (n, encoder.n_features):
            raise InputValueError(
                f"encoded metadata has shape {metadata.shape}, expected ({n}, {encoder.n_features}) "
                f"(features {encoder.feature_names}); or pass one {{'age', 'sex', 'site'}} dict per image"
            )
        return torch.from_numpy(np.ascontiguousarray(metadata, dtype=np.float32))
    if len(metadata) != n:
        raise InputValueError(f"got {n} images but {len(metadata)} metadata records; pass one dict per image")
    rows = []
    for i, record in enumerate(metadata):
        if not isinstance(record, Mapping):
            raise TypeError(
                f"metadata record {i} is a {type(record).__name__}; pass a dict with {METADATA_KEYS}"
            )
        unknown = sorted(set(record) - set(METADATA_KEYS))
        if unknown:
            raise InputValueError(
                f"metadata record {i} has unknown keys {unknown}; use only {list(METADATA_KEYS)}"
            )
        rows.append(
            encoder.encode_one(
                record.get("age"), record.get("sex"), record.get("site"), record.get("tabular")
            )
        )
    return torch.from_numpy(np.stack(rows)) if rows else torch.zeros((0, encoder.n_features))
