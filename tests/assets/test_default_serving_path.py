"""The whole tiny graph on the serving path users get by default: ``serving.runtime: auto``, a locked test
split, a fold ensemble and the out-of-distribution detector.

The ``tiny`` profile serves torch and locks no test split to stay fast; this one run puts back the defaults
it changes, so the ONNX export at promotion, its probe and parity check per member, the test metrics in the
manifest and ``served_bundle_reproduces`` on an exported bundle all run through the pipeline.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from graph_helpers import materialize_tiny_graph

from melanoma_ml.artifacts import ArtifactPaths
from melanoma_ml.config import DataConfig, ServingConfig, load_config

N_PATIENTS = 60
"""Enough synthetic patients that a 20% locked test split holds both classes (24, tiny's, are too few)."""

DEFAULTS = {
    "data": {"test_fraction": DataConfig().test_fraction, "synthetic": {"n_patients": N_PATIENTS}},
    "serving": {
        "runtime": ServingConfig().runtime,
        "ensemble": ServingConfig().ensemble,
        "ood_detection": ServingConfig().ood_detection,
    },
}


@pytest.mark.slow
def test_the_default_serving_path_exports_each_member_and_the_served_bundle_reproduces(
    tmp_path: Path,
) -> None:
    from melanoma_ml import schema
    from melanoma_ml.folds import locked_test_mask
    from melanoma_ml.serving.bundle import verify_bundle
    from melanoma_ml.serving.model_card import runtime_text
    from melanoma_ml.serving.registry import ModelRegistry

    config = load_config("tiny", DEFAULTS)
    serving = config.serving
    assert (serving.runtime, serving.precision, serving.ensemble, serving.ood_detection) == (
        "auto",
        "fp32",
        "folds",
        True,
    ), "the defaults changed: update this test's description of them"
    assert config.data.test_fraction > 0

    run, root = materialize_tiny_graph(tmp_path, DEFAULTS)
    evaluations = {e.check_name: e for e in run.check_evaluations()}
    assert all(e.passed for e in evaluations.values()), [
        (name, e.metadata) for name, e in evaluations.items() if not e.passed
    ]
    promotion = run.results[-1].output_for_node("serving_model")
    assert promotion.decision.promote and promotion.champion_after == "v0001"

    registry = ModelRegistry(ArtifactPaths(root).registry)
    bundle_dir = registry.version_path("v0001")
    manifest = verify_bundle(bundle_dir)  # every file, the exports included, matches its sha256
    ensemble = manifest.ensemble
    assert ensemble.kind == "folds" and len(ensemble.members) == config.data.n_folds

    # Which runtime serves, and why: auto chose per member; the tiny fp32 networks export with a gap of
    # ~1e-8, four orders of magnitude inside the 1e-4 tolerance, so every member serves ONNX Runtime.
    runtime = manifest.runtime
    assert runtime is not None and (runtime.runtime, runtime.precision, runtime.note) == (
        "onnxruntime",
        "fp32",
        "",
    )
    n_probe_views = 8 * serving.runtime_probe_images
    for index, member in enumerate(ensemble.members):
        chosen = member.runtime
        assert chosen is not None, f"member {index} records no runtime"
        assert (chosen.runtime, chosen.precision, chosen.note) == ("onnxruntime", "fp32", ""), chosen
        assert (
            chosen.parity["max_abs_prob_diff"]
            <= chosen.parity["tolerance"]
            == serving.runtime_parity_tolerance
        )
        assert chosen.parity["n_inputs"] == n_probe_views  # every view of every probe image was compared
        assert member.runtime_file is not None and (bundle_dir / member.runtime_file.name).is_file()
    assert runtime.parity["max_abs_prob_diff"] == max(
        m.runtime.parity["max_abs_prob_diff"] for m in ensemble.members
    )
    assert runtime_text(manifest).startswith("onnxruntime fp32 (max probability difference")

    # The exported bundle, loaded as the app loads it, reproduces its stored out-of-fold predictions.
    reproduced = evaluations["served_bundle_reproduces"]
    assert reproduced.metadata["version"].value == "v0001"
    assert reproduced.metadata["images_checked"].value > 0
    assert reproduced.metadata["max_abs_difference"].value <= 1e-3
    served = registry.load_current()
    assert len(served.scorers) == len(ensemble.members) and served.ood is not None
    assert manifest.ood is not None and (bundle_dir / manifest.ood.file.name).is_file()

    # The locked test split was scored and its numbers are in the manifest.
    assert evaluations["test_split_untouched"].passed
    import pandas as pd

    folds = pd.read_parquet(ArtifactPaths(root).folds_table)
    test_rows = folds[locked_test_mask(folds)]
    assert len(test_rows) and test_rows[schema.TARGET].nunique() == 2
    assert manifest.test_metrics is not None and set(manifest.test_metrics) == {"internal"}
    internal = manifest.test_metrics["internal"]
    assert internal.n_images == len(test_rows)
    assert internal.n_melanoma == int(test_rows[schema.TARGET].sum())
    auc = internal.metrics["auc"]
    assert 0.0 <= auc.lo <= auc.value <= auc.hi <= 1.0
    assert not set(manifest.oof_frame()["image_name"]) & set(test_rows[schema.IMAGE])
