"""The one ensemble average (``evaluation.ensemble``): known answers, the clip, and every caller using it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import special

from melanoma_ml.errors import InputValueError
from melanoma_ml.evaluation.ensemble import ENSEMBLE_CLIP, average_probabilities, averaged_oof
from melanoma_ml.serving.inference import average_members


def test_probability_space_is_the_plain_mean() -> None:
    got = average_probabilities([[0.1, 0.5], [0.9, 0.5], [0.5, 0.99]], "probability")
    np.testing.assert_allclose(got, [0.5, (0.5 + 0.5 + 0.99) / 3])


def test_logit_space_cancels_opposite_odds_and_lets_a_confident_member_pull_harder() -> None:
    got = average_probabilities([[0.1, 0.5], [0.9, 0.5], [0.5, 0.99]], "logit")
    np.testing.assert_allclose(got, [0.5, special.expit(special.logit(0.99) / 3)])
    assert got[1] > (0.5 + 0.5 + 0.99) / 3


def test_saturated_members_are_clipped_so_certain_disagreement_averages_to_a_half() -> None:
    got = average_probabilities([[0.0, 1.0, 1.0], [1.0, 1.0, 0.3]], "logit")
    assert np.isfinite(got).all()
    assert got[0] == pytest.approx(0.5)  # logit(clip) + logit(1 - clip) = 0
    assert got[1] == pytest.approx(1 - ENSEMBLE_CLIP)
    expected = special.expit((special.logit(1 - ENSEMBLE_CLIP) + special.logit(0.3)) / 2)
    assert got[2] == pytest.approx(expected)


@pytest.mark.parametrize("average", ["probability", "logit"])
def test_one_member_is_its_own_average(average: str) -> None:
    probs = np.array([[0.0, 1e-9, 0.3, 1.0]])
    np.testing.assert_array_equal(average_probabilities(probs, average), probs[0])


@pytest.mark.parametrize("bad", [("median", [[0.5]]), ("logit", np.zeros((0, 3))), ("logit", [0.5, 0.5])])
def test_unknown_spaces_and_missing_members_are_refused(bad) -> None:
    average, probs = bad
    with pytest.raises(InputValueError):
        average_probabilities(probs, average)


@pytest.mark.parametrize("average", ["probability", "logit"])
def test_the_served_average_is_the_one_average_of_the_view_means(average: str) -> None:
    """``serving.inference.average_members``: views averaged as probabilities, members by the one average."""
    generator = torch.Generator().manual_seed(0)
    member_logits = [torch.randn(8, 5, generator=generator) * 4 for _ in range(3)]
    view_means = np.stack([torch.sigmoid(v).mean(dim=0).numpy() for v in member_logits])
    got = average_members(member_logits, average)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), average_probabilities(view_means, average), rtol=0, atol=1e-6)


def test_out_of_fold_tables_are_averaged_per_image_in_the_first_tables_order() -> None:
    a = pd.DataFrame({"image_name": ["x", "y"], "fold": [0, 1], "prob": [0.1, 0.99]})
    b = pd.DataFrame({"image_name": ["y", "x"], "fold": [1, 0], "prob": [0.5, 0.9]})
    got = averaged_oof([a, b], "logit")
    assert got["image_name"].tolist() == ["x", "y"]
    np.testing.assert_allclose(got["prob"], average_probabilities([[0.1, 0.99], [0.9, 0.5]], "logit"))


def test_out_of_fold_tables_from_other_folds_are_refused() -> None:
    a = pd.DataFrame({"image_name": ["x", "y"], "fold": [0, 1], "prob": [0.1, 0.99]})
    b = a.assign(fold=[1, 0])
    with pytest.raises(InputValueError, match="same folds"):
        averaged_oof([a, b], "probability")
