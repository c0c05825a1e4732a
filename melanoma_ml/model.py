"""The network: a timm image backbone fused with a metadata MLP, ending in one melanoma logit."""

from __future__ import annotations

import difflib
from pathlib import Path

import timm
import torch
from torch import nn

from melanoma_ml.config import ModelConfig, PretrainedSpec
from melanoma_ml.errors import InputStateError, InputValueError
from melanoma_ml.weights_import import imported_backbone_state, package_name


class PretrainedWeightsUnavailable(InputStateError):
    """Raised when ImageNet weights cannot be loaded (offline machine, missing file)."""


def validate_backbone(name: str) -> None:
    """Fail early, with suggestions, when ``name`` is not a timm model.

    Raises:
        ValueError: unknown model name.
    """
    if timm.is_model(name):
        return
    scored = [(difflib.SequenceMatcher(None, name, m).ratio(), m) for m in timm.list_models()]
    close = [m for score, m in sorted(scored, key=lambda t: (-t[0], t[1])) if score >= 0.6][:5]
    hint = f" Did you mean: {', '.join(close)}?" if close else " See timm.list_models() for names."
    raise InputValueError(f"unknown backbone {name!r}: it is not a timm model name.{hint}")


def create_backbone(name: str, pretrained: PretrainedSpec) -> nn.Module:
    """A timm model without its classifier (``num_classes=0``): it returns pooled features.

    Args:
        name: timm model name, e.g. ``efficientnet_b0``.
        pretrained: ``True`` (hub weights), ``False`` (random init), ``package:NAME`` (the weights file an
            installed package ships, mapped and known-answer checked by ``melanoma_ml.weights_import``) or
            a path to a local weights file.
    """
    validate_backbone(name)
    if pretrained is False:
        return timm.create_model(name, pretrained=False, num_classes=0)
    if package_name(pretrained) is not None:
        state, _ = imported_backbone_state(str(pretrained), name)
        backbone = timm.create_model(name, pretrained=False, num_classes=0)
        backbone.load_state_dict(state, strict=True)
        return backbone
    if isinstance(pretrained, str | Path) and not isinstance(pretrained, bool):
        weights = Path(pretrained).expanduser()
        if not weights.is_file():
            raise PretrainedWeightsUnavailable(
                f"local weights file not found: {weights}; set model.pretrained to an existing "
                ".safetensors/.pth file, True for hub weights, or False for random init"
            )
        overlay = {"file": str(weights.resolve())}
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=0)
    try:
        return timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as exc:  # the hub raises many types (OSError, LocalEntryNotFoundError, HTTPError, ...)
        raise PretrainedWeightsUnavailable(
            f"could not load ImageNet weights for {name!r} from the model hub ({type(exc).__name__}: {exc}). "
            "On an offline machine download the weights elsewhere (e.g. "
            f"timm.create_model('{name}', pretrained=True) then save state_dict with safetensors) and set "
            "model.pretrained to that file's path (env MELANOMA_MODEL__PRETRAINED=/path/weights.safetensors), "
            "or set model.pretrained=false to train from scratch."
        ) from exc


class MetadataMLP(nn.Module):
    """Linear -> BatchNorm -> ReLU -> Dropout for each hidden width."""

    def __init__(self, in_features: int, hidden: list[int], dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = h
        self.net = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MelanomaNet(nn.Module):
    """Image features and metadata embedding concatenated into a linear head producing one logit.

    ``forward(image, metadata)`` returns logits of shape ``(batch,)``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        n_meta_features: int,
        meta_hidden: list[int],
        meta_dropout: float = 0.3,
        head_dropout: float = 0.3,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.n_meta_features = n_meta_features
        self.meta = MetadataMLP(n_meta_features, meta_hidden, meta_dropout)
        self.head = nn.Sequential(
            nn.Dropout(head_dropout), nn.Linear(backbone.num_features + self.meta.out_features, 1)
        )

    def forward(self, image: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
        features = self.backbone(image)
        embedded = self.meta(metadata)
        return self.head(torch.cat([features, embedded], dim=1)).squeeze(1)


def build_model(config: ModelConfig, n_meta_features: int) -> MelanomaNet:
    """Build the fused network described by ``config`` for ``n_meta_features`` metadata inputs."""
    backbone = create_backbone(config.backbone, config.pretrained_for(config.backbone))
    return MelanomaNet(
        backbone,
        n_meta_features=n_meta_features,
        meta_hidden=list(config.meta_hidden),
        meta_dropout=config.meta_dropout,
        head_dropout=config.head_dropout,
    )


def normalization_for(backbone: nn.Module) -> dict[str, list[float]]:
    """Mean/std the backbone expects, from ``timm.data.resolve_model_data_config``."""
    data_config = timm.data.resolve_model_data_config(backbone)
    return {"mean": [float(m) for m in data_config["mean"]], "std": [float(s) for s in data_config["std"]]}
