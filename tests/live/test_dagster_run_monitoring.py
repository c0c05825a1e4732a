"""A run whose process is killed (kill -9) ends FAILURE and is retried once, with this project's
`dagster.yaml` settings for run monitoring and run retries, under a live `dagster-daemon` on a temp instance.

Two crashes, as they happen in practice with the default run launcher:
1. the run worker alone is killed (out-of-memory killer, `kill -9`): the code server that launched it sees
   it die and marks the run FAILURE; the daemon's run retries launch a retry;
2. the run worker and the code server that launched it are both killed (a crashed host process): nothing is
   left to report the run, so only run monitoring can end it (here by the run's `dagster/max_runtime` tag,
   kept short for the test; the daemon polls every second). Its retry waits for the daemon to restart the
   code server (its workspace reload, every 60 s), too long for this test, so only the FAILURE is checked.
   The shipped backstop for this case is `run_monitoring.max_runtime_seconds` (86400 s in dagster.yaml):
   the run here is ended by a 5 s `dagster/max_runtime` tag that this test adds, not by shipped settings.
3. the op raises (bad input, a failed check): the run fails and, with the shipped
   `retry_on_asset_or_op_failure: false`, run retries do not retry it (crashes only).

Not covered, and not true: runs of `melanoma-ml demo --dagster` (and any `dagster.materialize` /
`execute_in_process` run) execute inside the calling process with no run launcher or code server. Killed
with kill -9 they stay STARTED until max_runtime_seconds (24 h) passes, and they have no job origin, so run
retries cannot re-run them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}

# A one-op job that records its process ids and sleeps; a retry (a run with a parent) finishes at once.
# in_process_executor, as in melanoma_assets.definitions: the op runs inside the run worker process.
JOB_FILE = """
import os, time
from pathlib import Path
import dagster as dg

@dg.op
def train_step(context: dg.OpExecutionContext) -> None:
    marker = Path(os.environ["RUN_MONITORING_TEST_DIR"]) / f"{context.run_id}.json"
    marker.write_text(f'{{"worker": {os.getpid()}, "code_server": {os.getppid()}}}')
    if context.run.tags.get("melanoma/test") == "op-raised":
        raise RuntimeError("bad input: the op itself failed")
    if context.run.parent_run_id is None:
        time.sleep(300)

@dg.job(executor_def=dg.in_process_executor)
def sleepy():
    train_step()

defs = dg.Definitions(jobs=[sleepy])
"""


def instance_yaml() -> str:
    """The project's instance settings for crashes, with storage under the temp DAGSTER_HOME and fast polling."""
    project = yaml.safe_load((REPO / "dagster.yaml").read_text())
    settings = {
        key: project[key]
        for key in ("telemetry", "concurrency", "run_monitoring", "run_retries")
        if key in project
    }
    settings.setdefault("run_monitoring", {})["poll_interval_seconds"] = 1
    return yaml.safe_dump(settings)


class Instance:
    """The temp instance's runs and event logs, read in this process through Dagster's public API."""

    def __init__(self, home: Path):
        import dagster as dg

        self._instance = dg.DagsterInstance.from_config(str(home))

    def runs(self) -> list:
        return list(self._instance.get_runs())

    def run(self, run_id: str):
        return self._instance.get_run_by_id(run_id)

    def events(self, run_id: str) -> str:
        return "\n".join(
            str(getattr(record, "message", "") or getattr(record.dagster_event, "message", ""))
            for record in self._instance.all_logs(run_id)
        )

    def close(self) -> None:
        self._instance.dispose()


def wait_for(what: str, condition, timeout: float, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"{what} within {timeout:.0f} s; daemon log:\n{log.read_text()[-4000:]}")


def descendants(pid: int) -> list[int]:
    """Process ids below ``pid`` (Linux /proc), children before grandchildren."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, frontier = [], [pid]
    while frontier:
        below = [child for parent in frontier for child in children.get(parent, [])]
        found += below
        frontier = below
    return found


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone: what we wanted
        os.kill(pid, signal.SIGKILL)


@pytest.mark.live
@pytest.mark.slow
@pytest.mark.timeout(420)  # each wait below has its own deadline; this only ends a hung daemon
def test_a_killed_run_is_marked_failed_and_retried(tmp_path: Path) -> None:
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(instance_yaml())
    (tmp_path / "jobs.py").write_text(JOB_FILE)
    markers = tmp_path / "markers"
    markers.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MELANOMA_", "DAGSTER_"))}
    env.update(DAGSTER_HOME=str(home), DAGSTER_DISABLE_TELEMETRY="1", RUN_MONITORING_TEST_DIR=str(markers))
    bin_dir = Path(sys.executable).parent
    log = tmp_path / "daemon.log"
    instance = Instance(home)  # creates the SQLite storage before the daemon opens it
    with open(log, "wb") as out:
        daemon = subprocess.Popen(
            [str(bin_dir / "dagster-daemon"), "run", "-f", "jobs.py"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def launch(tags: dict[str, str]) -> str:
        before = {run.run_id for run in instance.runs()}
        subprocess.run(
            [
                str(bin_dir / "dagster"),
                "job",
                "launch",
                "-f",
                "jobs.py",
                "-j",
                "sleepy",
                "--tags",
                json.dumps(tags),
            ],
            cwd=tmp_path,
            env=env,
            check=True,
            capture_output=True,
            timeout=60,
        )
        # new runs launched here; a retry the daemon launched meanwhile (it has a parent) is not one
        (run_id,) = {r.run_id for r in instance.runs() if "dagster/parent_run_id" not in r.tags} - before
        return run_id

    def crash(run_id: str, kill_code_server: bool) -> None:
        marker = markers / f"{run_id}.json"
        wait_for(f"run {run_id} did not start its op", marker.exists, 60, log)
        pids = json.loads(marker.read_text())
        if kill_code_server:
            kill(pids["code_server"])  # first, so it cannot report the worker's death
        kill(pids["worker"])
        wait_for(
            f"run {run_id} was not marked FAILURE",
            lambda: instance.run(run_id).status.value == "FAILURE",
            45,
            log,
        )

    def expect_retry(run_id: str) -> None:
        retry = wait_for(
            f"no retry of run {run_id}",
            lambda: [r for r in instance.runs() if r.tags.get("dagster/parent_run_id") == run_id],
            45,
            log,
        )[0]
        assert (
            retry.tags.get("dagster/retry_number") == "1" and retry.tags.get("dagster/root_run_id") == run_id
        )
        wait_for(
            f"the retry {retry.run_id} did not succeed",
            lambda: instance.run(retry.run_id).status.value in FINISHED,
            60,
            log,
        )
        assert instance.run(retry.run_id).status.value == "SUCCESS", instance.events(retry.run_id)

    try:
        killed = launch({"melanoma/test": "worker-killed"})
        crash(killed, kill_code_server=False)
        expect_retry(killed)
        raised = launch({"melanoma/test": "op-raised"})
        wait_for(
            f"run {raised} did not fail",
            lambda: instance.run(raised).status.value in FINISHED,
            60,
            log,
        )
        assert instance.run(raised).status.value == "FAILURE"
        wait_for(  # the retry daemon's verdict on this run, logged on it
            f"run retries gave no verdict on run {raised}",
            lambda: (
                "Not retrying run since it failed due to an asset or op failure" in instance.events(raised)
            ),
            60,
            log,
        )
        assert not [r for r in instance.runs() if r.tags.get("dagster/parent_run_id") == raised]
        orphan = launch({"melanoma/test": "worker-and-code-server-killed", "dagster/max_runtime": "5"})
        crash(orphan, kill_code_server=True)
        assert "maximum runtime" in instance.events(
            orphan
        )  # ended by run monitoring: no code server was left
    finally:
        instance.close()
        for pid in [*descendants(daemon.pid), daemon.pid]:
            kill(pid)
        daemon.wait(timeout=30)
