"""Resources: where artifacts go, what hardware trains, where data come from, and the run's settings.

None of these redeclare a default: ``None`` means "keep what the profile in ``melanoma_ml.config`` says".
``PipelineSettings.config()`` merges profile -> ``MELANOMA_*`` env -> ``overrides_json`` -> typed fields
-> the nested resources, and returns the one ``PipelineConfig`` every step receives.
"""

from __future__ import annotations

import json
from typing import Any

import dagster as dg
from pydantic import Field, ValidationError, field_validator

from melanoma_ml.config import PipelineConfig, deep_merge, load_config


class ArtifactStorage(dg.ConfigurableResource):
    """Root folder of every artifact (tables, image cache, checkpoints, reports, registry)."""

    root: str | None = Field(
        default=None,
        description="Local path or file:// URL (other fsspec URLs such as s3://... are refused with advice: "
        "the steps memory-map and atomically rename files; for S3 set MELANOMA_ARTIFACT_STORE and this is "
        "each worker's local working copy). None keeps the profile's artifact_root.",
    )


class TrainingHardware(dg.ConfigurableResource):
    """What trains: maps onto ``TrainingConfig`` accelerator/devices/strategy/device_pool/precision/num_workers.

    On a machine with several GPUs, ``device_pool`` lists what concurrent trainings lease (one each) and
    the instance's ``training`` pool limit must equal the pool size divided by ``devices`` (dagster.yaml).
    """

    accelerator: str | None = Field(
        default=None, description="auto, cpu, gpu or mps; None keeps the profile's."
    )
    devices: str | None = Field(
        default=None, description="Devices ONE training uses (2+: data-parallel), e.g. 1, 2 or auto."
    )
    strategy: str | None = Field(default=None, description="auto, ddp_spawn or ddp_fork (several devices).")
    device_pool: str | None = Field(
        default=None,
        description="Devices concurrent trainings lease, e.g. cuda:0,cuda:1; auto (every CUDA device) or off.",
    )
    precision: str | None = Field(
        default=None,
        description="e.g. 32-true, 16-mixed, bf16-mixed, or auto (bf16-mixed where the GPU has it).",
    )
    num_workers: str | None = Field(
        default=None, description="DataLoader workers, e.g. 0, 4 or auto (min(usable CPUs - 1, 8))."
    )

    @field_validator("num_workers", mode="before")
    @classmethod
    def _count_as_text(cls, v: Any) -> Any:
        """Dagster config has no int-or-str type: a count arrives as text and pydantic reads it back."""
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


class DataSource(dg.ConfigurableResource):
    """Where the images and metadata come from: maps onto ``DataConfig``."""

    source_dir: str | None = Field(
        default=None,
        description="ISIC-layout folder (ISIC 2020/2019, HAM10000, isic-cli). None keeps the profile's "
        "(the demo profile uses the built-in synthetic set).",
    )
    image_dir: str | None = Field(default=None, description="Image folder; None auto-detects.")
    layout: str | None = Field(default=None, description="auto, isic2020, isic2019, ham10000 or isic_cli.")


class PipelineSettings(dg.ConfigurableResource):
    """The run's settings: a profile plus overrides, resolved into ``melanoma_ml.config.PipelineConfig``.

    Launchpad example::

        resources:
          settings:
            config:
              overrides_json: '{"training": {"epochs": 3}, "evaluation": {"n_bootstrap": 200}}'
    """

    profile: str = Field(description="Profile in melanoma_ml.config.PROFILES (env MELANOMA_PROFILE).")
    overrides_json: str = Field(
        default="{}", description='JSON object merged onto the profile, e.g. {"training": {"epochs": 3}}.'
    )
    epochs: int | None = Field(default=None, description="Shortcut for training.epochs.")
    batch_size: int | None = Field(default=None, description="Shortcut for training.batch_size.")
    learning_rate: float | None = Field(default=None, description="Shortcut for training.learning_rate.")
    storage: ArtifactStorage
    hardware: TrainingHardware
    source: DataSource

    def overrides(self) -> dict[str, Any]:
        """Every override as one nested dict (later entries win)."""
        try:
            from_json = json.loads(self.overrides_json or "{}")
        except json.JSONDecodeError as exc:
            raise dg.Failure(
                f"resources.settings.config.overrides_json is not valid JSON ({exc}); give an object such as "
                '{"training": {"epochs": 3}}'
            ) from exc
        if not isinstance(from_json, dict):
            raise dg.Failure("resources.settings.config.overrides_json must be a JSON object, e.g. {}")
        typed = {
            "training": _present(
                epochs=self.epochs,
                batch_size=self.batch_size,
                learning_rate=self.learning_rate,
                accelerator=self.hardware.accelerator,
                devices=self.hardware.devices,
                strategy=self.hardware.strategy,
                device_pool=self.hardware.device_pool,
                precision=self.hardware.precision,
                num_workers=self.hardware.num_workers,
            ),
            "data": _present(
                source_dir=self.source.source_dir, image_dir=self.source.image_dir, layout=self.source.layout
            ),
            **_present(artifact_root=self.storage.root),
        }
        return deep_merge(from_json, {k: v for k, v in typed.items() if v != {}})

    def config(self) -> PipelineConfig:
        """The validated ``PipelineConfig`` of this run.

        Raises:
            dagster.Failure: invalid settings, with pydantic's field-by-field explanation.
        """
        try:
            return load_config(self.profile, self.overrides())
        except ValidationError as exc:
            raise dg.Failure(f"invalid pipeline settings (profile {self.profile!r}):\n{exc}") from exc
        except ValueError as exc:
            raise dg.Failure(str(exc)) from exc


def _present(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def default_settings(profile: str, overrides: dict[str, Any] | None = None) -> PipelineSettings:
    """The resource the definitions use: the profile, nothing overridden (or ``overrides`` as its JSON)."""
    return PipelineSettings(
        profile=profile,
        overrides_json=json.dumps(overrides or {}),
        storage=ArtifactStorage(),
        hardware=TrainingHardware(),
        source=DataSource(),
    )
