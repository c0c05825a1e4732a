"""A tiny served bundle that ships an out-of-distribution detector and a calibrator, for the serving tests.

Importable as ``from ood_helpers import ...`` (this folder holds ``conftest.py``), like ``app_helpers``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from app_helpers import METRICS, register_tiny

if TYPE_CHECKING:
    from melanoma_ml.serving.registry import ModelRegistry

TRAINING_PREVALENCE = 0.25
"""The prevalence the test calibrator was "fitted" at (what a prior shift starts from)."""


def smooth_images(n: int, size: int, seed: int) -> list[np.ndarray]:
    """Low-frequency colour patches: a stand-in for the training images the detector is fitted on."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = 120 + rng.integers(-40, 40, (n, 4, 4, 3))
    return [
        np.asarray(Image.fromarray(b.astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR))
        for b in base
    ]


def register_with_ood(
    registry: ModelRegistry,
    *,
    seed: int,
    size: int,
    calibrated: bool = True,
    promote: bool = True,
    oof: dict[str, list[Any]] | None = None,
) -> str:
    """Register a random-weight bundle with an OOD detector (and a temperature calibrator); its version.

    ``oof``: stored out-of-fold predictions (``ValidationPredictions`` columns), for the gallery.

    The network is ``register_tiny``'s (same seed, same weights); the detector is fitted on its features
    of ``smooth_images``, with the project's own ``MahalanobisScorer``.
    """
    from melanoma_ml.serving.bundle import load_bundle
    from melanoma_ml.serving.inference import preprocess
    from melanoma_ml.serving.ood import MahalanobisScorer, backbone_features

    plain = load_bundle(registry.version_path(register_tiny(registry, seed=seed, size=size, promote=False)))
    features = backbone_features(plain.net, preprocess(smooth_images(40, size, seed), plain.spec))
    calibration = (
        {
            "method": "temperature",
            "parameters": {"method": "temperature", "temperature": 2.0},
            "prevalence": TRAINING_PREVALENCE,
            "n_rows": 100,
        }
        if calibrated
        else None
    )
    version = registry.register_bundle(
        plain.net,
        plain.spec,
        threshold=0.5,
        metrics=METRICS,
        data_version=f"test-ood-{seed}",
        code_version="test",
        calibration=calibration,
        oof=oof,
        ood=MahalanobisScorer.fit(features, quantile=0.99),
    )
    if promote:
        registry.promote(version, reason="test")
    return version
