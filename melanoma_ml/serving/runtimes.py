"""Run a trained fused network outside PyTorch eager: ONNX export, a hash-checked ONNX Runtime runner, parity.

Design note (how this plugs in; NOT wired yet, the bundle manifest is being rewritten):

* Config: ``serving.runtime`` (``"torch"`` default | ``"onnxruntime"``) and ``serving.precision``
  (``"fp32"`` default | ``"int8"`` once static PTQ is validated per model) in ``melanoma_ml/config.py``.
* Export: the ``serving_model`` asset calls ``export_onnx(bundle.net, bundle.spec, <bundle>/model.onnx)``
  inside the bundle's atomic directory, checks ``max_probability_gap`` on the gate's validation images
  against a tolerance, and records the returned sha256 in the manifest next to ``weights.safetensors``'s
  (``files: {"model.onnx": {"sha256": ..., "opset": ..., "runtime": "onnxruntime"}}``).
* Load: ``load_bundle`` builds ``OnnxRunner(path, manifest_sha256)`` when ``serving.runtime`` asks for it.
  The file is never run without that digest: the runner hashes the very bytes it hands to ONNX Runtime.
* Inference: ``inference.predict_tensor`` keeps preprocessing and the 8 dihedral views; only the
  ``net(x, meta)`` call is swapped for ``runner(x, meta)`` (both return logits of shape ``(batch,)``).

The export uses the ``torch.export``-based exporter (the TorchScript one is deprecated since torch 2.9)
with a dynamic batch dimension, the weights inside the one ``.onnx`` file (so one sha256 covers all of it).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from melanoma_ml.atomic import atomic_write_bytes
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

    Inputs are ``image`` (``(batch, 3, S, S)`` float32, normalised like ``inference.normalize``) and
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
        expected = str(sha256).strip().lower()
        if not _SHA256.fullmatch(expected):
            raise OnnxModelError(
                f"{sha256!r} is not a sha256 hex digest (64 hex characters); pass the digest recorded "
                f"for {self.path.name} (export_onnx returns it)"
            )
        if not self.path.is_file():
            raise InputFileNotFoundError(f"ONNX model not found: {self.path}; export it with export_onnx")
        data = self.path.read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise OnnxDigestMismatch(
                f"{self.path} has sha256 {actual[:12]}..., expected {expected[:12]}...: the file was "
                "changed or is not the one recorded; re-export it and record the new digest"
            )
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
                "(inference.preprocess makes them)"
            )
        if m.shape != (x.shape[0], self.n_meta_features):
            raise OnnxModelError(
                f"metadata has shape {m.shape}, expected ({x.shape[0]}, {self.n_meta_features}): one "
                "encoded row per image"
            )
        return self.session.run([OUTPUT_NAME], {"image": x, "metadata": m})[0]


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
        images: Normalised ``(n, 3, S, S)`` float32 images (e.g. ``inference.dihedral_views`` output).
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
