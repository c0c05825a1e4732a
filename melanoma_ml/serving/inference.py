"""Batched inference: a bundle's members x dihedral views, the one scoring function of the served model.

The views of a whole batch (the bundle's ``views``, recorded at promotion from ``serving.views``: 1, 2, 4 or
all 8 of identity, 90/180/270 degree turns and their horizontal flips, ``network_inputs.VIEW_SUBSETS``) are made with tensor ops and go through ONE call
per member (members merged into one ONNX Runtime graph go through one call together); each member's view
probabilities are averaged, then the members by the one ensemble average. The inputs (square view,
normalisation, views, encoded metadata) are built by ``serving.network_inputs``, with the geometry and
pixel scaling of training. The app, ``predict``, batch scoring and the test evaluation all call
:func:`score`, so what is evaluated is what is served.
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
from melanoma_ml.serving.network_inputs import (
    N_VIEWS,
    VIEW_SUBSETS,
    dihedral_views,
    encode_metadata,
    preprocess,
)
from melanoma_ml.spec import ModelSpec

if TYPE_CHECKING:
    from melanoma_ml.serving.bundle import Bundle, Scorer


def served_views(views: int) -> int:
    """``views`` checked against ``VIEW_SUBSETS``.

    Raises:
        InputValueError: not 1, 2, 4 or 8.
    """
    if isinstance(views, bool) or views not in VIEW_SUBSETS:
        raise InputValueError(
            f"views must be one of {sorted(VIEW_SUBSETS)} (serving.views: dihedral views averaged per member), "
            f"got {views!r}"
        )
    return int(views)


def bundle_views(bundle: Bundle, views: int | None = None) -> int:
    """The views ``bundle`` is scored with: the ones it recorded at promotion (``BundleManifest.views``), or
    ``views`` when a caller asks for others (1: the app's or ``predict``'s TTA switched off; a benchmark).

    Raises:
        InputValueError: ``views`` is not 1, 2, 4 or 8.
    """
    return served_views(bundle.manifest.views if views is None else views)


def predict_tensor(net: nn.Module, x: torch.Tensor, meta: torch.Tensor, views: int = N_VIEWS) -> torch.Tensor:
    """Probabilities for an already preprocessed batch: ``(B,)`` float32 on the CPU.

    The ``views * B`` dihedral views (``VIEW_SUBSETS[views]``) and the metadata repeated per view go
    through one forward pass and the sigmoid probabilities of each image's views are averaged.

    Raises:
        ValueError: ``net`` is in training mode (dropout and batch statistics would make the output
            random): call ``net.eval()`` first.
    """
    if net.training:
        raise ValueError("the network is in training mode; call net.eval() before predicting")
    if x.shape[0] != meta.shape[0]:
        raise ValueError(f"batch has {x.shape[0]} images but {meta.shape[0]} metadata rows")
    views = served_views(views)
    n = x.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.float32)
    device = next(net.parameters()).device
    with torch.inference_mode():
        x = dihedral_views(x.to(device, non_blocking=True), views)
        meta = meta.to(device, dtype=torch.float32, non_blocking=True).repeat(views, 1)
        x = x.contiguous(memory_format=torch.channels_last)
        probabilities = torch.sigmoid(net(x, meta).float()).view(views, n).mean(dim=0)
    return probabilities.cpu()


def view_logits(
    logits_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    meta: torch.Tensor,
    views: int = N_VIEWS,
) -> torch.Tensor:
    """Logits ``(V, B)`` of a preprocessed batch, ``V = views`` dihedral views (``VIEW_SUBSETS``).

    All views of the batch go through ONE call of ``logits_fn`` (a :class:`~melanoma_ml.serving.bundle.Scorer`'s
    ``logits``: eager torch or an exported runtime).
    """
    if x.shape[0] != meta.shape[0]:
        raise ValueError(f"batch has {x.shape[0]} images but {meta.shape[0]} metadata rows")
    views = served_views(views)
    n = x.shape[0]
    with torch.inference_mode():
        logits = torch.as_tensor(logits_fn(_image_views(x, views), _meta_views(meta, views)))
    return logits.float().reshape(-1, n)


def _image_views(x: torch.Tensor, views: int) -> torch.Tensor:
    """``(views * B, 3, S, S)`` channels-last dihedral views, view-major."""
    return (dihedral_views(x, views) if views > 1 else x).contiguous(memory_format=torch.channels_last)


def _meta_views(meta: torch.Tensor, views: int) -> torch.Tensor:
    """``(views * B, k)`` float32 metadata: each image's row once per view, view-major."""
    meta = meta.to(dtype=torch.float32)
    return meta.repeat(views, 1) if views > 1 else meta


def members_view_logits(
    scorers: Sequence[Scorer], inputs: Sequence[tuple[torch.Tensor, torch.Tensor]], views: int
) -> list[torch.Tensor]:
    """Each member's ``(V, B)`` view logits for its own preprocessed ``(x, meta)``.

    A member that runs alone is one call of its ``logits``; members merged into one ONNX Runtime graph
    (``Scorer.merged``) are one call of that graph together, so its per-call overhead is paid once.
    """
    views = served_views(views)
    out: list[torch.Tensor] = []
    merged: dict[int, tuple[Any, dict[int, tuple[int, torch.Tensor, torch.Tensor]]]] = {}
    with torch.inference_mode():
        viewed: dict[int, torch.Tensor] = {}
        for index, (scorer, (x, meta)) in enumerate(zip(scorers, inputs, strict=True)):
            if x.shape[0] != meta.shape[0]:
                raise ValueError(f"batch has {x.shape[0]} images but {meta.shape[0]} metadata rows")
            if id(x) not in viewed:  # members sharing one preprocessed batch share its views
                viewed[id(x)] = _image_views(x, views)
            xv, mv = viewed[id(x)], _meta_views(meta, views)
            if scorer.merged is None:
                out.append(torch.as_tensor(scorer.logits(xv, mv)).float().reshape(views, -1))
            else:
                out.append(torch.empty(0))  # filled by its graph's one call below
                runner = scorer.merged.runner
                merged.setdefault(id(runner), (runner, {}))[1][scorer.merged.position] = (index, xv, mv)
        for runner, slots in merged.values():
            feeds = [None if p not in slots else slots[p][1:] for p in range(runner.n_members)]
            logits = runner.run(feeds)
            for position, (index, _, _) in slots.items():
                out[index] = torch.from_numpy(np.asarray(logits[position], dtype=np.float32)).reshape(
                    views, -1
                )
    return out


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
    views: int | None = None,
    batch_size: int = 64,
    deployment_prevalence: float | None = None,
) -> Scores:
    """Score decoded images with every network of the bundle, plus the out-of-distribution check.

    Each member preprocesses the batch for its own spec (shared when the specs agree), runs all views of
    it in one call (members merged into one ONNX Runtime graph run in one call together) and the members
    are averaged in the bundle's stated space (``manifest.ensemble.average``); then the bundle's calibrator
    and the prior shift apply (:func:`served_probabilities`). The detector (if any) reads member 0's
    backbone features of the un-augmented view. Each member averages the views the bundle recorded
    (:func:`bundle_views`), whatever the caller's ``serving.views``.

    Args:
        bundle: A loaded serving bundle (``load_bundle``).
        images: ``(H, W, 3)`` uint8 RGB arrays of any size.
        metadata: One ``{"age", "sex", "site"}`` dict per image, or an encoded ``(n, k)`` array (only for
            a one-network bundle or members sharing one encoder).
        views: Dihedral views averaged per member; None (what the app, ``predict`` and the card use): the
            bundle's own (``BundleManifest.views``). 1, 2, 4 or 8 overrides it (TTA off; benchmarks).
        batch_size: Images per call of each network (``views * batch_size`` rows).
        deployment_prevalence: ``serving.deployment_prevalence`` (None: no shift); compare the result with
            :func:`decision_threshold` at the same value.
    """
    views = bundle_views(bundle, views)
    if batch_size < 1:
        raise InputValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(images) == 0:
        empty = np.zeros(0, dtype=np.float32)
        flags = None if bundle.ood is None else np.zeros(0, dtype=bool)
        return Scores(empty, empty, None if flags is None else empty, flags)
    average = bundle.manifest.ensemble.average
    encoded = [encode_metadata(metadata, scorer.spec, len(images)) for scorer in bundle.scorers]
    raw_parts, ood_parts = [], []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        prepared: dict[tuple[Any, ...], torch.Tensor] = {}
        inputs = [
            (shared_preprocess(prepared, chunk, scorer.spec, start), meta[start : start + batch_size])
            for scorer, meta in zip(bundle.scorers, encoded, strict=True)
        ]
        raw_parts.append(average_members(members_view_logits(bundle.scorers, inputs, views), average))
        if bundle.ood is not None:
            from melanoma_ml.serving.ood import ood_scores_for

            x0 = shared_preprocess(prepared, chunk, bundle.spec, start)
            ood_parts.append(ood_scores_for(bundle.net, x0, bundle.ood))
    raw = torch.cat(raw_parts).numpy()
    prob = served_probabilities(bundle.manifest, raw, deployment_prevalence)
    if not ood_parts:
        return Scores(prob, raw)
    ood_score = np.concatenate([np.asarray(part[0], dtype=np.float64) for part in ood_parts])
    ood_flag = np.concatenate([np.asarray(part[1], dtype=bool) for part in ood_parts])
    return Scores(prob, raw, ood_score, ood_flag)


def shared_preprocess(
    cache: dict[tuple[Any, ...], torch.Tensor], images: Sequence[np.ndarray], spec: ModelSpec, first: int
) -> torch.Tensor:
    """``preprocess(images, spec)``, computed once per distinct (size, mean, std) within a batch (``cache``):
    members that preprocess alike get the same tensor, so ``members_view_logits`` makes its views once."""
    key = (spec.image_size, tuple(spec.mean), tuple(spec.std), spec.color_constancy)
    if key not in cache:
        cache[key] = preprocess(images, spec, first_index=first)
    return cache[key]


def predict(
    bundle: Bundle,
    images: Sequence[np.ndarray],
    metadata: Sequence[Mapping[str, Any]] | np.ndarray,
    *,
    views: int | None = None,
    batch_size: int = 64,
    calibrated: bool = True,
    deployment_prevalence: float | None = None,
) -> np.ndarray:
    """Melanoma probabilities for decoded images and their metadata (:func:`score`'s ``prob``).

    Args:
        bundle: A loaded serving bundle (``load_bundle``).
        images: ``(H, W, 3)`` uint8 RGB arrays of any size.
        metadata: One ``{"age", "sex", "site"}`` dict per image, or an encoded ``(n, k)`` array.
        views: Dihedral views averaged per member (None: the bundle's own, :func:`bundle_views`).
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
        bundle,
        images,
        metadata,
        views=views,
        batch_size=batch_size,
        deployment_prevalence=deployment_prevalence,
    )
    return scores.prob if calibrated else scores.raw


def score_out_of_fold(
    bundle: Bundle,
    images: Sequence[np.ndarray],
    metadata: Sequence[Mapping[str, Any]],
    folds: Sequence[int],
    *,
    views: int = 1,
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
    if len(ensemble.members) == 1:  # one network: its own out-of-fold rows are every image it is asked for
        return score(bundle, images, metadata, views=views).raw
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
        scorers = [bundle.scorers[m] for m in members]
        inputs = [(preprocess(subset, s.spec), encode_metadata(meta, s.spec, len(subset))) for s in scorers]
        out[index] = average_members(members_view_logits(scorers, inputs, views), ensemble.average).numpy()
    return out
