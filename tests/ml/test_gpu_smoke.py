"""benchmarks/gpu_smoke.py: its CPU dry run trains end to end; its step budget and utilisation sampler."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

from melanoma_ml.config import load_config

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_smoke.py"


@pytest.fixture(scope="module")
def smoke() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_smoke", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_without_cuda_it_says_so_and_exits_2(smoke: ModuleType, monkeypatch, capsys) -> None:
    monkeypatch.setattr(smoke.torch.cuda, "is_available", lambda: False)
    assert smoke.main([]) == smoke.NO_CUDA_EXIT
    assert "needs a GPU" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("n_train", "steps", "epochs", "batches"), [(1100, 300, 9, 34), (100, 6, 2, 3), (10, 3, 3, 1)]
)
def test_step_budget(smoke: ModuleType, n_train: int, steps: int, epochs: int, batches: int) -> None:
    config = smoke.with_step_budget(load_config("full"), n_train, steps)
    training = config.training
    assert (training.epochs, training.limit_train_batches) == (epochs, batches)
    assert training.early_stopping_patience == epochs


def test_sampler_collects_and_reports_a_failing_reader(smoke: ModuleType) -> None:
    values = iter([40.0, 60.0])

    def read() -> float:
        return next(values, None) or float("x")  # third read: ValueError, as a garbled nvidia-smi line

    with smoke.UtilisationSampler(read, period_s=0.01) as sampler:
        deadline = time.monotonic() + 5
        while not sampler.errors and time.monotonic() < deadline:
            time.sleep(0.01)
    assert sampler.samples == [40.0, 60.0]
    assert sampler.summary().startswith("mean 50%, max 60% (2 samples)")
    assert "ValueError" in sampler.errors[0]


def test_cuda_visible_devices_remaps_the_nvml_index(smoke: ModuleType, monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert smoke._nvml_index(1) == 1 and smoke._nvml_index(0) == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-abc")
    assert smoke._nvml_index(0) == 0
