"""Network weights on disk: one safetensors file, written and read the same way for checkpoints and bundles.

No pickle is involved: the architecture comes from a ``ModelSpec`` and only tensors are stored. torch and
safetensors are imported inside the functions, so importing ``WEIGHTS_FILE`` stays cheap (the bundle's
manifest checks and the registry use it without torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from melanoma_ml.atomic import atomic_write_bytes
from melanoma_ml.errors import InputFileNotFoundError, InputValueError

if TYPE_CHECKING:
    from torch import nn

    from melanoma_ml.spec import ModelSpec

WEIGHTS_FILE = "weights.safetensors"


class WeightsError(InputValueError):
    """A weights file cannot be read or does not fit the network its spec describes."""


def weights_bytes(net: nn.Module) -> bytes:
    """``net``'s state dict as safetensors bytes (CPU, contiguous, unshared copies; deterministic)."""
    from safetensors.torch import save

    state = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in net.state_dict().items()}
    return save(state, metadata={"format": "pt"})


def save_weights(path: str | Path, net: nn.Module) -> Path:
    """Write ``net``'s weights to ``path`` (atomically; the bytes are exactly ``weights_bytes(net)``)."""
    return atomic_write_bytes(path, weights_bytes(net))


def load_weights(spec: ModelSpec, path: str | Path) -> nn.Module:
    """Build ``spec``'s network (random init, no download) and load the weights at ``path`` into it.

    Returns:
        The network in eval mode, on the CPU.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        WeightsError: ``path`` is not a safetensors file, or its tensors do not fit ``spec``'s network
            (the message names the file and the backbone; callers add what to re-create).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise InputFileNotFoundError(f"weights file not found: {path}")
    try:
        state = load_file(str(path), device="cpu")
    except SafetensorError as exc:
        raise WeightsError(f"cannot read {path} as safetensors ({exc})") from exc
    net = spec.build_network()
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(
            f"{path} does not fit the {spec.backbone!r} network described by its spec ({exc})"
        ) from exc
    return net.eval()
