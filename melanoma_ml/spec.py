"""What it takes to rebuild a trained network without pickles: the model spec.

A fold checkpoint and a serving bundle both store ``weights.safetensors`` next to a JSON file holding a
``ModelSpec``. ``spec.build_network()`` recreates the exact architecture (random init, no hub access) so
the safetensors state dict can be loaded into it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from melanoma_ml.config import ModelConfig
from melanoma_ml.errors import InputValueError
from melanoma_ml.features import MetadataEncoder
from melanoma_ml.images.color_constancy import check_method
from melanoma_ml.weights_import import PretrainedLineage

ARCHITECTURE_FIELDS: tuple[str, ...] = tuple(
    name for name in ModelConfig.model_fields if name not in ("pretrained", "tabular_features")
)
"""The ``ModelConfig`` fields a spec keeps: all but ``pretrained`` (how the first weights were obtained
does not change the architecture, and a spec's network is always built with random init) and
``tabular_features`` (the fitted encoder records the tabular columns with their statistics; the spec's
network takes them from there, so specs written before tabular features existed read unchanged)."""


@dataclass(frozen=True)
class ModelSpec:
    """Architecture and preprocessing of a trained network.

    Attributes:
        network: The ``ModelConfig`` the network was built from (timm backbone, metadata MLP, dropouts);
            stored as a copy with ``pretrained=False``, so ``build_network`` never touches the hub.
        image_size: Square input side in pixels the network was trained at.
        mean: Per-channel normalization mean (0-1 scale).
        std: Per-channel normalization std (0-1 scale).
        encoder: The fitted metadata encoder.
        color_constancy: ``data.color_constancy`` at training time (``"none"`` or ``"shades_of_gray"``),
            applied by ``normalize_pixels`` before the mean/std wherever this spec's network sees pixels.
        pretrained: Where the backbone's first weights came from (``model.pretrained``: origin and
            sha256), or None: random init, or a spec written before lineage was recorded.

    On disk (``to_dict``) the ``ARCHITECTURE_FIELDS`` sit at the top level beside ``image_size``, ``mean``,
    ``std`` and ``encoder``, the shape every checkpoint and bundle has used, plus ``color_constancy`` when it
    is not ``"none"``: a spec without it (every one written before it existed) reads as ``"none"``, what its
    network was trained with, and such specs are written back unchanged. ``pretrained`` likewise is
    written only when set (readers that predate it ignore it).
    """

    network: ModelConfig
    image_size: int
    mean: list[float]
    std: list[float]
    encoder: MetadataEncoder = field(repr=False)
    color_constancy: str = "none"
    pretrained: PretrainedLineage | None = None

    def __post_init__(self) -> None:
        check_method(self.color_constancy)
        if not isinstance(self.network, ModelConfig):
            raise TypeError(
                f"ModelSpec.network must be a melanoma_ml.config.ModelConfig, got {type(self.network).__name__}; "
                "build it with ModelConfig(backbone=..., meta_hidden=...) or config.model_for(backbone)"
            )
        # A private copy: the caller's config stays mutable without changing this (frozen) spec. Its
        # tabular columns are the encoder's (one record of them: the encoder, which is what is stored).
        update = {"pretrained": False, "tabular_features": list(self.encoder.tabular)}
        object.__setattr__(self, "network", self.network.model_copy(update=update, deep=True))

    @property
    def backbone(self) -> str:
        """The timm model name (``network.backbone``)."""
        return self.network.backbone

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.network.model_dump(mode="json", include=set(ARCHITECTURE_FIELDS)),
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "encoder": self.encoder.to_dict(),
            **({"color_constancy": self.color_constancy} if self.color_constancy != "none" else {}),
            **({"pretrained": self.pretrained.to_dict()} if self.pretrained is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        """Rebuild from ``to_dict`` output (plain JSON; the network fields are validated by ``ModelConfig``)."""
        missing = [
            name
            for name in (*ARCHITECTURE_FIELDS, "image_size", "mean", "std", "encoder")
            if name not in data
        ]
        if missing:
            raise InputValueError(
                f"model spec is missing fields {missing}; the checkpoint or bundle is incomplete"
            )
        network = ModelConfig.model_validate({name: data[name] for name in ARCHITECTURE_FIELDS})
        return cls(
            network=network,
            image_size=int(data["image_size"]),
            mean=[float(m) for m in data["mean"]],
            std=[float(s) for s in data["std"]],
            encoder=MetadataEncoder.from_dict(data["encoder"]),
            color_constancy=str(data.get("color_constancy", "none")),
            pretrained=PretrainedLineage.from_dict(data["pretrained"]) if data.get("pretrained") else None,
        )

    def build_network(self):  # -> MelanomaNet (lazy import keeps this module torch-free)
        """A fresh network with this architecture and random weights (never touches the hub)."""
        from melanoma_ml.model import build_model

        return build_model(self.network, self.encoder.n_features)
