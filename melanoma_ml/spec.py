"""What it takes to rebuild a trained network without pickles: the model spec.

A fold checkpoint and a serving bundle both store ``weights.safetensors`` next to a JSON file holding a
``ModelSpec``. ``spec.build_network()`` recreates the exact architecture (random init, no hub access) so
the safetensors state dict can be loaded into it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from melanoma_ml.features import MetadataEncoder


@dataclass(frozen=True)
class ModelSpec:
    """Architecture and preprocessing of a trained network.

    Attributes:
        backbone: timm model name.
        meta_hidden: Hidden widths of the metadata MLP.
        meta_dropout: Dropout of the metadata MLP.
        head_dropout: Dropout before the fused linear head.
        image_size: Square input side in pixels the network was trained at.
        mean: Per-channel normalization mean (0-1 scale).
        std: Per-channel normalization std (0-1 scale).
        encoder: The fitted metadata encoder.
    """

    backbone: str
    meta_hidden: list[int]
    meta_dropout: float
    head_dropout: float
    image_size: int
    mean: list[float]
    std: list[float]
    encoder: MetadataEncoder = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["encoder"] = self.encoder.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        try:
            return cls(
                backbone=str(data["backbone"]),
                meta_hidden=[int(h) for h in data["meta_hidden"]],
                meta_dropout=float(data["meta_dropout"]),
                head_dropout=float(data["head_dropout"]),
                image_size=int(data["image_size"]),
                mean=[float(m) for m in data["mean"]],
                std=[float(s) for s in data["std"]],
                encoder=MetadataEncoder.from_dict(data["encoder"]),
            )
        except KeyError as exc:
            raise ValueError(f"model spec is missing field {exc}; the checkpoint or bundle is incomplete") from exc

    def build_network(self):  # -> MelanomaNet (lazy import keeps this module torch-free)
        """A fresh network with this architecture and random weights (never touches the hub)."""
        from melanoma_ml.config import ModelConfig
        from melanoma_ml.model import build_model

        config = ModelConfig(
            backbone=self.backbone,
            pretrained=False,
            meta_hidden=list(self.meta_hidden),
            meta_dropout=self.meta_dropout,
            head_dropout=self.head_dropout,
        )
        return build_model(config, self.encoder.n_features)
