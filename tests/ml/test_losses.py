"""Focal loss on logits: relation to BCE, hand-computed values, reductions, stability; build_loss."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from melanoma_ml.config import TrainingConfig
from melanoma_ml.training.losses import FocalLoss, build_loss

LOGITS = torch.tensor([-3.0, -0.5, 0.0, 0.7, 4.0])
TARGETS = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0])


def test_gamma_zero_alpha_half_is_half_the_bce() -> None:
    focal = FocalLoss(alpha=0.5, gamma=0.0, reduction="none")(LOGITS, TARGETS)
    bce = nn.functional.binary_cross_entropy_with_logits(LOGITS, TARGETS, reduction="none")
    torch.testing.assert_close(focal, 0.5 * bce)


@pytest.mark.parametrize(
    "logit,target,alpha,gamma,expected",
    [
        # p = 0.5: BCE = ln 2, (1 - p_t) ** 2 = 0.25; alpha weights positives, 1 - alpha negatives
        (0.0, 1.0, 0.25, 2.0, 0.25 * 0.25 * math.log(2)),
        (0.0, 0.0, 0.25, 2.0, 0.75 * 0.25 * math.log(2)),
        # p = sigmoid(2) for a positive: p_t = p
        (2.0, 1.0, 0.8, 1.0, 0.8 * (1 - 1 / (1 + math.exp(-2))) * math.log(1 + math.exp(-2))),
        (2.0, 0.0, 1.0, 2.0, 0.0),  # alpha = 1 ignores negatives
    ],
)
def test_known_values(logit: float, target: float, alpha: float, gamma: float, expected: float) -> None:
    loss = FocalLoss(alpha=alpha, gamma=gamma, reduction="sum")(torch.tensor([logit]), torch.tensor([target]))
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_reduction_modes_agree() -> None:
    per_example = FocalLoss(0.25, 2.0, "none")(LOGITS, TARGETS)
    assert per_example.shape == LOGITS.shape
    assert FocalLoss(0.25, 2.0, "sum")(LOGITS, TARGETS).item() == pytest.approx(per_example.sum().item())
    assert FocalLoss(0.25, 2.0, "mean")(LOGITS, TARGETS).item() == pytest.approx(per_example.mean().item())


def test_focusing_down_weights_easy_examples() -> None:
    easy, hard = torch.tensor([4.0]), torch.tensor([-1.0])
    target = torch.tensor([1.0])
    bce = FocalLoss(0.5, 0.0, "sum")
    focal = FocalLoss(0.5, 2.0, "sum")
    assert focal(easy, target) / bce(easy, target) < focal(hard, target) / bce(hard, target)


def test_extreme_logits_stay_finite_with_gradients() -> None:
    logits = torch.tensor([100.0, -100.0, 80.0], requires_grad=True)
    loss = FocalLoss(0.25, 2.0, "mean")(logits, torch.tensor([0.0, 1.0, 1.0]))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"alpha": 1.5, "gamma": 2.0, "reduction": "mean"}, "alpha"),
        ({"alpha": 0.25, "gamma": -1.0, "reduction": "mean"}, "gamma"),
        ({"alpha": 0.25, "gamma": 2.0, "reduction": "avg"}, "reduction"),
    ],
)
def test_invalid_arguments_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FocalLoss(**kwargs)


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="shape"):
        FocalLoss(0.25, 2.0, "mean")(LOGITS, TARGETS[:, None])


def test_build_loss_follows_the_training_config() -> None:
    focal = build_loss(TrainingConfig(loss="focal", focal_alpha=0.4, focal_gamma=1.5, focal_reduction="sum"))
    assert isinstance(focal, FocalLoss)
    assert (focal.alpha, focal.gamma, focal.reduction) == (0.4, 1.5, "sum")
    bce = build_loss(TrainingConfig(loss="bce"))
    assert isinstance(bce, nn.BCEWithLogitsLoss)
    torch.testing.assert_close(
        bce(LOGITS, TARGETS), nn.functional.binary_cross_entropy_with_logits(LOGITS, TARGETS)
    )
