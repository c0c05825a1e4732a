"""Class-activation maps (EigenCAM, Grad-CAM) for one request, via pytorch-grad-cam.

pytorch-grad-cam calls ``model(x)`` with one input, so the two-input network is wrapped in a module that
holds the request's metadata batch. The CAM object's hooks are released after every call (``with``),
and the network's training mode and ``requires_grad`` flags are restored: Grad-CAM gets its gradients
by making the *input* require grad, so no parameter gradient is ever computed or left behind.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pytorch_grad_cam import EigenCAM, GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget
from torch import nn

from melanoma_ml.serving.inference import encode_metadata, normalize, square_view
from melanoma_ml.spec import ModelSpec

if TYPE_CHECKING:
    from melanoma_ml.serving.bundle import Bundle

CamMethod = Literal["eigencam", "gradcam"]
CAM_CLASSES = {"eigencam": EigenCAM, "gradcam": GradCAM}
PROBE_SIZE = 64
"""Side of the dummy image used to find a 4-D layer in backbones without a known family layout."""


@dataclass(frozen=True)
class Explanation:
    """A CAM for one image.

    Attributes:
        heatmap: ``(S, S)`` float32 in [0, 1], aligned with the network's (un-augmented) input view.
        overlay: ``(S, S, 3)`` uint8 RGB: the heatmap blended over that input view.
        target_layer: Qualified module name the CAM was taken from (e.g. ``backbone.conv_head``).
        method: ``"eigencam"`` or ``"gradcam"``.
    """

    heatmap: np.ndarray
    overlay: np.ndarray
    target_layer: str
    method: str


class FixedMetadataModel(nn.Module):
    """``model(image)`` for CAM libraries: feeds the held metadata and returns ``(B, 1)`` logits."""

    def __init__(self, net: nn.Module, metadata: torch.Tensor) -> None:
        super().__init__()
        self.net = net
        self.metadata = metadata

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        meta = self.metadata.expand(image.shape[0], -1) if self.metadata.shape[0] == 1 else self.metadata
        return self.net(image, meta).unsqueeze(1)


def _children(module: nn.Module) -> list[str]:
    return list(module._modules)


def target_layer_names(net: nn.Module) -> list[str]:
    """Candidate CAM layers, best first, as qualified names within ``net``.

    Known timm families: EfficientNet-style ``conv_head``/``bn2``, ResNet ``layer4``, DenseNet
    ``features``, BYOB/NFNet ``final_conv``, ConvNeXt and most modern nets ``stages[-1]``; otherwise the
    last module with a spatial 4-D output found by a dry forward pass.
    """
    body, prefix = (
        (net.backbone, "backbone.") if isinstance(getattr(net, "backbone", None), nn.Module) else (net, "")
    )
    names: list[str] = []
    top = _children(body)
    if "conv_head" in top:
        names.append("conv_head")
        if "bn2" in top:
            names.append("bn2")
    if "layer4" in top:
        names.append("layer4")
        last = _children(body.layer4)
        if last:
            names.append(f"layer4.{last[-1]}")
    if "features" in top and _children(body.features):
        names += ["features", f"features.{_children(body.features)[-1]}"]
    if "final_conv" in top and not isinstance(body.final_conv, nn.Identity):
        names.append("final_conv")
    if "stages" in top and _children(body.stages):
        names.append(f"stages.{_children(body.stages)[-1]}")
    names = [prefix + name for name in names]
    if not names:
        names = [_last_4d_module(net)]
    return names


def default_target_layer(net: nn.Module) -> str:
    """The first of ``target_layer_names(net)``."""
    return target_layer_names(net)[0]


def _last_4d_module(net: nn.Module) -> str:
    """Name of the last module (in execution order) producing a 4-D tensor, found by a dry forward."""
    names = {module: name for name, module in net.named_modules() if name}
    finished: list[str] = []

    def record(module: nn.Module, _inputs: Any, output: Any) -> None:
        # a spatial map: (B, C, H, W) with H, W > 1 (global pools give (B, C, 1, 1))
        if isinstance(output, torch.Tensor) and output.ndim == 4 and min(output.shape[-2:]) > 1:
            finished.append(names[module])

    handles = [module.register_forward_hook(record) for module in names]
    was_training = net.training
    try:
        device = next(net.parameters()).device
        image = torch.zeros(1, 3, PROBE_SIZE, PROBE_SIZE, device=device)
        net.eval()
        with torch.inference_mode():
            n_meta = getattr(net, "n_meta_features", None)
            if n_meta is None:
                net(image)
            else:
                net(image, torch.zeros(1, n_meta, device=device))
    finally:
        for handle in handles:
            handle.remove()
        net.train(was_training)
    if not finished:
        raise ValueError(
            f"no layer with a spatial 4-D (B, C, H, W) output found in {type(net).__name__}; CAMs need a "
            "convolutional feature map: pass target_layer= one of the names from net.named_modules()"
        )
    return finished[-1]


def resolve_layer(net: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module called ``name`` (negative indices such as ``backbone.stages.-1`` allowed) and its canonical name.

    Raises:
        ValueError: no such module (the message lists the suggested names).
    """
    module = net
    for part in name.split("."):
        children = module._modules
        if part.lstrip("-").isdigit() and isinstance(module, nn.Sequential | nn.ModuleList):
            index = int(part)
            if not -len(module) <= index < len(module):
                module = None
                break
            module = module[index]
        elif part in children and children[part] is not None:
            module = children[part]
        else:
            module = None
            break
    if module is None:
        raise ValueError(
            f"no layer named {name!r} in the {type(net).__name__}; use one of {target_layer_names(net)} "
            "or another name from net.named_modules()"
        )
    canonical = next(qualified for qualified, candidate in net.named_modules() if candidate is module)
    return module, canonical


def explain(
    model: Bundle | nn.Module,
    image: np.ndarray,
    metadata: Mapping[str, Any] | np.ndarray,
    *,
    spec: ModelSpec | None = None,
    method: CamMethod = "eigencam",
    target_layer: str | None = None,
) -> Explanation:
    """CAM heatmap and overlay for one image on the un-augmented input view.

    Args:
        model: A loaded ``Bundle``, or a bare network together with ``spec``.
        image: ``(H, W, 3)`` uint8 RGB array (any size; resized and cropped like inference).
        metadata: ``{"age", "sex", "site"}`` dict (missing keys count as missing) or an encoded ``(k,)`` vector.
        spec: Required when ``model`` is a bare network.
        method: ``"eigencam"`` (no gradients, fast) or ``"gradcam"`` (gradient of the melanoma logit).
        target_layer: Qualified module name; None uses ``default_target_layer``.
    """
    if isinstance(model, nn.Module):
        if spec is None:
            raise ValueError("explain() got a bare network: pass spec= (or pass a loaded Bundle instead)")
        net = model
    else:
        net, spec = model.net, model.spec
    if method not in CAM_CLASSES:
        raise ValueError(f"unknown CAM method {method!r}; choose one of {sorted(CAM_CLASSES)}")
    view = square_view(image, spec.image_size)
    meta_input = metadata.reshape(1, -1) if isinstance(metadata, np.ndarray) else [metadata]
    meta = encode_metadata(meta_input, spec, 1)
    layer, layer_name = resolve_layer(net, target_layer or default_target_layer(net))
    heatmap = _cam(net, layer, layer_name, normalize(view[None], spec), meta, method)
    overlay = show_cam_on_image(view.astype(np.float32) / 255.0, heatmap, use_rgb=True)
    return Explanation(heatmap=heatmap, overlay=overlay, target_layer=layer_name, method=method)


def _cam(
    net: nn.Module, layer: nn.Module, layer_name: str, x: torch.Tensor, meta: torch.Tensor, method: CamMethod
) -> np.ndarray:
    """Run one CAM, restoring the net's mode and ``requires_grad`` flags whatever happens."""
    params = list(net.parameters())
    flags = [p.requires_grad for p in params]
    was_training = net.training
    device = params[0].device
    needs_grad = method == "gradcam"
    try:
        net.eval()
        net.requires_grad_(False)
        # inference_mode(False) + clone: works even when the caller sits inside torch.inference_mode()
        with torch.inference_mode(False), torch.set_grad_enabled(needs_grad):
            x = x.to(device).clone().contiguous(memory_format=torch.channels_last)
            x.requires_grad_(
                needs_grad
            )  # gradients reach the target layer through the input, not the weights
            wrapper = FixedMetadataModel(net, meta.to(device).clone())
            with CAM_CLASSES[method](model=wrapper, target_layers=[layer]) as cam:
                maps, feature_map = _run_cam(cam, x, layer_name, method)
    finally:
        for param, flag in zip(params, flags, strict=True):
            param.requires_grad_(flag)
        net.train(was_training)
    if len(feature_map) != 4 or min(feature_map[-2:]) < 2:
        raise ValueError(
            f"layer {layer_name} gives a {feature_map} feature map for a {x.shape[-1]} px input, too coarse "
            "for a heatmap; pass an earlier layer as target_layer= (e.g. the previous stage or block)"
        )
    return np.clip(maps[0], 0.0, 1.0).astype(np.float32)


def _run_cam(cam: Any, x: torch.Tensor, layer_name: str, method: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """The CAM maps and the target layer's activation shape."""
    try:
        maps = cam(input_tensor=x, targets=[BinaryClassifierOutputTarget(1)])
    except IndexError as exc:
        # pytorch-grad-cam's __exit__ swallows IndexError; re-raise as a type it lets through.
        raise RuntimeError(f"{method} failed on layer {layer_name}: {exc}") from exc
    return maps, tuple(cam.activations_and_grads.activations[0].shape)
