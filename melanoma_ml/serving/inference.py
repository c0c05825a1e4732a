"""Batched inference with 8-view dihedral test-time augmentation.

The 8 views (identity, 90/180/270 degree turns and their horizontal flips) of a whole batch are made
with tensor ops and go through ONE forward pass; the 8 sigmoid probabilities per image are averaged.
The geometry matches training: the image cache resizes the short side and centre-crops to the spec's
size, and this module reuses that very function. So does the pixel scaling: ``normalize`` runs
``melanoma_ml.images.normalization.normalize_pixels``, the function the training transforms use, once on
the whole batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from melanoma_ml.errors import InputValueError
from melanoma_ml.images.cache import resize_centre_crop
from melanoma_ml.images.normalization import normalize_pixels
from melanoma_ml.serving.calibrated import served_probabilities
from melanoma_ml.spec import ModelSpec

if TYPE_CHECKING:
    from melanoma_ml.serving.bundle import Bundle

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
    return torch.from_numpy(normalize_pixels(views, spec.mean, spec.std)).permute(0, 3, 1, 2)


def preprocess(images: Sequence[np.ndarray], spec: ModelSpec, *, first_index: int = 0) -> torch.Tensor:
    """Resize (short side) + centre-crop to ``spec.image_size`` and normalize: ``(B, 3, S, S)`` float32.

    ``first_index`` is the position of ``images[0]`` in the whole request (for error messages).
    """
    size = spec.image_size
    if len(images) == 0:
        return torch.zeros((0, 3, size, size), dtype=torch.float32)
    views = np.stack([square_view(image, size, index=first_index + i) for i, image in enumerate(images)])
    return normalize(views, spec)


def dihedral_views(x: torch.Tensor) -> torch.Tensor:
    """The 8 dihedral views of a square batch, view-major: ``out[v * B + b]`` is view ``v`` of image ``b``.

    Views 0-3 are turns by 0/90/180/270 degrees, views 4-7 the same turns flipped horizontally.
    """
    if x.ndim != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"dihedral views need a square (B, C, S, S) batch, got shape {tuple(x.shape)}")
    turns = [torch.rot90(x, k, dims=(2, 3)) for k in range(4)]
    return torch.cat(turns + [torch.flip(t, dims=(3,)) for t in turns], dim=0)


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


def predict_tensor(net: nn.Module, x: torch.Tensor, meta: torch.Tensor, tta: bool = True) -> torch.Tensor:
    """Probabilities for an already preprocessed batch: ``(B,)`` float32 on the CPU.

    With ``tta`` the ``8 * B`` views and the metadata repeated 8 times go through one forward pass and
    the 8 sigmoid probabilities of each image are averaged.

    Raises:
        ValueError: ``net`` is in training mode (dropout and batch statistics would make the output
            random): call ``net.eval()`` first.
    """
    if net.training:
        raise ValueError("the network is in training mode; call net.eval() before predicting")
    if x.shape[0] != meta.shape[0]:
        raise ValueError(f"batch has {x.shape[0]} images but {meta.shape[0]} metadata rows")
    n = x.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.float32)
    device = next(net.parameters()).device
    with torch.inference_mode():
        x = x.to(device, non_blocking=True)
        meta = meta.to(device, dtype=torch.float32, non_blocking=True)
        if tta:
            x = dihedral_views(x)
            meta = meta.repeat(N_VIEWS, 1)
        x = x.contiguous(memory_format=torch.channels_last)
        probabilities = torch.sigmoid(net(x, meta).float())
        if tta:
            probabilities = probabilities.view(N_VIEWS, n).mean(dim=0)
    return probabilities.cpu()


def predict(
    bundle: Bundle,
    images: Sequence[np.ndarray],
    metadata: Sequence[Mapping[str, Any]] | np.ndarray,
    *,
    tta: bool = True,
    batch_size: int = 64,
    calibrated: bool = True,
    deployment_prevalence: float | None = None,
) -> np.ndarray:
    """Melanoma probabilities for decoded images and their metadata.

    Args:
        bundle: A loaded serving bundle (``load_bundle``).
        images: ``(H, W, 3)`` uint8 RGB arrays of any size.
        metadata: One ``{"age", "sex", "site"}`` dict per image, or an encoded ``(n, k)`` array.
        tta: Average the 8 dihedral views (one forward pass per batch of ``8 * batch_size`` views).
        batch_size: Images per forward pass.
        calibrated: Serve the bundle's calibrated (and prior-shifted) probabilities
            (:func:`served_probabilities`); False gives the network's raw ones (what the stored out-of-fold
            predictions are, for reproduction checks).
        deployment_prevalence: ``serving.deployment_prevalence`` (None: no shift); compare the result with
            :func:`decision_threshold` at the same value.

    Returns:
        ``(n,)`` float array of probabilities in [0, 1].
    """
    if batch_size < 1:
        raise InputValueError(f"batch_size must be >= 1, got {batch_size}")
    meta = encode_metadata(metadata, bundle.spec, len(images))
    out = []
    for start in range(0, len(images), batch_size):
        x = preprocess(images[start : start + batch_size], bundle.spec, first_index=start)
        out.append(predict_tensor(bundle.net, x, meta[start : start + batch_size], tta=tta))
    if not out:
        return np.zeros(0, dtype=np.float32)
    raw = torch.cat(out).numpy()
    return served_probabilities(bundle.manifest, raw, deployment_prevalence) if calibrated else raw
