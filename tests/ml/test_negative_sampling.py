"""Per-epoch negative down-sampling: all positives, ratio x negatives, a new draw each epoch, seeded,
and Lightning moving the epoch forward; evaluation loaders read every row."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from melanoma_ml.config import TrainingConfig
from melanoma_ml.errors import MelanomaInputError
from melanoma_ml.training.data import MelanomaDataset, NegativeDownsampler, make_loader

TARGETS = np.array([1] * 5 + [0] * 95)  # 5% positives


def _epoch(sampler: NegativeDownsampler, epoch: int) -> list[int]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_each_epoch_holds_every_positive_and_ratio_times_as_many_negatives():
    sampler = NegativeDownsampler(TARGETS, ratio=3, seed=0)
    assert len(sampler) == 5 + 15
    for epoch in range(4):
        rows = _epoch(sampler, epoch)
        assert len(rows) == len(set(rows)) == 20
        assert {r for r in rows if TARGETS[r] == 1} == set(range(5))
        assert sum(TARGETS[r] == 0 for r in rows) == 15


def test_negatives_differ_between_epochs_until_every_one_was_used():
    sampler = NegativeDownsampler(TARGETS, ratio=3, seed=0)
    negatives = [{r for r in _epoch(sampler, e) if TARGETS[r] == 0} for e in range(7)]
    for a in range(6):  # 95 negatives / 15 per epoch: the first six epochs share none
        for b in range(a + 1, 6):
            assert not negatives[a] & negatives[b]
    assert len(set().union(*negatives)) == 95  # epoch 6 finishes the first pass and starts a new one


def test_the_same_seed_gives_the_same_sequence_and_another_seed_another():
    def sequence(seed: int) -> list[list[int]]:
        sampler = NegativeDownsampler(TARGETS, ratio=2, seed=seed)
        return [_epoch(sampler, e) for e in range(3)]

    assert sequence(7) == sequence(7)
    assert sequence(7) != sequence(8)


def test_a_ratio_beyond_the_negatives_uses_them_all():
    sampler = NegativeDownsampler(TARGETS, ratio=100, seed=0)
    assert sorted(_epoch(sampler, 3)) == list(range(100))


@pytest.mark.parametrize("targets", [np.zeros(10), np.array([])])
def test_no_positive_means_nothing_to_balance(targets):
    with pytest.raises(MelanomaInputError, match="negative_ratio"):
        NegativeDownsampler(targets, ratio=1, seed=0)


def test_the_setting_must_be_positive_or_none():
    assert TrainingConfig().negative_ratio is None
    with pytest.raises(ValidationError):
        TrainingConfig(negative_ratio=0)


# ---- through the loader and Lightning ------------------------------------------------------------------


def _dataset() -> MelanomaDataset:
    """100 one-pixel images; the metadata holds the row number so a batch says which rows it read."""
    n = len(TARGETS)
    images = np.zeros((n, 1, 1, 3), dtype=np.uint8)
    ids = np.arange(n, dtype=np.float32).reshape(n, 1)
    return MelanomaDataset(images, np.arange(n), ids, TARGETS, lambda image: {"image": torch.zeros(3, 1, 1)})


class _Recorder(L.LightningModule):
    """Learns nothing useful; records the rows each training epoch and each validation pass read."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.train_rows: dict[int, list[int]] = {}
        self.val_rows: dict[int, list[int]] = {}

    def training_step(self, batch, batch_idx):
        _image, ids, target = batch
        self.train_rows.setdefault(self.current_epoch, []).extend(ids[:, 0].long().tolist())
        return ((self.weight - target) ** 2).mean()

    def validation_step(self, batch, batch_idx):
        self.val_rows.setdefault(self.current_epoch, []).extend(batch[1][:, 0].long().tolist())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_draws_new_negatives_each_epoch_and_validates_on_every_row():
    training = TrainingConfig(negative_ratio=2, batch_size=8, seed=3)
    dataset = _dataset()
    module = _Recorder()
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(
        module,
        train_dataloaders=make_loader(dataset, training, shuffle=True),
        val_dataloaders=make_loader(dataset, training, shuffle=False),
    )
    expected = NegativeDownsampler(TARGETS, ratio=2, seed=3)
    for epoch in range(3):
        assert module.train_rows[epoch] == _epoch(expected, epoch)
        assert sorted(module.val_rows[epoch]) == list(range(100))
    assert set(module.train_rows[0]) != set(module.train_rows[1])


def test_without_a_ratio_the_loader_reads_every_row():
    loader = make_loader(_dataset(), TrainingConfig(batch_size=8), shuffle=True)
    assert loader.sampler is not None and not isinstance(loader.sampler, NegativeDownsampler)
    assert sorted(int(i) for _x, ids, _t in loader for i in ids[:, 0]) == list(range(100))
