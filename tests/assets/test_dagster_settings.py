"""Launchpad settings map onto melanoma_ml.config; bad settings fail at launch with a clear message."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from melanoma_assets.assets.data import source_metadata
from melanoma_assets.resources import (
    ArtifactStorage,
    DataSource,
    PipelineSettings,
    TrainingHardware,
)
from melanoma_ml.artifacts import artifact_paths
from melanoma_ml.config import load_config


def settings(tmp_path: Path, **kwargs) -> PipelineSettings:
    parts = {
        "storage": ArtifactStorage(root=str(tmp_path / "artifacts")),
        "hardware": TrainingHardware(),
        "source": DataSource(),
    }
    parts.update({k: kwargs.pop(k) for k in list(kwargs) if k in parts})
    return PipelineSettings(profile=kwargs.pop("profile", "tiny"), **parts, **kwargs)


def test_unset_fields_keep_the_profile_defaults(tmp_path: Path) -> None:
    config = settings(tmp_path).config()
    expected = load_config("tiny", {"artifact_root": str(tmp_path / "artifacts")})
    assert config == expected


@pytest.mark.parametrize(
    ("kwargs", "path", "value"),
    [
        ({"epochs": 7}, ("training", "epochs"), 7),
        ({"overrides_json": '{"evaluation": {"n_bootstrap": 77}}'}, ("evaluation", "n_bootstrap"), 77),
        (
            {"hardware": TrainingHardware(accelerator="cpu", num_workers=2)},
            ("training", "accelerator"),
            "cpu",
        ),
        ({"hardware": TrainingHardware(precision="bf16-mixed")}, ("training", "precision"), "bf16-mixed"),
        ({"hardware": TrainingHardware(num_workers=2)}, ("training", "num_workers"), 2),
        ({"hardware": TrainingHardware(num_workers="auto")}, ("training", "num_workers"), "auto"),
        ({"source": DataSource(source_dir="/data/isic", layout="ham10000")}, ("data", "layout"), "ham10000"),
        ({"epochs": 3, "overrides_json": '{"training": {"epochs": 9}}'}, ("training", "epochs"), 3),
    ],
)
def test_overrides_reach_the_config(tmp_path: Path, kwargs: dict, path: tuple[str, str], value) -> None:
    config = settings(tmp_path, **kwargs).config()
    assert getattr(getattr(config, path[0]), path[1]) == value


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"overrides_json": '{"data": {"n_folds": 1}}'}, "n_folds"),
        ({"overrides_json": "{not json"}, "not valid JSON"),
        ({"overrides_json": "[1, 2]"}, "must be a JSON object"),
        ({"profile": "huge"}, "unknown profile"),
        ({"hardware": TrainingHardware(accelerator="tpu9")}, "accelerator"),
    ],
)
def test_bad_settings_fail_with_a_message(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(dg.Failure, match=message):
        settings(tmp_path, **kwargs).config()


@pytest.mark.parametrize(
    ("root", "local"),
    [
        ("relative/dir", True),
        ("file:///tmp/artifacts", True),
        ("s3://bucket/artifacts", False),
        ("gs://b/a", False),
    ],
)
def test_storage_accepts_local_paths_and_explains_remote_urls(tmp_path: Path, root: str, local: bool) -> None:
    config = settings(tmp_path, storage=ArtifactStorage(root=root)).config()
    if local:
        assert artifact_paths(config).root.is_absolute()
    else:
        with pytest.raises(ValueError, match="mount the bucket"):
            artifact_paths(config)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"overrides_json": '{"backbones": ["efficientnet_b9000"]}'},
            "unknown backbone 'efficientnet_b9000'",
        ),
        ({"source": DataSource(source_dir="/nonexistent/isic")}, "data folder not found: /nonexistent/isic"),
        ({"storage": ArtifactStorage(root="s3://bucket/artifacts")}, "is a s3:// URL"),
    ],
)
def test_first_asset_rejects_bad_config_before_any_work(tmp_path: Path, kwargs: dict, message: str) -> None:
    result = dg.materialize(
        [source_metadata], resources={"settings": settings(tmp_path, **kwargs)}, raise_on_error=False
    )
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert message in str(failure.event_specific_data.error)
    assert not (tmp_path / "artifacts").exists()
