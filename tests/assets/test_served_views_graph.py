"""The tiny graph promoted with ``serving.views: 2`` serves 2 views wherever it is scored from, a config that
says 8 included: the card's test numbers (``batch.served_test_metrics``, as promotion measures them) and the
gallery (``gallery.render_gallery``). ``predict``, the app's service and batch scoring are checked on a
random-weight bundle in ``tests/serving/test_served_views.py``.

The separation between a views-2 and a views-8 score is the trained tiny network's on its own images; the
test requires more than 1e-5 (measured >= 1.6e-3 on MELANOMA_TEST_SEED 0-2), the equality 1e-6.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import TEST_SEED
from graph_helpers import materialize_tiny_graph

from melanoma_ml import schema
from melanoma_ml.artifacts import ArtifactPaths
from melanoma_ml.config import load_config

SEPARATION = 1e-5
OVERRIDES = {
    "serving": {"views": 2},
    "data": {"test_fraction": 0.25},
    "training": {"seed": 11 + TEST_SEED},
}


@pytest.mark.slow
def test_a_bundle_promoted_with_two_views_serves_two_views_under_a_config_of_eight(tmp_path: Path) -> None:
    from melanoma_ml.features import metadata_dict
    from melanoma_ml.folds import locked_test_mask
    from melanoma_ml.images.cache import load_resized
    from melanoma_ml.serving.batch import PROBABILITY, rows_scored_as_predict, score_path, served_test_metrics
    from melanoma_ml.serving.gallery import render_gallery
    from melanoma_ml.serving.inference import score
    from melanoma_ml.serving.registry import ModelRegistry

    run, root = materialize_tiny_graph(tmp_path, OVERRIDES)
    registry = ModelRegistry(ArtifactPaths(root).registry)
    bundle = registry.load_current()
    manifest = bundle.manifest
    assert manifest.views == 2
    assert manifest.test_metrics is not None and "internal" in manifest.test_metrics

    eight = load_config(
        "tiny", {**OVERRIDES, "serving": {"views": 8}, "artifact_root": str(tmp_path / "scoring")}
    )
    assert eight.serving.views == 8
    folds = pd.read_parquet(ArtifactPaths(root).folds_table)

    # The card's test numbers: measured again under a views-8 config, they are the stored views-2 ones.
    again = served_test_metrics(eight, registry.version_path(bundle.version), folds_table=folds, name="v")
    assert again is not None
    for metric in ("auc", "brier"):
        stored = manifest.test_metrics["internal"].metrics[metric].value
        assert again["internal"]["metrics"][metric]["value"] == pytest.approx(stored, abs=1e-6), metric
    test_rows = folds[locked_test_mask(folds)]
    (tmp_path / "scoring").mkdir(exist_ok=True)
    csv = tmp_path / "scoring" / "test.csv"
    served, _scored = rows_scored_as_predict(eight, bundle, test_rows, csv)
    two, eight_views = (score_path(csv, bundle, views=v).scored[PROBABILITY].to_numpy() for v in (2, 8))
    np.testing.assert_allclose(served, two, atol=1e-6)
    assert np.abs(served - eight_views).max() > SEPARATION, np.abs(served - eight_views).max()

    # The gallery under a views-8 config shows the views-2 probabilities.
    gallery = render_gallery(bundle, folds, tmp_path / "gallery", eight.serving, n_images=4, seed=0)
    assert gallery.items
    by_name = folds.set_index(schema.IMAGE)
    picked = by_name.loc[[item.image_name for item in gallery.items]].reset_index()
    images = [load_resized(p, bundle.spec.image_size) for p in picked[schema.IMAGE_PATH]]
    records = [metadata_dict(row, bundle.spec.encoder.tabular) for row in picked.itertuples(index=False)]
    prevalence = eight.serving.deployment_prevalence
    two, eight_views = (
        score(bundle, images, records, views=v, deployment_prevalence=prevalence).prob for v in (2, 8)
    )
    shown = np.array([item.prob for item in gallery.items])
    np.testing.assert_allclose(shown, two, atol=1e-6)
    assert np.abs(shown - eight_views).max() > SEPARATION, np.abs(shown - eight_views).max()
