"""What ``"auto"`` means for a training's hardware settings on the machine at hand.

``TrainingConfig`` may leave ``precision``, ``channels_last`` and ``num_workers`` at ``"auto"`` (the
``full`` profile does); ``resolve_hardware`` turns them into concrete values for one accelerator, once,
in one place, so the Trainer and every DataLoader agree:

=================  ==================================  ==================  ========
setting            CUDA                                MPS                 CPU
=================  ==================================  ==================  ========
precision          bf16-mixed (native bf16, Ampere+),  32-true             32-true
                   else 16-mixed
channels_last      on                                  off                 on
num_workers        min(usable CPUs - 1, 8)             same                same
pin_memory         on                                  off                 off
=================  ==================================  ==================  ========

Explicit values are kept as given. Workers persist across epochs and prefetch
``training.prefetch_factor`` batches each whenever there are workers at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import torch

from melanoma_ml.config import TrainingConfig

DeviceKind = Literal["cuda", "mps", "cpu"]

MAX_AUTO_WORKERS = 8
"""``num_workers: auto`` never starts more loader processes than this (more rarely helps one GPU)."""


@dataclass(frozen=True)
class HardwarePlan:
    """The concrete hardware settings of one fit (``resolve_hardware``).

    Attributes:
        device: Where the fit runs: ``cuda``, ``mps`` or ``cpu``.
        precision: Lightning precision (``bf16-mixed``, ``16-mixed``, ``32-true``, ...).
        channels_last: Model and input batches in NHWC memory format (tensor cores prefer it).
        num_workers: DataLoader worker processes (0: load in the training process).
        pin_memory: Page-locked batches for faster, asynchronous host-to-GPU copies.
        persistent_workers: Keep workers alive between epochs (only with workers).
        prefetch_factor: Batches each worker loads ahead (``None`` without workers, as torch requires).
    """

    device: DeviceKind
    precision: str
    channels_last: bool
    num_workers: int
    pin_memory: bool
    persistent_workers: bool
    prefetch_factor: int | None

    def loader_kwargs(self) -> dict[str, Any]:
        """The ``torch.utils.data.DataLoader`` keyword arguments this plan fixes."""
        return {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.persistent_workers,
            "prefetch_factor": self.prefetch_factor,
        }


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's cpuset), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def resolve_hardware(
    training: TrainingConfig, accelerator: str | None = None, *, cpus: int | None = None
) -> HardwarePlan:
    """Resolve ``training``'s ``"auto"`` hardware settings for ``accelerator``.

    Args:
        training: The training settings (``precision``, ``channels_last``, ``num_workers``,
            ``prefetch_factor``).
        accelerator: Lightning accelerator the fit uses (``auto``, ``gpu``, ``cpu``, ``mps``); ``None``
            takes ``training.accelerator``. ``auto``/``gpu`` mean CUDA when torch sees a CUDA device,
            then MPS, as Lightning picks.
        cpus: CPUs to size ``num_workers: auto`` by; ``None`` asks the OS (``usable_cpus``).

    Returns:
        The plan; only ``torch.cuda``/``torch.backends.mps`` availability and the CPU count are read.
    """
    device = _device_kind(accelerator or training.accelerator)
    precision = training.precision
    if precision == "auto":
        precision = _auto_precision(device)
    auto_channels_last = device in ("cuda", "cpu")  # CPU speed-up: README (benchmarks/epoch_profile.py)
    channels_last = auto_channels_last if training.channels_last == "auto" else bool(training.channels_last)
    workers = training.num_workers
    if workers == "auto":
        workers = max(0, min((cpus if cpus is not None else usable_cpus()) - 1, MAX_AUTO_WORKERS))
    return HardwarePlan(
        device=device,
        precision=precision,
        channels_last=channels_last,
        num_workers=int(workers),
        pin_memory=device == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=training.prefetch_factor if workers > 0 else None,
    )


def _device_kind(accelerator: str) -> DeviceKind:
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "cuda"
    if accelerator in ("auto", "gpu", "mps") and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _auto_precision(device: DeviceKind) -> str:
    """bf16 autocast where the GPU computes bf16 natively (no overflow risk, no loss scaling), fp16 with
    loss scaling on older CUDA GPUs, full fp32 on CPU and MPS (autocast there is rarely faster)."""
    if device != "cuda":
        return "32-true"
    # including_emulation=False: pre-Ampere GPUs "support" bf16 only by emulating it, slowly.
    return "bf16-mixed" if torch.cuda.is_bf16_supported(including_emulation=False) else "16-mixed"
