"""MelanomaModule: the shared step, namespaced per-stage metrics, optimiser and scheduler choice."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from melanoma_ml.config import ModelConfig, TrainingConfig
from melanoma_ml.model import build_model
from melanoma_ml.training.module import MONITOR, MelanomaModule

N_META = 5
METRICS = ("auroc", "f1", "recall", "precision", "accuracy")


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    config = ModelConfig(backbone="test_efficientnet", pretrained=False, meta_hidden=[8])
    return build_model(config, N_META)


def _batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(n, 3, 32, 32, generator=generator)
    metadata = torch.randn(n, N_META, generator=generator)
    target = torch.tensor([0.0, 1.0] * (n // 2))
    return image, metadata, target


def test_model_step_gives_a_finite_loss_probabilities_and_int_targets() -> None:
    module = MelanomaModule(_net(), TrainingConfig())
    loss, probs, targets = module.model_step(_batch())
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert loss.requires_grad
    assert probs.shape == (8,) and ((probs >= 0) & (probs <= 1)).all()
    assert targets.dtype == torch.int32


def test_the_network_is_not_a_hyperparameter() -> None:
    module = MelanomaModule(_net(), TrainingConfig(learning_rate=0.01))
    assert "net" not in module.hparams
    assert module.hparams["training"].learning_rate == 0.01


def test_one_epoch_logs_namespaced_train_and_val_metrics() -> None:
    loader = DataLoader(TensorDataset(*_batch(16)), batch_size=8)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(MelanomaModule(_net(), TrainingConfig()), loader, loader)
    expected = {f"{stage}/{name}" for stage in ("train", "val") for name in ("loss", *METRICS)}
    assert set(trainer.callback_metrics) == expected
    assert all(torch.isfinite(v) for v in trainer.callback_metrics.values())
    assert MONITOR in expected


@pytest.mark.parametrize(
    "scheduler,expected",
    [
        ("cosine", torch.optim.lr_scheduler.CosineAnnealingLR),
        ("plateau", torch.optim.lr_scheduler.ReduceLROnPlateau),
        ("none", None),
    ],
)
def test_optimizer_and_scheduler_follow_the_config(scheduler: str, expected) -> None:
    config = TrainingConfig(scheduler=scheduler, learning_rate=0.02, weight_decay=1e-3, epochs=7)
    configured = MelanomaModule(_net(), config).configure_optimizers()
    optimizer = configured if expected is None else configured["optimizer"]
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.param_groups[0]["lr"] == 0.02
    assert optimizer.param_groups[0]["weight_decay"] == 1e-3
    if expected is None:
        return
    lr_scheduler = configured["lr_scheduler"]
    assert isinstance(lr_scheduler["scheduler"], expected)
    if scheduler == "cosine":
        assert lr_scheduler["scheduler"].T_max == 7
    else:
        assert lr_scheduler["monitor"] == MONITOR
        assert lr_scheduler["scheduler"].mode == "max"


def test_a_non_finite_loss_stops_training_with_advice() -> None:
    module = MelanomaModule(_net(), TrainingConfig())
    image, metadata, target = _batch()
    with pytest.raises(FloatingPointError, match="learning_rate"):
        module.training_step((image * float("nan"), metadata, target), 0)
