"""Batched inference with 8-view dihedral test-time augmentation.

The 8 views (identity, 90/180/270 degree turns and their horizontal flips) of a whole batch are made
with tensor ops and go through ONE forward pass; the 8 sigmoid probabilities per image are averaged.
The inputs (square view, normalisation, views, encoded metadata) are built by ``serving.network_inputs``,
with the geometry and pixel scaling of training.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from melanoma_ml.errors import InputValueError
from melanoma_ml.evaluation.ensemble import average_probabilities
from melanoma_ml.serving.calibrated import served_probabilities
from melanoma_ml.serving.network_inputs import N_VIEWS, dihedral_views, encode_metadata, preprocess
from melanoma_ml.spec import ModelSpec

if TYPE_CHECKING:
    from melanoma_ml.serving.bundle import Bundle


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
    """``(B,)`` float32 probabilities from each member's ``(V, B)`` view logits.

    Views are averaged in probability space (sigmoid, then mean: what TTA has always done); members by the
    one ensemble average, ``evaluation.ensemble.average_probabilities`` in ``average`` space
    (``serving.ensemble_average``), the function the test evaluation averages fold models with.
    """
    per_member = torch.stack([torch.sigmoid(v.float()).mean(dim=0) for v in member_logits])  # (M, B)
    averaged = average_probabilities(per_member.cpu().numpy(), average)
    return torch.from_numpy(averaged.astype(np.float32))


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
