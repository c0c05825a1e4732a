"""The promotion step of melanoma_ml.pipeline against a real registry: worse candidates never replace the
champion, better ones do (the pointer moves, history kept), and rollback restores the previous version. The
bundle describes the one fold model it serves; the gallery shows that model's own validation images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from melanoma_ml import pipeline
from melanoma_ml.artifacts import ArtifactPaths
from melanoma_ml.atomic import sha256_file
from melanoma_ml.config import load_config
from melanoma_ml.serving.champion import OOF_KEEP, PromotionOutcome

N_PATIENTS = 60


def rows() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(N_PATIENTS), 2)
    return pd.DataFrame(
        {
            "image_name": [f"ISIC_{i:04d}" for i in range(len(patients))],
            "patient_id": [f"P{p}" for p in patients],
            "group_id": [f"patient:P{p}" for p in patients],
            "fold": patients % 2,
            "target": (rng.random(len(patients)) < 0.3).astype(int),
            "sex": rng.choice(["male", "female"], len(patients)),
            "age_approx": rng.choice([30.0, 50.0, 70.0], len(patients)),
            "anatom_site_general_challenge": "torso",
        }
    )


def fold_results(tmp_path: Path, config, backbone: str, skill: float, tag: str) -> list:
    """Two saved fold checkpoints whose OOF probabilities separate the classes with ``skill`` (0..1)."""
    from melanoma_ml.features import MetadataEncoder
    from melanoma_ml.model import build_model, normalization_for
    from melanoma_ml.spec import ModelSpec
    from melanoma_ml.training.checkpoint import save_checkpoint
    from melanoma_ml.training.train import OOF_COLUMNS, FoldResult

    table = rows()
    rng = np.random.default_rng(len(tag))
    noise = rng.random(len(table))
    table["prob"] = np.clip(skill * table["target"] + (1 - skill) * noise, 0, 1) * 0.98 + 0.01
    table["backbone"] = backbone
    encoder = MetadataEncoder.fit(table)
    model_config = config.model_for(backbone)
    net = build_model(model_config, encoder.n_features)
    norm = normalization_for(net.backbone)
    spec = ModelSpec(model_config, 32, norm["mean"], norm["std"], encoder)
    results = []
    for fold in (0, 1):
        out = save_checkpoint(tmp_path / tag / f"fold{fold}", net, spec, {"fold": fold})
        oof = table[table["fold"] == fold][list(OOF_COLUMNS)].reset_index(drop=True)
        results.append(
            FoldResult(
                backbone,
                fold,
                out,
                sha256_file(out / "weights.safetensors"),
                1,
                0.8 + fold / 100,
                1,
                100.0,
                1.0,
                60,
                60,
                oof,
                pd.DataFrame({"epoch": [1]}),
                spec,
            )
        )
    return results


def offer(tmp_path: Path, config, backbone: str, skill: float, tag: str, results=None) -> PromotionOutcome:
    results = results or fold_results(tmp_path, config, backbone, skill, tag)
    report = pipeline.evaluate_backbone(config, backbone, results)
    board = pipeline.rank_backbones(config, {backbone: report})
    return pipeline.promote_best(config, board, {backbone: report}, {backbone: results}, data_version=tag)


@pytest.mark.slow
def test_gate_keeps_the_champion_against_a_worse_candidate_and_promotes_a_better_one(tmp_path: Path) -> None:
    from melanoma_ml.serving.registry import ModelRegistry

    config = load_config(
        "tiny", {"artifact_root": str(tmp_path / "artifacts"), "evaluation": {"n_bootstrap": 200}}
    )
    registry = ModelRegistry(ArtifactPaths(tmp_path / "artifacts").registry)

    first_results = fold_results(tmp_path, config, "test_efficientnet", 0.6, "first")
    first = offer(tmp_path, config, "test_efficientnet", 0.6, "first", results=first_results)
    assert first.decision.promote and first.champion_before is None
    assert registry.current() == first.registered == "v0001"

    again = offer(tmp_path, config, "test_efficientnet", 0.6, "first", results=first_results)
    assert not again.decision.promote and "already served as v0001" in again.decision.reason
    assert registry.versions() == ["v0001"]

    worse = offer(tmp_path, config, "test_resnet", skill=0.0, tag="worse")
    assert not worse.decision.promote
    assert "champion v0001 stays" in worse.decision.reason
    assert worse.registered is None and worse.champion_after == "v0001"
    assert registry.current() == "v0001" and registry.versions() == ["v0001"]

    better = offer(tmp_path, config, "test_efficientnet", skill=0.9, tag="better")
    assert better.decision.promote, better.decision.reason
    assert better.champion_before == "v0001" and registry.current() == better.registered == "v0002"
    assert registry.manifest("v0002").backbone == "test_efficientnet"

    assert registry.rollback() == "v0001"
    assert registry.current() == "v0001"
    assert [e["event"] for e in registry.history()] == [
        "registered",
        "promoted",
        "registered",
        "promoted",
        "rolled_back",
    ]


@pytest.mark.slow
def test_weak_first_candidate_below_the_floor_is_not_served(tmp_path: Path) -> None:
    from melanoma_ml.serving.registry import ModelRegistry

    config = load_config(
        "tiny", {"artifact_root": str(tmp_path / "artifacts"), "evaluation": {"promotion_auc_floor": 0.95}}
    )
    outcome = offer(tmp_path, config, "test_efficientnet", skill=0.3, tag="weak")
    assert not outcome.decision.promote and "floor" in outcome.decision.reason
    assert ModelRegistry(ArtifactPaths(tmp_path / "artifacts").registry).current() is None
    gallery = pipeline.explain_gallery(config, rows())
    assert gallery.version is None and gallery.items == [] and "no model is promoted" in gallery.note


@pytest.mark.slow
def test_the_bundle_threshold_and_metrics_are_the_served_fold_models_own(tmp_path: Path) -> None:
    from melanoma_ml.evaluation import threshold_for_sensitivity
    from melanoma_ml.evaluation.metrics import roc_auc
    from melanoma_ml.serving.registry import ModelRegistry

    overrides = {"serving": {"ensemble": "best_fold"}, "evaluation": {"n_bootstrap": 200}}
    config = load_config("tiny", {"artifact_root": str(tmp_path / "artifacts"), **overrides})
    results = fold_results(tmp_path, config, "test_efficientnet", 0.3, "served")
    pooled = pipeline.evaluate_backbone(config, "test_efficientnet", results)
    outcome = offer(tmp_path, config, "test_efficientnet", 0.3, "served", results=results)
    assert outcome.decision.promote and outcome.fold == 1  # fold 1 has the higher validation AUROC
    manifest = ModelRegistry(ArtifactPaths(tmp_path / "artifacts").registry).manifest(outcome.registered)

    own = results[1].oof
    y, p = own["target"].to_numpy(), own["prob"].to_numpy()
    # The served threshold is re-tuned on the calibrated out-of-fold probabilities (same target sensitivity).
    calibrated = manifest.calibration.calibrator().apply(p)
    target = config.evaluation.target_sensitivity
    assert manifest.threshold == threshold_for_sensitivity(y, calibrated, target)
    assert manifest.metrics["auc"].value == pytest.approx(roc_auc(y, p))
    assert manifest.metrics["auc"].level == config.evaluation.ci_level
    assert manifest.threshold != pooled.threshold.value  # the pooled OOF of both folds gives another one
    assert manifest.metrics["auc"].value != pytest.approx(pooled.metric("auc").value)
    assert outcome.decision.evidence["candidate_estimate"]["value"] == manifest.metrics["auc"].value
    (member,) = manifest.ensemble.members  # one network: a one-member best_fold ensemble
    assert (manifest.ensemble.kind, member.fold) == ("best_fold", 1)
    assert member.checkpoint_sha256 == results[1].weights_sha256
    stored = manifest.oof_frame()
    assert stored["image_name"].tolist() == own["image_name"].tolist() and set(stored["fold"]) == {1}


@pytest.mark.slow
def test_a_folds_ensemble_is_served_with_its_pooled_out_of_fold_threshold_and_metrics(tmp_path: Path) -> None:
    from melanoma_ml.evaluation import threshold_for_sensitivity
    from melanoma_ml.evaluation.metrics import roc_auc
    from melanoma_ml.serving.registry import ModelRegistry

    config = load_config(
        "tiny", {"artifact_root": str(tmp_path / "artifacts"), "evaluation": {"n_bootstrap": 200}}
    )
    assert config.serving.ensemble == "folds"
    results = fold_results(tmp_path, config, "test_efficientnet", 0.3, "ens")
    outcome = offer(tmp_path, config, "test_efficientnet", 0.3, "ens", results=results)
    assert outcome.decision.promote and "mean of 2 fold models" in outcome.served_model
    registry = ModelRegistry(ArtifactPaths(tmp_path / "artifacts").registry)
    manifest = registry.manifest(outcome.registered)
    ensemble = manifest.ensemble
    assert ensemble.kind == "folds"
    # member 0 is the best fold (Grad-CAM explains it); every member knows its checkpoint and fold
    assert [m.fold for m in ensemble.members] == [1, 0]
    assert [m.checkpoint_sha256 for m in ensemble.members] == [
        results[1].weights_sha256,
        results[0].weights_sha256,
    ]

    pooled = pd.concat([r.oof for r in results], ignore_index=True)
    stored = manifest.oof_frame()
    assert sorted(stored["image_name"]) == sorted(pooled["image_name"]) and set(stored["fold"]) == {0, 1}
    y, p = stored["target"].to_numpy(), stored["prob"].to_numpy()
    assert manifest.metrics["auc"].value == pytest.approx(roc_auc(y, p))
    calibrated = manifest.calibration.calibrator().apply(p)
    assert manifest.threshold == threshold_for_sensitivity(
        y, calibrated, config.evaluation.target_sensitivity
    )

    bundle = registry.load_current()
    assert len(bundle.scorers) == 2
    # the same networks offered again are recognised as already served
    again = offer(tmp_path, config, "test_efficientnet", 0.3, "ens", results=results)
    assert not again.decision.promote and "already served" in again.decision.reason


@pytest.mark.slow
def test_a_top_k_bundle_averages_the_best_backbones_fold_models(tmp_path: Path) -> None:
    from melanoma_ml.evaluation.ensemble import averaged_oof
    from melanoma_ml.serving.registry import ModelRegistry

    overrides = {"serving": {"ensemble": "top_k", "ensemble_top_k": 2}, "evaluation": {"n_bootstrap": 200}}
    config = load_config("tiny", {"artifact_root": str(tmp_path / "artifacts"), **overrides})
    results = {
        "test_efficientnet": fold_results(tmp_path, config, "test_efficientnet", 0.5, "effnet"),
        "test_resnet": fold_results(tmp_path, config, "test_resnet", 0.3, "resnet"),
    }
    reports = {b: pipeline.evaluate_backbone(config, b, r) for b, r in results.items()}
    board = pipeline.rank_backbones(config, reports)
    outcome = pipeline.promote_best(config, board, reports, results, data_version="top_k")
    assert outcome.decision.promote and "mean of 4 fold models" in outcome.served_model
    manifest = ModelRegistry(ArtifactPaths(tmp_path / "artifacts").registry).manifest(outcome.registered)
    assert manifest.ensemble.kind == "top_k"
    backbones = [m.model_spec.backbone for m in manifest.ensemble.members]
    assert backbones[0] == board.candidate and sorted(set(backbones)) == ["test_efficientnet", "test_resnet"]
    assert manifest.backbone == "+".join(dict.fromkeys(backbones))
    pooled = [pd.read_parquet(ArtifactPaths(tmp_path / "artifacts").oof(b)) for b in board.top_backbones(2)]
    expected = averaged_oof(pooled, "probability")
    stored = manifest.oof_frame().merge(expected, on="image_name", suffixes=("", "_expected"))
    assert len(stored) == len(expected)
    np.testing.assert_allclose(stored["prob"], stored["prob_expected"])


@pytest.mark.slow
@pytest.mark.parametrize("stored_fold", [0, None], ids=["folds-remade", "no-fold-in-manifest"])
def test_gallery_shows_the_bundles_own_validation_images(tmp_path: Path, stored_fold: int | None) -> None:
    from PIL import Image

    from melanoma_ml.serving.registry import ModelRegistry

    config = load_config("tiny", {"artifact_root": str(tmp_path / "artifacts")})
    [result, _] = fold_results(tmp_path, config, "test_efficientnet", 0.6, "gallery")
    table = rows()
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    for name in table["image_name"]:
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            tmp_path / "img" / f"{name}.png"
        )
    table["image_path"] = [str(tmp_path / "img" / f"{n}.png") for n in table["image_name"]]
    own = result.oof  # fold 0's validation rows
    provenance = {"oof": {c: own[c].tolist() for c in OOF_KEEP}, "fold": stored_fold}
    from melanoma_ml.training.checkpoint import load_checkpoint

    net, spec, _ = load_checkpoint(result.checkpoint_dir)
    registry = ModelRegistry(ArtifactPaths(tmp_path / "artifacts").registry)
    version = registry.register_bundle(
        net, spec, threshold=0.5, metrics={}, data_version="d", code_version="c", **provenance
    )
    registry.promote(version)

    remade = table.assign(fold=1 - table["fold"])  # fold 0 now holds what the model trained on
    gallery = pipeline.explain_gallery(config, remade, n_images=4)
    assert gallery.version == version and len(gallery.items) == 4
    assert {item.image_name for item in gallery.items} <= set(own["image_name"])


def fold_results_with_own_encoders(tmp_path: Path, config, table: pd.DataFrame) -> list:
    """Two fold checkpoints, each with the metadata encoder fitted on its own training rows (the other fold),
    as training makes them; OOF probabilities separate the classes a little."""
    import torch

    from melanoma_ml.features import MetadataEncoder
    from melanoma_ml.model import build_model, normalization_for
    from melanoma_ml.spec import ModelSpec
    from melanoma_ml.training.checkpoint import save_checkpoint
    from melanoma_ml.training.train import OOF_COLUMNS, FoldResult

    table = table.assign(
        prob=0.3 + 0.4 * table["target"] + 0.05 * (table.index % 3), backbone="test_efficientnet"
    )
    model_config = config.model_for("test_efficientnet")
    results = []
    for fold in (0, 1):
        encoder = MetadataEncoder.fit(table[table["fold"] != fold])
        torch.manual_seed(fold)
        net = build_model(model_config, encoder.n_features).eval()
        norm = normalization_for(net.backbone)
        spec = ModelSpec(model_config, 32, norm["mean"], norm["std"], encoder)
        out = save_checkpoint(tmp_path / "own" / f"fold{fold}", net, spec, {"fold": fold})
        oof = table[table["fold"] == fold][list(OOF_COLUMNS)].reset_index(drop=True)
        results.append(
            FoldResult("test_efficientnet", fold, out, sha256_file(out / "weights.safetensors"), 1,
                       0.8 + fold / 100, 1, 100.0, 1.0, 60, 60, oof, pd.DataFrame({"epoch": [1]}), spec)
        )  # fmt: skip
    return results


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["onnxruntime", "auto"])
def test_a_fold_ensemble_whose_encoders_differ_in_width_is_exported_member_by_member(
    tmp_path: Path, runtime: str
) -> None:
    """Issue 19: a fold that never saw a site has a narrower encoder; each member is exported, probed and
    parity-checked with its own encoding (it crashed with ``mat1 and mat2 shapes cannot be multiplied``)."""
    from PIL import Image

    from melanoma_ml.artifacts import artifact_paths
    from melanoma_ml.images.cache import build_image_cache
    from melanoma_ml.serving.registry import ModelRegistry

    overrides = {"serving": {"runtime": runtime}, "evaluation": {"n_bootstrap": 50}}
    config = load_config("tiny", {"artifact_root": str(tmp_path / "artifacts"), **overrides})
    table = rows()
    table.loc[table["fold"] == 0, "anatom_site_general_challenge"] = ["torso", "head/neck"] * (
        N_PATIENTS // 2
    )
    rng = np.random.default_rng(1)
    (tmp_path / "img").mkdir()
    for name in table["image_name"]:
        pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "img" / f"{name}.png")
    table["image_path"] = [str(tmp_path / "img" / f"{n}.png") for n in table["image_name"]]
    build_image_cache(table, artifact_paths(config).cache(32), 32)
    results = fold_results_with_own_encoders(tmp_path, config, table)
    widths = [r.spec.encoder.n_features for r in results]
    assert widths[0] != widths[1]  # fold 0's model trained on fold 1's rows, which lack head/neck

    report = pipeline.evaluate_backbone(config, "test_efficientnet", results)
    board = pipeline.rank_backbones(config, {"test_efficientnet": report})
    outcome = pipeline.promote_best(
        config, board, {"test_efficientnet": report}, {"test_efficientnet": results}, data_version="own",
        folds_table=table,
    )  # fmt: skip
    assert outcome.decision.promote, outcome.decision.reason
    registry = ModelRegistry(ArtifactPaths(tmp_path / "artifacts").registry)
    manifest = registry.manifest(outcome.registered)
    members = manifest.ensemble.members
    assert [m.model_spec.encoder.n_features for m in members] == [widths[m.fold] for m in members]
    reference = manifest.monitor_reference  # the serving monitor's: the metadata of the out-of-fold rows
    assert reference.n_rows == len(manifest.oof.image_name)
    assert {"torso", "head/neck"} <= set(reference.mix["site"])
    for member in members:
        assert (member.runtime.runtime, member.runtime.note) == ("onnxruntime", ""), member.runtime
        assert member.runtime.parity["max_abs_prob_diff"] <= config.serving.runtime_parity_tolerance
    served = registry.load_current()
    records = [{"age": 50.0, "sex": "male", "site": "head/neck"}, {"age": None, "sex": None, "site": "torso"}]
    images = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in records]
    from melanoma_ml.serving.inference import predict

    got = predict(served, images, records)
    assert got.shape == (2,) and np.all((got >= 0) & (got <= 1))
