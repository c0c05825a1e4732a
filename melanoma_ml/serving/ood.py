"""Out-of-distribution flags from the served network's own outputs: "this does not look like training data".

Two scores, both "higher = less like the training images":

* ``MahalanobisScorer`` (the one to serve, by ``benchmarks/ood_detection.py``): the squared Mahalanobis
  distance of the backbone's pooled image embedding (``net.backbone(x)``: timm ``forward_features`` +
  global pooling, the features the fused head reads) to the nearest class mean (benign, melanoma), under
  one covariance shared by both classes and shrunk with Ledoit-Wolf (the embedding can be wider than the
  number of training images). The metadata branch is left out on purpose: an image is out of
  distribution whatever age and site come with it.
* ``EnergyScorer``: the free energy ``-T * logsumexp(logits / T)`` of the head's logits. Our head has one
  melanoma logit ``z``; as a two-class softmax its logits are ``(0, z)``, so the energy is
  ``-T * softplus(z / T)``, a monotone function of ``z``: it can only say "confidently benign", not
  "unfamiliar". It is kept as the measured baseline.

**Threshold rule** (both scorers): the ``quantile`` (default 0.99) of in-distribution *out-of-sample*
scores of the training images. For the Mahalanobis scorer these come from ``n_splits``-fold
cross-fitting (grouped by patient when ``groups`` is given): every training image is scored by a
detector fitted without it, then the final detector is refit on all of them. In-sample distances are
too small (the mean and covariance were fitted on those very points) and would flag far more than 1%
of new in-distribution images. So, for exchangeable new images, about ``1 - quantile`` of them are
flagged. The energy threshold is the same quantile of the calibration logits the caller passes.

**Serialisation**: ``save_ood`` writes one ``.safetensors`` file (arrays as float64 tensors, ``summary()``
as sorted JSON in its metadata header; the same detector always gives the same bytes). Not JSON lists in the manifest: the shared precision matrix of
efficientnet_b0 is 1280 x 1280 (13 MB as float64; ~35 MB as JSON text), and a bundle already hashes
``weights.safetensors`` with sha256, so the detector is one more hashed file with the same loader and no
pickle. ``summary()`` is the small JSON-safe part for the manifest (method, threshold, quantile, sizes).

How it is wired:
1. At promotion (``serving.ood_detection``, on by default): ``fit_bundle_ood`` fits the detector on the
   served model's training rows, read from the pre-resized image cache and ``preprocess``-ed exactly like
   a request (un-augmented view, all metadata missing), at most ``serving.ood_max_fit_images`` of them (a
   seeded, label-stratified sample), grouped by patient for cross-fitting, threshold at
   ``serving.ood_quantile``. ``save_ood`` writes it to the bundle's ``ood.safetensors``, which the manifest
   lists with its sha256 (``ood``: file, method, threshold, ``summary()``), so ``verify_bundle`` refuses a
   bundle whose detector was changed.
2. At serving: ``Bundle.ood`` is the loaded detector (None for bundles without one);
   ``inference.score`` calls ``ood_scores_for`` on the un-augmented batch (the same tensor TTA turns into
   8 views) and returns ``ood_score``/``ood_flag`` per image. The app shows "this does not look like a
   dermoscopy image the model was trained on" next to (not instead of) the probability, the API answer
   carries ``ood_score``, ``ood_flag`` and ``ood_threshold``, and batch scoring writes ``ood_score`` and
   ``ood_flag`` columns (empty when the bundle has no detector).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from sklearn.covariance import LedoitWolf
from sklearn.model_selection import GroupKFold, KFold, train_test_split
from torch import nn

from melanoma_ml import schema
from melanoma_ml.errors import InputFileNotFoundError, InputValueError
from melanoma_ml.serving.network_inputs import preprocess

if TYPE_CHECKING:
    from melanoma_ml.images.cache import ImageCache
    from melanoma_ml.spec import ModelSpec

OOD_FILE = "ood.safetensors"
"""The detector's file name inside a bundle folder."""
DEFAULT_QUANTILE = 0.99
DEFAULT_MAX_FIT_IMAGES = 2000
OOD_FORMAT_VERSION = 1
_HEADER_KEY = "ood"
_MIN_PER_CLASS = 2


@dataclass(frozen=True)
class MahalanobisScorer:
    """Squared Mahalanobis distance to the nearest class mean under a shared shrunk covariance.

    Attributes:
        means: ``(n_classes, dim)`` class means of the training embeddings (one row when fitted unlabelled).
        precision: ``(dim, dim)`` inverse of the shared Ledoit-Wolf covariance.
        threshold: Scores above it are flagged (see the module's threshold rule).
        quantile: The quantile of out-of-sample training scores ``threshold`` is.
        n_fit: Number of training embeddings it was fitted on.
    """

    means: np.ndarray
    precision: np.ndarray
    threshold: float
    quantile: float
    n_fit: int

    method = "mahalanobis"

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        labels: np.ndarray | None = None,
        *,
        groups: np.ndarray | None = None,
        quantile: float = DEFAULT_QUANTILE,
        n_splits: int = 5,
        seed: int = 0,
    ) -> MahalanobisScorer:
        """Fit on training embeddings and set the threshold by cross-fitting (module docstring).

        Args:
            features: ``(n, dim)`` embeddings of the training images.
            labels: ``(n,)`` 0/1 targets for class-conditional means; None fits one mean.
            groups: ``(n,)`` patient (or lesion) ids; cross-fitting keeps a group in one split, so repeat
                views of a lesion do not make held-out scores look too familiar.
            quantile: Threshold quantile of the out-of-sample training scores, in (0, 1).
            n_splits: Cross-fitting splits.
            seed: Shuffle seed of the (ungrouped) splits.

        Raises:
            InputValueError: too few images, a class with fewer than 2 images, non-finite features,
                mismatched lengths or a quantile outside (0, 1).
        """
        x = _features(features)
        y = _labels(labels, len(x))
        if not 0.0 < quantile < 1.0:
            raise InputValueError(f"OOD threshold quantile must be in (0, 1), got {quantile}; e.g. 0.99")
        if groups is not None and len(groups) != len(x):
            raise InputValueError(f"got {len(x)} feature rows but {len(groups)} groups; pass one per image")
        n_groups = len(np.unique(groups)) if groups is not None else len(x)
        if n_splits < 2 or n_groups < n_splits or len(x) < 2 * n_splits:
            raise InputValueError(
                f"OOD fitting needs at least {n_splits} groups and {2 * n_splits} images for {n_splits}-fold "
                f"cross-fitting, got {n_groups} groups / {len(x)} images; fit on the whole training fold"
            )
        splitter = (
            GroupKFold(n_splits=n_splits).split(x, groups=groups)
            if groups is not None
            else KFold(n_splits=n_splits, shuffle=True, random_state=seed).split(x)
        )
        held_out = np.empty(len(x))
        for fit_rows, score_rows in splitter:
            means, precision = _fit_gaussian(x[fit_rows], y[fit_rows])
            held_out[score_rows] = _min_distance(x[score_rows], means, precision)
        means, precision = _fit_gaussian(x, y)
        return cls(
            means=means,
            precision=precision,
            threshold=float(np.quantile(held_out, quantile)),
            quantile=float(quantile),
            n_fit=len(x),
        )

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def score(self, features: np.ndarray) -> np.ndarray:
        """``(n,)`` squared distance to the nearest class mean (higher = less like training)."""
        x = _features(features)
        if x.shape[1] != self.dim:
            raise InputValueError(
                f"features have width {x.shape[1]} but the OOD scorer was fitted on width {self.dim}; "
                "score embeddings of the same network the scorer was fitted for"
            )
        return _min_distance(x, self.means, self.precision)

    def flags(self, features: np.ndarray) -> np.ndarray:
        """``(n,)`` True where the score is above the threshold."""
        return self.score(features) > self.threshold

    def summary(self) -> dict[str, Any]:
        """JSON-safe description without the arrays (for a manifest)."""
        return {
            "method": self.method,
            "threshold": self.threshold,
            "quantile": self.quantile,
            "n_fit": self.n_fit,
            "dim": self.dim,
            "n_classes": int(self.means.shape[0]),
            "format_version": OOD_FORMAT_VERSION,
        }


@dataclass(frozen=True)
class EnergyScorer:
    """Free energy of the two-class logits ``(0, z)`` (higher = less like training); see the module note."""

    threshold: float
    quantile: float
    temperature: float = 1.0
    n_fit: int = 0

    method = "energy"

    @classmethod
    def fit(
        cls, logits: np.ndarray, *, quantile: float = DEFAULT_QUANTILE, temperature: float = 1.0
    ) -> EnergyScorer:
        """Threshold = ``quantile`` of the energies of in-distribution calibration ``logits`` ``(n,)``."""
        if not 0.0 < quantile < 1.0:
            raise InputValueError(f"OOD threshold quantile must be in (0, 1), got {quantile}; e.g. 0.99")
        if temperature <= 0:
            raise InputValueError(f"energy temperature must be > 0, got {temperature}")
        energies = energy_score(logits, temperature)
        if len(energies) == 0:
            raise InputValueError("energy threshold needs at least one calibration logit")
        return cls(
            threshold=float(np.quantile(energies, quantile)),
            quantile=float(quantile),
            temperature=float(temperature),
            n_fit=len(energies),
        )

    def score(self, logits: np.ndarray) -> np.ndarray:
        return energy_score(logits, self.temperature)

    def flags(self, logits: np.ndarray) -> np.ndarray:
        return self.score(logits) > self.threshold

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "threshold": self.threshold,
            "quantile": self.quantile,
            "temperature": self.temperature,
            "n_fit": self.n_fit,
            "format_version": OOD_FORMAT_VERSION,
        }


OODScorer = MahalanobisScorer | EnergyScorer


def energy_score(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``-T * logsumexp((0, z) / T)`` per image for one melanoma logit ``z`` each: ``(n,)``."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    if not np.isfinite(z).all():
        raise InputValueError("logits contain NaN or infinity; check the network's input")
    return -temperature * np.logaddexp(0.0, z / temperature)


def network_outputs(
    net: nn.Module, images: torch.Tensor, metadata: torch.Tensor, *, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """``(pooled backbone embeddings (n, dim), melanoma logits (n,))`` of a ``MelanomaNet`` in one pass.

    Args:
        net: The fused network (``melanoma_ml.model.MelanomaNet``): ``backbone``, ``meta`` and ``head``.
        images: ``(n, 3, S, S)`` normalized images (``serving.network_inputs.preprocess``), no TTA.
        metadata: ``(n, k)`` encoded metadata (``serving.network_inputs.encode_metadata``).
    """
    if len(images) != len(metadata):
        raise InputValueError(f"got {len(images)} images but {len(metadata)} metadata rows")
    net.eval()
    device = next(net.parameters()).device
    features, logits = [], []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(device)
            m = metadata[start : start + batch_size].to(device)
            embedded = net.backbone(x)
            z = net.head(torch.cat([embedded, net.meta(m)], dim=1)).squeeze(1)
            features.append(embedded.float().cpu().numpy())
            logits.append(z.float().cpu().numpy())
    if not features:
        return np.zeros((0, int(net.backbone.num_features)), np.float32), np.zeros(0, np.float32)
    return np.concatenate(features), np.concatenate(logits)


def fit_bundle_ood(
    net: nn.Module,
    spec: ModelSpec,
    rows: pd.DataFrame,
    cache: ImageCache,
    *,
    seed: int,
    quantile: float = DEFAULT_QUANTILE,
    max_images: int = DEFAULT_MAX_FIT_IMAGES,
    batch_size: int = 64,
) -> MahalanobisScorer:
    """Fit the served detector on the model's training images, seen exactly as the app sees a request.

    The pixels come from the pre-resized image cache (built by ``images.cache.load_resized``, the app's
    own decoder) and go through ``serving.network_inputs.preprocess`` (a no-op resize when the cache is at the
    model's size, then the shared normalisation): the same tensor a request's un-augmented view is.
    Metadata does not enter (the detector reads backbone features only). Cross-fitting keeps a patient's
    images in one split (``schema.GROUP``, else ``schema.PATIENT``, when the rows have it).

    Args:
        net: The served network (``MelanomaNet``), in eval mode.
        spec: Its spec (input size, normalisation).
        rows: The model's training rows (``image_name``, ``target``, group/patient ids); never its
            validation or test rows, whose scores must stay out-of-sample.
        cache: The image cache holding every image of ``rows``.
        seed: Seed of the row sample and of ungrouped cross-fitting splits.
        quantile: ``serving.ood_quantile``.
        max_images: ``serving.ood_max_fit_images``: a label-stratified sample of this many rows fits the
            detector when ``rows`` has more.
        batch_size: Images per forward pass.

    Raises:
        InputValueError: no rows, a bad ``max_images``, or too few images/patients to cross-fit (the
            message of ``MahalanobisScorer.fit`` says how many are needed).
        KeyError: an image of ``rows`` is not in ``cache``.
    """
    if rows.empty:
        raise InputValueError(
            "no training rows to fit the OOD detector on; pass the served model's training rows"
        )
    if max_images < 1:
        raise InputValueError(f"serving.ood_max_fit_images must be at least 1, got {max_images}")
    sample = _fit_sample(rows, max_images, seed)
    pixels = cache.array()
    positions = cache.rows_for(sample[schema.IMAGE].astype(str))
    features = []
    for start in range(0, len(sample), batch_size):
        chunk = pixels[positions[start : start + batch_size]]
        features.append(backbone_features(net, preprocess(list(chunk), spec)))
    labels = pd.to_numeric(sample[schema.TARGET], errors="coerce").fillna(0).astype(int).to_numpy()
    if np.bincount(labels, minlength=2).min() < _MIN_PER_CLASS:
        labels = None  # a class too small for its own mean: one mean for all training images
    group_column = next((c for c in (schema.GROUP, schema.PATIENT) if c in sample.columns), None)
    groups = None if group_column is None else sample[group_column].astype(str).to_numpy()
    return MahalanobisScorer.fit(
        np.concatenate(features), labels, groups=groups, quantile=quantile, seed=seed
    )


def ood_scores_for(
    net: nn.Module, x_identity_views: torch.Tensor, scorer: OODScorer, metadata: torch.Tensor | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, flags)`` of a preprocessed batch: ``(B,)`` float64 and ``(B,)`` bool.

    Args:
        net: The network the scorer was fitted for (the bundle's explanation model).
        x_identity_views: ``(B, 3, S, S)`` from ``serving.network_inputs.preprocess``: the un-augmented views
            (not the 8 TTA views).
        scorer: The bundle's detector.
        metadata: ``(B, k)`` encoded metadata; only the energy scorer needs it (it reads the head's logit).
    """
    if isinstance(scorer, MahalanobisScorer):
        scores = scorer.score(backbone_features(net, x_identity_views))
    else:
        if metadata is None:
            raise InputValueError("the energy OOD score reads the head's logit: pass the encoded metadata")
        scores = scorer.score(network_outputs(net, x_identity_views, metadata)[1])
    return scores, scores > scorer.threshold


def backbone_features(net: nn.Module, x: torch.Tensor) -> np.ndarray:
    """``(B, dim)`` float32 pooled embeddings ``net.backbone(x)``, run as ``predict_tensor`` runs the net.

    Channels-last input and inference mode, on the network's device: the fit at promotion and the score
    at serving go through this one function, so they see the same arithmetic.
    """
    if x.shape[0] == 0:
        return np.zeros((0, int(net.backbone.num_features)), np.float32)
    if net.training:
        raise ValueError("the network is in training mode; call net.eval() before scoring OOD features")
    device = next(net.parameters()).device
    with torch.inference_mode():
        x = x.to(device).contiguous(memory_format=torch.channels_last)
        return net.backbone(x).float().cpu().numpy()


def _fit_sample(rows: pd.DataFrame, max_images: int, seed: int) -> pd.DataFrame:
    """All rows, or a seeded sample of ``max_images`` stratified by label (kept in table order)."""
    if len(rows) <= max_images:
        return rows
    labels = pd.to_numeric(rows[schema.TARGET], errors="coerce").fillna(0).astype(int)
    stratify = labels if labels.value_counts().min() >= 2 else None
    kept, _ = train_test_split(
        np.arange(len(rows)), train_size=max_images, stratify=stratify, random_state=seed
    )
    return rows.iloc[np.sort(kept)]


def save_ood(path: str | Path, scorer: OODScorer) -> Path:
    """Write ``scorer`` to one ``.safetensors`` file (tensors + ``summary()`` in the metadata header)."""
    from safetensors.numpy import save_file

    path = Path(path)
    # One header key holding sorted JSON: safetensors writes several keys in no fixed order, and a bundle
    # hashes this file, so the same detector must give the same bytes.
    header = {_HEADER_KEY: json.dumps(scorer.summary(), sort_keys=True)}
    if isinstance(scorer, MahalanobisScorer):
        tensors = {
            "means": np.ascontiguousarray(scorer.means, np.float64),
            "precision": np.ascontiguousarray(scorer.precision, np.float64),
        }
    else:
        tensors = {"threshold": np.array([scorer.threshold], np.float64)}  # the format wants one tensor
    save_file(tensors, str(path), metadata=header)
    return path


def load_ood(path: str | Path) -> OODScorer:
    """Read a file written by ``save_ood``.

    Raises:
        InputFileNotFoundError: no such file.
        InputValueError: not a detector file, or one of an unknown format or method.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise InputFileNotFoundError(f"OOD detector file {path} not found; rebuild the bundle")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            header = json.loads((handle.metadata() or {}).get(_HEADER_KEY, "null"))
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, json.JSONDecodeError) as exc:
        raise InputValueError(
            f"{path} is not a readable OOD detector file ({exc}); rebuild the bundle"
        ) from exc
    if not isinstance(header, dict) or header.get("format_version") != OOD_FORMAT_VERSION:
        found = header.get("format_version") if isinstance(header, dict) else None
        raise InputValueError(
            f"{path} has OOD format {found!r}, this code reads {OOD_FORMAT_VERSION}; "
            "rebuild the bundle with this version"
        )
    method = header.get("method")
    if method == MahalanobisScorer.method:
        return MahalanobisScorer(
            means=tensors["means"],
            precision=tensors["precision"],
            threshold=float(header["threshold"]),
            quantile=float(header["quantile"]),
            n_fit=int(header["n_fit"]),
        )
    if method == EnergyScorer.method:
        return EnergyScorer(
            threshold=float(header["threshold"]),
            quantile=float(header["quantile"]),
            temperature=float(header["temperature"]),
            n_fit=int(header["n_fit"]),
        )
    raise InputValueError(f"{path} holds an unknown OOD method {method!r}; expected mahalanobis or energy")


# --- the Gaussian model ------------------------------------------------------------------------------


def _features(features: np.ndarray) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise InputValueError(f"features must be a non-empty (n, dim) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise InputValueError("features contain NaN or infinity; check the images and the network")
    return x


def _labels(labels: np.ndarray | None, n: int) -> np.ndarray:
    if labels is None:
        return np.zeros(n, dtype=int)
    y = np.asarray(labels).reshape(-1)
    if len(y) != n:
        raise InputValueError(f"got {n} feature rows but {len(y)} labels; pass one label per image")
    return y.astype(int)


def _fit_gaussian(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class means and the precision of the pooled within-class covariance (Ledoit-Wolf shrinkage)."""
    classes, counts = np.unique(y, return_counts=True)
    if counts.min() < _MIN_PER_CLASS:
        raise InputValueError(
            f"OOD fitting needs at least {_MIN_PER_CLASS} training images per class, got "
            f"{dict(zip(classes.tolist(), counts.tolist(), strict=True))}; fit without labels instead"
        )
    means = np.stack([x[y == c].mean(axis=0) for c in classes])
    centred = x - means[np.searchsorted(classes, y)]
    shrunk = LedoitWolf(assume_centered=True).fit(centred)
    return means, shrunk.precision_


def _min_distance(x: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    distances = []
    for mean in means:
        d = x - mean
        distances.append(np.einsum("ij,jk,ik->i", d, precision, d))
    return np.min(np.stack(distances), axis=0)
