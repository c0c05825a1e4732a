"""Fold checkpoints without pickles: ``weights.safetensors`` + ``spec.json`` + ``info.json``, written atomically."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from melanoma_ml.atomic import atomic_directory
from melanoma_ml.spec import ModelSpec

WEIGHTS_FILE = "weights.safetensors"
SPEC_FILE = "spec.json"
INFO_FILE = "info.json"
CHECKPOINT_FILES = (WEIGHTS_FILE, SPEC_FILE, INFO_FILE)


def _plain_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous, non-shared copies: what ``safetensors`` accepts."""
    return {name: tensor.detach().cpu().contiguous().clone() for name, tensor in net.state_dict().items()}


def save_checkpoint(out_dir: str | Path, net: nn.Module, spec: ModelSpec, info: Mapping[str, Any]) -> Path:
    """Write ``net``'s weights, its spec and ``info`` (JSON-safe) into ``out_dir``, replacing it atomically.

    Returns:
        ``out_dir`` as a ``Path``.
    """
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        save_file(_plain_state_dict(net), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / SPEC_FILE).write_text(json.dumps(spec.to_dict(), indent=2, sort_keys=True) + "\n")
        (tmp / INFO_FILE).write_text(json.dumps(dict(info), indent=2, sort_keys=True, default=str) + "\n")
    return out_dir


def read_spec(checkpoint_dir: str | Path) -> ModelSpec:
    """The ``ModelSpec`` of a checkpoint (or bundle) folder."""
    path = Path(checkpoint_dir) / SPEC_FILE
    _require_files(Path(checkpoint_dir), (SPEC_FILE,))
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); re-run training for this fold") from exc
    return ModelSpec.from_dict(data)


def load_checkpoint(checkpoint_dir: str | Path) -> tuple[nn.Module, ModelSpec, dict[str, Any]]:
    """Rebuild the network from ``spec.json`` and load ``weights.safetensors`` (no pickle involved).

    Returns:
        ``(net in eval mode on the CPU, spec, info)``.

    Raises:
        FileNotFoundError: a checkpoint file is missing (the message names it).
        ValueError: the weights do not fit the architecture in ``spec.json``.
    """
    checkpoint_dir = Path(checkpoint_dir)
    _require_files(checkpoint_dir, CHECKPOINT_FILES)
    spec = read_spec(checkpoint_dir)
    info = json.loads((checkpoint_dir / INFO_FILE).read_text())
    net = spec.build_network()
    state = load_file(str(checkpoint_dir / WEIGHTS_FILE), device="cpu")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"{checkpoint_dir / WEIGHTS_FILE} does not match the architecture in {SPEC_FILE} "
            f"(backbone {spec.backbone!r}): {exc}"
        ) from exc
    return net.eval(), spec, info


def _require_files(folder: Path, names: tuple[str, ...]) -> None:
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {folder}; train this fold first (train_fold)")
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"checkpoint {folder} is incomplete: missing {', '.join(missing)}; "
            "re-run training for this fold (an interrupted write never leaves a partial folder)"
        )
