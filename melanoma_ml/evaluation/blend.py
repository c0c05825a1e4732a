"""A stacked blend of out-of-fold predictions by rank averaging (image model + tabular GBDT).

Probabilities of differently trained models are on different scales (a focal-loss CNN and a boosted model
calibrate differently), so each model's out-of-fold probabilities become percentile ranks over all its
OOF rows, and the blend is their (weighted) mean: a score in (0, 1] that orders images, which is all AUC
and pAUC read. It is not a calibrated probability; the threshold tuned on it by ``evaluate_predictions``
is a rank cut-off. The blend has no fitted parameters (equal weights unless given), so evaluating it on
the same OOF rows is not an optimistic, in-sample estimate.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from melanoma_ml import schema
from melanoma_ml.errors import InputValueError
from melanoma_ml.training.train import BACKBONE, OOF_COLUMNS, PROB

BLEND_NAME = "blend"


def rank_blend(
    oofs: Sequence[pd.DataFrame], weights: Sequence[float] | None = None, *, name: str = BLEND_NAME
) -> pd.DataFrame:
    """Rank-average the ``prob`` of several OOF tables over the same images.

    Args:
        oofs: Out-of-fold tables (``OOF_COLUMNS``), each over the same set of ``image_name``s with the
            same targets (the image models' and ``train_gbdt_folds``' tables on one folds table are).
        weights: Non-negative weight per table (normalised to sum 1); None weighs them equally.
        name: The ``backbone`` value of the blended rows.

    Returns:
        The first table's rows and columns with ``prob`` the weighted mean percentile rank and
        ``backbone = name``.

    Raises:
        InputValueError: fewer than two tables, bad weights, or tables over different images or targets.
    """
    if len(oofs) < 2:
        raise InputValueError(f"a blend needs at least two out-of-fold tables, got {len(oofs)}")
    w = np.ones(len(oofs)) if weights is None else np.asarray(weights, dtype=float)
    if w.shape != (len(oofs),) or not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        raise InputValueError(
            f"weights must be {len(oofs)} non-negative numbers with a positive sum, got {weights}"
        )
    base = oofs[0].reset_index(drop=True)
    keys = base[schema.IMAGE]
    if keys.duplicated().any():
        raise InputValueError(f"out-of-fold table 0 repeats images, e.g. {keys[keys.duplicated()].iloc[0]!r}")
    score = np.zeros(len(base))
    for i, (oof, weight) in enumerate(zip(oofs, w / w.sum(), strict=True)):
        other = oof.set_index(schema.IMAGE, verify_integrity=False)
        if len(oof) != len(base) or set(other.index) != set(keys):
            raise InputValueError(
                f"out-of-fold table {i} ({oof[BACKBONE].iloc[0] if len(oof) else 'empty'}) covers "
                f"{len(oof)} images, table 0 {len(base)}, and they are not the same images; blend the "
                "predictions of models trained on the same folds table"
            )
        aligned = other.loc[keys]
        if (aligned[schema.TARGET].to_numpy() != base[schema.TARGET].to_numpy()).any():
            raise InputValueError(f"out-of-fold table {i} disagrees with table 0 on some targets")
        score += weight * aligned[PROB].rank(method="average", pct=True).to_numpy()
    out = base[[c for c in OOF_COLUMNS if c in base.columns]].copy()
    out[PROB] = score
    out[BACKBONE] = name
    return out
