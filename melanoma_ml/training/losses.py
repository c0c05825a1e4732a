"""Binary losses on logits: focal loss for the rare melanoma class, or plain BCE."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from melanoma_ml.config import TrainingConfig
from melanoma_ml.errors import InputValueError

Reduction = Literal["none", "mean", "sum"]


class FocalLoss(nn.Module):
    """Binary focal loss (Lin et al. 2017) on logits.

    ``alpha_t * (1 - p_t) ** gamma * BCE(logit, target)``, where ``alpha_t = alpha`` for positives and
    ``1 - alpha`` for negatives. Built on ``torchvision.ops.sigmoid_focal_loss``, which uses
    ``binary_cross_entropy_with_logits`` and so stays finite for large logits. ``gamma=0, alpha=0.5``
    is half the BCE.

    Args:
        alpha: Weight of the positive (melanoma) class, in ``[0, 1]``.
        gamma: Focusing exponent, ``>= 0``; larger values down-weight easy examples.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-example losses).
    """

    def __init__(self, alpha: float, gamma: float, reduction: Reduction) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise InputValueError(f"focal alpha must be in [0, 1], got {alpha}")
        if gamma < 0:
            raise InputValueError(f"focal gamma must be >= 0, got {gamma}")
        if reduction not in ("none", "mean", "sum"):
            raise InputValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
        self.alpha = alpha
        self.gamma = gamma
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.shape != targets.shape:
            raise ValueError(
                f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ in shape"
            )
        return sigmoid_focal_loss(
            logits, targets.to(logits.dtype), alpha=self.alpha, gamma=self.gamma, reduction=self.reduction
        )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}"


def build_loss(training: TrainingConfig) -> nn.Module:
    """The loss named by ``training.loss``: ``FocalLoss`` or ``BCEWithLogitsLoss`` (mean)."""
    if training.loss == "focal":
        return FocalLoss(training.focal_alpha, training.focal_gamma, training.focal_reduction)
    if training.loss == "bce":
        return nn.BCEWithLogitsLoss()
    raise InputValueError(f"unknown loss {training.loss!r}; set training.loss to 'focal' or 'bce'")
