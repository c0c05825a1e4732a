"""A live `dagster dev` on loopback: the UI's GraphQL shows the graph and checks, and launching the data
assets the way the UI does ends in a successful run. Everything lives under tmp_path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port

REPO = Path(__file__).resolve().parents[2]
DATA_ASSETS = ["source_metadata", "clean_metadata", "quarantined_rows", "patient_folds", "image_cache"]
DATA_CHECKS = [("clean_metadata", "clean_metadata_schema"), ("patient_folds", "folds_leak_free_and_balanced")]
INSTANCE_YAML = """\
telemetry:
  enabled: false
concurrency:
  pools:
    default_limit: 1
"""

ASSET_GRAPH = """
{ assetNodes { assetKey { path } groupName isPartitioned
    assetChecksOrError { ... on AssetChecks { checks { name blocking } } } } }
"""
LAUNCH = """
mutation Launch($params: ExecutionParams!) {
  launchPipelineExecution(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on InvalidStepError { invalidStepKey }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}
"""
RUN_STATUS = "query Run($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }"


def graphql(url: str, query: str, variables: dict | None = None) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(f"{url}/graphql", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        payload = json.loads(response.read())
    assert "errors" not in payload, payload["errors"]
    return payload["data"]


def wait_for_http(url: str, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"dagster dev exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/server_info", timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(1)
    pytest.fail(f"dagster dev did not answer on {url} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.mark.live
@pytest.mark.slow
def test_dagster_dev_shows_the_graph_and_runs_the_data_assets(tmp_path: Path) -> None:
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(INSTANCE_YAML)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MELANOMA_")}
    env.update(
        DAGSTER_HOME=str(home),
        MELANOMA_PROFILE="tiny",
        MELANOMA_ARTIFACT_ROOT=str(tmp_path / "artifacts"),
        DAGSTER_DISABLE_TELEMETRY="1",
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "dagster_dev.log"
    dagster = Path(sys.executable).with_name("dagster")
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(dagster), "dev", "-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_http(url, process, log)
        nodes = graphql(url, ASSET_GRAPH)["assetNodes"]
        by_key = {"/".join(n["assetKey"]["path"]): n for n in nodes}
        assert set(DATA_ASSETS) <= set(by_key)
        assert {
            "fold_model",
            "evaluation/test_efficientnet",
            "leaderboard",
            "serving_model",
            "gradcam_gallery",
        } <= set(by_key)
        assert by_key["fold_model"]["isPartitioned"]
        checks = {c["name"]: c["blocking"] for n in nodes for c in n["assetChecksOrError"].get("checks", [])}
        assert checks.get("folds_leak_free_and_balanced") is True and "served_bundle_reproduces" in checks

        params = {
            "selector": {
                "repositoryLocationName": "melanoma",
                "repositoryName": "__repository__",
                "pipelineName": "__ASSET_JOB",
                "assetSelection": [{"path": [name]} for name in DATA_ASSETS],
                "assetCheckSelection": [{"assetKey": {"path": [a]}, "name": c} for a, c in DATA_CHECKS],
            },
            "mode": "default",
            "executionMetadata": {"tags": [{"key": "melanoma/test", "value": "live"}]},
        }
        launched = graphql(url, LAUNCH, {"params": params})["launchPipelineExecution"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run_id = launched["run"]["runId"]

        deadline, status = time.monotonic() + 240, None
        while time.monotonic() < deadline:
            status = graphql(url, RUN_STATUS, {"id": run_id})["runOrError"]["status"]
            if status in {"SUCCESS", "FAILURE", "CANCELED"}:
                break
            time.sleep(2)
        assert status == "SUCCESS", f"run {run_id} ended {status}:\n{log.read_text()[-4000:]}"
        assert (tmp_path / "artifacts" / "tables" / "folds.parquet").is_file()
        assert (tmp_path / "artifacts" / "cache" / "32px").is_dir()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
