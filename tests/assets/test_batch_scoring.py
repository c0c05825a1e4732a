"""The drop-folder sensor (one dynamic partition per new sub-folder, one run each) and ``batch_scores``."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from app_helpers import register_tiny
from PIL import Image

from melanoma_assets.assets.scoring import TABLE_ROWS, batch_scores, incoming_batches
from melanoma_assets.resources import ArtifactStorage, DataSource, PipelineSettings, TrainingHardware
from melanoma_assets.sensors import QUIET_SECONDS, incoming_batches_sensor
from melanoma_ml.artifacts import ArtifactPaths
from melanoma_ml.serving.registry import ModelRegistry


def settings_for(root: Path, drop_dir: Path | None = None) -> PipelineSettings:
    overrides = {"serving": {"drop_dir": str(drop_dir)}} if drop_dir else {}
    return PipelineSettings(
        profile="tiny",
        overrides_json=json.dumps(overrides),
        storage=ArtifactStorage(root=str(root)),
        hardware=TrainingHardware(),
        source=DataSource(),
    )


def settled(folder: Path) -> Path:
    """Backdate a batch folder and its files past the sensor's quiet period."""
    past = time.time() - QUIET_SECONDS - 60
    for path in [*folder.iterdir(), folder]:
        os.utime(path, (past, past))
    return folder


def batch(folder: Path, n: int, *, broken: bool = False) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(len(folder.name))
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"ISIC_{i}.png")
    if broken:
        (folder / "broken.jpg").write_text("not an image")
    return folder


def instance_in(tmp_path: Path):
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    return dg.instance_for_test(temp_dir=str(home))


def tick(settings: PipelineSettings, instance: dg.DagsterInstance):
    with dg.build_sensor_context(instance=instance, resources={"settings": settings}) as context:
        return incoming_batches_sensor(context)


def test_sensor_adds_a_partition_per_new_settled_folder_and_requests_its_run(tmp_path: Path) -> None:
    drop = tmp_path / "drop"
    settled(batch(drop / "2026-01-05", 1))
    settled(batch(drop / "clinic_b", 1))
    batch(drop / "still_copying", 1)  # changed just now: waits for the quiet period
    settled(batch(drop / ".partial", 1))  # hidden: a folder being written under a temporary name
    settings = settings_for(tmp_path / "artifacts", drop)

    with instance_in(tmp_path) as instance:
        first = tick(settings, instance)
        assert isinstance(first, dg.SensorResult)
        assert [r.partition_key for r in first.run_requests] == ["2026-01-05", "clinic_b"]
        [add] = first.dynamic_partitions_requests
        assert add.partitions_def_name == incoming_batches.name
        assert list(add.partition_keys) == ["2026-01-05", "clinic_b"]

        instance.add_dynamic_partitions(incoming_batches.name, list(add.partition_keys))
        second = tick(settings, instance)
        assert isinstance(second, dg.SkipReason)
        assert "no new batch" in second.skip_message and "still_copying" in second.skip_message

        settled(drop / "still_copying")
        third = tick(settings, instance)
        assert [r.partition_key for r in third.run_requests] == ["still_copying"]


def test_sensor_defaults_to_the_artifact_roots_incoming_folder_and_skips_until_it_exists(
    tmp_path: Path,
) -> None:
    root = tmp_path / "artifacts"
    settings = settings_for(root)
    with instance_in(tmp_path) as instance:
        missing = tick(settings, instance)
        assert isinstance(missing, dg.SkipReason)
        assert str(root.resolve() / "incoming") in missing.skip_message

        settled(batch(ArtifactPaths(root).incoming / "b1", 1))
        found = tick(settings, instance)
        assert [r.partition_key for r in found.run_requests] == ["b1"]


@pytest.mark.parametrize("n_images", [3, TABLE_ROWS + 2])
def test_batch_scores_materializes_one_partition_with_the_model_version_and_a_table(
    tmp_path: Path, n_images: int
) -> None:
    root = tmp_path / "artifacts"
    version = register_tiny(ModelRegistry(ArtifactPaths(root).registry), seed=1, size=32)
    batch(ArtifactPaths(root).incoming / "b1", n_images, broken=True)
    settings = settings_for(root)

    with instance_in(tmp_path) as instance:
        instance.add_dynamic_partitions(incoming_batches.name, ["b1"])
        result = dg.materialize(
            [batch_scores], partition_key="b1", resources={"settings": settings}, instance=instance
        )

    assert result.success
    [event] = result.asset_materializations_for_node("batch_scores")
    metadata = event.metadata
    assert metadata["model_version"].value == version
    assert metadata["scored"].value == n_images and metadata["not_scored"].value == 1
    table = metadata["scores"].value
    assert len(table.records) == min(n_images + 1, TABLE_ROWS)
    assert [c.name for c in table.schema.columns][:2] == ["image_name", "target"]
    assert {r.data["model_version"] for r in table.records} == {version}
    summary = metadata["summary"].value
    assert f"model **{version}**" in summary and "broken" in summary
    written = pd.read_csv(ArtifactPaths(root).scores("b1"), keep_default_na=False)
    assert len(written) == n_images + 1
    stored = result.output_for_node("batch_scores")
    assert len(stored) == n_images + 1


def test_batch_scores_fails_with_the_reasons_when_nothing_could_be_scored(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    register_tiny(ModelRegistry(ArtifactPaths(root).registry), seed=1, size=32)
    (ArtifactPaths(root).incoming / "bad").mkdir(parents=True)
    (ArtifactPaths(root).incoming / "bad" / "a.jpg").write_bytes(b"")

    with instance_in(tmp_path) as instance:
        instance.add_dynamic_partitions(incoming_batches.name, ["bad"])
        result = dg.materialize(
            [batch_scores],
            partition_key="bad",
            resources={"settings": settings_for(root)},
            instance=instance,
            raise_on_error=False,
        )

    assert not result.success
    assert "empty" in pd.read_csv(ArtifactPaths(root).scores("bad"))["error"].iloc[0]
