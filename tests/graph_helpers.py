"""The whole tiny Dagster graph materialized in-process under ``tmp_path`` (shared by the graph tests)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dagster as dg

from melanoma_assets.definitions import build_definitions
from melanoma_assets.resources import ArtifactStorage, DataSource, PipelineSettings, TrainingHardware
from melanoma_assets.runner import GraphRun, materialize_graph


def materialize_tiny_graph(tmp_path: Path, overrides: dict[str, Any] | None = None) -> tuple[GraphRun, Path]:
    """Every asset of the ``tiny`` profile (with ``overrides``) on a test instance; returns the run and the
    artifact root. Fails the test with the failure events if a stage failed."""
    root = tmp_path / "artifacts"
    settings = PipelineSettings(
        profile="tiny",
        overrides_json=json.dumps(overrides or {}),
        storage=ArtifactStorage(root=str(root)),
        hardware=TrainingHardware(accelerator="cpu"),
        source=DataSource(),
    )
    resources = {"settings": settings, "io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path / "io"))}
    (tmp_path / "dagster_home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster_home")) as instance:
        run = materialize_graph(build_definitions("tiny"), resources, instance, progress=lambda _: None)
    assert run.success, [e for r in run.results for e in r.all_events if e.is_failure]
    return run, root
