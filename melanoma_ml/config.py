"""The one home of defaults for the whole project.

Every layer (CLI, Dagster launchpad config, Gradio app, tests) builds these models and overrides
fields; nothing else hard-codes a hyperparameter. ``PipelineConfig`` is a pydantic-settings model:
environment variables with the ``MELANOMA_`` prefix and ``__`` as nesting delimiter override fields
(``MELANOMA_TRAINING__EPOCHS=3``), as does a ``.env`` file in the working directory.

Profiles (``demo``, ``full``, ``tiny``) are named starting points; ``load_config(profile, overrides)``
merges overrides onto a profile.
"""

from __future__ import annotations

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


DatasetLayout = Literal["auto", "isic2020", "isic2019", "ham10000", "isic_cli"]
"""``auto`` detects the layout from the files in the folder (``melanoma_ml.metadata.layouts``)."""


class ExternalSource(_Strict):
    """An extra dataset whose rows are used for training only, e.g. ISIC 2019 added to ISIC 2020."""

    path: str = Field(description="Dataset folder or metadata CSV file (any ISIC layout).")
    layout: DatasetLayout = "auto"
    image_dir: str | None = Field(None, description="Image folder; None auto-detects it beside the table.")
    name: str | None = Field(
        None,
        description="Value of the source column; None uses the layout's name (ISIC2020, ISIC2019, HAM10000, "
        "ISIC-archive). Set it when two sources share a layout.",
    )
    require_labels: bool | Literal["auto"] = Field(
        "auto",
        description="auto: labels are required unless the source is ISIC 2019 metadata without its "
        "ground-truth file (a supplementary table whose values are compared with, and fill gaps in, the "
        "other sources; its images no labelled source lists are quarantined as no_label).",
    )


class DataConfig(_Strict):
    """Where the data come from and how they are split."""

    source_dir: str | None = Field(
        None,
        description="Folder with an ISIC-layout dataset (ISIC 2020/2019, HAM10000 or isic-cli export). "
        "None uses the built-in synthetic demo set generated under the artifact root.",
    )
    image_dir: str | None = Field(
        None,
        description="Image folder; None auto-detects (jpeg/train, train, images, ...) inside source_dir.",
    )
    layout: DatasetLayout = "auto"
    external_sources: list[ExternalSource] = Field(
        default_factory=list,
        description="Extra datasets for training only (never validated on), merged with the primary one "
        "(duplicates by id and image content removed, disagreements recorded). Env: "
        'MELANOMA_DATA__EXTERNAL_SOURCES=\'[{"path": "/data/isic2019"}]\'.',
    )
    n_folds: int = Field(5, ge=2, description="Number of patient-grouped stratified folds.")
    fold_seed: int = 42
    fold_prevalence_tolerance: float = Field(
        0.3,
        gt=0,
        description="folds.fold_problems flags a fold whose melanoma rate differs from the overall rate by "
        "more than this fraction of it (0.3: 1.76% +/- 0.53 points).",
    )
    image_size: int = Field(256, ge=16, description="Training image side; the image cache is keyed by it.")
    synthetic: SyntheticConfig = SyntheticConfig()


_TRUE_WORDS = frozenset({"true", "1", "yes"})
_FALSE_WORDS = frozenset({"false", "0", "no"})
"""Case-insensitive strings read as ``ModelConfig.pretrained`` flags rather than weights paths."""


class ModelConfig(_Strict):
    """The network: a timm backbone fused with a metadata MLP."""

    backbone: str = Field("efficientnet_b0", description="Any timm model name.")
    pretrained: PretrainedSpec = Field(
        True, description="True: hub ImageNet weights; False: random init; a path: local weights file."
    )
    meta_hidden: list[int] = Field(default_factory=lambda: [128, 64])
    meta_dropout: float = Field(0.3, ge=0, lt=1)
    head_dropout: float = Field(0.3, ge=0, lt=1)

    @field_validator("pretrained", mode="before")
    @classmethod
    def _pretrained_flag_words(cls, v: Any) -> Any:
        """Environment variables and ``.env`` files give strings: ``MELANOMA_MODEL__PRETRAINED=false`` must
        mean random init, not a weights file called "false". Any other string stays a path."""
        if isinstance(v, str):
            word = v.strip().lower()
            if word in _TRUE_WORDS:
                return True
            if word in _FALSE_WORDS:
                return False
        return v

    @field_validator("meta_hidden")
    @classmethod
    def _positive_hidden(cls, v: list[int]) -> list[int]:
        if not v or any(h <= 0 for h in v):
            raise ValueError("meta_hidden must be a non-empty list of positive layer widths, e.g. [128, 64]")
        return v


class AugmentationConfig(_Strict):
    """Training augmentation: probabilities (``p``) and magnitudes of each albumentations transform."""

    hflip: float = Field(0.5, ge=0, le=1)
    vflip: float = Field(0.5, ge=0, le=1)
    rotate90: float = Field(0.5, ge=0, le=1)
    rotate_limit: int = Field(30, ge=0, le=180, description="Affine rotation range in degrees (+/-).")
    affine: float = Field(0.5, ge=0, le=1, description="Probability of the shift/scale/rotate affine.")
    shift_limit: float = Field(0.0625, ge=0, lt=1, description="Affine shift as a fraction of the side.")
    scale_limit: float = Field(0.1, ge=0, lt=1, description="Affine zoom range (+/- fraction).")
    color_jitter: float = Field(0.5, ge=0, le=1)
    jitter_strength: float = Field(
        0.2, ge=0, lt=1, description="Brightness/contrast/saturation jitter range (+/- fraction)."
    )
    jitter_hue: float = Field(
        0.05, ge=0, le=0.5, description="Hue jitter range (+/- fraction of the circle)."
    )
    coarse_dropout: float = Field(0.3, ge=0, le=1)
    dropout_holes: tuple[int, int] = Field((1, 8), description="Inclusive range of dropped rectangles.")
    dropout_size: tuple[float, float] = Field(
        (0.05, 0.1), description="Side range of a dropped rectangle as a fraction of the image side."
    )


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
    fixed_threshold: float = Field(
        0.5, gt=0, lt=1, description="Second reported operating point, besides the tuned threshold."
    )
    subgroup_min_cases: int = Field(
        5,
        ge=1,
        description="A subgroup's AUC is reported only with at least this many melanoma and benign images.",
    )
    promotion_auc_floor: float = Field(
        0.70, ge=0, le=1, description="Candidate's AUC lower CI bound must exceed this to be promoted."
    )


class ServingConfig(_Strict):
    """The Gradio app and the model service behind it."""

    tta: bool = True
    cam_method: Literal["eigencam", "gradcam"] = Field(
        "gradcam",
        description="Default CAM in the app. Grad-CAM is class-specific and, with grad-cam 1.5.7's full SVD, "
        "several times faster than EigenCAM on efficientnet_b0 (benchmarks/serving_latency.py).",
    )
    host: str = "127.0.0.1"
    port: int = 7860
    reload_check_interval_s: float = Field(
        0.0,
        ge=0,
        description="Seconds between checks of the registry's current pointer; 0 checks on every request "
        "(one stat of a small file locally; raise it for remote artifact roots).",
    )
    queue_max_size: int = Field(
        16, ge=1, description="Requests waiting in the Gradio queue before new ones are refused."
    )
    concurrency_limit: int = Field(2, ge=1, description="Requests the app runs at the same time.")
    max_upload_mb: int = Field(25, ge=1, description="Largest accepted upload in megabytes.")
    max_image_pixels: int = Field(
        50_000_000,
        ge=1,
        description="Uploads whose header declares more pixels are refused (decompression bombs).",
    )
    max_image_side: int = Field(
        1024,
        ge=16,
        description="Uploads are downscaled (keeping aspect) to at most this side before inference.",
    )
    file_max_age_s: int = Field(
        3600, ge=60, description="Uploads and result images older than this are deleted from the app's cache."
    )
    cam_min_map_side: int = Field(
        4,
        ge=1,
        description="Smallest feature-map side (cells) a CAM target layer may have at the model's input "
        "size: the default layer is the preferred one that keeps at least this, and coarser layers are "
        "refused (a 1x1 or 2x2 map cannot show where the network looked).",
    )
    min_age: float = Field(
        0,
        ge=0,
        description="Smallest age the app accepts; an accepted 0 means unknown (ISIC's code, as in cleaning).",
    )
    max_age: float = Field(120, gt=0, description="Largest age the app accepts.")


class PipelineConfig(BaseSettings):
    """Everything one run needs. Build with ``load_config``."""

    model_config = SettingsConfigDict(
        env_prefix="MELANOMA_", env_nested_delimiter="__", env_file=".env", extra="forbid"
    )

    artifact_root: str = Field(
        "artifacts",
        description="Local path or file:// URL for every artifact; remote object stores are not supported "
        "for training artifacts (mount them and point artifact_root at the mount).",
    )
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
