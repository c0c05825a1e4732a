"""Calibrated, prior-shifted probabilities and the threshold that goes with them (no torch).

``serving.inference.predict`` runs every served probability through :func:`served_probabilities`; the
model card and anything that compares probabilities with a threshold use :func:`decision_threshold` with
the same ``serving.deployment_prevalence``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from melanoma_ml.serving.manifest import BundleManifest


def served_probabilities(
    manifest: BundleManifest, raw: np.ndarray, deployment_prevalence: float | None = None
) -> np.ndarray:
    """The probabilities a bundle serves: its calibrator applied to the network's raw ones, then prior-shifted.

    The served path's calibration (``serving.inference.predict`` calls it for the app, batch scoring and the
    gallery): ``evaluation.calibration.calibrated_probabilities`` on the manifest's calibrator, the same
    function the test evaluation's comparison rows call (``holdout.ModelUnderTest.calibrate``).
    A manifest without ``calibration`` (older bundles) serves ``raw`` unchanged, and no prior shift is
    possible (its training prevalence is unknown): ``deployment_prevalence`` is then ignored.

    Args:
        manifest: The bundle's manifest (``bundle.manifest``).
        raw: The network's (TTA-averaged) sigmoid probabilities.
        deployment_prevalence: ``serving.deployment_prevalence``; None means the calibrator's training
            prevalence (no shift).
    """
    from melanoma_ml.evaluation.calibration import calibrated_probabilities

    calibration = manifest.calibration
    stored = None if calibration is None else calibration.model_dump(include={"parameters", "prevalence"})
    return calibrated_probabilities(raw, stored, deployment_prevalence)


def decision_threshold(manifest: BundleManifest, deployment_prevalence: float | None = None) -> float:
    """The threshold that goes with :func:`served_probabilities` at ``deployment_prevalence``.

    Rule: the bundle's threshold lives on the calibrated scale at the training prevalence; a prior shift
    multiplies every probability's odds by the same factor, so the threshold's odds are multiplied by it
    too (``shift_prior`` on the threshold). ``served >= threshold`` then flags exactly the lesions it flags
    without a shift: the deployment prevalence changes the probabilities shown, never the decision (change
    the operating point by re-tuning the threshold, not through the prevalence).
    """
    calibration = manifest.calibration
    if calibration is None or deployment_prevalence is None:
        return float(manifest.threshold)
    from melanoma_ml.evaluation.calibration import shift_prior

    return float(
        shift_prior(np.array([manifest.threshold]), calibration.prevalence, deployment_prevalence)[0]
    )
