"""The artifact layout under the artifact root, and which roots it accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

from melanoma_ml.artifacts import artifact_paths
from melanoma_ml.config import PipelineConfig, load_config


def test_artifact_layout_matches_the_architecture_doc(tmp_path: Path) -> None:
    paths = artifact_paths(load_config("tiny", {"artifact_root": f"file://{tmp_path}"}))
    assert paths.root == tmp_path.resolve()
    assert paths.cache(64) == tmp_path / "cache" / "64px"
    assert paths.checkpoint("resnet50", 2) == tmp_path / "checkpoints" / "resnet50" / "fold2"
    assert paths.report("resnet50") == tmp_path / "reports" / "resnet50"
    assert paths.registry == tmp_path / "registry"
    assert paths.synthetic == tmp_path / "data" / "synthetic"
    assert (paths.caches, paths.test_reports) == (tmp_path / "cache", tmp_path / "reports" / "test")
    assert paths.cache(64).parent == paths.caches and paths.leaderboard.parent == paths.reports


def test_artifact_root_description_promises_what_the_pipeline_accepts(tmp_path: Path) -> None:
    description = PipelineConfig.model_fields["artifact_root"].description
    assert description.startswith("Local path or file:// URL") and "fsspec" not in description
    assert "not supported" in description and "mount" in description
    for accepted in (str(tmp_path), f"file://{tmp_path}"):
        assert artifact_paths(load_config("tiny", {"artifact_root": accepted})).root == tmp_path.resolve()
    with pytest.raises(ValueError, match="mount the bucket"):
        artifact_paths(load_config("tiny", {"artifact_root": "s3://bucket/artifacts"}))
