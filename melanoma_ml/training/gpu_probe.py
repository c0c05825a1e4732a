"""Instruments for a short training run on a GPU: a step budget, and GPU utilisation sampled meanwhile.

``benchmarks/gpu_smoke.py`` uses them to train fold 0 of ``full`` for about N optimizer steps and report
how busy the GPU was.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import threading
from collections.abc import Callable

from melanoma_ml.config import PipelineConfig


def with_step_budget(config: PipelineConfig, n_train: int, steps: int) -> PipelineConfig:
    """``config`` with epochs and ``limit_train_batches`` set so the fit runs about ``steps`` steps."""
    per_epoch = max(1, n_train // config.training.batch_size)
    epochs = max(1, math.ceil(steps / per_epoch))
    return config.model_copy(
        update={
            "training": config.training.model_copy(
                update={
                    "epochs": epochs,
                    "limit_train_batches": min(per_epoch, steps),
                    "early_stopping_patience": epochs,  # a smoke run measures; it does not stop early
                }
            )
        }
    )


class UtilisationSampler:
    """Samples ``read()`` (GPU utilisation in %) every ``period_s`` in a daemon thread while in a ``with``."""

    def __init__(self, read: Callable[[], float], period_s: float) -> None:
        self.read, self.period_s = read, period_s
        self.samples: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-utilisation", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.samples.append(float(self.read()))
            except (OSError, ValueError, subprocess.SubprocessError, RuntimeError) as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")  # shown in the summary, not lost
                return

    def __enter__(self) -> UtilisationSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> str:
        if not self.samples:
            return f"no samples ({'; '.join(self.errors) or 'the run was shorter than one period'})"
        mean = sum(self.samples) / len(self.samples)
        return f"mean {mean:.0f}%, max {max(self.samples):.0f}% ({len(self.samples)} samples)"


def nvml_index(torch_index: int) -> int:
    """The NVML / nvidia-smi index of torch's CUDA device ``torch_index`` (CUDA_VISIBLE_DEVICES remaps)."""
    visible = [part.strip() for part in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if part.strip()]
    if visible and all(part.isdigit() for part in visible) and torch_index < len(visible):
        return int(visible[torch_index])
    return torch_index


def utilisation_reader(torch_index: int) -> tuple[str, Callable[[], float]]:
    """``(how, read)``: read GPU utilisation in % with pynvml if installed, else nvidia-smi."""
    index = nvml_index(torch_index)
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        pynvml = None
    if pynvml is not None:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        return "pynvml", lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    smi = shutil.which("nvidia-smi")
    if smi is None:
        raise RuntimeError("neither pynvml nor nvidia-smi is available")
    command = [smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", str(index)]

    def read() -> float:
        return float(subprocess.run(command, capture_output=True, text=True, check=True, timeout=10).stdout)

    return "nvidia-smi", read
