"""Two training partitions at once through Dagster, each on its own leased device.

Two ``dagster asset materialize`` processes share one instance (SQLite under ``tmp_path``) whose
``training`` pool limit is 2, as ``dagster.yaml`` documents for a two-GPU machine; the pipeline declares
two CPU "devices" (``training.device_pool=cpu:0,cpu:1``). Both runs must succeed and each must record,
in its asset metadata and its fold result, a different device. Wall time is not asserted here
(``benchmarks/device_lease_concurrency.py`` measures it).

A tiny fold trains in seconds while a process starts in tens of them, so the runs would often not
overlap by themselves. The test therefore holds both devices until both runs have started their
training step (they wait for a lease, which is also under test), then frees them together.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from melanoma_ml.devices import host_lock_dir, lease_devices, waiting_for_devices
from melanoma_ml.training.train import FoldResult

pytestmark = pytest.mark.slow

PARTITIONS = ("test_efficientnet|0", "test_efficientnet|1")
DAGSTER = [sys.executable, "-m", "dagster"]


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DAGSTER_HOME=str(tmp_path / "home"),
        MELANOMA_PROFILE="tiny",
        MELANOMA_ARTIFACT_ROOT=str(tmp_path / "artifacts"),
        MELANOMA_TRAINING__ACCELERATOR="cpu",
        MELANOMA_TRAINING__EPOCHS="3",
        MELANOMA_TRAINING__DEVICE_POOL="cpu:0,cpu:1",
        OMP_NUM_THREADS="1",  # two trainings share this machine's cores
    )
    return env


def _materialize(env: dict[str, str], select: str, partition: str | None = None) -> subprocess.Popen:
    command = [*DAGSTER, "asset", "materialize", "-m", "melanoma_assets.definitions", "--select", select]
    if partition:
        command += ["--partition", partition]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-4000:]
    return output


def _wait_for_training_steps(home: Path, count: int, runs: list[subprocess.Popen]) -> None:
    """Until ``count`` fold_model steps have started (each is then waiting for a device lease)."""
    deadline = time.monotonic() + 600
    with dg.DagsterInstance.from_config(str(home)) as instance:
        while time.monotonic() < deadline:
            started = instance.get_event_records(
                dg.EventRecordsFilter(event_type=dg.DagsterEventType.STEP_START), limit=100
            )
            if sum(r.event_log_entry.step_key == "fold_model" for r in started) >= count:
                return
            assert all(run.poll() is None for run in runs), "a run ended before training started"
            time.sleep(1)
    raise AssertionError(f"{count} fold_model steps did not start within 600 s")


def _wait_for_lease_waiters(locks: Path, count: int, runs: list[subprocess.Popen]) -> None:
    """Until ``count`` fits wait in ``lease_devices``: a step can start long before it asks for a device
    (inputs, imports), and a first fit that trains and releases before the second asks would leave the
    second the same device, which is what a loaded machine did to this test."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if len(waiting_for_devices(locks)) >= count:
            return
        assert all(run.poll() is None for run in runs), "a run ended before it waited for a device"
        time.sleep(0.2)
    raise AssertionError(f"{count} fits did not wait for a device lease within 600 s")


def test_two_partitions_train_concurrently_on_distinct_devices(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(
        "telemetry:\n  enabled: false\nconcurrency:\n  pools:\n    default_limit: 1\n"
    )
    env = _env(tmp_path)
    subprocess.run([*DAGSTER, "instance", "concurrency", "set", "training", "2"], env=env, check=True)
    _finish(_materialize(env, "group:data"))

    locks = host_lock_dir(tmp_path / "artifacts" / "locks")
    with lease_devices(["cpu:0", "cpu:1"], 2, locks, holder="the test's gate", wait_s=0):
        runs = [_materialize(env, "fold_model", key) for key in PARTITIONS]  # both at once
        _wait_for_training_steps(home, len(runs), runs)
        _wait_for_lease_waiters(locks, len(runs), runs)  # both blocked on the lease, not just started
    for run in runs:
        _finish(run)

    with dg.DagsterInstance.from_config(str(home)) as instance:
        devices = {}
        for key in PARTITIONS:
            records = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey("fold_model"), asset_partitions=[key]), limit=1
            ).records
            assert len(records) == 1, key
            devices[key] = records[0].asset_materialization.metadata["devices"].value
    assert sorted(devices.values()) == ["cpu:0", "cpu:1"], devices
    for key, device in devices.items():
        fold = key.split("|")[1]
        result = FoldResult.load(tmp_path / "artifacts" / "checkpoints" / "test_efficientnet" / f"fold{fold}")
        assert result.devices == [device]
