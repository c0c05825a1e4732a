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


def manifest(**overrides) -> BundleManifest:
    fields = {
        "version": "v0002",
        "model_spec": SPEC,
        "threshold": 0.42,
        "metrics": {"auc": Estimate(0.8, 0.7, 0.9, 0.9), "brier": {"value": 0.1, "lo": None, "hi": None}},
        "data_version": "folds-1",
        "code_version": "melanoma_ml-0.1",
        "created_at": "2026-11-30T00:00:00+00:00",
        "weights_sha256": "a" * 64,
        "fold": 2,
        "checkpoint_sha256": "b" * 64,
        "oof": ValidationPredictions.from_frame(OOF),
    }
    return BundleManifest.model_validate({**fields, **overrides})


def test_json_round_trip_is_lossless_and_plain() -> None:
    written = manifest()
    text = json.dumps(written.to_json(), allow_nan=False)
    again = BundleManifest.model_validate(json.loads(text))
    assert again == written
    assert again.model_spec == SPEC and again.backbone == "test_resnet"
    assert again.metrics["auc"] == Estimate(0.8, 0.7, 0.9, 0.9)
    assert again.metrics["brier"].text() == "0.100 (no CI)"
    data = json.loads(text)
    assert data["schema_version"] == MANIFEST_SCHEMA_VERSION == stored_schema(data)
    assert data["metrics"]["auc"] == {"value": 0.8, "lo": 0.7, "hi": 0.9, "level": 0.9}
    assert data["oof"]["image_name"] == ["ISIC_1", "ISIC_2", "ISIC_3"] and "backbone" not in data["oof"]
    pd.testing.assert_frame_equal(again.oof_frame(), OOF[list(ValidationPredictions.columns())])


def test_schema_1_names_its_version_format_version() -> None:
    assert stored_schema({"format_version": 1, "extra": {}}) == 1
    assert stored_schema({}) is None


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"threshold": None}, "threshold"),
        ({"metrics": {"auc": {"value": 0.8}}}, "metrics.auc"),
        ({"model_spec": {"backbone": "x"}}, "model_spec"),
        ({"weights_sha256": "not-a-sha"}, "weights_sha256"),
        ({"schema_version": 1}, "schema_version"),
        ({"extra": {"fold": 1}}, "extra"),  # schema 1's free-form dict is not a field any more
        ({"oof": {**ValidationPredictions.from_frame(OOF).model_dump(), "target": [0, 2, 0]}}, "oof.target"),
    ],
)
def test_bad_fields_are_refused_by_name(change, where) -> None:
    with pytest.raises(ValidationError) as refused:
        manifest(**change)
    assert where in {".".join(map(str, e["loc"][: where.count(".") + 1])) for e in refused.value.errors()}


def test_a_missing_required_field_is_refused() -> None:
    data = manifest().to_json()
    del data["weights_sha256"]
    with pytest.raises(ValidationError, match="weights_sha256\n  Field required"):
        BundleManifest.model_validate(data)


def test_provenance_is_optional_and_an_absent_oof_gives_an_empty_table() -> None:
    bare = manifest(version=None, fold=None, checkpoint_sha256=None, oof=None)
    assert bare.oof_frame().empty and list(bare.oof_frame().columns) == list(ValidationPredictions.columns())
