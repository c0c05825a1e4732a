"""BundleManifest: the typed manifest.json, its JSON round trip and what it refuses (no torch, no files)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from pydantic import ValidationError

from melanoma_ml.config import ModelConfig
from melanoma_ml.evaluation.estimate import Estimate
from melanoma_ml.features import MetadataEncoder
from melanoma_ml.serving.manifest import (
    MANIFEST_SCHEMA_VERSION,
    BundleManifest,
    ValidationPredictions,
    from_schema_2,
    stored_schema,
)
from melanoma_ml.spec import ModelSpec

SPEC = ModelSpec(
    ModelConfig(backbone="test_resnet", meta_hidden=[8], meta_dropout=0.1, head_dropout=0.0),
    32,
    [0.5] * 3,
    [0.25] * 3,
    MetadataEncoder(age_mean=50.0, age_std=15.0, sexes=("female", "male"), sites=("torso",)),
)
OOF = pd.DataFrame(
    {
        "image_name": ["ISIC_1", "ISIC_2", "ISIC_3"],
        "group_id": ["patient:P1", "patient:P1", "patient:P2"],
        "fold": [2, 2, 2],
        "target": [0, 1, 0],
        "prob": [0.1, 0.8, 0.3],
        "backbone": "test_resnet",  # not stored
    }
)


def member(**overrides) -> dict:
    """Member 0 of a one-network bundle: the weights file, its spec and its fold provenance."""
    return {
        "weights": {"name": "weights.safetensors", "sha256": "a" * 64},
        "model_spec": SPEC,
        "fold": 2,
        "checkpoint_sha256": "b" * 64,
        **overrides,
    }


def manifest(members: list[dict] | None = None, kind: str = "best_fold", **overrides) -> BundleManifest:
    fields = {
        "version": "v0002",
        "threshold": 0.42,
        "metrics": {"auc": Estimate(0.8, 0.7, 0.9, 0.9), "brier": {"value": 0.1, "lo": None, "hi": None}},
        "data_version": "folds-1",
        "code_version": "melanoma_ml-0.1",
        "created_at": "2026-11-30T00:00:00+00:00",
        "ensemble": {"kind": kind, "average": "probability", "members": members or [member()]},
        "oof": ValidationPredictions.from_frame(OOF),
    }
    return BundleManifest.model_validate({**fields, **overrides})


def test_json_round_trip_is_lossless_and_plain() -> None:
    written = manifest()
    text = json.dumps(written.to_json(), allow_nan=False)
    again = BundleManifest.model_validate(json.loads(text))
    assert again == written
    assert again.model_spec == SPEC and again.backbone == "test_resnet"
    assert again.weights_sha256 == "a" * 64 and again.describe_model() == "test_resnet fold 2"
    assert again.metrics["auc"] == Estimate(0.8, 0.7, 0.9, 0.9)
    assert again.metrics["brier"].text() == "0.100 (no CI)"
    data = json.loads(text)
    assert data["schema_version"] == MANIFEST_SCHEMA_VERSION == 3 == stored_schema(data)
    assert data["metrics"]["auc"] == {"value": 0.8, "lo": 0.7, "hi": 0.9, "level": 0.9}
    assert data["oof"]["image_name"] == ["ISIC_1", "ISIC_2", "ISIC_3"] and "backbone" not in data["oof"]
    assert not {"model_spec", "weights_sha256", "fold", "checkpoint_sha256"} & set(data)  # one shape
    pd.testing.assert_frame_equal(again.oof_frame(), OOF[list(ValidationPredictions.columns())])


def test_schema_1_names_its_version_format_version() -> None:
    assert stored_schema({"format_version": 1, "extra": {}}) == 1
    assert stored_schema({}) is None


def _set(path: str, value):
    """A change to the manifest's JSON at a dotted ``path`` (list indices as numbers)."""

    def change(data: dict) -> dict:
        *parents, last = path.split(".")
        node = data
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(last) if isinstance(node, list) else last] = value
        return data

    return change


@pytest.mark.parametrize(
    ("change", "where"),
    [
        (_set("threshold", None), "threshold"),
        (_set("metrics.auc", {"value": 0.8}), "metrics.auc"),
        (_set("ensemble.members.0.model_spec", {"backbone": "x"}), "ensemble.members.0.model_spec"),
        (_set("ensemble.members.0.weights.sha256", "not-a-sha"), "ensemble.members.0.weights.sha256"),
        (_set("ensemble.members.0.weights.name", "../w.safetensors"), "ensemble.members.0.weights"),
        (_set("ensemble.members", []), "ensemble.members"),
        (_set("ensemble.kind", "best"), "ensemble.kind"),
        (_set("schema_version", 2), "schema_version"),  # schema 2 is read through from_schema_2 only
        (_set("fold", 1), "fold"),  # schema 2's top-level provenance is not a field any more
        (_set("extra", {"fold": 1}), "extra"),  # schema 1's free-form dict is not a field any more
        (_set("oof.target", [0, 2, 0]), "oof.target"),
    ],
)
def test_bad_fields_are_refused_by_name(change, where) -> None:
    data = change(manifest().to_json())
    with pytest.raises(ValidationError) as refused:
        BundleManifest.model_validate(data)
    assert where in {".".join(map(str, e["loc"][: where.count(".") + 1])) for e in refused.value.errors()}


def test_a_missing_required_field_is_refused() -> None:
    data = manifest().to_json()
    del data["ensemble"]
    with pytest.raises(ValidationError, match="ensemble\n  Field required"):
        BundleManifest.model_validate(data)


def test_provenance_is_optional_and_an_absent_oof_gives_an_empty_table() -> None:
    bare = manifest([member(fold=None, checkpoint_sha256=None)], version=None, oof=None)
    assert bare.oof_frame().empty and list(bare.oof_frame().columns) == list(ValidationPredictions.columns())
    assert bare.describe_model() == "test_resnet"


def test_one_network_is_one_member_of_kind_best_fold_and_its_oof_is_its_own_fold() -> None:
    with pytest.raises(ValidationError, match="kind 'best_fold' serves one network, got 2 members"):
        manifest([member(), member(weights={"name": "members/member1.safetensors", "sha256": "c" * 64})])
    with pytest.raises(ValidationError, match=r"oof holds rows of folds \[2\], but the bundle serves fold 1"):
        manifest([member(fold=1)])
    with pytest.raises(ValidationError, match="member 0 must be weights.safetensors"):
        manifest([member(weights={"name": "other.safetensors", "sha256": "a" * 64})])


def test_hashed_files_is_every_hashed_file_once_in_member_order() -> None:
    second = {"name": "members/member1.safetensors", "sha256": "c" * 64}
    onnx = {"name": "model.onnx", "sha256": "d" * 64}
    ood = {"file": {"name": "ood.safetensors", "sha256": "e" * 64}, "method": "mahalanobis", "threshold": 1.0}
    both = manifest(
        [member(runtime_file=onnx), member(weights=second, fold=1, runtime_file=None)], kind="folds", ood=ood
    )
    assert [f.name for f in both.hashed_files()] == [
        "weights.safetensors",
        "model.onnx",
        "members/member1.safetensors",
        "ood.safetensors",
    ]
    assert [f.sha256 for f in both.hashed_files()] == ["a" * 64, "d" * 64, "c" * 64, "e" * 64]
    assert both.describe_model() == "test_resnet: probability mean of 2 fold models"
    clash = {"name": "model.onnx", "sha256": "f" * 64}
    with pytest.raises(ValidationError, match="'model.onnx' is listed with two different sha256"):
        manifest([member(runtime_file=onnx), member(weights=second, runtime_file=clash)], kind="folds")


def _schema_2_one_network(runtime: dict | None = None) -> dict:
    """A one-network manifest as schema 2 wrote it: provenance and the runtime file at the top level."""
    data = manifest().to_json()
    (stored,) = data.pop("ensemble")["members"]
    return {
        **data,
        "schema_version": 2,
        "model_spec": stored["model_spec"],
        "weights_sha256": stored["weights"]["sha256"],
        "fold": 2,
        "checkpoint_sha256": "b" * 64,
        "runtime": runtime,
    }


def test_a_schema_2_one_network_manifest_becomes_a_one_member_ensemble() -> None:
    onnx = {"name": "model.onnx", "sha256": "d" * 64}
    runtime = {"runtime": "onnxruntime", "precision": "fp32", "file": onnx, "parity": {"n_inputs": 8.0}}
    old = _schema_2_one_network(runtime)
    read = BundleManifest.model_validate(from_schema_2(old))
    (first,) = read.ensemble.members
    assert (read.ensemble.kind, first.fold, first.checkpoint_sha256) == ("best_fold", 2, "b" * 64)
    assert (first.weights.name, first.weights.sha256, first.model_spec) == (
        "weights.safetensors",
        "a" * 64,
        SPEC,
    )
    assert first.runtime_file.name == "model.onnx" and first.runtime.runtime == "onnxruntime"
    assert read.runtime.parity == {"n_inputs": 8.0} and [f.name for f in read.hashed_files()] == [
        "weights.safetensors",
        "model.onnx",
    ]
    assert old["schema_version"] == 2 and "ensemble" not in old  # the caller's dict is left as it was
    torch_only = BundleManifest.model_validate(from_schema_2(_schema_2_one_network()))
    assert torch_only.runtime is None and torch_only.ensemble.members[0].runtime is None


def test_a_schema_2_ensemble_keeps_its_members_and_gives_them_the_bundle_runtime() -> None:
    second = {"name": "members/member1.safetensors", "sha256": "c" * 64}
    members = [member(fold=2), member(weights=second, fold=1)]
    data = manifest(members, kind="folds", oof=None).to_json()
    data["ensemble"]["members"][1]["runtime"] = {"runtime": "torch", "precision": "fp32"}
    old = {
        **data,
        "schema_version": 2,
        "model_spec": data["ensemble"]["members"][0]["model_spec"],
        "weights_sha256": "a" * 64,
        "runtime": {"runtime": "onnxruntime", "precision": "int8", "file": None},
    }
    read = BundleManifest.model_validate(from_schema_2(old))
    runtimes = [(m.runtime.runtime, m.runtime.precision) for m in read.ensemble.members]
    assert runtimes == [("onnxruntime", "int8"), ("torch", "fp32")]  # member 1 chose its own
    with pytest.raises(
        ValueError, match="member 0 must be weights.safetensors with the manifest's weights_sha256"
    ):
        from_schema_2({**old, "weights_sha256": "0" * 64})
    with pytest.raises(ValueError, match="reads schema 2 manifests, got schema 3"):
        from_schema_2(data)
