"""The score reference of a bundle, at the deployment prevalence: what a day's served probabilities are
compared with.

The bundle's out-of-fold rows (manifest ``oof``) scored as serving scores them; the metadata mix the bundle
ships beside them is ``serving.monitor_reference.MonitorReference``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from melanoma_ml.errors import InputValueError
from melanoma_ml.monitoring.cbpe import expected_auc
from melanoma_ml.serving.calibrated import decision_threshold, served_probabilities

if TYPE_CHECKING:
    from melanoma_ml.serving.manifest import BundleManifest


@dataclass(frozen=True)
class ReferenceScores:
    """The served probabilities of the bundle's out-of-fold rows, as the monitor compares a day with them.

    Attributes:
        prob: Served probability per row at the deployment prevalence.
        weight: Row weight re-weighting the rows' melanoma share to that prevalence (all 1 without a shift).
        sensitivity: Share of melanoma rows at or above the served threshold.
        false_positive_rate: Share of benign rows at or above it.
        prevalence: The melanoma rate the weights give (the deployment prevalence, else the rows' own).
        estimated_auc: CBPE's AUC of the re-weighted rows (``monitoring.cbpe``: from the probabilities, as a
            day's is estimated, so the two are compared like with like).
        estimated_sensitivity: CBPE's sensitivity at the served threshold on the re-weighted rows.
    """

    prob: np.ndarray
    weight: np.ndarray
    sensitivity: float
    false_positive_rate: float
    prevalence: float
    estimated_auc: float | None
    estimated_sensitivity: float | None

    @property
    def expected_positive_rate(self) -> float:
        """Share of cases flagged at :attr:`prevalence`: ``pi * sensitivity + (1 - pi) * FPR``."""
        pi = self.prevalence
        return pi * self.sensitivity + (1 - pi) * self.false_positive_rate


def reference_scores(manifest: BundleManifest, deployment_prevalence: float | None) -> ReferenceScores | None:
    """Served probabilities of the manifest's ``oof`` rows at ``deployment_prevalence`` (None: no ``oof``).

    Under label shift (the assumption ``shift_prior`` makes) the population served at prevalence ``pi`` is the
    out-of-fold rows with melanoma rows weighted ``pi / pi_rows`` and benign rows ``(1 - pi) / (1 - pi_rows)``,
    each scored with the prior-shifted probability; a manifest without a calibrator serves raw probabilities
    and cannot be shifted, so its rows keep their own mix.
    """
    if manifest.oof is None or len(manifest.oof.prob) == 0:
        return None
    y = np.asarray(manifest.oof.target, dtype=int)
    shift = deployment_prevalence if manifest.calibration is not None else None
    prob = served_probabilities(manifest, np.asarray(manifest.oof.prob, dtype=float), shift)
    flagged = prob >= decision_threshold(manifest, shift)
    rows_rate = float(y.mean())
    if not 0.0 < rows_rate < 1.0:
        raise InputValueError(
            f"the bundle's out-of-fold rows hold one class only ({len(y)} rows): no score reference"
        )
    pi = rows_rate if shift is None else float(shift)
    weight = np.where(y == 1, pi / rows_rate, (1 - pi) / (1 - rows_rate))
    return ReferenceScores(
        prob=prob,
        weight=weight,
        sensitivity=float(flagged[y == 1].mean()),
        false_positive_rate=float(flagged[y == 0].mean()),
        prevalence=pi,
        estimated_auc=expected_auc(prob, weight=weight),
        estimated_sensitivity=float(np.sum((weight * prob)[flagged]) / np.sum(weight * prob)),
    )
