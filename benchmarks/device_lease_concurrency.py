"""Two training partitions through Dagster: one after another vs at once on two leased devices.

Baseline and candidate in the same run, on the same instance and data: each partition is its own
``dagster asset materialize`` process (the way a backfill launches runs), with the ``training`` pool
limit at 2 and ``training.device_pool`` declaring two CPU "devices". Sequential runs the two processes
one after the other; concurrent starts both at once (each leases its own device). Every process uses
one CPU thread (``OMP_NUM_THREADS=1``, which torch reads for its thread count), so on a 2-core machine
two concurrent trainings stand in for two GPUs. Wall time includes each process's start-up (imports,
code location load), as a backfill's would.

    .venv/bin/python benchmarks/device_lease_concurrency.py --profile demo --workdir /tmp/lease_bench
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import machine_load, open_run

from melanoma_ml.training.train import FoldResult

DAGSTER = [sys.executable, "-m", "dagster"]
BACKBONE = "test_efficientnet"


def _env(workdir: Path, profile: str, epochs: int | None, root: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DAGSTER_HOME=str(workdir / "home"),
        DAGSTER_DISABLE_TELEMETRY="1",
        HF_HUB_OFFLINE="1",
        NO_ALBUMENTATIONS_UPDATE="1",
        MELANOMA_PROFILE=profile,
        MELANOMA_ARTIFACT_ROOT=str(workdir / root),
        MELANOMA_TRAINING__ACCELERATOR="cpu",
        MELANOMA_TRAINING__DEVICE_POOL="cpu:0,cpu:1",
        OMP_NUM_THREADS="1",
    )
    if epochs:
        env["MELANOMA_TRAINING__EPOCHS"] = str(epochs)
    return env


def _start(env: dict[str, str], select: str, partition: str | None = None) -> subprocess.Popen:
    command = [*DAGSTER, "asset", "materialize", "-m", "melanoma_assets.definitions", "--select", select]
    if partition:
        command += ["--partition", partition]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(process: subprocess.Popen) -> None:
    output, _ = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"materialize failed:\n{output[-4000:]}")


def _fold_results(env: dict[str, str], folds: list[str]) -> list[dict]:
    run = open_run(env["MELANOMA_ARTIFACT_ROOT"])
    return [FoldResult.load(run.paths.checkpoint(BACKBONE, int(fold))).to_dict() for fold in folds]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--epochs", type=int, default=None, help="training.epochs (default: the profile's)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/device_lease_bench"))
    args = parser.parse_args()

    shutil.rmtree(args.workdir, ignore_errors=True)
    home = args.workdir / "home"
    home.mkdir(parents=True)
    (home / "dagster.yaml").write_text(
        "telemetry:\n  enabled: false\nconcurrency:\n  pools:\n    default_limit: 1\n"
    )
    folds = ["0", "1"]
    partitions = [f"{BACKBONE}|{fold}" for fold in folds]
    timings: dict[str, float] = {}
    devices: dict[str, list[list[str]]] = {}
    for mode in ("sequential", "concurrent"):
        env = _env(args.workdir, args.profile, args.epochs, f"artifacts-{mode}")
        if mode == "sequential":
            subprocess.run([*DAGSTER, "instance", "concurrency", "set", "training", "2"], env=env, check=True)
        _wait(_start(env, "group:data"))  # not timed: both modes train on the same prepared data
        started = time.perf_counter()
        if mode == "sequential":
            for key in partitions:
                _wait(_start(env, "fold_model", key))
        else:
            for process in [_start(env, "fold_model", key) for key in partitions]:
                _wait(process)
        timings[mode] = time.perf_counter() - started
        results = _fold_results(env, folds)
        devices[mode] = [r["devices"] for r in results]
        train_s = ", ".join(f"fold {r['fold']} {r['wall_time_s']:.1f} s" for r in results)
        print(
            f"{mode}: {timings[mode]:.1f} s wall for {len(partitions)} partitions (train_fold: {train_s}); "
            f"devices {devices[mode]}"
        )
    ratio = timings["concurrent"] / timings["sequential"]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"concurrent / sequential wall = {ratio:.2f} (profile {args.profile}, {os.cpu_count()} CPUs, "
        f"1 thread each; load average now {load}: other work on the machine competes for the cores)"
    )


if __name__ == "__main__":
    with machine_load():
        main()
