"""Calibrated serving: the registered bundle carries its calibrator, every prediction goes through it, the
threshold stays the same operating point, a prior shift moves probabilities but not decisions, and old
bundles without a calibrator still serve raw probabilities."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from app_helpers import SITES, SIZE, register_tiny
from scipy import special

from melanoma_ml.atomic import sha256_file
from melanoma_ml.config import ModelConfig, PipelineConfig, ServingConfig
from melanoma_ml.evaluation.calibration import METHODS, shift_prior
from melanoma_ml.evaluation.threshold import threshold_for_sensitivity
from melanoma_ml.features import MetadataEncoder
from melanoma_ml.serving.bundle import load_bundle
from melanoma_ml.serving.calibrated import decision_threshold
from melanoma_ml.serving.champion import register_fold_model, served_model_report
from melanoma_ml.serving.inference import predict
from melanoma_ml.serving.model_card import NOT_CALIBRATED, model_card_markdown
from melanoma_ml.serving.registry import ModelRegistry
from melanoma_ml.serving.remote_registry import open_registry
from melanoma_ml.serving.service import ModelService
from melanoma_ml.spec import ModelSpec
from melanoma_ml.training.checkpoint import save_checkpoint
from melanoma_ml.training.train import FoldResult
from melanoma_ml.weights import WEIGHTS_FILE

FOLD = 1


def tiny_fold_result(tmp_path: Path) -> FoldResult:
    """A random-weight test_efficientnet fold checkpoint with over-confident, shifted out-of-fold scores."""
    torch.manual_seed(0)
    encoder = MetadataEncoder(age_mean=50.0, age_std=15.0, sexes=("female", "male"), sites=SITES)
    spec = ModelSpec(
        network=ModelConfig(
            backbone="test_efficientnet", meta_hidden=[8], meta_dropout=0.0, head_dropout=0.0
        ),
        image_size=SIZE,
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
        encoder=encoder,
    )
    net = spec.build_network().eval()
    checkpoint = save_checkpoint(tmp_path / "fold1", net, spec, {"fold": FOLD})
    rng = np.random.default_rng(7)
    n_patients = 80
    target = np.repeat((rng.random(n_patients) < 0.25).astype(int), 2)
    score = rng.normal(size=target.size) + 1.5 * target
    oof = pd.DataFrame(
        {
            "image_name": [f"ISIC_{i:05d}" for i in range(target.size)],
            "group_id": np.repeat([f"P{i:03d}" for i in range(n_patients)], 2),
            "fold": FOLD,
            "target": target,
            "prob": special.expit(3.0 * score + 1.0),  # far too confident and too high: calibration must act
        }
    )
    return FoldResult(
        backbone="test_efficientnet",
        fold=FOLD,
        checkpoint_dir=checkpoint,
        weights_sha256=sha256_file(checkpoint / WEIGHTS_FILE),
        best_epoch=1,
        best_val_auroc=0.8,
        epochs_run=1,
        train_images_per_second=1.0,
        wall_time_s=1.0,
        n_train=10,
        n_val=len(oof),
        oof=oof,
        history=pd.DataFrame(),
        spec=spec,
    )


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> tuple[PipelineConfig, FoldResult, str, float]:
    tmp_path = tmp_path_factory.mktemp("calibrated")
    config = PipelineConfig(artifact_root=str(tmp_path), evaluation={"n_bootstrap": 50})
    best = tiny_fold_result(tmp_path)
    report = served_model_report(config, best)
    version = register_fold_model(config, best, report, "test", data_version="test")
    open_registry(config).promote(version, reason="test")
    return config, best, version, report.threshold.value


def test_registered_bundle_has_a_calibrator_and_a_threshold_on_its_scale(registered) -> None:
    config, best, version, raw_threshold = registered
    manifest = open_registry(config).manifest(version)
    calibration = manifest.calibration
    assert calibration is not None and calibration.method in METHODS
    assert calibration.prevalence == pytest.approx(best.oof["target"].mean())
    assert calibration.n_rows == len(best.oof)
    for key in ("ece_before", "ece_after", "brier_before", "brier_after"):
        assert key in calibration.report
    assert calibration.report["ece_after"].value < calibration.report["ece_before"].value

    y, raw = best.oof["target"].to_numpy(), best.oof["prob"].to_numpy()
    calibrated = calibration.calibrator().apply(raw)
    target = config.evaluation.target_sensitivity
    assert manifest.threshold == pytest.approx(threshold_for_sensitivity(y, calibrated, target))
    assert manifest.threshold != pytest.approx(raw_threshold)
    flagged_raw = raw >= raw_threshold
    flagged = calibrated >= manifest.threshold
    if calibration.method == "isotonic":  # steps may tie a few benign scores to the threshold
        assert flagged[y == 1].sum() == flagged_raw[y == 1].sum() and flagged.sum() >= flagged_raw.sum()
    else:
        np.testing.assert_array_equal(flagged, flagged_raw)


def test_predict_serves_calibrated_then_prior_shifted_probabilities(registered) -> None:
    config, _best, version, _ = registered
    bundle = load_bundle(open_registry(config).version_path(version))
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, size=(SIZE + 8, SIZE, 3), dtype=np.uint8) for _ in range(4)]
    metadata = [{"age": 40 + 5 * i, "sex": "female", "site": "torso"} for i in range(4)]

    raw = predict(bundle, images, metadata, views=1, calibrated=False)
    calibrated = predict(bundle, images, metadata, views=1)
    calibration = bundle.manifest.calibration
    np.testing.assert_allclose(calibrated, calibration.calibrator().apply(raw), rtol=0, atol=1e-12)
    assert not np.allclose(calibrated, raw)

    shifted = predict(bundle, images, metadata, views=1, deployment_prevalence=0.05)
    np.testing.assert_allclose(shifted, shift_prior(calibrated, calibration.prevalence, 0.05), atol=1e-12)
    assert (shifted < calibrated).all()  # 5% is below the ~25% training prevalence
    # The threshold moves with the odds: the decision does not depend on the prevalence setting.
    for prevalence in (0.01, 0.05, 0.5):
        moved = predict(bundle, images, metadata, views=1, deployment_prevalence=prevalence)
        np.testing.assert_array_equal(
            moved >= decision_threshold(bundle.manifest, prevalence), calibrated >= bundle.threshold
        )
    assert decision_threshold(bundle.manifest, 0.05) < bundle.threshold == decision_threshold(bundle.manifest)


def test_card_shows_the_method_and_the_deployment_prevalence(registered) -> None:
    config, _best, version, _ = registered
    service = ModelService(open_registry(config), ServingConfig(deployment_prevalence=0.05))
    model = service.status().model
    method = model.manifest.calibration.method
    card = model_card_markdown(model, service.config.deployment_prevalence)
    assert f"| Probabilities | calibrated ({method}, fitted on the model's 160 out-of-fold rows" in card
    assert "| Deployment prevalence | 5.0% (probabilities prior-shifted from" in card
    assert f"| Decision threshold | {decision_threshold(model.manifest, 0.05):.3f} |" in card
    assert "ECE after calibration, cross-fitted out-of-fold" in card
    unshifted = model_card_markdown(model)
    assert "(the training prevalence: no prior shift)" in unshifted
    assert f"| Decision threshold | {model.threshold:.3f} |" in unshifted


def test_old_bundle_without_calibration_serves_raw_and_says_so(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    version = register_tiny(registry, seed=5, threshold=0.4)
    bundle = load_bundle(registry.version_path(version))
    assert bundle.manifest.calibration is None
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8) for _ in range(2)]
    metadata = [{"age": 50, "sex": "male", "site": "torso"}] * 2
    raw = predict(bundle, images, metadata, views=1, calibrated=False)
    np.testing.assert_array_equal(predict(bundle, images, metadata, views=1, deployment_prevalence=0.05), raw)
    assert decision_threshold(bundle.manifest, 0.05) == 0.4
    model = ModelService(registry, ServingConfig(deployment_prevalence=0.05)).status().model
    card = model_card_markdown(model, 0.05)
    assert f"| Probabilities | {NOT_CALIBRATED} (raw network output" in card
    assert "| Decision threshold | 0.400 |" in card
