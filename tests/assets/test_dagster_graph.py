"""The whole graph, every partition, in-process on the tiny profile: checks pass, a bundle is served."""

from __future__ import annotations

from pathlib import Path

import pytest
from graph_helpers import materialize_tiny_graph

from melanoma_ml.artifacts import ArtifactPaths


@pytest.mark.slow
def test_whole_graph_materializes_and_serves_a_verified_bundle(tmp_path: Path) -> None:
    from melanoma_ml.serving.registry import ModelRegistry

    run, root = materialize_tiny_graph(tmp_path)
    evaluations = run.check_evaluations()
    assert {e.check_name for e in evaluations} == {
        "clean_metadata_schema",
        "folds_leak_free_and_balanced",
        "checkpoint_loads",
        "report_complete",
        "test_split_untouched",
        "served_bundle_reproduces",
    }
    assert all(e.passed for e in evaluations), [
        (e.check_name, e.metadata) for e in evaluations if not e.passed
    ]
    assert sum(e.check_name == "checkpoint_loads" for e in evaluations) == 2  # one per fold partition

    registry = ModelRegistry(ArtifactPaths(root).registry)
    assert registry.current() == "v0001"
    bundle = registry.load_current()
    assert bundle.spec.backbone == "test_efficientnet"
    promotion = run.results[-1].output_for_node("serving_model")
    assert promotion.decision.promote and promotion.champion_after == "v0001"
    # the default served model: both fold models averaged, with an out-of-distribution detector
    manifest = bundle.manifest
    assert len(manifest.ensemble.members) == len(bundle.scorers) == 2 and bundle.ood is not None
    assert (
        manifest.ood is not None
        and (ArtifactPaths(root).registry / "versions" / "v0001" / "ood.safetensors").is_file()
    )
    gallery = run.results[-1].output_for_node("gradcam_gallery")
    assert gallery.version == "v0001" and gallery.items and all(i.path.is_file() for i in gallery.items)
    own = manifest.oof_frame()
    member0_rows = set(own.loc[own["fold"] == manifest.ensemble.members[0].fold, "image_name"])
    assert {item.image_name for item in gallery.items} <= member0_rows  # images member 0 never trained on
    for relative in (
        "tables/folds.parquet",
        "checkpoints/test_efficientnet/fold1/weights.safetensors",
        "reports/test_efficientnet/report.json",
        "reports/leaderboard/leaderboard.json",
    ):
        assert (root / relative).is_file(), relative
