"""Device leases: pool parsing, Lightning placement, and flock leases across threads and processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from melanoma_ml.config import TrainingConfig, load_config
from melanoma_ml.devices import (
    DeviceLeaseTimeout,
    devices_per_fit,
    host_lock_dir,
    lease_devices,
    lightning_strategy,
    placement_for,
    resolve_pool,
    training_placement,
    waiting_for_devices,
)
from melanoma_ml.errors import InputValueError

POOL = ["cpu:0", "cpu:1"]


# ---- config and placement (no locks) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("cuda:0,cuda:1", ["cuda:0", "cuda:1"]),
        (" cpu:0 , cpu:1 ", ["cpu:0", "cpu:1"]),
        (["cuda:2"], ["cuda:2"]),
        ("auto", "auto"),
        ("off", "off"),
    ],
)
def test_device_pool_accepts_lists_and_comma_strings(given, expected) -> None:
    assert TrainingConfig(device_pool=given).device_pool == expected


@pytest.mark.parametrize("bad", [["gpu0"], ["cuda:0", "cuda:0"], ["cuda:0", "cpu:1"], [], "cuda"])
def test_device_pool_refuses_unknown_duplicate_or_mixed_devices(bad) -> None:
    with pytest.raises(ValidationError, match="device_pool"):
        TrainingConfig(device_pool=bad)


def test_device_pool_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MELANOMA_TRAINING__DEVICE_POOL", "cuda:0,cuda:1")
    monkeypatch.setenv("MELANOMA_TRAINING__DEVICES", "2")
    training = load_config("tiny").training
    assert training.device_pool == ["cuda:0", "cuda:1"] and training.devices == 2


def test_defaults_train_one_device_and_lease_only_cuda() -> None:
    training = TrainingConfig()
    assert (training.devices, training.strategy, training.device_pool) == (1, "auto", "auto")
    assert resolve_pool(TrainingConfig(accelerator="cpu")) == []  # a CPU run never leases CUDA devices
    assert resolve_pool(TrainingConfig(device_pool="off")) == []
    assert resolve_pool(TrainingConfig(device_pool=POOL)) == POOL


def test_placement_pins_cuda_indices_and_counts_cpu_slots() -> None:
    one = placement_for(["cuda:1"], TrainingConfig())
    assert (one.accelerator, one.devices, one.strategy, one.leased) == ("gpu", [1], "auto", ("cuda:1",))
    two = placement_for(["cuda:2", "cuda:3"], TrainingConfig(devices=2))
    assert (two.devices, two.strategy) == ([2, 3], "ddp_spawn")
    cpu = placement_for(POOL, TrainingConfig(devices=2, accelerator="cpu", strategy="ddp_fork"))
    assert (cpu.accelerator, cpu.devices, cpu.strategy) == ("cpu", 2, "ddp_fork")
    unleased = placement_for((), TrainingConfig(accelerator="cpu"))
    assert (unleased.accelerator, unleased.devices, unleased.leased) == ("cpu", 1, ())


def test_placement_refuses_an_accelerator_that_contradicts_the_pool() -> None:
    with pytest.raises(InputValueError, match="training.accelerator='cpu'"):
        placement_for(["cuda:0"], TrainingConfig(accelerator="cpu"))


def test_several_devices_never_use_the_relaunching_ddp() -> None:
    assert lightning_strategy("auto", 2) == "ddp_spawn"
    assert lightning_strategy("auto", 1) == "auto"
    assert lightning_strategy("auto", "auto") == "auto"
    assert lightning_strategy("ddp_fork", 2) == "ddp_fork"
    with pytest.raises(ValidationError, match="strategy"):
        TrainingConfig(strategy="ddp")


def test_devices_per_fit_is_bounded_by_the_pool() -> None:
    assert devices_per_fit(TrainingConfig(devices="auto"), POOL) == 2
    with pytest.raises(InputValueError, match="only 2 device"):
        devices_per_fit(TrainingConfig(devices=3), POOL)


# ---- leases ----------------------------------------------------------------------------------------


def test_concurrent_leases_get_distinct_devices_and_a_full_pool_times_out(tmp_path: Path) -> None:
    with lease_devices(POOL, 1, tmp_path, holder="a", wait_s=0) as first:
        with lease_devices(POOL, 1, tmp_path, holder="b", wait_s=0) as second:
            assert first == ("cpu:0",) and second == ("cpu:1",)
            held = r"cpu:0: pid \d+ \(a\); cpu:1: pid \d+ \(b\)"
            with (
                pytest.raises(DeviceLeaseTimeout, match=held),
                lease_devices(POOL, 1, tmp_path, holder="c", wait_s=0.3, poll_s=0.1),
            ):
                pass
        with lease_devices(POOL, 1, tmp_path, holder="d", wait_s=0) as again:
            assert again == ("cpu:1",)  # released when the block ended


def test_a_multi_device_lease_is_all_or_nothing(tmp_path: Path) -> None:
    with lease_devices(POOL, 1, tmp_path, holder="one", wait_s=0):
        with pytest.raises(DeviceLeaseTimeout), lease_devices(POOL, 2, tmp_path, holder="two", wait_s=0):
            pass
        with lease_devices(POOL, 1, tmp_path, holder="three", wait_s=0) as free:
            assert free == ("cpu:1",)  # the failed pair did not keep cpu:1
    with lease_devices(POOL, 2, tmp_path, holder="pair", wait_s=0) as both:
        assert both == tuple(POOL)


def test_a_waiting_lease_is_visible_until_it_holds_or_gives_up(tmp_path: Path) -> None:
    import threading

    seen: list[list[dict]] = []
    with lease_devices(["cpu:0"], 1, tmp_path, holder="first", wait_s=0):
        assert waiting_for_devices(tmp_path) == []  # holding is not waiting
        with (
            pytest.raises(DeviceLeaseTimeout),
            lease_devices(["cpu:0"], 1, tmp_path, holder="timeout", wait_s=0.3, poll_s=0.05),
        ):
            pass
        assert waiting_for_devices(tmp_path) == []  # a waiter that gave up leaves no file

        def wait_then_lease() -> None:
            with lease_devices(["cpu:0"], 1, tmp_path, holder="second", wait_s=30, poll_s=0.05):
                seen.append(waiting_for_devices(tmp_path))

        thread = threading.Thread(target=wait_then_lease)
        thread.start()
        deadline = time.monotonic() + 30
        while not waiting_for_devices(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.02)
        waiters = waiting_for_devices(tmp_path)
        assert [(w["holder"], w["pid"], w["count"]) for w in waiters] == [("second", os.getpid(), 1)]
    thread.join(30)
    assert seen == [[]]  # once it holds the device it no longer waits
    assert waiting_for_devices(tmp_path) == []


def test_a_lease_waits_for_a_device_to_be_released(tmp_path: Path) -> None:
    holder = _hold_in_subprocess(tmp_path, ["cpu:0"])
    try:
        started = time.monotonic()
        releaser = subprocess.Popen(  # releases the device after ~0.5 s by killing the holder (SIGKILL:
            # a SIGTERM can be blocked in a child that inherits the test process's signal mask)
            [sys.executable, "-c", f"import os, signal, time; time.sleep(0.5); os.kill({holder.pid}, 9)"]
        )
        with lease_devices(["cpu:0"], 1, tmp_path, holder="waiter", wait_s=30, poll_s=0.05) as got:
            assert got == ("cpu:0",) and time.monotonic() - started >= 0.4
        releaser.wait(10)
    finally:
        _stop(holder)


def test_another_process_holds_its_device_until_it_is_killed(tmp_path: Path) -> None:
    holder = _hold_in_subprocess(tmp_path, ["cpu:0"])
    try:
        with lease_devices(POOL, 1, tmp_path, holder="here", wait_s=0) as got:
            assert got == ("cpu:1",)
        os.kill(holder.pid, signal.SIGKILL)  # the kernel drops a dead process's flock
        holder.wait(10)
        with lease_devices(POOL, 1, tmp_path, holder="after", wait_s=5, poll_s=0.05) as got:
            assert got == ("cpu:0",)
    finally:
        _stop(holder)


def test_training_placement_locks_per_host_and_only_with_a_pool(tmp_path: Path) -> None:
    training = TrainingConfig(device_pool=POOL, accelerator="cpu", device_wait_s=0)
    with training_placement(training, tmp_path, holder="fit") as placement:
        assert placement.leased == ("cpu:0",) and placement.accelerator == "cpu"
        assert (host_lock_dir(tmp_path) / "device-cpu-0.lock").is_file()
    with training_placement(TrainingConfig(accelerator="cpu"), tmp_path / "none", holder="fit") as plain:
        assert plain.leased == ()
    assert not (tmp_path / "none").exists()


def _hold_in_subprocess(lock_dir: Path, devices: list[str]) -> subprocess.Popen:
    """A process that leases ``devices`` and sleeps; returns once it holds them."""
    code = (
        "import sys, time\n"
        "from melanoma_ml.devices import lease_devices\n"
        f"with lease_devices({devices!r}, {len(devices)}, {str(lock_dir)!r}, holder='other', wait_s=0):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(120)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "held"
    return process


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(10)
