"""Test-set evaluation of fold models (``evaluation.holdout``), on synthetic predictions (no network).

The point checked here: each model's calibrator is fitted on that model's own out-of-fold rows exactly as
promotion fits it, applied unchanged to the test probabilities, and its ECE/Brier before and after reach
the table; the calibrated threshold keeps the raw operating point. A bundle's own test metrics
(``bundle_test_metrics``) are of its served probabilities at its fixed threshold.
"""

from __future__ import annotations

import dataclasses
from math import nan
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import special

from melanoma_ml import schema
from melanoma_ml.config import ModelConfig, PipelineConfig
from melanoma_ml.evaluation.calibration import fit_served_calibration
from melanoma_ml.evaluation.estimate import Estimate
from melanoma_ml.evaluation.holdout import (
    ModelUnderTest,
    TestEvaluation,
    bundle_test_metrics,
    calibration_on_test,
    evaluate_on_test,
    models_to_test,
)
from melanoma_ml.evaluation.report import evaluate_predictions
from melanoma_ml.features import MetadataEncoder
from melanoma_ml.serving import manifest
from melanoma_ml.spec import ModelSpec
from melanoma_ml.training.train import FoldResult

N_FOLDS = 3
IMAGES_PER_PATIENT = 2
SPEC = ModelSpec(
    network=ModelConfig(backbone="test_efficientnet"),
    image_size=32,
    mean=[0.485, 0.456, 0.406],
    std=[0.229, 0.224, 0.225],
    encoder=MetadataEncoder(age_mean=50.0, age_std=15.0, sexes=("female", "male"), sites=("torso",)),
)


def _rows(n_patients: int, prefix: str, rng: np.random.Generator) -> tuple[pd.DataFrame, np.ndarray]:
    """Rows of ``n_patients`` (two images each, ~25% melanoma patients) and a latent score per row."""
    target = np.repeat((rng.random(n_patients) < 0.25).astype(int), IMAGES_PER_PATIENT)
    rows = pd.DataFrame(
        {
            schema.IMAGE: [f"{prefix}_{i:05d}" for i in range(target.size)],
            schema.GROUP: np.repeat([f"{prefix}P{i:04d}" for i in range(n_patients)], IMAGES_PER_PATIENT),
            schema.TARGET: target,
        }
    )
    return rows, rng.normal(size=target.size) + 1.5 * target


def _overconfident(score: np.ndarray) -> np.ndarray:
    """Far too confident and too high: what focal loss at 24% melanoma does to the network's output."""
    return special.expit(3.0 * score + 1.0)


def _fold_result(fold: int, tmp_path: Path, rng: np.random.Generator) -> FoldResult:
    oof, score = _rows(70, f"F{fold}", rng)
    oof["fold"] = fold
    oof["prob"] = _overconfident(score)
    return FoldResult(
        backbone="test_efficientnet",
        fold=fold,
        checkpoint_dir=tmp_path / f"fold{fold}",
        weights_sha256="0" * 64,
        best_epoch=1,
        best_val_auroc=0.7 + 0.05 * fold,  # fold 2 is served
        epochs_run=1,
        train_images_per_second=1.0,
        wall_time_s=1.0,
        n_train=10,
        n_val=len(oof),
        oof=oof,
        history=pd.DataFrame(),
        spec=SPEC,
    )


@pytest.fixture(scope="module")
def tested(tmp_path_factory: pytest.TempPathFactory):
    tmp_path = tmp_path_factory.mktemp("holdout")
    rng = np.random.default_rng(3)
    config = PipelineConfig(artifact_root=str(tmp_path), evaluation={"n_bootstrap": 60})
    folds = [_fold_result(k, tmp_path, rng) for k in range(N_FOLDS)]
    pooled = pd.concat([r.oof for r in folds], ignore_index=True)
    oof_report = evaluate_predictions(pooled, config.evaluation)
    rows, score = _rows(90, "T", rng)
    fold_probs = {k: _overconfident(score + rng.normal(scale=0.3, size=score.size)) for k in range(N_FOLDS)}
    models = models_to_test(config, "test_efficientnet", folds, oof_report)
    results = [evaluate_on_test(m, "internal", rows, fold_probs, config.evaluation) for m in models]
    return (
        config,
        folds,
        oof_report,
        models,
        TestEvaluation(results, {"internal": {"rows_scored": len(rows)}}),
    )


def test_each_model_is_calibrated_on_its_own_out_of_fold_rows_as_promotion_does(tested) -> None:
    config, folds, oof_report, models, _ = tested
    ensemble, served = models
    assert (ensemble.kind, ensemble.members, len(ensemble.oof)) == (
        "folds", (0, 1, 2), sum(len(r.oof) for r in folds)
    )  # fmt: skip
    assert ensemble.threshold == oof_report.threshold.value
    assert (served.kind, served.fold, served.members) == ("best_fold", 2, (2,))
    # the served model's calibrator and threshold are those register_fold_model puts into its bundle
    bundle_calibration, bundle_threshold, _ = fit_served_calibration(config, folds[2].oof, served.threshold)
    assert served.calibration == bundle_calibration
    assert served.calibrated_threshold == bundle_threshold
    assert served.calibration is not None and ensemble.calibration is not None


@pytest.mark.parametrize("kind", ["folds", "best_fold"])
def test_calibration_lowers_test_ece_and_keeps_the_operating_point(tested, kind: str) -> None:
    *_, evaluation = tested
    result = evaluation.find("test_efficientnet", kind)
    calibration, report = result.calibration, result.report
    ece_before, ece_after = calibration.report["ece_before"], calibration.report["ece_after"]
    assert ece_before.value == pytest.approx(report.metric("ece").value)  # the report's raw ECE
    assert calibration.report["brier_before"].value == pytest.approx(report.metric("brier").value)
    assert ece_after.value < ece_before.value / 2
    assert calibration.report["ece_change"].hi < 0  # paired CI: better beyond resampling noise
    assert calibration.report["brier_after"].value < calibration.report["brier_before"].value
    # calibrated >= calibrated threshold flags the same test rows as raw >= raw threshold
    assert calibration.method in {"temperature", "platt"}
    assert calibration.sensitivity == report.metric("sensitivity").value
    assert calibration.specificity == report.metric("specificity").value


def test_table_carries_ece_before_and_after(tested) -> None:
    *_, evaluation = tested
    table = evaluation.table()
    assert {"ece_before", "ece_after", "brier_before", "brier_after", "calibration"} <= set(table.columns)
    served = evaluation.find("test_efficientnet", "best_fold")
    row = table[table["kind"] == "best_fold"].iloc[0]
    assert row["ece_after"] == served.calibration.report["ece_after"].value
    assert row["ece_after_lo"] <= row["ece_after"] <= row["ece_after_hi"]
    assert "calibration" in evaluation.to_dict() and len(evaluation.to_dict()["calibration"]) == 2


def test_bundle_test_metrics_are_of_the_served_probabilities_at_the_fixed_threshold(tested) -> None:
    """What a bundle stores for a test set: its served probabilities' metrics, threshold never re-tuned."""
    from melanoma_ml.evaluation.metrics import roc_auc

    config, *_ = tested
    rows, score = _rows(60, "S", np.random.default_rng(8))
    probs = special.expit(score)
    y = rows[schema.TARGET].to_numpy()
    stored = bundle_test_metrics(rows, probs, 0.7, config.evaluation, "served model on test set internal")
    tested_set = manifest.TestMetrics(**stored)  # what the bundle's manifest validates
    assert (tested_set.n_images, tested_set.n_melanoma) == (len(rows), int(y.sum()))
    assert tested_set.metrics["auc"].value == pytest.approx(roc_auc(y, probs), abs=1e-12)
    assert tested_set.metrics["sensitivity"].value == pytest.approx(np.mean(probs[y == 1] >= 0.7))
    assert tested_set.metrics["specificity"].value == pytest.approx(np.mean(probs[y == 0] < 0.7))
    assert tested_set.metrics["brier"].value == pytest.approx(np.mean((probs - y) ** 2))


def test_a_model_whose_rows_cannot_fit_a_calibrator_reports_after_equal_to_before(tested) -> None:
    """One melanoma patient out-of-fold: promotion serves raw probabilities, and the test report says so."""
    config, folds, *_ = tested
    oof = folds[0].oof.assign(**{schema.TARGET: 0})
    oof.loc[oof[schema.GROUP] == oof[schema.GROUP].iloc[0], schema.TARGET] = 1
    model = ModelUnderTest.fix(
        config, "test_efficientnet", "best_fold", 0, [0], oof, Estimate(0.7, nan, nan, 0.95), 0.5
    )
    assert model.calibration is None and model.calibrated_threshold == 0.5
    rows = pd.DataFrame(
        {schema.GROUP: ["a", "a", "b", "c"], schema.TARGET: [0, 1, 0, 1], schema.IMAGE: list("wxyz")}
    )
    calibration = calibration_on_test(model, rows, np.array([0.2, 0.9, 0.6, 0.4]), config.evaluation)
    assert calibration.method is None
    assert calibration.report["ece_after"] == calibration.report["ece_before"]
    assert (calibration.sensitivity, calibration.specificity) == (0.5, 0.5)


@pytest.mark.parametrize("average", ["probability", "logit"])
def test_members_are_averaged_in_the_serving_space(tested, average: str) -> None:
    *_, models, _evaluation = tested
    model = dataclasses.replace(models[0], average=average)
    probs = {0: np.array([0.1, 0.5]), 1: np.array([0.9, 0.5]), 2: np.array([0.5, 0.99])}
    mean = model.test_probabilities(probs)
    if average == "probability":
        np.testing.assert_allclose(mean, [0.5, (0.5 + 0.5 + 0.99) / 3])
    else:  # logit(0.1) + logit(0.9) cancel; 0.99 pulls harder in logit space
        np.testing.assert_allclose(mean, [0.5, special.expit(special.logit(0.99) / 3)])


def test_the_fold_model_mean_is_compared_with_the_served_fold_on_the_same_test_patients(
    tested, tmp_path
) -> None:
    from melanoma_ml.evaluation.compare import paired_auc_difference
    from melanoma_ml.evaluation.holdout import PREDICTIONS_FILE, folds_vs_best_fold

    config, _folds, _report, models, evaluation = tested
    [comparison] = folds_vs_best_fold(evaluation.results, config.evaluation)
    assert "folds_vs_best_fold" in evaluation.to_dict()  # test_evaluation.json's key, in the served words
    ensemble = evaluation.find("test_efficientnet", "folds")
    served = evaluation.find("test_efficientnet", "best_fold")
    expected = paired_auc_difference(ensemble.predictions, served.predictions, config.evaluation)
    assert comparison["diff"] == pytest.approx(expected["diff"])
    assert comparison["diff"] == pytest.approx(ensemble.test_auc.value - served.test_auc.value)
    assert comparison["lo"] <= comparison["diff"] <= comparison["hi"]
    assert (comparison["a"], comparison["b"]) == (ensemble.model, served.model)

    rows, score = _rows(40, "W", np.random.default_rng(5))
    probs = {k: _overconfident(score) for k in range(N_FOLDS)}
    evaluate_on_test(models[0], "internal", rows, probs, config.evaluation, tmp_path)
    assert models[0].folder == "folds" and models[1].folder == "fold2"
    written = pd.read_parquet(tmp_path / "test_efficientnet" / models[0].folder / PREDICTIONS_FILE)
    assert written[schema.IMAGE].tolist() == rows[schema.IMAGE].tolist() and "prob" in written


def test_a_top_k_model_averages_the_best_backbones_and_reaches_the_bundle(tmp_path) -> None:
    from melanoma_ml.evaluation.ensemble import averaged_oof
    from melanoma_ml.evaluation.holdout import top_k_model

    rng = np.random.default_rng(11)
    base = PipelineConfig(artifact_root=str(tmp_path), evaluation={"n_bootstrap": 60})
    config = PipelineConfig(
        artifact_root=str(tmp_path), evaluation={"n_bootstrap": 60}, serving={"ensemble": "top_k"}
    )
    folds_a = [_fold_result(k, tmp_path, rng) for k in range(N_FOLDS)]
    # a second backbone on the same images and folds, with other (noisier) probabilities
    folds_b = [
        dataclasses.replace(
            r,
            backbone="test_resnet",
            oof=r.oof.assign(
                prob=np.clip(r.oof["prob"] + rng.normal(scale=0.1, size=len(r.oof)), 0.01, 0.99)
            ),
        )
        for r in folds_a
    ]
    results = {"test_efficientnet": folds_a, "test_resnet": folds_b}
    reports = {
        b: evaluate_predictions(pd.concat([r.oof for r in f]), config.evaluation) for b, f in results.items()
    }
    model = top_k_model(config, results, reports)
    assert model is not None and model.kind == "top_k" and len(model.members) == 2 * N_FOLDS
    best = max(reports, key=lambda b: reports[b].metric("auc").value)
    assert model.backbone.split("+")[0] == best
    expected = averaged_oof(
        [pd.concat([r.oof for r in results[b]], ignore_index=True) for b in model.backbone.split("+")],
        "probability",
    )
    np.testing.assert_allclose(np.sort(model.oof["prob"]), np.sort(expected["prob"]))

    rows, score = _rows(60, "K", rng)
    probs = {
        (b, k): _overconfident(score + rng.normal(scale=0.3, size=score.size))
        for b in results
        for k in range(N_FOLDS)
    }
    tested = evaluate_on_test(model, "internal", rows, probs, config.evaluation)
    np.testing.assert_allclose(tested.predictions["prob"], np.mean(list(probs.values()), axis=0))
    evaluation = TestEvaluation([tested], {"internal": {"rows_scored": len(rows)}})
    assert evaluation.find(model.backbone, "top_k").report.n_images == len(rows)
    assert evaluation.find(model.backbone, "folds") is None  # no fold-model mean was scored here
    assert top_k_model(base, results, reports) is None  # only when serving.ensemble is top_k


CALIBRATORS = {
    "temperature": ({"method": "temperature", "temperature": 2.5}, lambda z: special.expit(z / 2.5)),
    "platt": ({"method": "platt", "slope": 0.6, "intercept": -0.8}, lambda z: special.expit(0.6 * z - 0.8)),
    "isotonic": (
        {"method": "isotonic", "x": [0.0, 0.5, 1.0], "y": [0.0, 0.1, 0.7]},
        lambda z: np.interp(special.expit(z), [0.0, 0.5, 1.0], [0.0, 0.1, 0.7]),
    ),
}


@pytest.mark.parametrize("method", sorted(CALIBRATORS))
def test_the_comparison_rows_and_the_served_model_calibrate_with_one_function(tested, method: str) -> None:
    """Known calibrator parameters, known raw probabilities: ``ModelUnderTest.calibrate`` (the test
    evaluation's rows) and ``served_probabilities`` (what ``inference.predict`` serves from a bundle's
    manifest) give the same numbers, and both are the calibrator's formula; the served prior shift is Bayes'
    rule on those numbers."""
    from melanoma_ml.serving.calibrated import served_probabilities
    from melanoma_ml.weights import WEIGHTS_FILE

    _config, folds, _report, models, _evaluation = tested
    parameters, formula = CALIBRATORS[method]
    stored = {"method": method, "parameters": parameters, "prevalence": 0.25, "n_rows": 140, "report_on": "x"}
    model = dataclasses.replace(models[1], calibration=stored)
    served = manifest.BundleManifest.model_validate(
        {
            "threshold": 0.5,
            "metrics": {"auc": Estimate(0.8, 0.7, 0.9, 0.9)},
            "data_version": "folds-1",
            "code_version": "melanoma_ml-test",
            "created_at": "2026-12-07T00:00:00+00:00",
            "oof": manifest.ValidationPredictions.from_frame(folds[2].oof),
            "calibration": stored,
            "ensemble": {
                "kind": "best_fold",
                "average": "probability",
                "members": [
                    {
                        "weights": {"name": WEIGHTS_FILE, "sha256": "a" * 64},
                        "model_spec": SPEC,
                        "fold": 2,
                        "checkpoint_sha256": "b" * 64,
                    }
                ],
            },
        }
    )
    raw = np.array([1e-9, 0.01, 0.2, 0.5, 0.73, 0.99, 1 - 1e-9])
    expected = formula(special.logit(raw))
    tested_rows = model.calibrate(raw)
    np.testing.assert_allclose(tested_rows, expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(served_probabilities(served, raw), tested_rows, rtol=0, atol=1e-12)
    assert not np.allclose(tested_rows, raw)  # the calibrator acts on this case
    # the served path's prior shift: odds times (0.05 / 0.95) / (0.25 / 0.75), on the same calibrated numbers
    shifted = served_probabilities(served, raw, 0.05)
    inner = expected[(expected > 0) & (expected < 1)]
    odds = inner / (1 - inner) * (0.05 / 0.95) / (0.25 / 0.75)
    np.testing.assert_allclose(
        shifted[(expected > 0) & (expected < 1)], odds / (1 + odds), rtol=0, atol=1e-12
    )
    # no calibrator: both serve raw, and no prior shift is possible
    plain = dataclasses.replace(models[1], calibration=None)
    uncalibrated = served.model_copy(update={"calibration": None})
    np.testing.assert_array_equal(plain.calibrate(raw), raw)
    np.testing.assert_array_equal(served_probabilities(uncalibrated, raw, 0.05), raw)


def test_old_kind_words_are_read_back_in_the_served_vocabulary(tested, tmp_path) -> None:
    """Older runs wrote ``ensemble``/``served``: their pickled step values (a Dagster run's test evaluation
    and leaderboard) and report folders are read in ``serving.ensemble``'s words."""
    import pickle

    from melanoma_ml.errors import InputValueError
    from melanoma_ml.evaluation.external import ExternalScore
    from melanoma_ml.evaluation.holdout import tested_kind, written_report_folder

    assert [tested_kind(w) for w in ("ensemble", "served", "folds", "best_fold", "top_k")] == [
        "folds", "best_fold", "folds", "best_fold", "top_k"
    ]  # fmt: skip
    with pytest.raises(InputValueError, match=r"'fold_mean'.*best_fold.*ensemble"):
        tested_kind("fold_mean")

    *_, evaluation = tested
    old_results = []
    for result, old_word in zip(evaluation.results, ("ensemble", "served"), strict=True):
        old = dataclasses.replace(result)
        object.__setattr__(old, "kind", old_word)  # as an older run's object was
        old_results.append(old)
    old_evaluation = dataclasses.replace(evaluation, results=old_results)
    again = pickle.loads(pickle.dumps(old_evaluation))
    assert [r.kind for r in again.results] == ["folds", "best_fold"]
    assert (
        again.find("test_efficientnet", "folds").test_auc
        == evaluation.find("test_efficientnet", "folds").test_auc
    )
    assert again.table()["kind"].tolist() == ["folds", "best_fold"]

    auc = Estimate(0.8, 0.7, 0.9, 0.95)
    score = ExternalScore("b", "best_fold", 2, "ph2", auc, auc, 40, 10)
    object.__setattr__(score, "kind", "served")
    assert pickle.loads(pickle.dumps(score)).kind == "best_fold"

    set_dir = tmp_path / "internal"
    (set_dir / "test_efficientnet" / "ensemble").mkdir(parents=True)  # an older run's fold-model mean
    assert written_report_folder(set_dir, "test_efficientnet", "folds").name == "ensemble"
    assert written_report_folder(set_dir, "test_efficientnet", "best_fold", 2).name == "fold2"
    (set_dir / "test_efficientnet" / "folds").mkdir()
    assert (
        written_report_folder(set_dir, "test_efficientnet", "folds")
        == set_dir / "test_efficientnet" / "folds"
    )
