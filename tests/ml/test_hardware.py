"""``resolve_hardware``: what "auto" precision, memory format and loader workers become on each device kind."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from melanoma_ml.config import TrainingConfig, load_config
from melanoma_ml.training import hardware
from melanoma_ml.training.data import MelanomaDataset, make_loader
from melanoma_ml.training.hardware import HardwarePlan, resolve_hardware

AUTO = TrainingConfig(precision="auto", channels_last="auto", num_workers="auto", prefetch_factor=4)


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch):
    """Pretend to be a machine with the given CUDA / bf16 / MPS support."""

    def pretend(*, cuda: bool = False, bf16: bool = False, mps: bool = False) -> list[bool]:
        emulation_asked: list[bool] = []

        def is_bf16_supported(including_emulation: bool = True) -> bool:
            emulation_asked.append(including_emulation)
            return bf16

        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
        return emulation_asked

    return pretend


def test_cuda_with_native_bf16(machine) -> None:
    emulation_asked = machine(cuda=True, bf16=True)
    plan = resolve_hardware(AUTO, cpus=16)
    assert plan == HardwarePlan(
        device="cuda",
        precision="bf16-mixed",
        channels_last=True,
        num_workers=8,
        pin_memory=True,
        persistent_workers=True,
        prefetch_factor=4,
    )
    assert emulation_asked == [False]  # emulated bf16 (pre-Ampere) must not count as support


def test_older_cuda_gets_fp16_mixed(machine) -> None:
    machine(cuda=True, bf16=False)
    plan = resolve_hardware(AUTO, cpus=4)
    assert (plan.device, plan.precision, plan.channels_last, plan.pin_memory) == (
        "cuda",
        "16-mixed",
        True,
        True,
    )
    assert plan.num_workers == 3


def test_mps_stays_fp32_without_pinning(machine) -> None:
    machine(mps=True)
    plan = resolve_hardware(AUTO, cpus=4)
    assert (plan.device, plan.precision, plan.channels_last, plan.pin_memory) == (
        "mps",
        "32-true",
        False,
        False,
    )


def test_cpu_stays_fp32_in_channels_last(machine) -> None:
    machine()
    plan = resolve_hardware(AUTO, cpus=2)
    assert plan == HardwarePlan(
        device="cpu",
        precision="32-true",
        channels_last=True,  # faster on CPU: README (benchmarks/epoch_profile.py)
        num_workers=1,
        pin_memory=False,
        persistent_workers=True,
        prefetch_factor=4,
    )


def test_cpu_accelerator_on_a_cuda_machine_is_a_cpu_fit(machine) -> None:
    machine(cuda=True, bf16=True)
    plan = resolve_hardware(AUTO.model_copy(update={"accelerator": "cpu"}), cpus=8)
    assert (plan.device, plan.precision, plan.channels_last, plan.pin_memory) == (
        "cpu",
        "32-true",
        True,
        False,
    )
    assert resolve_hardware(AUTO, "gpu", cpus=8).device == "cuda"  # the placement's accelerator wins


@pytest.mark.parametrize(("cpus", "workers"), [(1, 0), (2, 1), (9, 8), (64, 8)])
def test_auto_workers_leave_one_cpu_and_stop_at_eight(machine, cpus: int, workers: int) -> None:
    machine()
    plan = resolve_hardware(AUTO, cpus=cpus)
    assert plan.num_workers == workers
    assert plan.persistent_workers is (workers > 0)
    assert plan.prefetch_factor == (4 if workers else None)  # torch refuses a prefetch factor without workers


def test_auto_workers_count_this_process_cpus(machine, monkeypatch: pytest.MonkeyPatch) -> None:
    machine()
    monkeypatch.setattr(hardware, "usable_cpus", lambda: 5)
    assert resolve_hardware(AUTO).num_workers == 4


def test_explicit_settings_are_kept_on_cuda(machine) -> None:
    machine(cuda=True, bf16=True)
    explicit = TrainingConfig(precision="32-true", channels_last=False, num_workers=0)
    plan = resolve_hardware(explicit)
    assert (plan.precision, plan.channels_last, plan.num_workers, plan.persistent_workers) == (
        "32-true",
        False,
        0,
        False,
    )


@pytest.mark.parametrize(("profile", "channels_last"), [("demo", True), ("tiny", False)])
def test_laptop_profiles_keep_fp32_and_no_workers(machine, profile: str, channels_last: bool) -> None:
    machine(cuda=True, bf16=True)
    plan = resolve_hardware(load_config(profile).training)
    assert (plan.precision, plan.channels_last, plan.num_workers) == ("32-true", channels_last, 0)
    machine()
    assert resolve_hardware(load_config(profile).training).channels_last is channels_last  # CPU too


def test_full_profile_is_auto(machine) -> None:
    machine(cuda=True, bf16=True)
    plan = resolve_hardware(load_config("full").training, cpus=16)
    assert (plan.precision, plan.channels_last, plan.num_workers, plan.pin_memory) == (
        "bf16-mixed",
        True,
        8,
        True,
    )


def test_env_and_overrides_take_auto_or_a_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MELANOMA_TRAINING__NUM_WORKERS", "3")
    assert load_config("full").training.num_workers == 3
    monkeypatch.setenv("MELANOMA_TRAINING__NUM_WORKERS", "auto")
    assert load_config("tiny").training.num_workers == "auto"
    with pytest.raises(ValueError, match="num_workers"):
        load_config("tiny", {"training": {"num_workers": "many"}})


def _dataset(n: int = 4, size: int = 8) -> MelanomaDataset:
    images = np.random.default_rng(0).integers(0, 255, (n, size, size, 3), dtype=np.uint8)

    def to_tensor(image: np.ndarray) -> dict[str, torch.Tensor]:
        return {"image": torch.from_numpy(image).permute(2, 0, 1).float().contiguous()}

    return MelanomaDataset(images, np.arange(n), np.zeros((n, 2)), np.array([0, 1, 0, 1]), to_tensor)


@pytest.mark.parametrize("channels_last", [True, False])
def test_loader_batches_follow_the_memory_format(machine, channels_last: bool) -> None:
    machine()
    loader = make_loader(_dataset(), TrainingConfig(batch_size=4, channels_last=channels_last), shuffle=False)
    image, metadata, target = next(iter(loader))
    assert image.shape == (4, 3, 8, 8)
    assert image.is_contiguous(memory_format=torch.channels_last) is channels_last
    assert metadata.shape == (4, 2) and target.tolist() == [0.0, 1.0, 0.0, 1.0]
    assert loader.pin_memory is False and loader.num_workers == 0
