"""CAM explanations: target layers per backbone family, both methods, hooks released, net state restored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from melanoma_ml.config import ModelConfig, ServingConfig
from melanoma_ml.features import MetadataEncoder
from melanoma_ml.model import MelanomaNet
from melanoma_ml.serving.bundle import Bundle
from melanoma_ml.serving.explain import (
    Explanation,
    default_target_layer,
    explain,
    resolve_layer,
    target_layer_names,
)
from melanoma_ml.spec import ModelSpec

SIZE = 64
META = {"age": 60, "sex": "male", "site": "torso"}


def tiny_spec(backbone: str) -> ModelSpec:
    encoder = MetadataEncoder(
        age_mean=50.0, age_std=15.0, sexes=("female", "male"), sites=("head/neck", "torso")
    )
    network = ModelConfig(backbone=backbone, meta_hidden=[8], meta_dropout=0.1, head_dropout=0.1)
    return ModelSpec(network, SIZE, [0.5] * 3, [0.25] * 3, encoder)


@pytest.fixture(scope="module")
def nets() -> dict[str, tuple[nn.Module, ModelSpec]]:
    torch.manual_seed(0)
    out = {}
    for backbone in ("test_efficientnet", "test_resnet", "test_convnext"):
        spec = tiny_spec(backbone)
        out[backbone] = (spec.build_network().eval(), spec)
    return out


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(1)
    img = rng.integers(90, 140, (60, 72, 3), dtype=np.uint8)
    img[20:40, 30:50] = (40, 20, 10)  # a dark "lesion"
    return img


def hooks_left(net: nn.Module) -> int:
    return sum(
        len(m._forward_hooks)
        + len(m._forward_pre_hooks)
        + len(m._backward_hooks)
        + len(m._backward_pre_hooks)
        for m in net.modules()
    )


@pytest.mark.parametrize(
    ("backbone", "expected"),
    [
        ("test_efficientnet", ["backbone.conv_head", "backbone.bn2"]),
        ("test_resnet", ["backbone.layer4", "backbone.layer4.0"]),
        ("test_convnext", ["backbone.stages.3"]),
    ],
)
def test_target_layers_follow_the_backbone_family(nets, backbone, expected):
    net, _ = nets[backbone]
    assert target_layer_names(net) == expected
    assert default_target_layer(net) == expected[0]


def test_layer_names_accept_negative_indices_and_name_the_choices(nets):
    net, _ = nets["test_convnext"]
    module, name = resolve_layer(net, "backbone.stages.-1")
    assert name == "backbone.stages.3"
    assert module is net.backbone.stages[3]
    with pytest.raises(ValueError, match=r"no layer named 'backbone.nope'.*\['backbone.stages.3'\]"):
        resolve_layer(net, "backbone.nope")
    with pytest.raises(ValueError, match="no layer named 'backbone.stages.7'"):
        resolve_layer(net, "backbone.stages.7")


def test_unknown_family_falls_back_to_the_last_spatial_feature_map():
    body = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    body.num_features = 6
    net = MelanomaNet(body, n_meta_features=3, meta_hidden=[4]).train()
    assert target_layer_names(net) == ["backbone.2"]  # not the (B, C, 1, 1) global pool
    assert net.training and hooks_left(net) == 0


def test_a_backbone_without_feature_maps_needs_an_explicit_layer():
    body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, 5))
    body.num_features = 5
    with pytest.raises(ValueError, match="pass target_layer="):
        target_layer_names(MelanomaNet(body, n_meta_features=2, meta_hidden=[4]))


@pytest.mark.parametrize("backbone", ["test_efficientnet", "test_resnet", "test_convnext"])
@pytest.mark.parametrize("method", ["eigencam", "gradcam"])
def test_explanations_are_maps_over_the_input_view(nets, image, backbone, method):
    net, spec = nets[backbone]
    result = explain(net, image, META, spec=spec, method=method)
    assert isinstance(result, Explanation)
    assert result.heatmap.shape == (SIZE, SIZE)
    assert result.heatmap.dtype == np.float32
    assert result.heatmap.min() >= 0 and result.heatmap.max() <= 1
    assert np.isfinite(result.heatmap).all()
    assert result.overlay.shape == (SIZE, SIZE, 3) and result.overlay.dtype == np.uint8
    assert result.target_layer == default_target_layer(net, SIZE)
    assert result.method == method
    assert hooks_left(net) == 0


@pytest.mark.parametrize("backbone", ["test_efficientnet", "test_resnet", "test_convnext"])
def test_eigencam_maps_peak_at_one_and_are_not_flat(nets, image, backbone):
    net, spec = nets[backbone]
    heatmap = explain(net, image, META, spec=spec).heatmap
    assert heatmap.max() == pytest.approx(1.0, abs=1e-3)
    assert heatmap.std() > 0.01


@pytest.mark.parametrize("method", ["eigencam", "gradcam"])
def test_the_network_state_is_left_as_found(nets, image, method):
    net, spec = nets["test_efficientnet"]
    frozen = spec.build_network().requires_grad_(False).eval()
    trainable = spec.build_network().train()
    frozen.backbone.conv_head.weight.requires_grad_(True)  # a mixed pattern must survive too
    for model in (frozen, trainable):
        flags = [p.requires_grad for p in model.parameters()]
        mode = model.training
        explain(model, image, META, spec=spec, method=method)
        assert [p.requires_grad for p in model.parameters()] == flags
        assert model.training is mode
        assert all(p.grad is None for p in model.parameters())
        assert hooks_left(model) == 0


def test_explain_works_inside_an_inference_mode_block(nets, image):
    net, spec = nets["test_resnet"]
    with torch.inference_mode():
        result = explain(net, image, META, spec=spec, method="gradcam")
    assert result.heatmap.shape == (SIZE, SIZE)
    assert hooks_left(net) == 0


def test_explain_accepts_a_bundle_an_encoded_vector_and_an_explicit_layer(nets, image):
    net, spec = nets["test_resnet"]
    bundle = Bundle(path=Path("mem"), net=net, spec=spec, manifest={}, threshold=0.5, version="t")
    encoded = spec.encoder.encode_one(60, "male", "torso")
    a = explain(bundle, image, META, method="gradcam", target_layer="backbone.layer3")
    b = explain(net, image, encoded, spec=spec, method="gradcam", target_layer="backbone.layer3")
    assert a.target_layer == "backbone.layer3"
    np.testing.assert_allclose(a.heatmap, b.heatmap, atol=1e-6)


def test_a_feature_map_too_coarse_for_a_heatmap_is_refused(image):
    spec = tiny_spec("test_convnext")
    small = ModelSpec.from_dict({**spec.to_dict(), "image_size": 32})
    net = small.build_network().eval()
    with pytest.raises(
        ValueError, match=r"layer backbone.stages.3 gives a \(1, 64, 1, 1\) feature map.*earlier layer"
    ):
        explain(net, image, META, spec=small, target_layer="backbone.stages.3")
    assert hooks_left(net) == 0
    # stages.2 is 2x2 at 32 px: below the configured minimum side, accepted when the caller lowers it
    with pytest.raises(ValueError, match=r"\(1, 48, 2, 2\) feature map.*cam_min_map_side is 4"):
        explain(net, image, META, spec=small, target_layer="backbone.stages.2", min_side=4)
    assert (
        explain(net, image, META, spec=small, target_layer="backbone.stages.2", min_side=2).heatmap.std() > 0
    )
    # the default layer is chosen for the input size, so a request without a layer works
    assert explain(net, image, META, spec=small).heatmap.std() > 0


def feature_map_side(net: nn.Module, layer: str, size: int) -> int:
    """Smaller side of ``layer``'s output on a ``size`` px input, measured independently of explain.py."""
    module = dict(net.named_modules())[layer]
    shapes = []
    handle = module.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
    try:
        with torch.inference_mode():
            net(torch.zeros(1, 3, size, size), torch.zeros(1, net.n_meta_features))
    finally:
        handle.remove()
    assert len(shapes[-1]) == 4, f"{layer} gives {shapes[-1]}, not a (B, C, H, W) map"
    return min(shapes[-1][-2:])


@pytest.mark.parametrize("backbone", ["test_efficientnet", "test_resnet", "test_convnext"])
@pytest.mark.parametrize("size", [32, 64])
def test_default_layer_keeps_the_minimum_map_side_at_small_sizes(nets, backbone, size):
    """At 32 px test_efficientnet's conv_head is 1x1 and at 64 px 2x2: the default must be finer."""
    net, _ = nets[backbone]
    min_side = ServingConfig().cam_min_map_side
    names = target_layer_names(net, size)
    assert names and names == target_layer_names(net, size, min_side)
    assert all(feature_map_side(net, name, size) >= min_side for name in names)
    assert default_target_layer(net, size) == names[0]
    assert hooks_left(net) == 0 and not net.training


def test_size_aware_layers_prefer_the_family_layers_that_are_fine_enough(nets):
    net, _ = nets["test_efficientnet"]
    assert target_layer_names(net, 64, min_side=2) == ["backbone.conv_head", "backbone.bn2"]
    assert "backbone.conv_head" not in target_layer_names(net, 64, min_side=4)
    net, _ = nets["test_resnet"]
    assert target_layer_names(net, 128, min_side=4) == ["backbone.layer4", "backbone.layer4.0"]
    assert target_layer_names(net, 64, min_side=4) == ["backbone.layer3"]  # layer4 is 2x2: fallback


def test_no_layer_fine_enough_says_what_to_change(nets):
    net, _ = nets["test_convnext"]
    with pytest.raises(ValueError, match=r"at least 64x64 on a 32 px input.*cam_min_map_side"):
        target_layer_names(net, 32, min_side=64)
    assert hooks_left(net) == 0


@pytest.mark.parametrize("size", [32, 64])
def test_default_gradcam_works_at_small_sizes(image, size):
    spec = ModelSpec.from_dict({**tiny_spec("test_efficientnet").to_dict(), "image_size": size})
    net = spec.build_network().eval()
    result = explain(net, image, META, spec=spec, method="gradcam")
    assert result.heatmap.shape == (size, size) and np.isfinite(result.heatmap).all()
    assert feature_map_side(net, result.target_layer, size) >= ServingConfig().cam_min_map_side


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "lime"}, "unknown CAM method 'lime'"),
        ({"spec": None}, "pass spec="),
        ({"target_layer": "backbone.layer9"}, "no layer named 'backbone.layer9'"),
    ],
)
def test_bad_explain_requests_say_what_to_do(nets, image, kwargs, message):
    net, spec = nets["test_resnet"]
    with pytest.raises(ValueError, match=message):
        explain(net, image, META, **{"spec": spec, **kwargs})
