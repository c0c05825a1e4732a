"""``model.pretrained`` as a per-backbone mapping: each backbone of a run starts from its own weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from pydantic import ValidationError

from melanoma_ml.config import ModelConfig, TrainingConfig, load_config
from melanoma_ml.errors import InputValueError
from melanoma_ml.model import build_model
from melanoma_ml.training.recipe import resolve_recipe
from melanoma_ml.weights_import import import_weights, pretrained_lineage, write_imported

EFFICIENTNET, RESNET = "test_efficientnet", "test_resnet"


def _imported_file(tmp_path: Path, backbone: str, seed: int) -> tuple[Path, dict[str, torch.Tensor]]:
    """A ``weights import``-written safetensors file of ``backbone`` with seed-specific random weights."""
    torch.manual_seed(seed)
    state = timm.create_model(backbone, pretrained=False).state_dict()
    source = tmp_path / f"{backbone}-{seed}.pth"
    torch.save(state, source)
    out = write_imported(import_weights(source, backbone, check=False), tmp_path / f"{backbone}.safetensors")
    return out, state


def _two_backbone_config(pretrained: object) -> object:
    return load_config("tiny", {"backbones": [EFFICIENTNET, RESNET], "model": {"pretrained": pretrained}})


def test_each_backbone_resolves_to_its_own_entry_and_flag_words_become_booleans() -> None:
    config = _two_backbone_config({EFFICIENTNET: "package:some-wheel", RESNET: "No"})
    assert config.model_for(EFFICIENTNET).pretrained == "package:some-wheel"
    assert config.model_for(RESNET).pretrained is False
    assert config.model_for(RESNET).backbone == RESNET
    # one value still means every backbone
    single = _two_backbone_config("false")
    assert single.model_for(EFFICIENTNET).pretrained is False and single.model_for(RESNET).pretrained is False


def test_a_mapping_missing_a_trained_backbone_is_refused_with_the_fix() -> None:
    with pytest.raises((ValidationError, InputValueError), match=rf"{RESNET}.*give each of them an entry"):
        _two_backbone_config({EFFICIENTNET: False})
    # entries for backbones that are not trained are ignored
    config = _two_backbone_config({EFFICIENTNET: False, RESNET: False, "convnext_tiny": True})
    assert config.model_for(RESNET).pretrained is False


def test_a_model_config_asked_for_an_unmapped_backbone_names_it() -> None:
    model = ModelConfig(backbone=RESNET, pretrained={EFFICIENTNET: False})
    with pytest.raises(InputValueError, match=rf"not '{RESNET}'.*add '{RESNET}: "):
        model.pretrained_for(RESNET)


def test_the_mapping_arrives_from_the_environment_as_json(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.setenv("MELANOMA_BACKBONES", json.dumps([EFFICIENTNET, RESNET]))
    monkeypatch.setenv(
        "MELANOMA_MODEL__PRETRAINED", json.dumps({EFFICIENTNET: "/w/e.safetensors", RESNET: "0"})
    )
    config = load_config("tiny")
    assert config.model_for(EFFICIENTNET).pretrained == "/w/e.safetensors"
    assert config.model_for(RESNET).pretrained is False


def test_the_recipe_follows_each_backbones_own_weights() -> None:
    config = _two_backbone_config({EFFICIENTNET: "/w/e.safetensors", RESNET: False})
    training = TrainingConfig()
    assert resolve_recipe(config.model_for(EFFICIENTNET), training).kind == "finetune"
    assert resolve_recipe(config.model_for(RESNET), training).kind == "scratch"


def test_each_backbone_is_built_from_its_own_file_with_its_own_lineage(tmp_path: Path) -> None:
    efficientnet_file, efficientnet_state = _imported_file(tmp_path, EFFICIENTNET, seed=1)
    resnet_file, resnet_state = _imported_file(tmp_path, RESNET, seed=2)
    config = _two_backbone_config({EFFICIENTNET: str(efficientnet_file), RESNET: str(resnet_file)})
    for backbone, state, path in (
        (EFFICIENTNET, efficientnet_state, efficientnet_file),
        (RESNET, resnet_state, resnet_file),
    ):
        model_config = config.model_for(backbone)
        built = build_model(model_config, n_meta_features=4).backbone.state_dict()
        for key, value in built.items():
            if key in state:  # the classifier is dropped (num_classes=0)
                torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=f"{backbone}: {key}")
        lineage = pretrained_lineage(model_config.pretrained, backbone)
        assert lineage is not None and str(path.resolve()) in lineage.origin
    # a ModelConfig holding the mapping itself builds the same network as the resolved one
    direct = ModelConfig(backbone=RESNET, pretrained={RESNET: str(resnet_file)})
    first_key = next(iter(resnet_state))
    torch.testing.assert_close(
        build_model(direct, n_meta_features=4).backbone.state_dict()[first_key], resnet_state[first_key]
    )
