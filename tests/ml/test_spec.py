"""ModelSpec: holds the network's ModelConfig (no copied fields) and reads the JSON every old file has."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from melanoma_ml.config import ModelConfig
from melanoma_ml.errors import MelanomaInputError
from melanoma_ml.features import MetadataEncoder
from melanoma_ml.spec import ARCHITECTURE_FIELDS, ModelSpec

ENCODER = MetadataEncoder(age_mean=50.0, age_std=12.0, sexes=("female", "male"), sites=("torso",))

OLD_SPEC_JSON = """{
  "backbone": "test_efficientnet",
  "meta_hidden": [8, 4],
  "meta_dropout": 0.1,
  "head_dropout": 0.2,
  "image_size": 32,
  "mean": [0.485, 0.456, 0.406],
  "std": [0.229, 0.224, 0.225],
  "encoder": {"version": 1, "age_mean": 50.0, "age_std": 12.0, "sexes": ["female", "male"],
              "sites": ["torso"], "feature_names": ["age_z", "age_missing", "sex=female", "sex=male",
              "sex_missing", "site=torso", "site_missing"]}
}"""
"""``spec.json`` as checkpoints and bundles were written before the spec held a ``ModelConfig``."""


def test_the_spec_keeps_every_model_config_field_but_pretrained_and_tabular_features():
    assert set(ARCHITECTURE_FIELDS) == set(ModelConfig.model_fields) - {"pretrained", "tabular_features"}
    assert ARCHITECTURE_FIELDS == ("backbone", "meta_hidden", "meta_dropout", "head_dropout")


def test_a_spec_json_in_the_old_shape_loads_and_is_written_back_unchanged():
    old = json.loads(OLD_SPEC_JSON)
    spec = ModelSpec.from_dict(old)
    assert spec.network == ModelConfig(
        backbone="test_efficientnet", pretrained=False, meta_hidden=[8, 4], meta_dropout=0.1, head_dropout=0.2
    )
    assert spec.backbone == "test_efficientnet"
    assert (spec.image_size, spec.mean, spec.encoder) == (32, [0.485, 0.456, 0.406], ENCODER)
    assert spec.to_dict() == old
    assert list(spec.to_dict()) == list(old)


def test_the_network_is_built_from_the_held_config_without_the_hub():
    spec = ModelSpec.from_dict(json.loads(OLD_SPEC_JSON))
    net = spec.build_network()
    widths = [layer.out_features for layer in net.meta.net if isinstance(layer, torch.nn.Linear)]
    assert widths == [8, 4] and net.meta.out_features == 4


def test_training_config_is_copied_with_random_init_and_stays_independent():
    config = ModelConfig(backbone="test_efficientnet", pretrained="/weights/b0.safetensors", meta_hidden=[8])
    spec = ModelSpec(config, 32, [0.5] * 3, [0.25] * 3, ENCODER)
    assert spec.network.pretrained is False and config.pretrained == "/weights/b0.safetensors"
    config.meta_hidden = [16]
    assert spec.network.meta_hidden == [8]
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_missing_fields_are_named():
    old = json.loads(OLD_SPEC_JSON)
    del old["meta_dropout"], old["std"]
    with pytest.raises(MelanomaInputError, match=r"missing fields \['meta_dropout', 'std'\]"):
        ModelSpec.from_dict(old)


def test_bad_network_values_are_refused_by_the_config_rules():
    old = json.loads(OLD_SPEC_JSON)
    old["meta_hidden"] = [0]
    with pytest.raises(ValidationError, match="meta_hidden"):
        ModelSpec.from_dict(old)


def test_the_network_must_be_a_model_config():
    with pytest.raises(TypeError, match="ModelConfig"):
        ModelSpec("test_efficientnet", 32, [0.5] * 3, [0.25] * 3, ENCODER)  # type: ignore[arg-type]


def test_colour_constancy_round_trips_and_old_specs_read_as_none():
    assert ModelSpec.from_dict(json.loads(OLD_SPEC_JSON)).color_constancy == "none"
    config = ModelConfig(backbone="test_efficientnet", meta_hidden=[8])
    spec = ModelSpec(config, 32, [0.5] * 3, [0.25] * 3, ENCODER, color_constancy="shades_of_gray")
    stored = json.loads(json.dumps(spec.to_dict()))
    assert stored["color_constancy"] == "shades_of_gray"
    assert ModelSpec.from_dict(stored) == spec
    assert "color_constancy" not in ModelSpec(config, 32, [0.5] * 3, [0.25] * 3, ENCODER).to_dict()


def test_an_unknown_colour_constancy_in_a_spec_is_refused():
    old = json.loads(OLD_SPEC_JSON) | {"color_constancy": "retinex"}
    with pytest.raises(MelanomaInputError, match="color_constancy"):
        ModelSpec.from_dict(old)
