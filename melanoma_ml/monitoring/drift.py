"""Distribution shift between a reference and a day of served cases: PSI, a KS test, category shares.

**PSI** (population stability index) over bins: ``sum_b (a_b - e_b) * ln(a_b / e_b)`` where ``e_b`` and
``a_b`` are the reference's and the current cases' shares of bin ``b``. Binning, fixed here so that every
number the monitor reports means the same thing:

- scores: ``bins`` (default 10) bins whose inner edges are the reference's (weighted) quantiles at
  ``1/bins, ..., (bins-1)/bins``; repeated edges (ties, e.g. an isotonic calibrator's steps) are merged, and
  the outer bins are open (``-inf``, ``+inf``), so every current value falls in a bin. Bins are
  ``(lower, upper]``: a value equal to an edge goes to the bin below it, so the reference's tied mass at a
  quantile stays in the bin that quantile closes (``numpy.searchsorted(..., side="left")``).
- categories: one bin per category; a current category the reference never saw is its own bin with a
  reference share of 0.
- shares are smoothed counts: ``(count_b + 1/2) / (n + k/2)`` over the ``k`` bins (for the reference,
  ``count_b = share_b * m`` with ``m`` its (effective) size). Without it a bin empty on one side has an
  infinite logarithm, and a floor such as 1e-4 makes every empty bin of a small day cost about 0.3 (a
  day of 50 cases has empty bins by chance); with it identical distributions still give exactly 0.

The usual reading: < 0.1 no shift, 0.1-0.2 moderate, > 0.2 a shift worth a look. PSI is noisy on small
samples, so the monitor pairs it with a test: for categories, Pearson's chi-square on the same smoothed
shares, ``n_eff * sum_b (a_b - e_b)^2 / e_b`` with ``k - 1`` degrees of freedom, where
``n_eff = n * m / (n + m)`` for ``n`` current and ``m`` reference cases (two samples, not one against a
known truth) (:func:`chi_square_p_value`); for scores, KS.

**KS**: the two-sample Kolmogorov-Smirnov statistic (largest gap between the two empirical CDFs, ties
handled exactly) with its asymptotic p-value ``scipy.stats.kstwo.sf(D, round(n_eff))``, the same one
``scipy.stats.ks_2samp(..., method="asymp")`` uses; the reference may carry weights (a reference
re-weighted to another melanoma prevalence), then ``m`` is Kish's effective size ``(sum w)^2 / sum w^2``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats

from melanoma_ml.errors import InputValueError

SMOOTHING = 0.5
"""Count added to every bin before shares are taken (module docstring)."""

PSI_FLOOR = 1e-4
"""Smallest share :func:`psi_from_shares` takes a logarithm of (for share vectors given without counts)."""

DEFAULT_BINS = 10


@dataclass(frozen=True)
class ShiftResult:
    """One shift measurement.

    Attributes:
        psi: Population stability index (module docstring).
        p_value: The test's p-value (KS for scores, PSI's chi-square for categories).
        n_current: Current cases measured.
        n_reference: (Effective) reference cases.
        expected: Bin or category -> reference share (smoothed).
        observed: Bin or category -> current share (smoothed).
    """

    psi: float
    p_value: float
    n_current: int
    n_reference: float
    expected: dict[str, float]
    observed: dict[str, float]


def _weights(values: np.ndarray, weights: np.ndarray | None, what: str) -> np.ndarray:
    if weights is None:
        return np.ones(len(values))
    w = np.asarray(weights, dtype=float)
    if w.shape != values.shape or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise InputValueError(f"{what}: weights must be finite, non-negative, not all 0, one per value")
    return w


def _finite(values: object, what: str) -> np.ndarray:
    x = np.asarray(values, dtype=float).ravel()
    if not np.all(np.isfinite(x)):
        raise InputValueError(f"{what} holds non-finite values; drop missing scores before measuring shift")
    return x


def effective_size(weights: np.ndarray) -> float:
    """Kish's effective sample size ``(sum w)^2 / sum w^2`` (``len(weights)`` for equal weights)."""
    w = np.asarray(weights, dtype=float)
    return float(w.sum() ** 2 / np.square(w).sum())


def quantile_edges(
    reference: object, bins: int = DEFAULT_BINS, weights: np.ndarray | None = None
) -> np.ndarray:
    """Inner bin edges: the reference's weighted quantiles at ``k / bins``, repeats merged (module docstring)."""
    if bins < 2:
        raise InputValueError(f"PSI needs at least 2 bins, got {bins}")
    x = _finite(reference, "the reference")
    if len(x) == 0:
        raise InputValueError("the reference is empty: nothing to bin against")
    w = _weights(x, weights, "the reference")
    order = np.argsort(x, kind="stable")
    x, w = x[order], w[order]
    cumulative = np.cumsum(w) / w.sum()
    targets = np.arange(1, bins) / bins
    edges = x[np.minimum(np.searchsorted(cumulative, targets, side="left"), len(x) - 1)]
    return np.unique(edges)


def _counts(x: np.ndarray, w: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Weighted counts per bin, scaled so they sum to the (effective) size: Kish's for weights."""
    counts = np.bincount(np.searchsorted(edges, x, side="left"), weights=w, minlength=len(edges) + 1)
    return counts / counts.sum() * effective_size(w)


def smoothed_shares(counts: np.ndarray) -> np.ndarray:
    """``(count + SMOOTHING) / (total + k * SMOOTHING)`` (module docstring)."""
    c = np.asarray(counts, dtype=float) + SMOOTHING
    return c / c.sum()


def psi_from_shares(expected: np.ndarray, observed: np.ndarray) -> float:
    """PSI of two share vectors over the same bins (shares floored at :data:`PSI_FLOOR`)."""
    e = np.maximum(np.asarray(expected, dtype=float), PSI_FLOOR)
    a = np.maximum(np.asarray(observed, dtype=float), PSI_FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def chi_square_p_value(
    expected: np.ndarray, observed: np.ndarray, n_current: float, n_reference: float
) -> float:
    """Two-sample Pearson chi-square p-value of two (smoothed) share vectors (module docstring)."""
    e, a = np.asarray(expected, dtype=float), np.asarray(observed, dtype=float)
    if len(e) < 2 or n_current <= 0 or n_reference <= 0:
        return 1.0
    n_eff = n_current * n_reference / (n_current + n_reference)
    return float(stats.chi2.sf(n_eff * np.sum((a - e) ** 2 / e), len(e) - 1))


def ks_test(
    current: object, reference: object, reference_weights: np.ndarray | None = None
) -> tuple[float, float]:
    """``(D, p)``: two-sample KS statistic and its asymptotic p-value (module docstring)."""
    a = _finite(current, "the current scores")
    r = _finite(reference, "the reference scores")
    if len(a) == 0 or len(r) == 0:
        raise InputValueError("a KS test needs at least one current and one reference score")
    w = _weights(r, reference_weights, "the reference")
    order = np.argsort(r, kind="stable")
    r, w = r[order], w[order]
    grid = np.union1d(a, r)
    cdf_current = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_reference = np.concatenate([[0.0], np.cumsum(w) / w.sum()])[np.searchsorted(r, grid, side="right")]
    d = float(np.max(np.abs(cdf_current - cdf_reference)))
    m = effective_size(w)
    n_eff = max(1, round(len(a) * m / (len(a) + m)))
    return d, float(np.clip(stats.kstwo.sf(d, n_eff), 0.0, 1.0))


def score_shift(
    current: object,
    reference: object,
    *,
    reference_weights: np.ndarray | None = None,
    bins: int = DEFAULT_BINS,
) -> ShiftResult:
    """PSI over the reference's quantile bins and the KS p-value of ``current`` against ``reference``."""
    a = _finite(current, "the current scores")
    r = _finite(reference, "the reference scores")
    w = _weights(r, reference_weights, "the reference")
    edges = quantile_edges(r, bins, w)
    expected = smoothed_shares(_counts(r, w, edges))
    observed = smoothed_shares(_counts(a, np.ones(len(a)), edges))
    _, p = ks_test(a, r, w)
    labels = _bin_labels(edges)
    return ShiftResult(
        psi=psi_from_shares(expected, observed),
        p_value=p,
        n_current=len(a),
        n_reference=effective_size(w),
        expected=dict(zip(labels, expected.tolist(), strict=True)),
        observed=dict(zip(labels, observed.tolist(), strict=True)),
    )


def _bin_labels(edges: np.ndarray) -> list[str]:
    bounds = ["-inf", *(f"{e:.4g}" for e in edges), "inf"]
    return [f"({lo}, {hi}]" for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


def category_shift(
    current: Mapping[str, int], reference_shares: Mapping[str, float], n_reference: float
) -> ShiftResult:
    """PSI of current category counts against reference shares, with its chi-square p-value.

    Args:
        current: Category -> number of current cases (categories absent from the reference are kept).
        reference_shares: Category -> share of the reference rows (summing to 1).
        n_reference: How many reference rows the shares come from.
    """
    total = sum(current.values())
    if total <= 0:
        raise InputValueError("no current cases to compare with the reference mix")
    if abs(sum(reference_shares.values()) - 1.0) > 1e-6:
        raise InputValueError(f"reference shares must sum to 1, got {sum(reference_shares.values()):.6f}")
    categories = sorted(set(reference_shares) | set(current))
    expected = smoothed_shares(np.array([reference_shares.get(c, 0.0) for c in categories]) * n_reference)
    observed = smoothed_shares(np.array([current.get(c, 0) for c in categories], dtype=float))
    psi = psi_from_shares(expected, observed)
    return ShiftResult(
        psi=psi,
        p_value=chi_square_p_value(expected, observed, total, n_reference),
        n_current=int(total),
        n_reference=float(n_reference),
        expected=dict(zip(categories, expected.tolist(), strict=True)),
        observed=dict(zip(categories, observed.tolist(), strict=True)),
    )
