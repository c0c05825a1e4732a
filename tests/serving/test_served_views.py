"""The views a bundle serves are recorded in it at promotion (manifest ``views``) and every served path scores
with them, never with the scoring side's ``serving.views``: ``inference.score``, the app's service, batch
scoring (``score_path``) and ``melanoma-ml predict``. A manifest without the field (schema 2, early schema 3)
serves 8, what those bundles served, and an edited value is refused like any other edited byte.

Random-weight ``test_efficientnet`` bundles on noise images: no training, so nothing depends on what a network
learned. A views-2 bundle is scored while the config says ``serving.views: 8``; the answers must equal a
views-2 score (1e-6) and differ from a views-8 one (by more than 1e-5: measured >= 1.9e-4 over MELANOMA_TEST_SEED 0-9).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from app_helpers import register_tiny
from conftest import REPO_ROOT, TEST_SEED
from PIL import Image
from test_bundle_schemas import _write_schema_2_version

from melanoma_ml.artifacts import ArtifactPaths
from melanoma_ml.cli import EXIT_OK, main
from melanoma_ml.config import ServingConfig
from melanoma_ml.images.cache import load_resized
from melanoma_ml.serving.batch import load_scoring_model, score_path
from melanoma_ml.serving.bundle import BundleIntegrityError, read_manifest, verify_bundle
from melanoma_ml.serving.inference import score
from melanoma_ml.serving.manifest import UNRECORDED_VIEWS
from melanoma_ml.serving.model_card import model_card_markdown
from melanoma_ml.serving.registry import ModelRegistry
from melanoma_ml.serving.service import ModelService, PredictionRequest

SIZE = 32
RECORD = {"age": 55.0, "sex": "male", "site": "torso"}
MISSING = {"age": None, "sex": None, "site": None}
SEPARATION = 1e-5
"""Least max |views-2 - views-8| difference the tests require; measured >= 1.9e-4 over seeds 0-9."""


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An artifact root whose registry serves a random-weight bundle that records 2 views."""
    root = tmp_path / "artifacts"
    register_tiny(ModelRegistry(ArtifactPaths(root).registry), seed=3 + TEST_SEED, size=SIZE, views=2)
    return root


def _images(folder: Path, n: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(TEST_SEED)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(folder / f"ISIC_{i}.png")
    return folder


def _by_views(bundle, folder: Path, record: dict) -> dict[int, np.ndarray]:
    """The folder's images, each with ``record``, scored by ``bundle`` with each view count named."""
    decoded = [load_resized(p, bundle.spec.image_size) for p in sorted(folder.glob("*.png"))]
    return {v: score(bundle, decoded, [record] * len(decoded), views=v).prob for v in (1, 2, 8)}


def test_the_bundle_records_its_views_and_the_card_says_so(root: Path) -> None:
    registry = ModelRegistry(ArtifactPaths(root).registry)
    bundle = load_scoring_model(registry)
    assert bundle.manifest.views == 2
    stored = json.loads((registry.version_path(bundle.version) / "manifest.json").read_text())
    assert stored["views"] == 2
    status = ModelService(registry, ServingConfig(views=8)).status()
    assert "2 views per member" in model_card_markdown(status.model)


def test_every_served_path_scores_with_the_bundle_s_views_not_the_config_s(
    root: Path, tmp_path: Path, capsys
) -> None:
    folder = _images(tmp_path / "batch")
    registry = ModelRegistry(ArtifactPaths(root).registry)
    bundle = load_scoring_model(registry)
    expected = _by_views(bundle, folder, RECORD)
    unknown = _by_views(bundle, folder, MISSING)  # what a folder of images without metadata is scored with
    for probs in (expected, unknown):
        assert np.abs(probs[2] - probs[8]).max() > SEPARATION  # the two view counts tell apart
    names = [f"ISIC_{i}" for i in range(len(expected[2]))]

    # inference.score with no view count
    decoded = [load_resized(p, SIZE) for p in sorted(folder.glob("*.png"))]
    np.testing.assert_allclose(score(bundle, decoded, [RECORD] * len(decoded)).prob, expected[2], atol=1e-6)

    # batch scoring (batch_scores, the card's test numbers): score_path with no view count
    batch = score_path(folder, bundle)
    assert batch.views == 2
    np.testing.assert_allclose(
        batch.table.set_index("image_name").loc[names, "target"], unknown[2], atol=1e-6
    )

    # the app's service, configured with 8 views; TTA switched off is one view
    service = ModelService(registry, ServingConfig(views=8))
    for request_tta, views in ((None, 2), (True, 2), (False, 1)):
        answer = service.predict(PredictionRequest(image=folder / "ISIC_0.png", tta=request_tta, **RECORD))
        assert (answer.views, answer.tta) == (views, views > 1)
        assert answer.probability == pytest.approx(float(expected[views][0]), abs=1e-6)

    # melanoma-ml predict with --set serving.views=8
    out = tmp_path / "scores.csv"
    args = ["predict", str(folder), "--out", str(out), "--artifact-root", str(root), "--profile", "tiny"]
    assert main([*args, "--set", "serving.views=8", "--no-log"]) == EXIT_OK
    assert "TTA on (2 views)" in capsys.readouterr().err
    predicted = pd.read_csv(out).set_index("image_name").loc[names, "target"].to_numpy()
    np.testing.assert_allclose(predicted, unknown[2], atol=1e-6)
    assert np.abs(predicted - unknown[8]).max() > SEPARATION


def test_a_manifest_without_views_serves_eight_and_an_edited_value_is_refused(root: Path) -> None:
    registry = ModelRegistry(ArtifactPaths(root).registry)
    folder = registry.version_path(registry.current())
    text = (folder / "manifest.json").read_text()
    assert '"views": 2' in text

    edited = text.replace('"views": 2', '"views": 8')
    (folder / "manifest.json").write_text(edited)
    with pytest.raises(BundleIntegrityError, match="sha256 mismatch for .*manifest.json"):
        verify_bundle(folder, manifest_sha256=registry.recorded_manifest_sha256(registry.current()))
    with pytest.raises(BundleIntegrityError):
        load_scoring_model(registry)

    data = json.loads(text)
    del data["views"]  # as written before the views were recorded
    (folder / "manifest.json").write_text(json.dumps(data))
    (folder / "manifest.sha256").unlink()
    assert UNRECORDED_VIEWS == 8 and read_manifest(folder).views == 8


def test_schema_2_bundles_serve_eight_views(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "artifacts" / "registry")
    registry.versions_dir.mkdir(parents=True)
    for fixture in ("one_network.json", "folds_ensemble.json"):
        version = _write_schema_2_version(registry, fixture)
        assert "views" not in json.loads((registry.version_path(version) / "manifest.json").read_text())
        registry.promote(version)
        assert load_scoring_model(registry).manifest.views == 8, fixture


def test_readme_says_views_are_recorded_in_the_bundle() -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    row = re.search(r"^\| `views` \|.*$", readme, re.MULTILINE)
    assert row is not None, "README's serving-settings table has no `views` row"
    assert "Recorded in the bundle" in row.group(0)
