"""Tabular features through the service: a bundle trained with them takes ``tabular: {name: value}``
optionally (left out -> the encoder's missing rule), and a bundle without them keeps its old request shape."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from app_helpers import SITES, SIZE, register_tiny
from PIL import Image

from melanoma_ml.config import ModelConfig, ServingConfig
from melanoma_ml.features import MetadataEncoder
from melanoma_ml.serving.inference import predict
from melanoma_ml.serving.registry import ModelRegistry
from melanoma_ml.serving.request_fields import (
    InvalidRequest,
    parse_tabular,
)
from melanoma_ml.serving.service import (
    ModelService,
    PredictionRequest,
)
from melanoma_ml.spec import ModelSpec

COLUMNS = ("clin_size_long_diam_mm", "tbp_lv_areaMM2")


def _register_tabular(registry: ModelRegistry) -> str:
    torch.manual_seed(0)
    encoder = MetadataEncoder(
        age_mean=50.0,
        age_std=15.0,
        sexes=("female", "male"),
        sites=SITES,
        tabular=COLUMNS,
        tabular_median=(4.0, 10.0),
        tabular_scale=(2.0, 5.0),
    )
    network = ModelConfig(backbone="test_efficientnet", meta_hidden=[8], meta_dropout=0.0, head_dropout=0.0)
    spec = ModelSpec(network, SIZE, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], encoder)
    net = spec.build_network().eval()
    with torch.no_grad():  # make the tabular inputs matter to the logit
        net.meta.net[0].weight[:, -4:] = 3.0
    version = registry.register_bundle(
        net, spec, threshold=0.5, metrics={"auc": {"value": 0.8, "lo": 0.7, "hi": 0.9}},
        data_version="test", code_version="test",
    )  # fmt: skip
    registry.promote(version, reason="test")
    return version


@pytest.fixture()
def upload(tmp_path: Path) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(
        buffer, "PNG"
    )
    return buffer.getvalue()


@pytest.fixture()
def service(tmp_path: Path) -> ModelService:
    registry = ModelRegistry(tmp_path / "registry")
    _register_tabular(registry)
    return ModelService(registry, ServingConfig(tta=False))


def test_parse_tabular_fills_every_column_and_reads_json_text():
    assert parse_tabular(None, COLUMNS) == {c: None for c in COLUMNS}
    assert parse_tabular("", COLUMNS) == parse_tabular({}, COLUMNS) == {c: None for c in COLUMNS}
    assert parse_tabular('{"tbp_lv_areaMM2": "12.5"}', COLUMNS) == {
        "clin_size_long_diam_mm": None,
        "tbp_lv_areaMM2": 12.5,
    }
    assert parse_tabular({"clin_size_long_diam_mm": "unknown"}, COLUMNS)["clin_size_long_diam_mm"] is None
    assert parse_tabular(None, ()) is None and parse_tabular(" ", ()) is None


@pytest.mark.parametrize(
    "value,columns,match",
    [
        ("{not json", COLUMNS, "JSON object"),
        ("[1, 2]", COLUMNS, "object mapping"),
        ({"tbp_lv_x": 1}, COLUMNS, "unknown tabular features"),
        ({"tbp_lv_areaMM2": "big"}, COLUMNS, "finite number"),
        ({"tbp_lv_areaMM2": float("inf")}, COLUMNS, "finite number"),
        ({"tbp_lv_areaMM2": True}, COLUMNS, "finite number"),
        ({"tbp_lv_areaMM2": 1.0}, (), "uses no tabular features"),
    ],
)
def test_parse_tabular_says_what_to_fix(value, columns, match):
    with pytest.raises(InvalidRequest, match=match):
        parse_tabular(value, columns)


def test_predict_with_tabular_given_encodes_them_like_the_library(service, upload):
    given = {"clin_size_long_diam_mm": 9.0, "tbp_lv_areaMM2": "30"}
    result = service.predict(
        PredictionRequest(image=upload, age=60, sex="male", tabular=given, cam_method="none")
    )
    expected = {"clin_size_long_diam_mm": 9.0, "tbp_lv_areaMM2": 30.0}
    assert result.to_json()["metadata"]["tabular"] == expected
    assert result.model.tabular_features == COLUMNS
    image = service.decode(upload)
    direct = predict(
        result.model.bundle,
        [image],
        [{"age": 60.0, "sex": "male", "site": None, "tabular": expected}],
        views=result.views,  # the bundle's views: the service's config no longer decides them
    )
    assert result.probability == pytest.approx(float(direct[0]), abs=1e-6)


def test_predict_with_tabular_omitted_uses_the_missing_rule_and_the_values_matter(service, upload):
    omitted = service.predict(PredictionRequest(image=upload, age=60, cam_method="none"))
    assert omitted.metadata["tabular"] == {c: None for c in COLUMNS}
    as_json = service.predict(PredictionRequest(image=upload, age=60, tabular="", cam_method="none"))
    assert as_json.probability == omitted.probability
    at_median = service.predict(
        PredictionRequest(image=upload, age=60, tabular={"clin_size_long_diam_mm": 4, "tbp_lv_areaMM2": 10},
                          cam_method="none")
    )  # fmt: skip
    large = service.predict(
        PredictionRequest(image=upload, age=60, tabular={"tbp_lv_areaMM2": 200}, cam_method="none")
    )
    assert at_median.probability != omitted.probability  # missing flags are inputs of their own
    assert large.probability != at_median.probability


def test_a_bundle_without_tabular_features_keeps_the_old_request_and_answer(tmp_path: Path, upload):
    registry = ModelRegistry(tmp_path / "registry")
    register_tiny(registry, seed=1)
    service = ModelService(registry, ServingConfig(tta=False))
    result = service.predict(
        PredictionRequest(image=upload, age="55", sex="male", site="torso", cam_method="none")
    )
    assert result.to_json()["metadata"] == {"age": 55.0, "sex": "male", "site": "torso"}
    assert result.model.tabular_features == ()
    with pytest.raises(InvalidRequest, match="uses no tabular features"):
        service.predict(PredictionRequest(image=upload, tabular={"tbp_lv_areaMM2": 3}, cam_method="none"))


def test_the_cam_explanation_takes_the_tabular_metadata(service, upload):
    result = service.predict(
        PredictionRequest(image=upload, tabular={"tbp_lv_areaMM2": 12}, cam_method="gradcam")
    )
    assert result.overlay is not None and result.overlay.shape == (SIZE, SIZE, 3)


def test_the_app_passes_the_optional_json_textbox_and_names_the_columns(service, upload, tmp_path: Path):
    from melanoma_ml.serving.app import run_prediction, tabular_hint

    path = tmp_path / "upload.png"
    path.write_bytes(upload)
    answer, *_ = run_prediction(service, str(path), "60", None, None, False, "none", None)
    assert answer["metadata"]["tabular"] == {c: None for c in COLUMNS}  # the textbox may be left out
    answer, *_ = run_prediction(
        service, str(path), "60", None, None, False, "none", None, '{"tbp_lv_areaMM2": 12}'
    )
    assert answer["metadata"]["tabular"]["tbp_lv_areaMM2"] == 12.0
    assert all(c in tabular_hint(service.status().model) for c in COLUMNS)
    assert "no tabular features" in tabular_hint(None)
