"""Post-hoc calibration of melanoma probabilities, fitted on out-of-fold predictions, and prior shift.

Why: the model's output is a ranking score more than a probability. Trained at ~24% melanoma with focal
loss, on new data at ~9% prevalence the promoted model's mean predicted probability was ~0.24 (ECE ~0.15).
Two separate corrections, applied in this order:

1. A calibrator (:class:`TemperatureScaling`, :class:`PlattScaling` or :class:`IsotonicCalibrator`) maps
   the model's probability to one that matches the observed melanoma rate *at the prevalence of the rows
   it was fitted on* (the out-of-fold set). :func:`choose_calibrator` picks the method by cross-fitting on
   the out-of-fold rows, grouped by patient, and comparing held-out negative log-likelihood.
2. :func:`shift_prior` moves those probabilities to a deployment prevalence by Bayes' rule on the odds
   (valid under label shift: the images of a melanoma, and of a benign lesion, look the same there).

Temperature and Platt scaling are strictly increasing, so AUC, pAUC and the ROC are unchanged; isotonic
regression is only non-decreasing (it pools scores into steps), so it can tie scores and change AUC
slightly. Every threshold tuned on uncalibrated probabilities must be re-tuned (or mapped through the same
calibrator) once calibrated probabilities are served.

Where it is wired:

* promotion (:func:`fit_served_calibration`, called by ``serving.packaging``): on the served model's own out-of-fold rows,
  ``choose_calibrator`` picks the method (patient-grouped cross-fitting), the chosen method is refitted on
  every row, and the threshold is re-tuned on the calibrated scale (the same operating point). The
  bundle's manifest stores ``to_dict()``, the fitted-on prevalence and a ``calibration_report`` of the
  cross-fitted predictions (``StoredCalibration``; read back with :func:`calibrator_from_dict`). Rows that
  cannot be cross-fitted (fewer than 2 patients with melanoma, a split with one class: the
  ``InputValueError`` of :func:`cross_fitted_predictions`) get no calibrator: the bundle serves raw
  probabilities and says why in its manifest (``uncalibrated_reason``) and on its model card.
* serving (``serving.calibrated.served_probabilities``): every prediction path (the app, ``melanoma-ml
  predict`` and the ``batch_scores`` asset, the Grad-CAM gallery) serves :func:`calibrated_probabilities`,
  ``shift_prior(calibrator.apply(raw), fitted_prevalence, serving.deployment_prevalence)``; the
  threshold moves with the odds (``decision_threshold``), so the prevalence changes what is shown, never
  the decision.
* test evaluation (``evaluation.holdout``, the ``test_evaluation`` asset): each model's calibrator, fitted
  on its out-of-fold rows as promotion fits it, is applied unchanged (by the served path's own
  :func:`calibrated_probabilities`) to the locked test split and each
  external test set; ``calibration_report`` there gives ECE and Brier before/after on rows no calibrator
  saw. The bundle's own test metrics are of its served (calibrated) probabilities
  (``holdout.bundle_test_metrics``, scored by the bundle at promotion).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np
import pandas as pd
from scipy import optimize, special
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold

from melanoma_ml import schema
from melanoma_ml.config import EvaluationConfig, PipelineConfig
from melanoma_ml.errors import InputValueError
from melanoma_ml.evaluation.bootstrap import batch_size, percentile_interval
from melanoma_ml.evaluation.estimate import Estimate
from melanoma_ml.evaluation.inputs import PROB, group_codes, validate_predictions
from melanoma_ml.evaluation.metrics import brier_score, expected_calibration_error
from melanoma_ml.evaluation.resample import draw_group_resamples
from melanoma_ml.evaluation.threshold import threshold_for_sensitivity
from melanoma_ml.evaluation.weighted import WeightedRows

METHODS: tuple[str, ...] = ("temperature", "platt", "isotonic")
"""Calibrator names, as stored under ``"method"`` by ``to_dict``."""

UNCALIBRATED = "uncalibrated"
"""Row of :func:`choose_calibrator`'s table holding the model's own probabilities (the baseline)."""

NLL_CLIP = 1e-6
"""Probabilities are clipped to ``[NLL_CLIP, 1 - NLL_CLIP]`` when scoring log-likelihood, so a held-out
melanoma that isotonic regression maps to exactly 0 costs ``-log(1e-6) ~ 13.8`` nats instead of infinity."""

_LOGIT_CLIP = 1e-12
"""Probabilities are clipped to ``[_LOGIT_CLIP, 1 - _LOGIT_CLIP]`` before a logit (|logit| <= 27.6)."""


def _probabilities(prob: Any, what: str = "probabilities") -> np.ndarray:
    p = np.asarray(prob, dtype=np.float64)
    bad = ~np.isfinite(p) | (p < 0) | (p > 1)
    if bad.any():
        first = np.flatnonzero(bad.ravel())[:5].tolist()
        raise InputValueError(
            f"{what} must be finite numbers in [0, 1]; {int(bad.sum())} are not (positions {first}); "
            f"apply a sigmoid to logits before calibrating"
        )
    return p


def _labels(target: Any, n: int) -> np.ndarray:
    y = np.asarray(target)
    if y.shape != (n,):
        raise InputValueError(f"target has shape {y.shape}; expected one 0/1 label per probability ({n})")
    if not np.isin(y, (0, 1)).all():
        raise InputValueError("target must be 1 for melanoma and 0 for benign, nothing else")
    if y.min() == y.max():
        raise InputValueError(
            f"a calibrator needs both melanoma and benign cases to fit; got only {'melanoma' if y[0] else 'benign'}"
        )
    return y.astype(np.float64)


def logit(prob: Any) -> np.ndarray:
    """Log-odds of probabilities clipped to ``[1e-12, 1 - 1e-12]`` (finite for 0 and 1)."""
    p = np.clip(np.asarray(prob, dtype=np.float64), _LOGIT_CLIP, 1.0 - _LOGIT_CLIP)
    return np.log(p) - np.log1p(-p)


def _json_float(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InputValueError(f"calibrator field {name!r} must be a finite number, got {value!r}")
    return float(value)


def _fields(data: Mapping[str, Any], method: str, keys: Sequence[str]) -> list[Any]:
    if not isinstance(data, Mapping) or data.get("method") != method:
        raise InputValueError(f"not a {method} calibrator: {data!r}")
    missing = [k for k in keys if k not in data]
    if missing:
        raise InputValueError(f"{method} calibrator lacks {missing}; got keys {sorted(data)}")
    return [data[k] for k in keys]


@dataclass(frozen=True)
class TemperatureScaling:
    """``p' = sigmoid(logit(p) / temperature)``: one parameter; > 1 softens, < 1 sharpens.

    It cannot move the probabilities' overall level (no intercept), so it fixes over- or under-confidence
    but not a prevalence mismatch; :class:`PlattScaling` adds the intercept.
    """

    temperature: float
    method: ClassVar[str] = "temperature"

    @classmethod
    def fit(cls, prob: Any, target: Any) -> TemperatureScaling:
        """The temperature that minimises the mean negative log-likelihood (L-BFGS on ``log T``)."""
        z = logit(_probabilities(prob))
        y = _labels(target, z.size)

        def nll_and_grad(u: np.ndarray) -> tuple[float, np.ndarray]:
            s = z * math.exp(-float(u[0]))
            nll = np.mean(np.logaddexp(0.0, s) - y * s)
            grad = np.mean((special.expit(s) - y) * -s)
            return float(nll), np.array([grad])

        result = optimize.minimize(
            nll_and_grad, x0=np.zeros(1), jac=True, method="L-BFGS-B", bounds=[(-7.0, 7.0)]
        )
        if not result.success:
            raise InputValueError(f"temperature scaling did not converge: {result.message}")
        return cls(temperature=float(math.exp(float(result.x[0]))))

    def apply(self, prob: Any) -> np.ndarray:
        """Calibrated probabilities, same shape as ``prob``."""
        return special.expit(logit(_probabilities(prob)) / self.temperature)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "temperature": self.temperature}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TemperatureScaling:
        (temperature,) = _fields(data, cls.method, ["temperature"])
        temperature = _json_float(temperature, "temperature")
        if temperature <= 0:
            raise InputValueError(f"temperature must be > 0, got {temperature}")
        return cls(temperature=temperature)


@dataclass(frozen=True)
class PlattScaling:
    """``p' = sigmoid(slope * logit(p) + intercept)``: an unpenalised logistic regression on the logit."""

    slope: float
    intercept: float
    method: ClassVar[str] = "platt"

    @classmethod
    def fit(cls, prob: Any, target: Any) -> PlattScaling:
        """Maximum-likelihood slope and intercept (sklearn ``LogisticRegression(C=inf)``)."""
        z = logit(_probabilities(prob))
        y = _labels(target, z.size)
        model = LogisticRegression(C=np.inf, max_iter=1000).fit(z[:, None], y.astype(np.int8))
        return cls(slope=float(model.coef_[0, 0]), intercept=float(model.intercept_[0]))

    def apply(self, prob: Any) -> np.ndarray:
        """Calibrated probabilities, same shape as ``prob``."""
        return special.expit(self.slope * logit(_probabilities(prob)) + self.intercept)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "slope": self.slope, "intercept": self.intercept}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PlattScaling:
        slope, intercept = _fields(data, cls.method, ["slope", "intercept"])
        return cls(slope=_json_float(slope, "slope"), intercept=_json_float(intercept, "intercept"))


@dataclass(frozen=True)
class IsotonicCalibrator:
    """A non-decreasing step map fitted by isotonic regression, stored as its breakpoints.

    ``apply`` interpolates linearly between the breakpoints and clips outside them (sklearn's
    ``IsotonicRegression(out_of_bounds="clip")`` prediction), so the stored arrays are the whole model.

    Attributes:
        x: increasing input probabilities (sklearn's ``X_thresholds_``).
        y: non-decreasing calibrated probabilities at ``x`` (``y_thresholds_``).
    """

    x: tuple[float, ...]
    y: tuple[float, ...]
    method: ClassVar[str] = "isotonic"

    def __post_init__(self) -> None:
        x, y = np.asarray(self.x, dtype=np.float64), np.asarray(self.y, dtype=np.float64)
        if x.size == 0 or x.shape != y.shape:
            raise InputValueError(
                f"isotonic calibrator needs equal, non-empty x and y; got {x.size} and {y.size} values"
            )
        if (np.diff(x) < 0).any() or (np.diff(y) < 0).any():
            raise InputValueError("isotonic calibrator breakpoints x and y must both be non-decreasing")

    @classmethod
    def fit(cls, prob: Any, target: Any) -> IsotonicCalibrator:
        """Pool-adjacent-violators fit of the melanoma rate as a non-decreasing function of ``prob``."""
        p = _probabilities(prob)
        y = _labels(target, p.size)
        model = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(p, y)
        return cls(
            x=tuple(float(v) for v in model.X_thresholds_), y=tuple(float(v) for v in model.y_thresholds_)
        )

    def apply(self, prob: Any) -> np.ndarray:
        """Calibrated probabilities, same shape as ``prob``."""
        p = _probabilities(prob)
        return np.interp(p, np.asarray(self.x), np.asarray(self.y))

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "x": list(self.x), "y": list(self.y)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IsotonicCalibrator:
        x, y = _fields(data, cls.method, ["x", "y"])
        if not isinstance(x, Sequence) or not isinstance(y, Sequence):
            raise InputValueError("isotonic calibrator x and y must be lists of numbers")
        return cls(x=tuple(_json_float(v, "x") for v in x), y=tuple(_json_float(v, "y") for v in y))


Calibrator = TemperatureScaling | PlattScaling | IsotonicCalibrator

_CLASSES: dict[str, type[TemperatureScaling] | type[PlattScaling] | type[IsotonicCalibrator]] = {
    cls.method: cls for cls in (TemperatureScaling, PlattScaling, IsotonicCalibrator)
}


def fit_calibrator(method: str, prob: Any, target: Any) -> Calibrator:
    """Fit the calibrator named ``method`` (one of :data:`METHODS`)."""
    if method not in _CLASSES:
        raise InputValueError(f"unknown calibration method {method!r}; choose from {list(METHODS)}")
    return _CLASSES[method].fit(prob, target)


def calibrator_from_dict(data: Mapping[str, Any]) -> Calibrator:
    """Read a calibrator written by its ``to_dict`` (dispatches on ``data["method"]``)."""
    method = data.get("method") if isinstance(data, Mapping) else None
    if method not in _CLASSES:
        raise InputValueError(
            f"stored calibrator names method {method!r}; expected one of {list(METHODS)} in {data!r}"
        )
    return _CLASSES[method].from_dict(data)


def shift_prior(prob: Any, train_prevalence: float, deployment_prevalence: float) -> np.ndarray:
    """Move calibrated probabilities from the prevalence they were calibrated at to another one.

    Bayes' rule on the odds: ``odds' = odds * [pi' / (1 - pi')] / [pi / (1 - pi)]``, i.e. a constant shift
    of the logit. It assumes label shift: the appearance of melanomas and of benign lesions is the same at
    the deployment site, only their proportion differs. 0 and 1 stay 0 and 1.

    Args:
        prob: calibrated melanoma probabilities.
        train_prevalence: melanoma rate of the rows the calibrator was fitted on (the out-of-fold set).
        deployment_prevalence: expected melanoma rate where the model is used.
    """
    for name, value in (
        ("train_prevalence", train_prevalence),
        ("deployment_prevalence", deployment_prevalence),
    ):
        if not 0.0 < float(value) < 1.0:
            raise InputValueError(f"{name} must be a melanoma rate strictly between 0 and 1, got {value!r}")
    p = _probabilities(prob)
    shift = math.log(deployment_prevalence / (1 - deployment_prevalence)) - math.log(
        train_prevalence / (1 - train_prevalence)
    )
    if shift == 0.0:
        return p.copy()
    with np.errstate(divide="ignore"):
        log_odds = np.log(p) - np.log1p(-p)  # +-inf at 1 and 0, which expit maps back to 1 and 0
    return special.expit(log_odds + shift)


def calibrated_probabilities(
    raw: Any, calibration: Mapping[str, Any] | None, deployment_prevalence: float | None = None
) -> np.ndarray:
    """The probabilities a model with the stored ``calibration`` serves for its ``raw`` ones: the one
    function both the served path (``serving.calibrated.served_probabilities``: the app, ``predict``, batch
    scoring) and the test evaluation's comparison rows (``holdout.ModelUnderTest.calibrate``) call.

    ``calibrator_from_dict(calibration["parameters"]).apply(raw)``, then, with a ``deployment_prevalence``,
    :func:`shift_prior` from ``calibration["prevalence"]`` to it.

    Args:
        raw: The model's (averaged) sigmoid probabilities.
        calibration: What :func:`fit_served_calibration` stores (``BundleManifest.calibration`` as a dict:
            ``parameters`` and ``prevalence`` are read), or None: ``raw`` is served unchanged, and no prior
            shift is possible (the training prevalence is unknown), so ``deployment_prevalence`` is ignored.
        deployment_prevalence: ``serving.deployment_prevalence``; None: the calibrator's training
            prevalence (no shift).
    """
    if calibration is None:
        return np.asarray(raw, dtype=np.float64)
    calibrated = calibrator_from_dict(calibration["parameters"]).apply(raw)
    if deployment_prevalence is None:
        return calibrated
    return shift_prior(calibrated, float(calibration["prevalence"]), deployment_prevalence)


def negative_log_likelihood(target: Any, prob: Any) -> float:
    """Mean binary cross-entropy in nats, probabilities clipped to ``[NLL_CLIP, 1 - NLL_CLIP]``."""
    p = np.clip(_probabilities(prob), NLL_CLIP, 1.0 - NLL_CLIP)
    y = np.asarray(target, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def cross_fitted_predictions(
    prob: Any, target: Any, groups: Any, methods: Sequence[str], *, n_splits: int, seed: int
) -> dict[str, np.ndarray]:
    """Each method's calibrated probability of every row, from a calibrator that never saw its patient.

    Splits are ``StratifiedGroupKFold``: a patient's images stay in one split (as in ``GroupKFold``) and
    melanoma cases are spread over the splits, so no fitting split lacks them at low prevalence.

    Raises:
        InputValueError: fewer groups than ``n_splits``, or a split whose fitting part holds one class.
    """
    p = _probabilities(prob)
    y = _labels(target, p.size)
    codes = pd.factorize(pd.Series(np.asarray(groups)).astype(str), sort=True)[0]
    n_groups = int(codes.max()) + 1
    if n_splits < 2 or n_groups < n_splits:
        raise InputValueError(
            f"cross-fitting calibrators needs at least 2 splits and as many patients; got n_splits={n_splits} "
            f"and {n_groups} patient groups"
        )
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    out = {method: np.full(p.size, np.nan) for method in methods}
    for k, (fit_rows, held_out) in enumerate(splitter.split(p, y.astype(np.int8), codes)):
        if y[fit_rows].min() == y[fit_rows].max():
            raise InputValueError(
                f"cross-fit split {k} has a single class in its fitting rows; use fewer splits "
                f"(n_splits={n_splits}) or more patients with melanoma"
            )
        for method in methods:
            out[method][held_out] = fit_calibrator(method, p[fit_rows], y[fit_rows]).apply(p[held_out])
    return out


class CalibrationChoice(NamedTuple):
    """What :func:`choose_calibrator` returns.

    Attributes:
        calibrator: the chosen method refitted on every out-of-fold row.
        table: one row per method plus ``"uncalibrated"``: cross-fitted ``nll``, ``brier``, ``ece``,
            ``mean_prob`` (compare with ``prevalence``) and ``chosen``; sorted by ``nll``.
        prevalence: melanoma rate of the rows the calibrator was fitted on (``shift_prior``'s
            ``train_prevalence``).
    """

    calibrator: Calibrator
    table: pd.DataFrame
    prevalence: float


def choose_calibrator(
    oof: pd.DataFrame,
    groups: str = schema.GROUP,
    methods: Sequence[str] = METHODS,
    seed: int = 0,
    *,
    n_splits: int = 5,
    config: EvaluationConfig | None = None,
) -> CalibrationChoice:
    """Pick a calibrator by measurement: lowest cross-fitted negative log-likelihood on out-of-fold rows.

    Why NLL and not Brier: both are proper scoring rules, but the Brier score is bounded and, at ~9%
    prevalence, dominated by the many benign images near 0; NLL weighs relative errors in the tails (0.01
    vs 0.001) and so the odds that :func:`shift_prior` multiplies. Brier and ECE are in the table too.

    Args:
        oof: out-of-fold predictions of ONE model (``image_name``, ``group_id``, ``target``, ``prob``),
            never predictions on images the model was trained on.
        groups: column holding the patient group (images of one patient are never split).
        methods: candidate methods from :data:`METHODS`.
        seed: seed of the cross-fitting split.
        n_splits: cross-fitting splits.
        config: ``ece_bins`` for the table's ECE (defaults of ``EvaluationConfig`` when omitted).
    """
    config = config or EvaluationConfig()
    unknown = [m for m in methods if m not in _CLASSES]
    if not methods or unknown:
        raise InputValueError(
            f"calibration methods {list(methods)} must be a non-empty subset of {list(METHODS)}"
        )
    frame = validate_predictions(oof)
    if groups not in frame.columns:
        raise InputValueError(f"out-of-fold predictions lack the group column {groups!r}")
    p = frame[PROB].to_numpy(dtype=np.float64)
    y = frame[schema.TARGET].to_numpy(dtype=np.float64)
    fitted = cross_fitted_predictions(p, y, frame[groups], list(methods), n_splits=n_splits, seed=seed)
    candidates = {UNCALIBRATED: p, **fitted}
    table = pd.DataFrame(
        [
            {
                "method": name,
                "nll": negative_log_likelihood(y, q),
                "brier": brier_score(y, q),
                "ece": expected_calibration_error(y, q, config.ece_bins),
                "mean_prob": float(np.mean(q)),
            }
            for name, q in candidates.items()
        ]
    )
    best = table[table["method"] != UNCALIBRATED].sort_values(["nll", "method"]).iloc[0]["method"]
    table["chosen"] = table["method"] == best
    table = table.sort_values(["nll", "method"], ignore_index=True)
    return CalibrationChoice(calibrator=fit_calibrator(best, p, y), table=table, prevalence=float(np.mean(y)))


def calibration_report(
    before: Any, after: Any, target: Any, groups: Any, config: EvaluationConfig
) -> dict[str, dict[str, float | None]]:
    """ECE, Brier score and mean probability before and after calibration, with patient-bootstrap CIs.

    Both sets of probabilities are scored on the SAME resamples of patients, so ``*_change`` (after minus
    before) has a paired CI: an upper bound below 0 means calibration helped beyond resampling noise.
    Pass cross-fitted "after" probabilities (``cross_fitted_predictions``); in-sample ones flatter.

    Returns:
        ``{name: {"value", "lo", "hi", "level"}}`` (``Estimate.to_dict``) for ``ece_before``,
        ``ece_after``, ``ece_change``, ``brier_before``, ``brier_after``, ``brier_change``,
        ``mean_prob_before``, ``mean_prob_after`` and ``observed_rate``.
    """
    p_before = _probabilities(before, "probabilities before calibration")
    p_after = _probabilities(after, "probabilities after calibration")
    if p_before.shape != p_after.shape or p_before.ndim != 1:
        raise InputValueError(
            f"before and after must be 1-D and the same length; got {p_before.shape} and {p_after.shape}"
        )
    y = _labels(target, p_before.size).astype(np.int8)
    codes, n_groups = group_codes(pd.DataFrame({schema.GROUP: np.asarray(groups)}))
    if len(codes) != y.size:
        raise InputValueError(f"groups has {len(codes)} entries; expected one per probability ({y.size})")
    resamples = draw_group_resamples(y, codes, config.n_bootstrap, config.bootstrap_seed)
    rows = {
        "before": WeightedRows(y, p_before, codes, n_groups),
        "after": WeightedRows(y, p_after, codes, n_groups),
    }
    per_group_rows = np.bincount(codes, minlength=n_groups).astype(np.float64)
    per_group = {
        "observed_rate": np.bincount(codes, weights=y.astype(np.float64), minlength=n_groups),
        "mean_prob_before": np.bincount(codes, weights=p_before, minlength=n_groups),
        "mean_prob_after": np.bincount(codes, weights=p_after, minlength=n_groups),
    }
    draws: dict[str, list[np.ndarray]] = {}
    for batch in resamples.batches(batch_size(*rows.values())):
        counts = resamples.counts[batch].astype(np.float64)
        for stage, weighted in rows.items():
            draws.setdefault(f"ece_{stage}", []).append(weighted.calibration_error(counts, config.ece_bins))
            draws.setdefault(f"brier_{stage}", []).append(weighted.brier(counts))
        n_rows = counts @ per_group_rows
        for name, sums in per_group.items():
            draws.setdefault(name, []).append((counts @ sums) / n_rows)
    values = {name: np.concatenate(parts) for name, parts in draws.items()}
    for metric in ("ece", "brier"):
        values[f"{metric}_change"] = values[f"{metric}_after"] - values[f"{metric}_before"]

    point = {
        "ece_before": expected_calibration_error(y, p_before, config.ece_bins),
        "ece_after": expected_calibration_error(y, p_after, config.ece_bins),
        "brier_before": brier_score(y, p_before),
        "brier_after": brier_score(y, p_after),
        "mean_prob_before": float(np.mean(p_before)),
        "mean_prob_after": float(np.mean(p_after)),
        "observed_rate": float(np.mean(y)),
    }
    for metric in ("ece", "brier"):
        point[f"{metric}_change"] = point[f"{metric}_after"] - point[f"{metric}_before"]
    report = {}
    for name, value in point.items():
        lo, hi = percentile_interval(values[name], config.ci_level)
        report[name] = Estimate(value, lo, hi, config.ci_level).to_dict()
    return report


CALIBRATION_SPLITS = 5
"""Cross-fitting splits for choosing the calibrator (fewer when the served fold has fewer patients)."""


class ServedCalibration(NamedTuple):
    """What :func:`fit_served_calibration` returns.

    Attributes:
        stored: ``BundleManifest.calibration`` as a dict, or None (raw probabilities are served).
        threshold: The decision threshold on the served scale.
        uncalibrated_reason: Why ``stored`` is None (``BundleManifest.uncalibrated_reason``), else None.
    """

    stored: dict[str, Any] | None
    threshold: float
    uncalibrated_reason: str | None


def fit_served_calibration(
    config: PipelineConfig, oof: pd.DataFrame, raw_threshold: float
) -> ServedCalibration:
    """The calibrator a bundle serves and the threshold on its scale, from the model's own out-of-fold rows.

    The method is chosen by cross-fitted NLL (``choose_calibrator``, patient-grouped splits) and refitted
    on all rows. The threshold is re-tuned on the calibrated probabilities with the report's own rule
    (``threshold_for_sensitivity`` at ``evaluation.target_sensitivity``), so ``calibrated >= threshold``
    is the same operating point as ``raw >= raw_threshold`` (identical flags for temperature and Platt
    scaling; isotonic steps may tie a few benign scores to the threshold). The stored report (ECE, Brier
    before/after with patient-bootstrap CIs) scores the cross-fitted predictions of the chosen method on
    these rows: no untouched test set is needed, and none of its rows is scored by a calibrator that saw it.

    Returns:
        ``(BundleManifest.calibration as a dict, threshold, None)``, or ``(None, raw_threshold, why)`` when
        the rows cannot be cross-fitted (fewer than 2 patients per split with both classes): the bundle then
        serves raw probabilities, its manifest's ``uncalibrated_reason`` says why and its model card says so.
    """
    evaluation = config.evaluation
    n_groups = int(oof[schema.GROUP].nunique())
    n_melanoma_groups = int(oof.loc[oof[schema.TARGET] == 1, schema.GROUP].nunique())
    n_splits = min(CALIBRATION_SPLITS, n_groups, n_melanoma_groups)
    seed = evaluation.bootstrap_seed
    try:
        if n_splits < 2:
            raise InputValueError(
                f"only {n_melanoma_groups} patients with melanoma among the out-of-fold rows"
            )
        choice = choose_calibrator(oof, seed=seed, n_splits=n_splits, config=evaluation)
        method = choice.calibrator.method
        y = oof[schema.TARGET].to_numpy()
        raw = oof["prob"].to_numpy(dtype=np.float64)
        crossed = cross_fitted_predictions(raw, y, oof[schema.GROUP], [method], n_splits=n_splits, seed=seed)
        report = calibration_report(raw, crossed[method], y, oof[schema.GROUP], evaluation)
    except InputValueError as exc:
        reason = (
            f"calibration skipped on {len(oof)} out-of-fold rows of {n_groups} patients: {exc}; "
            "raw network probabilities are served (more patients with melanoma give a calibrator)"
        )
        logging.getLogger(__name__).warning("serving uncalibrated probabilities: %s", reason)
        return ServedCalibration(None, raw_threshold, reason)
    threshold = threshold_for_sensitivity(y, choice.calibrator.apply(raw), evaluation.target_sensitivity)
    calibration = {
        "method": method,
        "parameters": choice.calibrator.to_dict(),
        "prevalence": choice.prevalence,
        "n_rows": len(oof),
        "report": report,
        "report_on": f"the model's {len(oof)} out-of-fold rows, cross-fitted ({n_splits} patient-grouped splits)",
    }
    return ServedCalibration(calibration, threshold, None)
