"""Seeded cluster-bootstrap resamples: patients (groups) are drawn with replacement, never rows.

A resample is stored as how many times each group was drawn; every row of a group then carries that
count as its weight. One :class:`GroupResamples` can be applied to several models' predictions of the
same images (paired comparison) and to subsets of rows (subgroups).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from melanoma_ml.errors import InputValueError

MAX_REDRAW_ROUNDS = 1000
_DRAW_CHUNK_CELLS = 4_000_000


@dataclass(frozen=True)
class GroupResamples:
    """``counts[b, g]``: how often group ``g`` was drawn in resample ``b`` (each row sums to n_groups).

    Attributes:
        counts: (n_resamples, n_groups) unsigned integer matrix.
        n_redrawn: resamples that held a single class (all melanoma or all benign) and were redrawn.
        seed: the seed that produced them.
    """

    counts: np.ndarray
    n_redrawn: int
    seed: int

    @property
    def n_resamples(self) -> int:
        return int(self.counts.shape[0])

    @property
    def n_groups(self) -> int:
        return int(self.counts.shape[1])

    def batches(self, size: int) -> list[slice]:
        """Consecutive slices of at most ``size`` resamples (bounds the memory of vectorised metrics)."""
        size = max(1, int(size))
        return [slice(i, min(i + size, self.n_resamples)) for i in range(0, self.n_resamples, size)]


def _draw(rng: np.random.Generator, n_resamples: int, n_groups: int, dtype: np.dtype) -> np.ndarray:
    counts = np.empty((n_resamples, n_groups), dtype=dtype)
    rows_per_chunk = max(1, _DRAW_CHUNK_CELLS // max(n_groups, 1))
    for start in range(0, n_resamples, rows_per_chunk):
        stop = min(start + rows_per_chunk, n_resamples)
        picks = rng.integers(0, n_groups, size=(stop - start, n_groups))
        offsets = (np.arange(stop - start) * n_groups)[:, None]
        flat = np.bincount((picks + offsets).ravel(), minlength=(stop - start) * n_groups)
        counts[start:stop] = flat.reshape(stop - start, n_groups)
    return counts


def draw_group_resamples(
    y: np.ndarray, group_codes: np.ndarray, n_resamples: int, seed: int
) -> GroupResamples:
    """Draw ``n_resamples`` cluster-bootstrap resamples of the groups in ``group_codes``.

    Resamples without a melanoma case or without a benign case cannot score an AUC; they are redrawn
    (with the same generator, so the result is reproducible) and counted in ``n_redrawn``.

    Args:
        y: 0/1 label per row.
        group_codes: group index per row, ``0..n_groups-1`` (see ``inputs.group_codes``).
        n_resamples: number of resamples.
        seed: seed of ``numpy.random.default_rng``.

    Raises:
        ValueError: the rows hold a single class, or single-class resamples keep coming back (fewer
            groups with melanoma than the bootstrap can work with).
    """
    y = np.asarray(y)
    n_groups = int(group_codes.max()) + 1
    has_pos = np.bincount(group_codes, weights=(y == 1), minlength=n_groups) > 0
    has_neg = np.bincount(group_codes, weights=(y == 0), minlength=n_groups) > 0
    if not has_pos.any() or not has_neg.any():
        only = "benign" if not has_pos.any() else "melanoma"
        raise InputValueError(
            f"AUC needs both melanoma and benign cases in the evaluation set (got only {only} images); "
            f"the bootstrap cannot run"
        )
    dtype = np.dtype(np.uint16) if n_groups < np.iinfo(np.uint16).max else np.dtype(np.uint32)
    rng = np.random.default_rng(seed)
    counts = _draw(rng, n_resamples, n_groups, dtype)
    n_redrawn = 0
    for _ in range(MAX_REDRAW_ROUNDS):
        single = ((counts @ has_pos) == 0) | ((counts @ has_neg) == 0)
        if not single.any():
            return GroupResamples(counts=counts, n_redrawn=n_redrawn, seed=seed)
        n_redrawn += int(single.sum())
        counts[single] = _draw(rng, int(single.sum()), n_groups, dtype)
    raise InputValueError(
        f"bootstrap resamples keep holding a single class after {MAX_REDRAW_ROUNDS} redraws: only "
        f"{int(has_pos.sum())} of {n_groups} groups contain melanoma; evaluate on more data"
    )
