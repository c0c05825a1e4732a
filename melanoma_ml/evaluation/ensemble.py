"""The ensemble average: how several members' probabilities of the same images become one.

``serving.ensemble_average`` names the space: ``probability`` (the mean of the members' probabilities) or
``logit`` (the sigmoid of the mean of their log-odds, each probability first clipped to
``[ENSEMBLE_CLIP, 1 - ENSEMBLE_CLIP]`` so a saturated member cannot dominate with an infinite logit). One
member is its own average in either space. Every place that averages members uses
:func:`average_probabilities`: served scores (``serving.inference``), the test evaluation
(``evaluation.holdout``) and the out-of-fold rows of a ``top_k`` ensemble (:func:`averaged_oof`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import special

from melanoma_ml.errors import InputValueError

AVERAGES = ("logit", "probability")
"""The spaces members can be averaged in (``serving.ensemble_average``)."""

ENSEMBLE_CLIP = 1e-7
"""Probabilities are clipped to ``[ENSEMBLE_CLIP, 1 - ENSEMBLE_CLIP]`` before a ``logit`` average."""


def average_probabilities(member_probs: np.ndarray | Sequence[np.ndarray], average: str) -> np.ndarray:
    """``(B,)`` float64: the members' probabilities ``(M, B)`` averaged in ``average`` space.

    Raises:
        InputValueError: an unknown ``average``, or no member.
    """
    if average not in AVERAGES:
        raise InputValueError(f"unknown ensemble average {average!r}; use one of {list(AVERAGES)}")
    probs = np.asarray(member_probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise InputValueError(f"need an (members, images) array with at least one member, got {probs.shape}")
    if average == "probability" or probs.shape[0] == 1:
        return probs.mean(axis=0)
    clipped = np.clip(probs, ENSEMBLE_CLIP, 1 - ENSEMBLE_CLIP)
    return special.expit(special.logit(clipped).mean(axis=0))


def averaged_oof(oofs: Sequence[pd.DataFrame], average: str) -> pd.DataFrame:
    """Several backbones' out-of-fold tables as one: per image, their probabilities averaged in ``average``
    space (:func:`average_probabilities`); rows are the images all of them predicted, in the first's order.

    Raises:
        InputValueError: the tables disagree on an image's fold (the backbones were trained on other folds).
    """
    first = oofs[0].reset_index(drop=True)
    probs = [first["prob"].to_numpy(dtype=np.float64)]
    for other in oofs[1:]:
        merged = first[["image_name", "fold"]].merge(
            other[["image_name", "fold", "prob"]], on="image_name", how="left", validate="one_to_one"
        )
        if merged["prob"].isna().any() or (merged["fold_x"] != merged["fold_y"]).any():
            raise InputValueError(
                "the top_k backbones were not trained on the same folds (an image is missing or in another "
                "fold); re-train them on one folds table or set serving.ensemble to 'folds'"
            )
        probs.append(merged["prob"].to_numpy(dtype=np.float64))
    return first.assign(prob=average_probabilities(np.stack(probs), average))
