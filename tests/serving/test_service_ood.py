"""Out-of-distribution flags in the app: the service's answer, the API JSON and the page's warning.

A bundle with a detector (``ood_helpers.register_with_ood``: fitted on smooth colour patches) answers
``ood_score``/``ood_flag``/``ood_threshold`` and the page warns next to the probability for a flagged
upload; a bundle without one (older bundles, ``serving.ood_detection: false``) answers neither.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from app_helpers import register_tiny
from ood_helpers import register_with_ood, smooth_images
from PIL import Image

from melanoma_ml.config import ServingConfig
from melanoma_ml.serving.app import result_markdown, run_prediction
from melanoma_ml.serving.registry import ModelRegistry
from melanoma_ml.serving.service import ModelService, NoModelAvailable, PredictionRequest

SIZE = 32
WARNING = "This does not look like a dermoscopy image the model was trained on"
OOD_KEYS = {"ood_score", "ood_flag", "ood_threshold"}


@pytest.fixture()
def uploads(tmp_path: Path) -> dict[str, Path]:
    """A noise image (out of distribution for the detector) and a smooth patch like its training images."""
    rng = np.random.default_rng(0)
    paths = {"noise": tmp_path / "noise.png", "smooth": tmp_path / "smooth.png"}
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(paths["noise"])
    Image.fromarray(smooth_images(1, 48, seed=3)[0]).save(paths["smooth"])
    return paths


def test_a_flagged_upload_is_answered_with_its_ood_fields_and_a_warning_beside_the_probability(
    tmp_path: Path, uploads
) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    register_with_ood(registry, seed=3, size=SIZE)
    service = ModelService(registry, ServingConfig(tta=False, cam_method="gradcam"))

    flagged = service.predict(PredictionRequest(image=uploads["noise"], cam_method="none"))
    usual = service.predict(PredictionRequest(image=uploads["smooth"], cam_method="none"))

    detector = flagged.model.bundle.ood
    assert flagged.ood_flag is True and flagged.ood_score > detector.threshold
    assert usual.ood_flag is False and usual.ood_score <= detector.threshold
    answer = flagged.to_json()
    assert set(answer) >= OOD_KEYS and answer["ood_flag"] is True
    assert answer["ood_score"] == flagged.ood_score and answer["ood_threshold"] == detector.threshold
    page = result_markdown(flagged)
    assert "Melanoma probability" in page and WARNING in page  # next to, not instead of, the probability
    assert (
        f"out-of-distribution score {flagged.ood_score:.1f} above threshold {detector.threshold:.1f}" in page
    )
    assert "the probability is not reliable for it" in page
    assert WARNING not in result_markdown(usual) and usual.to_json()["ood_flag"] is False
    # The /predict endpoint returns the same answer JSON.
    endpoint = run_prediction(service, str(uploads["noise"]), "", None, None, False, "none", None)
    assert endpoint[0]["ood_flag"] is True and WARNING in endpoint[3]


def test_a_bundle_without_a_detector_shows_and_answers_no_ood_fields(tmp_path: Path, uploads) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    register_tiny(registry, seed=1, size=SIZE)
    service = ModelService(registry, ServingConfig(tta=False))

    prediction = service.predict(PredictionRequest(image=uploads["noise"], cam_method="none"))

    assert prediction.ood_score is None and prediction.ood_flag is None and prediction.ood_threshold is None
    assert not OOD_KEYS & set(prediction.to_json())
    page = result_markdown(prediction)
    assert WARNING not in page and "OOD" not in page


def test_a_changed_detector_file_stops_that_version_serving(tmp_path: Path, uploads) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    version = register_with_ood(registry, seed=3, size=SIZE)
    service = ModelService(registry, ServingConfig(tta=False, reverify_seconds=0))
    request = PredictionRequest(image=uploads["smooth"], cam_method="none")
    assert service.predict(request).model_version == version

    detector = registry.version_path(version) / "ood.safetensors"
    data = bytearray(detector.read_bytes())
    data[-1] ^= 0xFF  # one tensor byte, in place: the mtime changes, inode and size do not
    with open(detector, "r+b") as fh:
        fh.write(bytes(data))

    with pytest.raises(NoModelAvailable, match=f"{version} stopped serving.*ood.safetensors"):
        service.predict(request)
