"""Fold checkpoints without pickles: ``weights.safetensors`` + ``spec.json`` + ``info.json``, written atomically."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from torch import nn

from melanoma_ml.atomic import atomic_directory, atomic_write_bytes, atomic_write_json
from melanoma_ml.errors import InputFileNotFoundError, InputValueError
from melanoma_ml.spec import ModelSpec
from melanoma_ml.weights import WEIGHTS_FILE, WeightsError, load_weights, save_weights

SPEC_FILE = "spec.json"
INFO_FILE = "info.json"
CHECKPOINT_FILES = (WEIGHTS_FILE, SPEC_FILE, INFO_FILE)


def save_checkpoint(
    out_dir: str | Path,
    net: nn.Module,
    spec: ModelSpec,
    info: Mapping[str, Any],
    extra_files: Mapping[str, bytes] | None = None,
) -> Path:
    """Write ``net``'s weights, its spec, ``info`` and ``extra_files`` into ``out_dir``, as one unit.

    Everything is written into a temp folder that then replaces ``out_dir`` in one rename, so a reader sees
    either the previous complete folder or the new complete one, never a mix.

    Args:
        out_dir: The checkpoint folder (replaced if it exists).
        net: The network (any device; weights are written from CPU copies).
        spec: The spec that rebuilds ``net``.
        info: Small JSON-able facts (strict JSON: NaN is stored as null, unknown objects are refused).
        extra_files: Further files to store beside the checkpoint, ``{file name: bytes}`` (e.g. the fold's
            ``oof.parquet``, ``history.csv``, ``result.json``); a name may hold sub-folders in POSIX form
            (``logs/events.out.tfevents...``), created as needed.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        ValueError: an extra file name is absolute, leaves ``out_dir`` or collides with a checkpoint file.
        TypeError: ``info`` holds something JSON cannot store (the message names its key).
    """
    out_dir = Path(out_dir)
    extra_files = dict(extra_files or {})
    for name in extra_files:
        parts = PurePosixPath(name).parts
        escapes = name.startswith("/") or "\\" in name or ".." in parts
        if not parts or escapes or parts[0] in CHECKPOINT_FILES:
            raise ValueError(
                f"extra file name {name!r} must be a plain file name (or a relative POSIX path without "
                f"'..') other than {list(CHECKPOINT_FILES)}; rename it"
            )
    with atomic_directory(out_dir) as tmp:
        save_weights(tmp / WEIGHTS_FILE, net)
        atomic_write_json(tmp / SPEC_FILE, spec.to_dict())
        atomic_write_json(tmp / INFO_FILE, dict(info))
        for name, data in extra_files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(tmp / name, data)
    return out_dir


def read_spec(checkpoint_dir: str | Path) -> ModelSpec:
    """The ``ModelSpec`` of a checkpoint (or bundle) folder."""
    path = Path(checkpoint_dir) / SPEC_FILE
    _require_files(Path(checkpoint_dir), (SPEC_FILE,))
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputValueError(f"{path} is not valid JSON ({exc}); re-run training for this fold") from exc
    return ModelSpec.from_dict(data)


def load_checkpoint(checkpoint_dir: str | Path) -> tuple[nn.Module, ModelSpec, dict[str, Any]]:
    """Rebuild the network from ``spec.json`` and load ``weights.safetensors`` (no pickle involved).

    Returns:
        ``(net in eval mode on the CPU, spec, info)``.

    Raises:
        FileNotFoundError: a checkpoint file is missing (the message names it).
        ValueError: the weights are unreadable or do not fit the architecture in ``spec.json``.
    """
    checkpoint_dir = Path(checkpoint_dir)
    _require_files(checkpoint_dir, CHECKPOINT_FILES)
    spec = read_spec(checkpoint_dir)
    info = json.loads((checkpoint_dir / INFO_FILE).read_text())
    try:
        net = load_weights(spec, checkpoint_dir / WEIGHTS_FILE)
    except WeightsError as exc:
        raise WeightsError(f"{exc}; re-run training for this fold (train_fold)") from exc
    return net, spec, info


def _require_files(folder: Path, names: tuple[str, ...]) -> None:
    if not folder.is_dir():
        raise InputFileNotFoundError(
            f"checkpoint folder not found: {folder}; train this fold first (train_fold)"
        )
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise InputFileNotFoundError(
            f"checkpoint {folder} is incomplete: missing {', '.join(missing)}; "
            "re-run training for this fold (an interrupted write never leaves a partial folder)"
        )
