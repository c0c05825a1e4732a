"""Metrics of one set of rows under many bootstrap weightings at once (the fast path of the bootstrap).

A cluster-bootstrap resample gives every row the number of times its group was drawn as a weight.
Rows are collapsed into ascending "score cells": one cell per distinct melanoma score (every row with
exactly that score) and one cell for the benign rows strictly between two consecutive melanoma scores.
AUC, partial AUC, the tuned threshold and the ROC curve only change where a melanoma score is crossed, so
they are exact on cells; with few melanoma cases there are far fewer cells than rows (ISIC 2020: ~1,200
cells for 33k rows). Each resample becomes two weight vectors over the cells, melanoma weight ``P`` and
benign weight ``N``, obtained for a batch of resamples with one sparse matrix product instead of one
sklearn call per resample. Threshold counts, Brier score and calibration error only need per-group sums,
so they are a dense ``counts @ per_group`` product.

Arrays of shape ``(n_scores, batch)`` keep cells on axis 0 (ascending score) and resamples on axis 1.
Tests check every function here against sklearn on rows duplicated by their weights.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

from melanoma_ml.evaluation.metrics import calibration_bin, rates_from_counts
from melanoma_ml.evaluation.threshold import SENSITIVITY_TOLERANCE


class WeightedRows:
    """Rows (labels, scores, group codes) prepared for scoring under group-count weights.

    Args:
        y: 0/1 label per row.
        p: probability per row.
        group_codes: group index per row in ``0..n_groups-1``.
        n_groups: number of groups of the resamples (may exceed the groups present in these rows).
    """

    def __init__(self, y: np.ndarray, p: np.ndarray, group_codes: np.ndarray, n_groups: int) -> None:
        y = np.asarray(y).astype(np.int8)
        p = np.asarray(p, dtype=np.float64)
        pos = y == 1
        melanoma_scores = np.unique(p[pos])
        # Cell 2k+1 holds every row scoring exactly melanoma_scores[k]; even cell 2k holds benign rows
        # strictly between melanoma_scores[k-1] and melanoma_scores[k] (the last one: above all of them).
        below = np.searchsorted(melanoma_scores, p, side="left")
        tied = np.zeros(p.size, dtype=bool)
        if melanoma_scores.size:
            tied = (below < melanoma_scores.size) & (
                melanoma_scores[np.minimum(below, melanoma_scores.size - 1)] == p
            )
        cell = 2 * below + tied
        self.scores = np.full(2 * melanoma_scores.size + 1, np.nan)
        self.scores[1::2] = melanoma_scores
        self.n_groups = n_groups
        shape = (self.scores.size, n_groups)
        self._pos = sparse.csr_matrix((np.ones(pos.sum()), (cell[pos], group_codes[pos])), shape=shape)
        self._neg = sparse.csr_matrix((np.ones((~pos).sum()), (cell[~pos], group_codes[~pos])), shape=shape)
        self._y = y
        self._p = p
        self._groups = group_codes

    @property
    def n_scores(self) -> int:
        """Number of score cells (``2 * distinct melanoma scores + 1``)."""
        return int(self.scores.size)

    def class_weights(self, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Melanoma and benign weight per score cell, ``(n_scores, batch)`` each, for counts ``(batch, n_groups)``."""
        counts_t = np.asarray(counts, dtype=np.float64).T
        return np.asarray(self._pos @ counts_t), np.asarray(self._neg @ counts_t)

    def _per_group(self, values: np.ndarray) -> np.ndarray:
        return np.bincount(self._groups, weights=values, minlength=self.n_groups)

    def threshold_rates(self, counts: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
        """Every threshold metric of ``p >= threshold`` for each resample, arrays of shape ``(batch,)``."""
        called = self._p >= threshold
        pos = self._y == 1
        per_group = np.stack(
            [
                self._per_group(called & pos),
                self._per_group(called & ~pos),
                self._per_group(~called & ~pos),
                self._per_group(~called & pos),
            ],
            axis=1,
        )
        tp, fp, tn, fn = (np.asarray(counts, dtype=np.float64) @ per_group).T
        return rates_from_counts(tp, fp, tn, fn)

    def brier(self, counts: np.ndarray) -> np.ndarray:
        """Weighted mean squared error of the probabilities, shape ``(batch,)``."""
        counts = np.asarray(counts, dtype=np.float64)
        squared = self._per_group((self._p - self._y) ** 2)
        rows = self._per_group(np.ones_like(self._p))
        return (counts @ squared) / (counts @ rows)

    def calibration_error(self, counts: np.ndarray, n_bins: int) -> np.ndarray:
        """Weighted expected calibration error with equal-width bins, shape ``(batch,)``."""
        counts = np.asarray(counts, dtype=np.float64)
        bins = calibration_bin(self._p, n_bins)
        cell = self._groups * n_bins + bins
        size = self.n_groups * n_bins
        sum_p = np.bincount(cell, weights=self._p, minlength=size).reshape(self.n_groups, n_bins)
        sum_y = np.bincount(cell, weights=self._y.astype(np.float64), minlength=size).reshape(
            self.n_groups, n_bins
        )
        rows = self._per_group(np.ones_like(self._p))
        return np.abs(counts @ sum_p - counts @ sum_y).sum(axis=1) / (counts @ rows)


def _totals(P: np.ndarray, N: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    wp, wn = P.sum(axis=0), N.sum(axis=0)
    return wp, wn, (wp > 0) & (wn > 0)


def auc(P: np.ndarray, N: np.ndarray) -> np.ndarray:
    """Weighted AUC per resample (ties count one half); NaN where a resample lacks a class."""
    wp, wn, ok = _totals(P, N)
    benign_below = np.cumsum(N, axis=0) - N
    wins = (P * (benign_below + 0.5 * N)).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ok, wins / (wp * wn), np.nan)


def partial_auc(P: np.ndarray, N: np.ndarray, min_tpr: float) -> np.ndarray:
    """Weighted ISIC 2024 partial AUC above ``min_tpr`` TPR per resample (see ``metrics.partial_auc``).

    With labels and scores flipped, the ROC runs over ascending scores: x = melanoma weight at or below
    the score, y = benign weight at or below it. The area under it up to ``x = 1 - min_tpr`` (the last
    segment cut by linear interpolation, as sklearn does) is the ISIC partial AUC.
    """
    wp, wn, ok = _totals(P, N)
    max_fpr = 1.0 - min_tpr
    batch = P.shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.vstack([np.zeros((1, batch)), np.cumsum(P, axis=0) / wp])
        y = np.vstack([np.zeros((1, batch)), np.cumsum(N, axis=0) / wn])
        segments = np.diff(x, axis=0) * (y[:-1] + y[1:]) / 2
        area = np.where(x[1:] <= max_fpr, segments, 0.0).sum(axis=0)
        stop = (x <= max_fpr).sum(axis=0)
        cols = np.arange(batch)
        has_cut = stop < x.shape[0]
        nxt = np.minimum(stop, x.shape[0] - 1)
        x0, y0 = x[stop - 1, cols], y[stop - 1, cols]
        x1, y1 = x[nxt, cols], y[nxt, cols]
        y_cut = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
        area = area + np.where(has_cut, (max_fpr - x0) * (y0 + y_cut) / 2, 0.0)
    return np.where(ok, area, np.nan)


def threshold_for_sensitivity(P: np.ndarray, scores: np.ndarray, target: float) -> np.ndarray:
    """Per resample, the largest melanoma score whose weighted sensitivity (``p >= score``) reaches ``target``.

    The answer always lies on a melanoma cell (the first cell past it holds melanoma weight), so
    ``scores`` (NaN on benign-only cells) is never read at a benign-only cell.
    """
    wp = P.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        sensitivity = (wp - (np.cumsum(P, axis=0) - P)) / wp
    index = (sensitivity >= target - SENSITIVITY_TOLERANCE).sum(axis=0) - 1
    return np.where(wp > 0, scores[np.clip(index, 0, scores.size - 1)], np.nan)


def roc_tpr_at(P: np.ndarray, N: np.ndarray, fpr_grid: np.ndarray) -> np.ndarray:
    """TPR of each resample's ROC curve linearly interpolated at ``fpr_grid``, shape ``(len(grid), batch)``."""
    wp, wn, ok = _totals(P, N)
    batch = P.shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        fpr = np.vstack([np.zeros((1, batch)), np.cumsum(N[::-1], axis=0) / wn])
        tpr = np.vstack([np.zeros((1, batch)), np.cumsum(P[::-1], axis=0) / wp])
    out = np.full((fpr_grid.size, batch), np.nan)
    for b in np.flatnonzero(ok):
        out[:, b] = np.interp(fpr_grid, fpr[:, b], tpr[:, b])
    return out
