"""benchmarks/gpu_smoke.py through its command line (CPU dry run, no-GPU exit) and the instruments it uses
(``melanoma_ml.training.gpu_probe``: step budget, utilisation sampler)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from melanoma_ml.config import load_config
from melanoma_ml.training.gpu_probe import UtilisationSampler, nvml_index, with_step_budget

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_smoke.py"
NO_CUDA_EXIT = 2


@pytest.mark.slow
def test_dry_run_trains_a_fold_on_the_cpu(tmp_path: Path) -> None:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,  # meant to take well under 60 s; other runs sharing the 2 cores stretch it to minutes
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},  # the CPU path, also on a GPU machine
    )
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "plan: cpu, precision 32-true, channels_last True, 1 loader workers" in out
    assert "test_efficientnet 64 px on cpu:" in out and "train img/s over 8 steps (2 epochs)" in out
    assert "best val AUROC" in out
    assert (tmp_path / "fold" / "weights.safetensors").is_file()
    print(f"dry run: {seconds:.1f} s")


def test_without_cuda_it_says_so_and_exits_2() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},  # no CUDA device, also on a GPU machine
    )
    assert done.returncode == NO_CUDA_EXIT, done.stderr[-3000:]
    assert "needs a GPU" in done.stderr


@pytest.mark.parametrize(
    ("n_train", "steps", "epochs", "batches"), [(1100, 300, 9, 34), (100, 6, 2, 3), (10, 3, 3, 1)]
)
def test_step_budget(n_train: int, steps: int, epochs: int, batches: int) -> None:
    config = with_step_budget(load_config("full"), n_train, steps)
    training = config.training
    assert (training.epochs, training.limit_train_batches) == (epochs, batches)
    assert training.early_stopping_patience == epochs


def test_sampler_collects_and_reports_a_failing_reader() -> None:
    values = iter([40.0, 60.0])

    def read() -> float:
        return next(values, None) or float("x")  # third read: ValueError, as a garbled nvidia-smi line

    with UtilisationSampler(read, period_s=0.01) as sampler:
        deadline = time.monotonic() + 5
        while not sampler.errors and time.monotonic() < deadline:
            time.sleep(0.01)
    assert sampler.samples == [40.0, 60.0]
    assert sampler.summary().startswith("mean 50%, max 60% (2 samples)")
    assert "ValueError" in sampler.errors[0]


def test_cuda_visible_devices_remaps_the_nvml_index(monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert nvml_index(1) == 1 and nvml_index(0) == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-abc")
    assert nvml_index(0) == 0
