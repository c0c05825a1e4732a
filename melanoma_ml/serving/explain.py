"""Class-activation maps (EigenCAM, Grad-CAM) for one request, via pytorch-grad-cam.

pytorch-grad-cam calls ``model(x)`` with one input, so the two-input network is wrapped in a module that
holds the request's metadata batch. The CAM object's hooks are released after every call (``with``),
and the network's training mode and ``requires_grad`` flags are restored: Grad-CAM gets its gradients
by making the *input* require grad, so no parameter gradient is ever computed or left behind.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pytorch_grad_cam import EigenCAM, GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget
from torch import nn

from melanoma_ml.errors import InputValueError
from melanoma_ml.evaluation.localisation import CamLocalisation, localisation_of
from melanoma_ml.serving.network_inputs import encode_metadata, normalize, square_view
from melanoma_ml.spec import ModelSpec

if TYPE_CHECKING:
    from melanoma_ml.serving.bundle import Bundle

CamMethod = Literal["eigencam", "gradcam"]
CAM_CLASSES = {"eigencam": EigenCAM, "gradcam": GradCAM}
PROBE_SIZE = 64
"""Side of the dummy image used to find a 4-D layer in backbones without a known family layout when no
input size is given (``target_layer_names(net)``)."""


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


def target_layer_names(
    net: nn.Module, image_size: int | None = None, min_side: int | None = None
) -> list[str]:
    """Candidate CAM layers, best first, as qualified names within ``net``.

    Known timm families: EfficientNet-style ``conv_head``/``bn2``, ResNet ``layer4``, DenseNet
    ``features``, BYOB/NFNet ``final_conv``, ConvNeXt and most modern nets ``stages[-1]``.

    Args:
        net: The network (a ``MelanomaNet`` or a bare backbone).
        image_size: Input side in pixels. When given, only layers whose feature map is at least
            ``min_side`` on that input are returned (a dry forward pass measures them): small inputs
            shrink the last stage to 1x1 or 2x2, which cannot show where the network looked. If no family
            layer is fine enough, the last module (in execution order) with such a map is returned. When
            None, the family layers are returned unchecked.
        min_side: Smallest accepted feature-map side; None uses ``ServingConfig.cam_min_map_side``.

    Raises:
        ValueError: no layer keeps a ``min_side`` x ``min_side`` map (the message says what to pass).
    """
    min_side = _min_side(min_side)
    family = _family_layer_names(net)
    if image_size is None and family:
        return family
    sides, order = _feature_map_sides(net, image_size or PROBE_SIZE)
    names = [name for name in family if sides.get(name, 0) >= min_side]
    if not names:
        names = [name for name in order if sides[name] >= min_side][-1:]
    if not names:
        size = f"a {image_size} px input" if image_size else f"a {PROBE_SIZE} px probe input"
        raise InputValueError(
            f"no layer of {type(net).__name__} keeps a spatial 4-D (B, C, H, W) feature map of at least "
            f"{min_side}x{min_side} on {size}; CAMs need a convolutional feature map: pass target_layer= one "
            "of the names from net.named_modules(), lower serving.cam_min_map_side, or use a larger "
            "data.image_size"
        )
    return names


def default_target_layer(net: nn.Module, image_size: int | None = None, min_side: int | None = None) -> str:
    """The first of ``target_layer_names(net, image_size, min_side)``."""
    return target_layer_names(net, image_size, min_side)[0]


def _min_side(min_side: int | None) -> int:
    if min_side is None:
        from melanoma_ml.config import ServingConfig

        return ServingConfig().cam_min_map_side
    if min_side < 1:
        raise InputValueError(f"min_side must be a positive number of feature-map cells, got {min_side}")
    return min_side


def _family_layer_names(net: nn.Module) -> list[str]:
    """The preferred CAM layers of known timm families, best first ([] for an unknown family)."""
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
    return [prefix + name for name in names]


def _feature_map_sides(net: nn.Module, image_size: int) -> tuple[dict[str, int], list[str]]:
    """Smaller side of every 4-D module output on a blank ``image_size`` input, and the modules in the
    order they finished (a container finishes after its children), from one dry forward pass."""
    names = {module: name for name, module in net.named_modules() if name}
    sides: dict[str, int] = {}
    order: list[str] = []

    def record(module: nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.ndim == 4:
            name = names[module]
            sides[name] = int(min(output.shape[-2:]))
            order.append(name)

    handles = [module.register_forward_hook(record) for module in names]
    was_training = net.training
    try:
        device = next(net.parameters()).device
        image = torch.zeros(1, 3, image_size, image_size, device=device)
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
    return sides, order


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
        raise InputValueError(
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
    min_side: int | None = None,
) -> Explanation:
    """CAM heatmap and overlay for one image on the un-augmented input view.

    Args:
        model: A loaded ``Bundle``, or a bare network together with ``spec``.
        image: ``(H, W, 3)`` uint8 RGB array (any size; resized and cropped like inference).
        metadata: ``{"age", "sex", "site"}`` dict (missing keys count as missing) or an encoded ``(k,)`` vector.
        spec: Required when ``model`` is a bare network.
        method: ``"eigencam"`` (no gradients, fast) or ``"gradcam"`` (gradient of the melanoma logit).
        target_layer: Qualified module name; None uses ``default_target_layer`` at the spec's image size.
        min_side: Smallest feature-map side accepted for a heatmap; None uses
            ``ServingConfig.cam_min_map_side``.

    Raises:
        ValueError: unknown method or layer, or a layer whose map is smaller than ``min_side``.
    """
    if isinstance(model, nn.Module):
        if spec is None:
            raise ValueError("explain() got a bare network: pass spec= (or pass a loaded Bundle instead)")
        net = model
    else:
        net, spec = model.net, model.spec
    if method not in CAM_CLASSES:
        raise InputValueError(f"unknown CAM method {method!r}; choose one of {sorted(CAM_CLASSES)}")
    view = square_view(image, spec.image_size)
    meta_input = metadata.reshape(1, -1) if isinstance(metadata, np.ndarray) else [metadata]
    meta = encode_metadata(meta_input, spec, 1)
    min_side = _min_side(min_side)
    layer, layer_name = resolve_layer(
        net, target_layer or default_target_layer(net, spec.image_size, min_side)
    )
    heatmap = _cam(net, layer, layer_name, normalize(view[None], spec), meta, method, min_side)
    overlay = show_cam_on_image(view.astype(np.float32) / 255.0, heatmap, use_rgb=True)
    return Explanation(heatmap=heatmap, overlay=overlay, target_layer=layer_name, method=method)


def cam_localisation(
    net: nn.Module,
    spec: ModelSpec,
    images: Sequence[np.ndarray],
    metadata: Sequence[Mapping[str, Any]],
    masks: Sequence[np.ndarray],
    *,
    method: CamMethod = "gradcam",
    target_layer: str | None = None,
    n_bootstrap: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> CamLocalisation:
    """Does ``net``'s CAM point at the lesion? Its :func:`explain` heatmap of each image scored against the
    image's lesion mask (``evaluation.localisation.localisation_of``: mass inside, bootstrap CI over images).

    Args:
        net: The network (eval mode); ``spec`` describes it (image size, normalisation, encoder).
        images: ``(H, W, 3)`` uint8 RGB originals (the CAM is computed on their input view).
        metadata: One ``{"age", "sex", "site"}`` dict per image.
        masks: One mask per image already on the input view (``evaluation.localisation.lesion_mask_view``).
        method: ``"gradcam"`` or ``"eigencam"``.
        target_layer: CAM layer; None picks :func:`default_target_layer` at the spec's size.
        n_bootstrap, seed, level: The bootstrap over images.

    Raises:
        InputValueError: images, metadata and masks differ in number, or a mask is not on the input view.
    """
    if not len(images) == len(metadata) == len(masks) or not len(images):
        raise InputValueError(
            f"need one metadata dict and one mask per image and at least one image; got {len(images)} "
            f"images, {len(metadata)} metadata dicts, {len(masks)} masks"
        )
    layer = target_layer or default_target_layer(net, spec.image_size)
    heatmaps = [
        explain(net, image, meta, spec=spec, method=method, target_layer=layer).heatmap
        for image, meta in zip(images, metadata, strict=True)
    ]
    return localisation_of(heatmaps, masks, layer, n_bootstrap=n_bootstrap, seed=seed, level=level)


def _cam(
    net: nn.Module,
    layer: nn.Module,
    layer_name: str,
    x: torch.Tensor,
    meta: torch.Tensor,
    method: CamMethod,
    min_side: int,
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
    if len(feature_map) != 4 or min(feature_map[-2:]) < min_side:
        raise InputValueError(
            f"layer {layer_name} gives a {feature_map} feature map for a {x.shape[-1]} px input, too coarse "
            f"for a heatmap (serving.cam_min_map_side is {min_side}); pass an earlier layer as target_layer= "
            "(e.g. the previous stage or block) or leave it empty for the size-aware default"
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
