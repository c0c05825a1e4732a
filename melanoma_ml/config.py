"""The one home of defaults for the whole project.

Every layer (CLI, Dagster launchpad config, Gradio app, tests) builds these models and overrides
fields; nothing else hard-codes a hyperparameter. ``PipelineConfig`` is a pydantic-settings model:
environment variables with the ``MELANOMA_`` prefix and ``__`` as nesting delimiter override fields
(``MELANOMA_TRAINING__EPOCHS=3``), as does a ``.env`` file in the working directory.

Profiles (``demo``, ``full``, ``tiny``) are named starting points; ``load_config(profile, overrides)``
merges overrides onto a profile.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PretrainedSpec = bool | str
"""``True`` downloads ImageNet weights from the hub, ``False`` starts from random weights, and a
string is a path to a local weights file (``.safetensors``, ``.pth`` or ``.bin``) for air-gapped sites."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticConfig(_Strict):
    """Built-in synthetic demo data (ISIC 2020 layout, generated, never committed)."""

    n_patients: int = Field(120, ge=2, description="Number of synthetic patients.")
    images_per_patient: tuple[int, int] = Field((2, 6), description="Inclusive range of images per patient.")
    melanoma_rate: float = Field(0.2, gt=0, lt=1, description="Fraction of lesions that are melanoma.")
    image_size: int = Field(512, ge=32, description="Side of the generated originals in pixels.")
    seed: int = 0


class DataConfig(_Strict):
    """Where the data come from and how they are split."""

    source_dir: str | None = Field(
        None,
        description="Folder with an ISIC-layout dataset (ISIC 2020/2019, HAM10000 or isic-cli export). "
        "None uses the built-in synthetic demo set generated under the artifact root.",
    )
    image_dir: str | None = Field(
        None, description="Image folder; None auto-detects (jpeg/train, train, images, ...) inside source_dir."
    )
    layout: Literal["auto", "isic2020", "isic2019", "ham10000", "isic_cli"] = "auto"
    n_folds: int = Field(5, ge=2, description="Number of patient-grouped stratified folds.")
    fold_seed: int = 42
    image_size: int = Field(256, ge=16, description="Training image side; the image cache is keyed by it.")
    synthetic: SyntheticConfig = SyntheticConfig()


class ModelConfig(_Strict):
    """The network: a timm backbone fused with a metadata MLP."""

    backbone: str = Field("efficientnet_b0", description="Any timm model name.")
    pretrained: PretrainedSpec = Field(
        True, description="True: hub ImageNet weights; False: random init; a path: local weights file."
    )
    meta_hidden: list[int] = Field(default_factory=lambda: [128, 64])
    meta_dropout: float = Field(0.3, ge=0, lt=1)
    head_dropout: float = Field(0.3, ge=0, lt=1)

    @field_validator("meta_hidden")
    @classmethod
    def _positive_hidden(cls, v: list[int]) -> list[int]:
        if not v or any(h <= 0 for h in v):
            raise ValueError("meta_hidden must be a non-empty list of positive layer widths, e.g. [128, 64]")
        return v


class AugmentationConfig(_Strict):
    hflip: float = 0.5
    vflip: float = 0.5
    rotate90: float = 0.5
    rotate_limit: int = 30
    color_jitter: float = 0.5
    coarse_dropout: float = 0.3


class TrainingConfig(_Strict):
    """Optimisation and hardware settings for one fold."""

    epochs: int = Field(20, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    loss: Literal["focal", "bce"] = "focal"
    focal_alpha: float = Field(0.25, ge=0, le=1)
    focal_gamma: float = Field(2.0, ge=0)
    focal_reduction: Literal["mean", "sum"] = "mean"
    scheduler: Literal["cosine", "plateau", "none"] = "cosine"
    early_stopping_patience: int = Field(5, ge=1)
    seed: int = 42
    accelerator: Literal["auto", "cpu", "gpu", "mps"] = "auto"
    devices: int | str = "auto"
    precision: str = Field("32-true", description="Lightning precision, e.g. 32-true, 16-mixed, bf16-mixed.")
    num_workers: int = Field(0, ge=0)
    limit_train_batches: int | float | None = None
    augmentation: AugmentationConfig = AugmentationConfig()


class EvaluationConfig(_Strict):
    """Out-of-fold evaluation, bootstrap and promotion gate settings."""

    target_sensitivity: float = Field(0.90, gt=0, lt=1)
    n_bootstrap: int = Field(1000, ge=50)
    ci_level: float = Field(0.95, gt=0.5, lt=1)
    bootstrap_seed: int = 0
    pauc_min_tpr: float = Field(0.80, ge=0, lt=1)
    ece_bins: int = Field(10, ge=2)
    promotion_auc_floor: float = Field(
        0.70, ge=0, le=1, description="Candidate's AUC lower CI bound must exceed this to be promoted."
    )


class ServingConfig(_Strict):
    tta: bool = True
    cam_method: Literal["eigencam", "gradcam"] = "eigencam"
    host: str = "127.0.0.1"
    port: int = 7860


class PipelineConfig(BaseSettings):
    """Everything one run needs. Build with ``load_config``."""

    model_config = SettingsConfigDict(
        env_prefix="MELANOMA_", env_nested_delimiter="__", env_file=".env", extra="forbid"
    )

    artifact_root: str = Field("artifacts", description="Local path or fsspec URL for every artifact.")
    backbones: list[str] = Field(default_factory=lambda: ["efficientnet_b0"])
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    serving: ServingConfig = ServingConfig()

    @model_validator(mode="after")
    def _backbones_present(self) -> PipelineConfig:
        if not self.backbones:
            raise ValueError("backbones must name at least one timm model, e.g. ['efficientnet_b0']")
        return self

    def model_for(self, backbone: str) -> ModelConfig:
        """The model config with ``backbone`` swapped in."""
        return self.model.model_copy(update={"backbone": backbone})


PROFILES: dict[str, dict[str, Any]] = {
    # Runs the whole graph on a 2-core laptop in minutes: synthetic data, two tiny timm backbones.
    "demo": {
        "backbones": ["test_efficientnet", "test_resnet"],
        "data": {
            "n_folds": 3,
            "image_size": 64,
            "synthetic": {"n_patients": 120, "images_per_patient": (2, 6), "image_size": 512},
        },
        "model": {"pretrained": False},
        "training": {"epochs": 8, "batch_size": 32, "learning_rate": 3e-3, "early_stopping_patience": 4},
        "evaluation": {"n_bootstrap": 300, "promotion_auc_floor": 0.6},
    },
    # Seconds, for tests.
    "tiny": {
        "backbones": ["test_efficientnet"],
        "data": {
            "n_folds": 2,
            "image_size": 32,
            "synthetic": {"n_patients": 24, "images_per_patient": (2, 3), "image_size": 96},
        },
        "model": {"pretrained": False, "meta_hidden": [16, 8]},
        "training": {"epochs": 2, "batch_size": 16, "learning_rate": 3e-3},
        "evaluation": {"n_bootstrap": 50, "promotion_auc_floor": 0.0},
    },
    # Real ISIC 2020 on a GPU.
    "full": {
        "backbones": ["efficientnet_b0", "densenet121", "resnet50", "convnext_tiny", "tf_efficientnetv2_s"],
        "data": {"n_folds": 5, "image_size": 256, "layout": "isic2020"},
        "model": {"pretrained": True},
        "training": {"epochs": 20, "batch_size": 32, "learning_rate": 1e-4, "num_workers": 4},
        "evaluation": {"n_bootstrap": 1000},
    },
}


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``override`` into a copy of ``base`` (override wins)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(profile: str | None = "demo", overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Build a ``PipelineConfig``: profile, then ``MELANOMA_*`` env vars / ``.env``, then ``overrides``.

    Raises:
        ValueError: unknown profile name (the message lists the known ones).
    """
    if profile is not None and profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    values = PROFILES[profile] if profile else {}
    merged = deep_merge(deep_merge(values, _environment_values()), overrides or {})
    return PipelineConfig(**merged)


def _environment_values() -> dict[str, Any]:
    """``MELANOMA_*`` variables and ``.env`` entries as a nested dict (env wins over ``.env``)."""
    from pydantic_settings import DotEnvSettingsSource, EnvSettingsSource

    dotenv = DotEnvSettingsSource(PipelineConfig)()
    env = EnvSettingsSource(PipelineConfig)()
    return deep_merge(dotenv, env)


def resolve_path(path: str | Path) -> Path:
    """Expand ``~`` and make a local path absolute (fsspec URLs are handled by ``storage``)."""
    return Path(path).expanduser().resolve()
