"""The optimisation recipe of one fit: scratch (one Adam rate) or finetune (a pretrained backbone).

``resolve_recipe`` turns ``model`` + ``training`` into a ``Recipe`` (the kind and every number it uses);
``MelanomaModule`` builds its optimizer from ``build_optimizer`` / ``param_groups``, scales each step by
``warmup_factor`` and sets the backbone's trainability and BatchNorm mode with ``apply_backbone_mode``.
``Recipe.to_dict()`` is what a fold's ``result.json`` records.

Finetune, in order of the fit:

1. ``freeze_backbone_epochs``: the backbone gets no gradient and runs in eval mode; head and metadata MLP
   train at their full scheduled rate.
2. Warmup: from the first step the backbone trains, ``warmup_epochs`` x steps-per-epoch optimizer steps
   scale every group's scheduled rate by ``(k + 1) / W`` (step ``k``), then 1.
3. Throughout: AdamW, head/metadata MLP at ``finetune.learning_rate``, backbone at that x
   ``backbone_lr_scale`` (default 1: a lower backbone rate lost AUC on real images here), weight decay on weights only; the configured ``training.scheduler`` (cosine over
   the recipe's epochs, plateau or none) decays the rates per epoch; below ``bn_freeze_below_batch`` the
   backbone's BatchNorm keeps its pretrained running statistics (affine parameters still train).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

from melanoma_ml.config import ModelConfig, TrainingConfig
from melanoma_ml.errors import InputValueError

RecipeKind = Literal["scratch", "finetune"]


@dataclass(frozen=True)
class Recipe:
    """What one fit uses, resolved from the config (no "auto" left).

    Attributes:
        kind: ``scratch`` (today's single-rate Adam) or ``finetune``.
        requested: ``training.finetune.recipe`` as configured (``auto``, ``scratch`` or ``finetune``).
        optimizer: ``adam`` (scratch) or ``adamw`` (finetune).
        learning_rate: Rate of the head and metadata MLP (scratch: of the whole network).
        backbone_learning_rate: Rate of the backbone (scratch: the same as ``learning_rate``).
        weight_decay: Adam's L2 (scratch, every parameter) or AdamW's decoupled decay (finetune, weights only).
        epochs: ``Trainer(max_epochs=...)`` and the cosine schedule's length.
        scheduler: ``training.scheduler``.
        warmup_epochs: Linear warmup length in epochs, counted from the first epoch the backbone trains.
        freeze_backbone_epochs: Leading epochs with the backbone frozen.
        bn_frozen: The backbone's BatchNorm runs in eval mode the whole fit (batch below the threshold).
    """

    kind: RecipeKind
    requested: str
    optimizer: Literal["adam", "adamw"]
    learning_rate: float
    backbone_learning_rate: float
    weight_decay: float
    epochs: int
    scheduler: str
    warmup_epochs: float = 0.0
    freeze_backbone_epochs: int = 0
    bn_frozen: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe record of the recipe (``result.json``'s ``recipe``)."""
        return asdict(self)


def resolve_recipe(model: ModelConfig, training: TrainingConfig) -> Recipe:
    """The recipe ``training.finetune.recipe`` names; ``auto`` is finetune unless ``model.pretrained`` is False.

    Scratch reproduces the single-rate optimisation every model had before recipes existed: Adam over the
    whole network at ``training.learning_rate`` with ``training.weight_decay`` and ``training.epochs``.
    """
    tune = training.finetune
    auto: RecipeKind = "scratch" if model.pretrained_for(model.backbone) is False else "finetune"
    kind: RecipeKind = auto if tune.recipe == "auto" else tune.recipe
    if kind == "scratch":
        return Recipe(
            kind="scratch",
            requested=tune.recipe,
            optimizer="adam",
            learning_rate=training.learning_rate,
            backbone_learning_rate=training.learning_rate,
            weight_decay=training.weight_decay,
            epochs=training.epochs,
            scheduler=training.scheduler,
        )
    return Recipe(
        kind="finetune",
        requested=tune.recipe,
        optimizer="adamw",
        learning_rate=tune.learning_rate,
        backbone_learning_rate=tune.learning_rate * tune.backbone_lr_scale,
        weight_decay=tune.weight_decay,
        epochs=tune.epochs if tune.epochs is not None else training.epochs,
        scheduler=training.scheduler,
        warmup_epochs=tune.warmup_epochs,
        freeze_backbone_epochs=tune.freeze_backbone_epochs,
        bn_frozen=training.batch_size < tune.bn_freeze_below_batch,
    )


def _backbone(net: nn.Module) -> nn.Module:
    backbone = getattr(net, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise InputValueError(
            f"the finetune recipe needs a network with a .backbone module (melanoma_ml.model.MelanomaNet); "
            f"got {type(net).__name__}; set training.finetune.recipe='scratch' for other networks"
        )
    return backbone


def _no_decay(parameter: nn.Parameter) -> bool:
    """Biases and normalisation scales/shifts (every tensor of at most one dimension) get no weight decay."""
    return parameter.ndim <= 1


def param_groups(net: nn.Module, recipe: Recipe) -> list[dict[str, Any]]:
    """The optimizer's parameter groups; every parameter of ``net`` is in exactly one.

    Scratch: one group (every parameter; the optimizer's own ``lr``/``weight_decay``). Finetune, each named
    (``name``) and omitted when empty: ``head`` and ``head_no_decay`` (everything outside ``net.backbone``:
    metadata MLP and head) at ``learning_rate``, then ``backbone`` and ``backbone_no_decay`` at
    ``backbone_learning_rate``; ``*_no_decay`` (biases, norm parameters) without weight decay. The head
    comes first, so the history's ``lr`` column (group 0 at each epoch's start, before warmup scaling) is
    the head's scheduled rate.
    """
    if recipe.kind == "scratch":
        return [{"params": list(net.parameters())}]
    in_backbone = {id(p) for p in _backbone(net).parameters()}
    buckets: dict[str, list[nn.Parameter]] = {
        "head": [],
        "head_no_decay": [],
        "backbone": [],
        "backbone_no_decay": [],
    }
    for parameter in net.parameters():
        part = "backbone" if id(parameter) in in_backbone else "head"
        buckets[part + ("_no_decay" if _no_decay(parameter) else "")].append(parameter)
    groups = []
    for group_name, params in buckets.items():
        if not params:
            continue
        groups.append(
            {
                "name": group_name,
                "params": params,
                "lr": recipe.backbone_learning_rate
                if group_name.startswith("backbone")
                else recipe.learning_rate,
                "weight_decay": 0.0 if group_name.endswith("_no_decay") else recipe.weight_decay,
            }
        )
    return groups


def build_optimizer(net: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """Adam (scratch, exactly ``Adam(net.parameters(), lr, weight_decay)``) or AdamW over ``param_groups``."""
    if recipe.kind == "scratch":
        return torch.optim.Adam(net.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    return torch.optim.AdamW(
        param_groups(net, recipe), lr=recipe.learning_rate, weight_decay=recipe.weight_decay
    )


def backbone_frozen(epoch: int, recipe: Recipe) -> bool:
    """Whether the backbone is frozen in (0-based) ``epoch``."""
    return recipe.kind == "finetune" and epoch < recipe.freeze_backbone_epochs


def warmup_factor(step: int, steps_per_epoch: int, recipe: Recipe) -> float:
    """Multiplier of every group's scheduled rate at (0-based) optimizer ``step``.

    1 while the backbone is frozen and after the warmup; in between, step ``k`` of the
    ``W = round(warmup_epochs x steps_per_epoch)`` warmup steps (``k = 0`` at the first step after the
    frozen epochs) gets ``(k + 1) / W``.
    """
    if recipe.kind == "scratch" or recipe.warmup_epochs <= 0:
        return 1.0
    if steps_per_epoch < 1:
        raise InputValueError(f"steps_per_epoch must be at least 1, got {steps_per_epoch}")
    warmup_steps = max(1, round(recipe.warmup_epochs * steps_per_epoch))
    k = step - recipe.freeze_backbone_epochs * steps_per_epoch
    if k < 0:
        return 1.0
    return min(1.0, (k + 1) / warmup_steps)


def apply_backbone_mode(net: nn.Module, recipe: Recipe, epoch: int) -> None:
    """Set the backbone's trainability and train/eval mode for ``epoch`` (call at each epoch's start).

    Frozen epochs: no gradients and the whole backbone in eval mode. Otherwise it trains, with its
    BatchNorm layers in eval mode when ``recipe.bn_frozen`` (running statistics kept, affine trained).
    Scratch leaves the network as it is.
    """
    if recipe.kind == "scratch":
        return
    backbone = _backbone(net)
    frozen = backbone_frozen(epoch, recipe)
    backbone.requires_grad_(not frozen)
    if frozen:
        backbone.eval()
        return
    if net.training:
        backbone.train()
    if recipe.bn_frozen:
        for module in backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def steps_per_epoch(num_training_batches: float, accumulate_grad_batches: int) -> int:
    """Optimizer steps in one epoch (Lightning's ``trainer.num_training_batches`` may be ``inf``)."""
    if not math.isfinite(num_training_batches):
        raise InputValueError(
            "the finetune warmup needs a training loader with a length; set training.finetune.warmup_epochs=0 "
            "for an iterable dataset"
        )
    return max(1, math.ceil(int(num_training_batches) / max(1, accumulate_grad_batches)))
