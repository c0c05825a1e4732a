"""Batched inference with 8-view dihedral test-time augmentation.

The 8 views (identity, 90/180/270 degree turns and their horizontal flips) of a whole batch are made
with tensor ops and go through ONE forward pass; the 8 sigmoid probabilities per image are averaged.
The geometry matches training: the image cache resizes the short side and centre-crops to the spec's
size, and this module reuses that very function. So does the pixel scaling: ``normalize`` runs
``melanoma_ml.images.normalization.normalize_pixels``, the function the training transforms use, once on
the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
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


def view_logits(
    logits_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    meta: torch.Tensor,
    tta: bool = True,
) -> torch.Tensor:
    """Logits ``(V, B)`` of a preprocessed batch: ``V = 8`` dihedral views with ``tta``, else 1.

    All views of the batch go through ONE call of ``logits_fn`` (a :class:`~melanoma_ml.serving.bundle.Scorer`'s
    ``logits``: eager torch or an exported runtime).
    """
    if x.shape[0] != meta.shape[0]:
        raise ValueError(f"batch has {x.shape[0]} images but {meta.shape[0]} metadata rows")
    n = x.shape[0]
    with torch.inference_mode():
        meta = meta.to(dtype=torch.float32)
        if tta:
            x = dihedral_views(x)
            meta = meta.repeat(N_VIEWS, 1)
        logits = torch.as_tensor(logits_fn(x.contiguous(memory_format=torch.channels_last), meta))
    return logits.float().reshape(-1, n)


@dataclass(frozen=True)
class Scores:
    """What a bundle says about a batch of images.

    Attributes:
        prob: Served probabilities: the members' average, calibrated and prior-shifted (what the app shows).
        raw: The average before calibration (what out-of-fold predictions were, for reproduction checks).
        ood_score: Out-of-distribution score per image (higher = less like the training images), or None
            when the bundle ships no detector.
        ood_flag: ``ood_score`` above the detector's threshold, or None.
    """

    prob: np.ndarray
    raw: np.ndarray
    ood_score: np.ndarray | None = None
    ood_flag: np.ndarray | None = None


def average_members(member_logits: Sequence[torch.Tensor], average: str) -> torch.Tensor:
    """``(B,)`` probabilities from each member's ``(V, B)`` view logits.

    Views are averaged in probability space (sigmoid, then mean: what TTA has always done); members in
    ``average`` space: ``probability`` (mean of the members' probabilities) or ``logit`` (sigmoid of the
    mean of the members' view-averaged log-odds).
    """
    per_member = torch.stack([torch.sigmoid(v).mean(dim=0) for v in member_logits])  # (M, B)
    if average == "probability" or len(member_logits) == 1:
        return per_member.mean(dim=0)
    if average != "logit":
        raise InputValueError(f"unknown ensemble average {average!r}; use 'logit' or 'probability'")
    eps = 1e-7
    clipped = per_member.clamp(eps, 1 - eps)
    return torch.sigmoid(torch.logit(clipped).mean(dim=0))


def score(
    bundle: Bundle,
    images: Sequence[np.ndarray],
    metadata: Sequence[Mapping[str, Any]] | np.ndarray,
    *,
    tta: bool = True,
    batch_size: int = 64,
    deployment_prevalence: float | None = None,
) -> Scores:
    """Score decoded images with every network of the bundle, plus the out-of-distribution check.

    Each member preprocesses the batch for its own spec (shared when the specs agree), runs all views of
    it in one call and the members are averaged in the bundle's stated space
    (``manifest.ensemble.average``); then the bundle's calibrator and the prior shift apply
    (:func:`served_probabilities`). The detector (if any) reads member 0's backbone features of the
    un-augmented view.

    Args:
        bundle: A loaded serving bundle (``load_bundle``).
        images: ``(H, W, 3)`` uint8 RGB arrays of any size.
        metadata: One ``{"age", "sex", "site"}`` dict per image, or an encoded ``(n, k)`` array (only for
            a one-network bundle or members sharing one encoder).
        tta: Average the 8 dihedral views.
        batch_size: Images per call of each network (``8 * batch_size`` views with TTA).
        deployment_prevalence: ``serving.deployment_prevalence`` (None: no shift); compare the result with
            :func:`decision_threshold` at the same value.
    """
    if batch_size < 1:
        raise InputValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(images) == 0:
        empty = np.zeros(0, dtype=np.float32)
        flags = None if bundle.ood is None else np.zeros(0, dtype=bool)
        return Scores(empty, empty, None if flags is None else empty, flags)
    ensemble = bundle.manifest.ensemble
    average = "probability" if ensemble is None else ensemble.average
    encoded = [encode_metadata(metadata, scorer.spec, len(images)) for scorer in bundle.scorers]
    raw_parts, ood_parts = [], []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        prepared: dict[tuple[Any, ...], torch.Tensor] = {}
        member_logits = []
        for scorer, meta in zip(bundle.scorers, encoded, strict=True):
            x = _prepared(prepared, chunk, scorer.spec, start)
            member_logits.append(view_logits(scorer.logits, x, meta[start : start + batch_size], tta))
        raw_parts.append(average_members(member_logits, average))
        if bundle.ood is not None:
            from melanoma_ml.serving.ood import ood_scores_for

            x0 = _prepared(prepared, chunk, bundle.spec, start)
            ood_parts.append(ood_scores_for(bundle.net, x0, bundle.ood))
    raw = torch.cat(raw_parts).numpy()
    prob = served_probabilities(bundle.manifest, raw, deployment_prevalence)
    if not ood_parts:
        return Scores(prob, raw)
    ood_score = np.concatenate([np.asarray(part[0], dtype=np.float64) for part in ood_parts])
    ood_flag = np.concatenate([np.asarray(part[1], dtype=bool) for part in ood_parts])
    return Scores(prob, raw, ood_score, ood_flag)


def _prepared(
    cache: dict[tuple[Any, ...], torch.Tensor], images: Sequence[np.ndarray], spec: ModelSpec, first: int
) -> torch.Tensor:
    """``preprocess(images, spec)``, computed once per distinct (size, mean, std) within a batch."""
    key = (spec.image_size, tuple(spec.mean), tuple(spec.std), spec.color_constancy)
    if key not in cache:
        cache[key] = preprocess(images, spec, first_index=first)
    return cache[key]


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
    """Melanoma probabilities for decoded images and their metadata (:func:`score`'s ``prob``).

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
    scores = score(
        bundle, images, metadata, tta=tta, batch_size=batch_size, deployment_prevalence=deployment_prevalence
    )
    return scores.prob if calibrated else scores.raw


def score_out_of_fold(
    bundle: Bundle,
    images: Sequence[np.ndarray],
    metadata: Sequence[Mapping[str, Any]],
    folds: Sequence[int],
    *,
    tta: bool = False,
) -> np.ndarray:
    """Raw probabilities as out-of-fold predictions: each image scored only by the members that did not
    train on it (those whose ``fold`` is the image's ``folds`` entry), averaged in the bundle's space.

    This is how an ensemble bundle's stored out-of-fold predictions (manifest ``oof``) were made, so it
    reproduces them; a one-network bundle scores every image with its network.

    Raises:
        InputValueError: an image's fold has no member (the image was in every member's training data).
    """
    folds = [int(f) for f in folds]
    if len(folds) != len(images):
        raise InputValueError(f"got {len(images)} images but {len(folds)} folds")
    ensemble = bundle.manifest.ensemble
    if ensemble is None:
        return score(bundle, images, metadata, tta=tta).raw
    out = np.full(len(images), np.nan, dtype=np.float32)
    member_folds = [m.fold for m in ensemble.members]
    for fold in sorted(set(folds)):
        index = [i for i, f in enumerate(folds) if f == fold]
        members = [i for i, f in enumerate(member_folds) if f == fold]
        if not members:
            raise InputValueError(
                f"no member of the ensemble was trained without fold {fold}; its out-of-fold prediction "
                "cannot be reproduced"
            )
        subset = [images[i] for i in index]
        meta = [metadata[i] for i in index]
        logits = []
        for m in members:
            scorer = bundle.scorers[m]
            x = preprocess(subset, scorer.spec)
            logits.append(view_logits(scorer.logits, x, encode_metadata(meta, scorer.spec, len(subset)), tta))
        out[index] = average_members(logits, ensemble.average).numpy()
    return out
