"""The LightningModule: training logic only; the network is built elsewhere and passed in."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryF1Score,
    BinaryPrecision,
    BinaryRecall,
)

from melanoma_ml.config import ModelConfig, TrainingConfig
from melanoma_ml.errors import InputValueError
from melanoma_ml.training.losses import build_loss
from melanoma_ml.training.recipe import (
    Recipe,
    apply_backbone_mode,
    build_optimizer,
    resolve_recipe,
    steps_per_epoch,
    warmup_factor,
)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

MONITOR = "val/auroc"
"""The metric that picks the best epoch, drives early stopping and the plateau scheduler."""


def _metrics(prefix: str) -> MetricCollection:
    return MetricCollection(
        {
            "auroc": BinaryAUROC(),
            "f1": BinaryF1Score(),
            "recall": BinaryRecall(),
            "precision": BinaryPrecision(),
            "accuracy": BinaryAccuracy(),
        },
        prefix=prefix,
    )


class MelanomaModule(L.LightningModule):
    """Trains a ``MelanomaNet`` (``net(image, metadata) -> logits``) with the configured loss.

    Logs ``train/loss``, ``val/loss`` and ``{train,val}/{auroc,f1,recall,precision,accuracy}`` per epoch.

    Args:
        net: The network (not saved as a hyperparameter; checkpoints store it as safetensors).
        training: Optimiser, loss and scheduler settings.
        recipe: How to optimise (``melanoma_ml.training.recipe.resolve_recipe``: scratch or finetune);
            None: the recipe of a randomly initialised network (``auto`` resolves to scratch).
    """

    def __init__(self, net: nn.Module, training: TrainingConfig, recipe: Recipe | None = None) -> None:
        super().__init__()
        self.recipe = (
            recipe if recipe is not None else resolve_recipe(ModelConfig(pretrained=False), training)
        )
        # The recipe as a plain dict: the logger's hparams (TensorBoard, hparams.yaml) record what was used.
        self.save_hyperparameters({"training": training, "recipe": self.recipe.to_dict()})
        self.net = net
        self.training_config = training
        self.criterion = build_loss(training)
        self.train_metrics = _metrics("train/")
        self.val_metrics = _metrics("val/")

    def forward(self, image: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
        return self.net(image, metadata)

    def model_step(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, probabilities, integer targets)`` for one batch; shared by training and validation."""
        image, metadata, target = batch
        logits = self(image, metadata)
        loss = self.criterion(logits.float(), target.float())
        return loss, torch.sigmoid(logits.detach().float()), target.int()

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train", self.train_metrics)

    def validation_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "val", self.val_metrics)

    def _shared_step(self, batch: Batch, stage: str, metrics: MetricCollection) -> torch.Tensor:
        loss, probs, targets = self.model_step(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{stage} loss is {loss.item()} at epoch {self.current_epoch}; lower training.learning_rate "
                "or use training.precision='32-true'"
            )
        batch_size = targets.shape[0]
        metrics.update(probs, targets)
        # sync_dist: a data-parallel fit logs the mean over the ranks (a no-op on one device); the
        # torchmetrics collection syncs its own state across ranks when it computes.
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, batch_size=batch_size, sync_dist=True)
        self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=batch_size)
        return loss

    def on_fit_start(self) -> None:
        if self.recipe.freeze_backbone_epochs > 0 and self.trainer.world_size > 1:
            raise InputValueError(
                f"training.finetune.freeze_backbone_epochs={self.recipe.freeze_backbone_epochs} needs a "
                f"one-device fit, this one has {self.trainer.world_size} (data-parallel DDP cannot change "
                "which parameters train mid-fit); set it to 0 or training.devices=1"
            )

    def on_train_epoch_start(self) -> None:
        apply_backbone_mode(self.net, self.recipe, self.current_epoch)

    def on_train_end(self) -> None:
        if self.recipe.freeze_backbone_epochs > 0:  # a fit that ended frozen leaves the network trainable
            self.net.backbone.requires_grad_(True)

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        """The step at the scheduled rates x ``warmup_factor``; the scheduler's own rates are restored after,
        so cosine and plateau keep stepping from their values, not the warmed ones."""
        factor = 1.0
        if self.recipe.kind == "finetune" and self.recipe.warmup_epochs > 0:
            per_epoch = steps_per_epoch(
                self.trainer.num_training_batches, self.trainer.accumulate_grad_batches
            )
            factor = warmup_factor(self.trainer.global_step, per_epoch, self.recipe)
        if factor == 1.0:
            optimizer.step(closure=optimizer_closure)
            return
        scheduled = [group["lr"] for group in optimizer.param_groups]
        for group, lr in zip(optimizer.param_groups, scheduled, strict=True):
            group["lr"] = lr * factor
        try:
            optimizer.step(closure=optimizer_closure)
        finally:
            for group, lr in zip(optimizer.param_groups, scheduled, strict=True):
                group["lr"] = lr

    def configure_optimizers(self) -> Any:
        cfg = self.training_config
        optimizer = build_optimizer(self.net, self.recipe)
        if cfg.scheduler == "none":
            return optimizer
        if cfg.scheduler == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.recipe.epochs)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
        if cfg.scheduler == "plateau":
            # Halve early-stopping patience so the learning rate drops before training gives up.
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="max", patience=max(1, cfg.early_stopping_patience // 2)
            )
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "monitor": MONITOR, "interval": "epoch"},
            }
        raise InputValueError(f"unknown scheduler {cfg.scheduler!r}; use 'cosine', 'plateau' or 'none'")
