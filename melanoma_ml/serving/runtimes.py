"""Run a trained fused network outside PyTorch eager fp32: the serving runtimes, their files and parity.

A ``RuntimeChoice`` (``serving.runtime`` x ``serving.precision``, the offered pairs are
``config.RUNTIME_PRECISIONS``) is made per bundle at promotion by ``choose_runtime``:

* ``export_runtime`` writes the file the runtime needs into the bundle folder (torch needs none; onnxruntime
  and openvino run ``<stem>.onnx`` or, for int8, ``<stem>.int8.onnx``) and returns its name and sha256;
* ``load_logits_fn`` turns a choice (and the file, hashed before use) into ``logits_fn(x, meta)``;
* parity is ``max_probability_gap`` against the eager fp32 network on a probe of real views.

The ONNX export uses the ``torch.export``-based exporter (the TorchScript one is deprecated since torch 2.9)
with a dynamic batch dimension and the weights inside the one ``.onnx`` file (so one sha256 covers all of it).
int8 is ONNX Runtime static post-training quantization: QDQ, per-channel int8 weights, uint8 activations
with MinMax ranges from calibration images. Grad-CAM never uses any of this: it needs the torch weights.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, get_args

import numpy as np
import torch
from torch import nn

from melanoma_ml.atomic import atomic_write_bytes
from melanoma_ml.config import RUNTIME_PRECISIONS, ServingPrecision, ServingRuntime
from melanoma_ml.errors import InputFileNotFoundError, InputValueError

if TYPE_CHECKING:
    from melanoma_ml.spec import ModelSpec

OPSET = 18
INPUT_NAMES = ("image", "metadata")
OUTPUT_NAME = "logit"
_SHA256 = re.compile(r"[0-9a-f]{64}")

ArrayLike = np.ndarray | torch.Tensor
LogitsFn = Callable[[torch.Tensor, torch.Tensor], ArrayLike]


class OnnxModelError(InputValueError):
    """An ONNX model file that cannot be used as given (wrong digest, wrong inputs)."""


class OnnxDigestMismatch(OnnxModelError):
    """The file's sha256 differs from the digest it should have: it was changed or is the wrong file."""


class _ExportRoot(nn.Module):
    """Holds the network under a neutral name for ``torch.export``.

    ``MelanomaNet`` has a submodule called ``meta``; the exporter's decomposition step resolves parameter
    targets with ``getattr`` on a ``GraphModule``, whose own ``.meta`` is a dict, and fails with
    "references nonexistent attribute net of meta". One level of nesting avoids the clash.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.model = net

    def forward(self, image: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
        return self.model(image, metadata)


def export_onnx(net: nn.Module, spec: ModelSpec, path: str | Path, *, opset: int = OPSET) -> str:
    """Export the fused network to one self-contained ``.onnx`` file with a dynamic batch size.

    Inputs are ``image`` (``(batch, 3, S, S)`` float32, normalised like ``network_inputs.normalize``) and
    ``metadata`` (``(batch, k)`` float32, the spec's encoder); the output ``logit`` is ``(batch,)``.
    The file is written atomically.

    Args:
        net: The trained network in eval mode.
        spec: Its model spec (image size and metadata width).
        path: Where to write the file.
        opset: ONNX opset.

    Returns:
        The file's sha256 (hex), to be recorded next to it.

    Raises:
        ValueError: ``net`` is in training mode (dropout would be baked into the graph).
    """
    if net.training:
        raise ValueError("the network is in training mode; call net.eval() before exporting it")
    device = next(net.parameters()).device
    size, k = spec.image_size, spec.encoder.n_features
    # Batch 2, not 1: torch.export specialises a dimension whose example size is 0 or 1.
    example = (torch.zeros(2, 3, size, size, device=device), torch.zeros(2, k, device=device))
    batch = {0: torch.export.Dim("batch", min=1)}
    program = torch.onnx.export(
        _ExportRoot(net).eval(),
        example,
        input_names=list(INPUT_NAMES),
        output_names=[OUTPUT_NAME],
        dynamic_shapes={"image": batch, "metadata": batch},
        opset_version=opset,
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    data = program.model_proto.SerializeToString()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


MERGED_STEM = "members"
"""Stem of the one exported graph that holds every ONNX Runtime member of an ensemble (``members.onnx``)."""


def merged_input_names(n: int) -> list[str]:
    """Inputs of a merged graph of ``n`` members: ``image_0, metadata_0, image_1, ...``."""
    return [name for i in range(n) for name in (f"image_{i}", f"metadata_{i}")]


def merged_output_names(n: int) -> list[str]:
    """Outputs of a merged graph: ``logit_0 ... logit_{n-1}``, each ``(batch,)``."""
    return [f"logit_{i}" for i in range(n)]


class _MergedRoot(nn.Module):
    """Several networks as one module for ``torch.export``: member ``i`` reads inputs ``2i`` (image) and
    ``2i + 1`` (metadata) and writes output ``i``. The members sit under ``models`` (see ``_ExportRoot``)."""

    def __init__(self, nets: list[nn.Module]) -> None:
        super().__init__()
        self.models = nn.ModuleList(nets)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(model(inputs[2 * i], inputs[2 * i + 1]) for i, model in enumerate(self.models))


def export_merged_onnx(
    nets: list[nn.Module], specs: list[ModelSpec], path: str | Path, *, opset: int = OPSET
) -> str:
    """Export several fused networks into ONE self-contained ``.onnx`` graph: one ONNX Runtime session
    (one call, one thread pool) serves them all, so per-call overhead is paid once per batch, not per member.

    Each member keeps its own inputs (``image_i``: its image size and normalisation; ``metadata_i``: its
    own encoder's width, which differs between fold members) and output ``logit_i``, with its own dynamic
    batch dimension. Written atomically.

    Returns:
        The file's sha256 (hex).

    Raises:
        ValueError: a network is in training mode, or ``nets`` and ``specs`` differ in length.
    """
    if len(nets) != len(specs) or not nets:
        raise ValueError(f"got {len(nets)} networks and {len(specs)} specs; pass one spec per network")
    if any(net.training for net in nets):
        raise ValueError("a network is in training mode; call net.eval() before exporting it")
    device = next(nets[0].parameters()).device
    example: list[torch.Tensor] = []
    for spec in specs:  # batch 2, not 1: torch.export specialises a dimension whose example size is 0 or 1
        example += [
            torch.zeros(2, 3, spec.image_size, spec.image_size, device=device),
            torch.zeros(2, spec.encoder.n_features, device=device),
        ]
    # One batch dimension per member: a member run alone feeds the others one row of zeros.
    batches = [torch.export.Dim(f"batch_{i}", min=1) for i in range(len(nets))]
    program = torch.onnx.export(
        _MergedRoot(list(nets)).eval(),
        tuple(example),
        input_names=merged_input_names(len(nets)),
        output_names=merged_output_names(len(nets)),
        dynamic_shapes=(tuple({0: batches[i // 2]} for i in range(len(example))),),
        opset_version=opset,
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    data = program.model_proto.SerializeToString()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def verified_bytes(path: Path, sha256: str) -> tuple[bytes, str]:
    """The bytes of a model file and their digest, read once, after checking them against ``sha256``.

    Raises:
        InputFileNotFoundError: ``path`` does not exist.
        OnnxDigestMismatch: the file's digest differs from ``sha256``.
        OnnxModelError: ``sha256`` is not a hex digest.
    """
    expected = str(sha256).strip().lower()
    if not _SHA256.fullmatch(expected):
        raise OnnxModelError(
            f"{sha256!r} is not a sha256 hex digest (64 hex characters); pass the digest recorded "
            f"for {path.name} (export_onnx returns it)"
        )
    if not path.is_file():
        raise InputFileNotFoundError(f"ONNX model not found: {path}; export it with export_onnx")
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise OnnxDigestMismatch(
            f"{path} has sha256 {actual[:12]}..., expected {expected[:12]}...: the file was "
            "changed or is not the one recorded; re-export it and record the new digest"
        )
    return data, actual


class OnnxRunner:
    """Logits from an ``.onnx`` file made by ``export_onnx``, run by ONNX Runtime's CPU provider.

    The file is read once, its sha256 checked against ``sha256``, and those same bytes are given to
    ONNX Runtime, so what runs is what was verified.

    Args:
        path: The ``.onnx`` file.
        sha256: Its expected hex digest (from the manifest that lists it).
        threads: ONNX Runtime intra-op threads (``None``: its default, one per physical core).

    Raises:
        InputFileNotFoundError: ``path`` does not exist.
        OnnxDigestMismatch: the file's digest differs from ``sha256``.
        OnnxModelError: ``sha256`` is not a hex digest, or the model lacks the ``image``/``metadata``
            inputs.
    """

    def __init__(self, path: str | Path, sha256: str, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        data, actual = verified_bytes(self.path, sha256)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        if set(inputs) != set(INPUT_NAMES):
            raise OnnxModelError(
                f"{self.path} has inputs {sorted(inputs)}, expected {list(INPUT_NAMES)}; export it with "
                "export_onnx"
            )
        self.image_shape = tuple(inputs["image"][1:])
        self.n_meta_features = inputs["metadata"][1]
        self.sha256 = actual

    def __call__(self, images: ArrayLike, metadata: ArrayLike) -> np.ndarray:
        """Logits ``(batch,)`` float32 for normalised ``(batch, 3, S, S)`` images and ``(batch, k)`` metadata."""
        x = np.ascontiguousarray(_numpy(images), dtype=np.float32)
        m = np.ascontiguousarray(_numpy(metadata), dtype=np.float32)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise OnnxModelError(
                f"images have shape {x.shape}; {self.path.name} takes (batch, *{self.image_shape}) "
                "(network_inputs.preprocess makes them)"
            )
        if m.shape != (x.shape[0], self.n_meta_features):
            raise OnnxModelError(
                f"metadata has shape {m.shape}, expected ({x.shape[0]}, {self.n_meta_features}): one "
                "encoded row per image"
            )
        return self.session.run([OUTPUT_NAME], {"image": x, "metadata": m})[0]


class MergedOnnxRunner:
    """Logits of every member of a graph made by ``export_merged_onnx``, from one ONNX Runtime session.

    Like ``OnnxRunner`` it runs the very bytes whose sha256 it checked.

    Args:
        path: The ``.onnx`` file.
        sha256: Its expected hex digest (from the manifest that lists it).
        threads: ONNX Runtime intra-op threads (``None``: its default, one per physical core).

    Raises:
        InputFileNotFoundError, OnnxDigestMismatch: as ``verified_bytes``.
        OnnxModelError: the graph's inputs are not ``merged_input_names``.
    """

    def __init__(self, path: str | Path, sha256: str, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        data, self.sha256 = verified_bytes(self.path, sha256)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        self.n_members = len(inputs) // 2
        if not inputs or list(inputs) != merged_input_names(self.n_members):
            raise OnnxModelError(
                f"{self.path} has inputs {sorted(inputs)}, expected {merged_input_names(max(self.n_members, 1))}; "
                "export it with export_merged_onnx"
            )
        self.image_shapes = [tuple(inputs[f"image_{i}"][1:]) for i in range(self.n_members)]
        self.meta_widths = [int(inputs[f"metadata_{i}"][1]) for i in range(self.n_members)]

    def run(self, feeds: list[tuple[ArrayLike, ArrayLike] | None]) -> list[np.ndarray | None]:
        """``(batch,)`` float32 logits of each member fed ``(images, metadata)``, in one session call.

        A member fed None gets one row of zeros (the session needs every input) and answers None.
        """
        if len(feeds) != self.n_members:
            raise OnnxModelError(f"{self.path.name} holds {self.n_members} members, got {len(feeds)} inputs")
        values: dict[str, np.ndarray] = {}
        for i, feed in enumerate(feeds):
            if feed is None:
                x = np.zeros((1, *self.image_shapes[i]), dtype=np.float32)
                m = np.zeros((1, self.meta_widths[i]), dtype=np.float32)
            else:
                x = np.ascontiguousarray(_numpy(feed[0]), dtype=np.float32)
                m = np.ascontiguousarray(_numpy(feed[1]), dtype=np.float32)
                if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shapes[i]:
                    raise OnnxModelError(
                        f"member {i} of {self.path.name} takes images (batch, *{self.image_shapes[i]}), got "
                        f"{x.shape}"
                    )
                if m.shape != (x.shape[0], self.meta_widths[i]):
                    raise OnnxModelError(
                        f"member {i} of {self.path.name} takes metadata ({x.shape[0]}, {self.meta_widths[i]}), "
                        f"got {m.shape}: encode it with that member's own encoder"
                    )
            values[f"image_{i}"], values[f"metadata_{i}"] = x, m
        outputs = self.session.run(merged_output_names(self.n_members), values)
        return [None if feed is None else out.reshape(-1) for feed, out in zip(feeds, outputs, strict=True)]

    def member(self, position: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``logits_fn(x, meta)`` of one member run on its own (the others get one zero row each)."""
        if not 0 <= position < self.n_members:
            raise ValueError(f"{self.path.name} holds members 0..{self.n_members - 1}, not {position}")

        def logits(x: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
            feeds: list[tuple[ArrayLike, ArrayLike] | None] = [None] * self.n_members
            feeds[position] = (x, meta)
            return torch.from_numpy(np.asarray(self.run(feeds)[position], dtype=np.float32))

        return logits


@dataclass(frozen=True)
class MergedSlot:
    """Where a member sits in a merged graph: the runner shared by its members and its position there."""

    runner: MergedOnnxRunner
    position: int


def _numpy(value: ArrayLike) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def max_probability_gap(
    reference: nn.Module,
    candidate: LogitsFn,
    images: torch.Tensor,
    metadata: torch.Tensor,
    *,
    batch_size: int = 64,
) -> float:
    """Largest ``|sigmoid(candidate) - sigmoid(reference)|`` over the given inputs.

    Args:
        reference: The fp32 eager network (eval mode) the candidate must match.
        candidate: Anything that maps ``(images, metadata)`` to logits: an ``OnnxRunner``, a compiled or
            autocast wrapper of the network.
        images: Normalised ``(n, 3, S, S)`` float32 images (e.g. ``network_inputs.dihedral_views`` output).
        metadata: ``(n, k)`` float32 encoded metadata.
        batch_size: Rows per call.
    """
    if reference.training:
        raise ValueError("the reference network is in training mode; call net.eval() first")
    if images.shape[0] != metadata.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {metadata.shape[0]} metadata rows")
    gap = 0.0
    for start in range(0, images.shape[0], batch_size):
        x, m = images[start : start + batch_size], metadata[start : start + batch_size]
        with torch.inference_mode():
            expected = torch.sigmoid(reference(x, m).double())
        got = torch.sigmoid(torch.as_tensor(_numpy(candidate(x, m))).double())
        gap = max(gap, float((got - expected).abs().max()))
    return gap


# ---------------------------------------------------------------- the serving runtime of a bundle

RUNTIMES: tuple[str, ...] = tuple(get_args(ServingRuntime))
PRECISIONS: tuple[str, ...] = tuple(get_args(ServingPrecision))
AUTO_PREFERENCE: dict[str, str] = {"fp32": "onnxruntime", "bf16": "torch", "int8": "onnxruntime"}
"""The runtime ``serving.runtime: auto`` tries first for each precision (before falling back to torch fp32)."""

log = logging.getLogger(__name__)


class ServingRuntimeError(InputValueError):
    """A runtime/precision that cannot serve this model as asked (not offered, not installed, no file)."""


class RuntimeParityError(ServingRuntimeError):
    """The requested runtime's probabilities differ from eager fp32 by more than the tolerance."""


@dataclass(frozen=True)
class RuntimeChoice:
    """One ``serving.runtime`` x ``serving.precision`` pair that ``config.RUNTIME_PRECISIONS`` offers.

    Raises:
        ServingRuntimeError: the pair is not offered (e.g. onnxruntime bf16).
    """

    runtime: str
    precision: str

    def __post_init__(self) -> None:
        offered = RUNTIME_PRECISIONS.get(self.runtime)
        if offered is None:
            raise ServingRuntimeError(
                f"unknown serving runtime {self.runtime!r}; use one of {', '.join(RUNTIMES)} (or auto)"
            )
        if self.precision not in offered:
            raise ServingRuntimeError(
                f"runtime {self.runtime} does not offer precision {self.precision!r} (it offers "
                f"{', '.join(offered)}); change serving.precision or serving.runtime"
            )

    @property
    def needs_file(self) -> bool:
        """Whether the runtime runs an exported file (everything but torch)."""
        return self.runtime != "torch"

    def file_name(self, stem: str) -> str:
        """The exported file's name in the bundle folder: ``<stem>.onnx`` or ``<stem>.int8.onnx``."""
        return f"{stem}.int8.onnx" if self.precision == "int8" else f"{stem}.onnx"

    def __str__(self) -> str:
        return f"{self.runtime} {self.precision}"


REFERENCE = RuntimeChoice("torch", "fp32")
"""Eager fp32 PyTorch: what every other choice is compared with, and what ``auto`` falls back to."""


class RuntimeSelection(NamedTuple):
    """What ``choose_runtime`` settled on, for the bundle manifest."""

    choice: RuntimeChoice
    file: tuple[str, str] | None
    """``(name relative to the bundle folder, sha256)`` of the exported file; None for torch."""
    parity: dict[str, float]
    """``max_abs_prob_diff`` vs eager fp32, ``n_inputs`` (probe rows: every view counts) and ``tolerance``."""
    note: str


def export_runtime(
    net: nn.Module,
    spec: ModelSpec,
    folder: Path,
    stem: str,
    choice: RuntimeChoice,
    *,
    calibration: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[str, str] | None:
    """Write the file ``choice`` runs into ``folder`` (atomically).

    Args:
        net: The trained network in eval mode.
        spec: Its model spec.
        folder: The bundle folder (being staged).
        stem: File name stem, e.g. ``"model"`` or ``"members/fold1"``.
        choice: The runtime/precision.
        calibration: Normalised views and their encoded metadata for int8's activation ranges (training
            images, not the parity probe); required for int8, ignored otherwise.

    Returns:
        ``(file name relative to folder, sha256)``, or None when the runtime needs no file (torch).

    Raises:
        ServingRuntimeError: int8 without calibration inputs.
    """
    if not choice.needs_file:
        return None
    name = choice.file_name(stem)
    path = Path(folder) / name
    if choice.precision == "fp32":
        return name, export_onnx(net, spec, path)
    if calibration is None or calibration[0].shape[0] == 0:
        raise ServingRuntimeError(
            f"{choice} needs calibration images for its activation ranges; pass calibration=(views, metadata) "
            "from training images, or set serving.precision to fp32"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".int8-") as tmp:  # stays inside the bundle
        fp32 = Path(tmp) / "fp32.onnx"
        export_onnx(net, spec, fp32)
        data = _quantize_int8(fp32, calibration, Path(tmp))
    atomic_write_bytes(path, data)
    return name, hashlib.sha256(data).hexdigest()


def _quantize_int8(
    fp32_path: Path, calibration: tuple[torch.Tensor, torch.Tensor], workdir: Path, *, batch: int = 32
) -> bytes:
    """Static PTQ with ONNX Runtime: QDQ, per-channel int8 weights, uint8 activations with MinMax ranges."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    views, meta = (np.ascontiguousarray(_numpy(t), dtype=np.float32) for t in calibration)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(
                {"image": views[i : i + batch], "metadata": meta[i : i + batch]}
                for i in range(0, views.shape[0], batch)
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    prepared, out = workdir / "prepared.onnx", workdir / "int8.onnx"
    quant_pre_process(str(fp32_path), str(prepared))
    quantize_static(
        str(prepared),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    return out.read_bytes()


class OpenVinoRunner:
    """Logits from an ``.onnx`` file (fp32 or int8 QDQ) compiled by OpenVINO for the CPU.

    Like ``OnnxRunner`` it hashes the bytes it compiles. Inference precision is pinned to f32 (OpenVINO would
    otherwise pick bf16 on CPUs with AMX); an int8 QDQ file still runs its quantized ops in int8.

    Raises:
        ServingRuntimeError: openvino is not installed (it is optional: ``pip install openvino``).
        OnnxDigestMismatch, InputFileNotFoundError: as ``verified_bytes``.
    """

    def __init__(self, path: str | Path, sha256: str, *, threads: int | None = None) -> None:
        try:
            import openvino as ov
        except ImportError as err:
            raise ServingRuntimeError(
                f"serving runtime openvino needs the optional package openvino ({err}); "
                "`pip install openvino`, or set serving.runtime to onnxruntime or auto"
            ) from err
        self.path = Path(path)
        data, self.sha256 = verified_bytes(self.path, sha256)
        config: dict[str, object] = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = threads
        core = ov.Core()
        self.model = core.compile_model(core.read_model(data), "CPU", config)
        names = {name for port in self.model.inputs for name in port.get_names()}
        if not set(INPUT_NAMES) <= names:
            raise OnnxModelError(
                f"{self.path} has inputs {sorted(names)}, expected {list(INPUT_NAMES)}; export it with export_onnx"
            )

    def __call__(self, images: ArrayLike, metadata: ArrayLike) -> np.ndarray:
        """Logits ``(batch,)`` float32; one infer request per call, so concurrent callers do not share one."""
        request = self.model.create_infer_request()
        x = np.ascontiguousarray(_numpy(images), dtype=np.float32)
        m = np.ascontiguousarray(_numpy(metadata), dtype=np.float32)
        result = request.infer({"image": x, "metadata": m})
        return np.asarray(result[self.model.output(0)], dtype=np.float32).reshape(-1)


def load_logits_fn(
    folder: Path,
    choice: RuntimeChoice,
    file: tuple[str, str] | None,
    net: nn.Module | None,
    *,
    threads: int | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``logits_fn(x, meta) -> (B,) float32 logits on the CPU`` for one bundle member.

    Args:
        folder: The bundle folder ``file`` is relative to.
        choice: The runtime/precision the manifest records.
        file: ``(name, sha256)`` of the exported file (None for torch); hashed before it is run.
        net: The torch network in eval mode (used by torch; ignored by the others).
        threads: Intra-op threads of ONNX Runtime/OpenVINO (None: their default); torch uses the process's.

    Raises:
        ServingRuntimeError: the choice needs a file and none is given, or the name leaves the folder.
        OnnxDigestMismatch: the file differs from its recorded sha256 (the message names it).
    """
    if not choice.needs_file:
        if net is None:
            raise ValueError(f"{choice} runs the torch network: pass net")
        return _torch_logits_fn(net, bf16=choice.precision == "bf16")
    if file is None:
        raise ServingRuntimeError(
            f"{choice} needs its exported model file, but none is recorded for it in {folder}; "
            "promote the model again (the serving_model asset exports it)"
        )
    name, sha256 = file
    root = Path(folder).resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root):
        raise ServingRuntimeError(
            f"runtime file {name!r} lies outside the bundle folder {folder}; promote again"
        )
    runner: LogitsFn
    if choice.runtime == "onnxruntime":
        runner = OnnxRunner(path, sha256, threads=threads)
    else:
        runner = OpenVinoRunner(path, sha256, threads=threads)

    def logits(x: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(runner(x, meta), dtype=np.float32)).reshape(-1)

    return logits


def _torch_logits_fn(net: nn.Module, *, bf16: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if net.training:
        raise ValueError("the network is in training mode; call net.eval() before serving it")
    device = next(net.parameters()).device

    def logits(x: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            out = net(x, meta.to(device, dtype=torch.float32, non_blocking=True))
        return out.float().reshape(-1).cpu()

    return logits


def choose_runtime(
    net: nn.Module,
    spec: ModelSpec,
    folder: Path,
    stem: str,
    requested: str,
    precision: str,
    probe: tuple[torch.Tensor, torch.Tensor],
    tolerance: float,
    *,
    calibration: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> RuntimeSelection:
    """Export, load and check the requested runtime against eager fp32 on ``probe``; what the bundle serves.

    ``requested="auto"`` tries ``AUTO_PREFERENCE[precision]`` and falls back to torch fp32 (with a warning
    and the reason in ``note``) when its export or load raises or its gap exceeds ``tolerance``. A runtime
    asked for by name is used or refused, never swapped.

    Args:
        net: The eager fp32 network in eval mode (the reference, and what torch choices serve).
        spec: Its model spec.
        folder: The bundle folder being staged; the exported file lands there.
        stem: The exported file's stem (``export_runtime``).
        requested: ``serving.runtime`` (``auto`` or one of ``RUNTIMES``).
        precision: ``serving.precision``.
        probe: Normalised views and encoded metadata of real validation images (e.g. their 8 TTA views).
        tolerance: ``serving.runtime_parity_tolerance``: largest allowed |probability difference|.
        calibration: int8 calibration inputs from training images (``export_runtime``).

    Raises:
        RuntimeParityError: an explicitly requested runtime misses the tolerance (names gap and setting).
        ServingRuntimeError: the pair is not offered, or the runtime is not installed.
    """
    if requested != "auto":
        choice = RuntimeChoice(requested, precision)
        file, gap = _export_and_measure(net, spec, folder, stem, choice, probe, calibration)
        if not gap <= tolerance:
            _remove(folder, file)
            raise RuntimeParityError(
                f"serving.runtime={choice.runtime} with serving.precision={choice.precision} moves probabilities "
                f"by up to {gap:.3g} from eager fp32 over {probe[0].shape[0]} probe views, above "
                f"serving.runtime_parity_tolerance={tolerance:g}; raise that tolerance if the difference is "
                "acceptable, or set serving.runtime to auto (falls back to torch fp32) or torch"
            )
        return RuntimeSelection(choice, file, _parity(gap, probe, tolerance), "")
    candidate = RuntimeChoice(AUTO_PREFERENCE[precision], precision)
    try:
        file, gap = _export_and_measure(net, spec, folder, stem, candidate, probe, calibration)
    except Exception as err:  # auto's contract: any failure of the candidate means serving torch fp32
        reason = f"{candidate} failed: {type(err).__name__}: {err}"
    else:
        if gap <= tolerance:
            return RuntimeSelection(candidate, file, _parity(gap, probe, tolerance), "")
        _remove(folder, file)
        reason = (
            f"{candidate} moved probabilities by up to {gap:.3g} over {probe[0].shape[0]} probe views, above "
            f"serving.runtime_parity_tolerance={tolerance:g}"
        )
    note = f"serving.runtime=auto fell back to torch fp32: {reason}"[:500]
    log.warning(note)
    _, gap = _export_and_measure(net, spec, folder, stem, REFERENCE, probe, None)
    return RuntimeSelection(REFERENCE, None, _parity(gap, probe, tolerance), note)


def _export_and_measure(
    net: nn.Module,
    spec: ModelSpec,
    folder: Path,
    stem: str,
    choice: RuntimeChoice,
    probe: tuple[torch.Tensor, torch.Tensor],
    calibration: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[tuple[str, str] | None, float]:
    file = export_runtime(net, spec, folder, stem, choice, calibration=calibration)
    try:
        logits_fn = load_logits_fn(folder, choice, file, net)
        return file, max_probability_gap(net, logits_fn, *probe)
    except BaseException:
        _remove(folder, file)
        raise


def _parity(gap: float, probe: tuple[torch.Tensor, torch.Tensor], tolerance: float) -> dict[str, float]:
    return {
        "max_abs_prob_diff": float(gap),
        "n_inputs": float(probe[0].shape[0]),
        "tolerance": float(tolerance),
    }


def _remove(folder: Path, file: tuple[str, str] | None) -> None:
    if file is not None:
        (Path(folder) / file[0]).unlink(missing_ok=True)


def merges(requested: str, precision: str, n_members: int) -> bool:
    """Whether ``requested``/``precision`` serves an ensemble's members from one merged ONNX Runtime graph:
    onnxruntime fp32 (asked for by name, or what ``auto`` tries first at fp32) with two members or more."""
    runtime = AUTO_PREFERENCE[precision] if requested == "auto" else requested
    return n_members >= 2 and runtime == "onnxruntime" and precision == "fp32"


def choose_merged_runtime(
    nets: list[nn.Module],
    specs: list[ModelSpec],
    folder: Path,
    requested: str,
    probes: list[tuple[torch.Tensor, torch.Tensor]],
    tolerance: float,
) -> list[RuntimeSelection] | None:
    """Export the members into one graph (``export_merged_onnx``) and check each member's output in it
    against its eager fp32 network on its own probe; what each member serves.

    Under ``auto`` a member that misses the tolerance serves torch fp32 (with the reason in its note) and
    the graph is exported again without it. A runtime asked for by name is used for every member or
    refused (``RuntimeParityError`` names the member).

    Returns:
        One selection per member (merged members share one file), or None when fewer than two members
        remain in the graph or the merged export fails: then each member chooses on its own
        (``choose_runtime``), which names the failure.
    """
    choice = RuntimeChoice("onnxruntime", "fp32")
    name = choice.file_name(MERGED_STEM)
    candidates = list(range(len(nets)))
    misses: dict[int, tuple[float, str]] = {}
    while len(candidates) >= 2:
        try:
            sha256 = export_merged_onnx(
                [nets[i] for i in candidates], [specs[i] for i in candidates], folder / name
            )
            runner = MergedOnnxRunner(folder / name, sha256)
            gaps = {
                i: max_probability_gap(nets[i], runner.member(p), *probes[i])
                for p, i in enumerate(candidates)
            }
        except Exception as err:  # the per-member path exports each member alone and reports what fails
            log.warning("merging %d members into one ONNX graph failed (%s: %s); exporting each alone",
                        len(candidates), type(err).__name__, err)  # fmt: skip
            _remove(folder, (name, ""))
            return None
        missed = {i: gap for i, gap in gaps.items() if not gap <= tolerance}
        if not missed:
            break
        if requested != "auto":
            _remove(folder, (name, sha256))
            worst = max(missed, key=missed.__getitem__)
            raise RuntimeParityError(
                f"serving.runtime=onnxruntime moves member {worst}'s probabilities by up to {missed[worst]:.3g} "
                f"from eager fp32 over {probes[worst][0].shape[0]} probe views, above "
                f"serving.runtime_parity_tolerance={tolerance:g}; raise that tolerance if the difference is "
                "acceptable, or set serving.runtime to auto (falls back to torch fp32 per member) or torch"
            )
        for i, gap in missed.items():
            misses[i] = (gap, (
                f"serving.runtime=auto fell back to torch fp32: {choice} moved probabilities by up to {gap:.3g} "
                f"over {probes[i][0].shape[0]} probe views, above serving.runtime_parity_tolerance={tolerance:g}"
            ))  # fmt: skip
            log.warning(misses[i][1])
        candidates = [i for i in candidates if i not in missed]
    if len(candidates) < 2:
        _remove(folder, (name, ""))
        return None
    selections = []
    for i in range(len(nets)):
        if i in misses:
            selections.append(
                RuntimeSelection(REFERENCE, None, _parity(0.0, probes[i], tolerance), misses[i][1])
            )
        else:
            selections.append(
                RuntimeSelection(choice, (name, sha256), _parity(gaps[i], probes[i], tolerance), "")
            )
    return selections
