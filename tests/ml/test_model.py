"""The fused network: shapes, backbone validation, pretrained spec handling."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from melanoma_ml.config import ModelConfig
from melanoma_ml.model import (
    PretrainedWeightsUnavailable,
    build_model,
    create_backbone,
    normalization_for,
    validate_backbone,
)


@pytest.mark.parametrize("backbone", ["test_efficientnet", "test_resnet", "test_convnext"])
def test_forward_gives_one_logit_per_image(backbone):
    net = build_model(
        ModelConfig(backbone=backbone, pretrained=False, meta_hidden=[16, 8]), n_meta_features=5
    )
    net.eval()
    out = net(torch.randn(3, 3, 32, 32), torch.randn(3, 5))
    assert out.shape == (3,)
    assert torch.isfinite(out).all()


def test_head_width_follows_backbone_num_features():
    net = build_model(ModelConfig(backbone="test_efficientnet", pretrained=False), n_meta_features=4)
    assert net.head[-1].in_features == net.backbone.num_features + 64


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(ValueError, match="efficientnet_b0"):
        validate_backbone("efficientnet_bo")


def test_pretrained_missing_local_file_says_what_to_do(tmp_path):
    with pytest.raises(PretrainedWeightsUnavailable, match="local weights file not found"):
        create_backbone("test_efficientnet", str(tmp_path / "missing.safetensors"))


def test_pretrained_from_local_file_loads_those_weights(tmp_path):
    source = create_backbone("test_efficientnet", False)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    loaded = create_backbone("test_efficientnet", str(weights))
    for key, value in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


def test_pretrained_true_offline_explains_the_local_file_option(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PretrainedWeightsUnavailable, match="model.pretrained to that file"):
        create_backbone("test_efficientnet", True)


def test_normalization_comes_from_timm():
    backbone = create_backbone("test_efficientnet", False)
    norm = normalization_for(backbone)
    assert len(norm["mean"]) == 3 and len(norm["std"]) == 3


def test_pretrained_false_as_text_builds_a_random_backbone(tmp_path, monkeypatch):
    """``MELANOMA_MODEL__PRETRAINED=false`` used to reach create_backbone as a weights path called "false"."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MELANOMA_MODEL__PRETRAINED", "false")
    from melanoma_ml.config import load_config

    config = load_config("demo").model_for("test_efficientnet")
    net = build_model(config, n_meta_features=3)
    assert net(torch.randn(2, 3, 32, 32), torch.randn(2, 3)).shape == (2,)
