"""The HTTP side of deploy/smoke: the Dagster webserver's GraphQL and the app's ``/predict``.

    python deploy/smoke_checks.py run-graph  --ui URL [--timeout S]
    python deploy/smoke_checks.py history    --ui URL [--timeout S]
    python deploy/smoke_checks.py predict    --app URL --image FILE --expect VERSION [--timeout S]

``run-graph`` launches ``prepare_data`` the way the UI does (the query shapes of
tests/live/test_dagster_live.py); the daemon's automation sensor then trains every partition, evaluates,
promotes and draws the gallery. It waits until ``serving_model`` and ``gradcam_gallery`` are materialized
and no run is in progress, fails on any failed or canceled run, and prints one JSON line: the runs by
status. ``history`` waits for the webserver and prints the same line without launching anything.
``predict`` calls the app through gradio_client and checks the answer names ``VERSION``. Only the
standard library and gradio_client are needed (run it with the project's .venv python).

Two more checks of ``deploy/smoke --profile scale-out`` run *inside* a container of the stack (the script
goes in on stdin: ``docker compose exec -T SERVICE python - COMMAND < deploy/smoke_checks.py``):

    placement --step fold_model --workers 2     # in dagster-daemon: the Dagster instance's events
    bucket                                      # in a Celery worker: its S3 settings and melanoma_ml

``placement`` reads which Celery worker executed every ``STEP`` (the engine events' ``Celery worker``) and
fails unless they ran on at least ``N`` different workers. ``bucket`` reads the promoted version from the
model registry in the bucket (``MELANOMA_SERVING__REGISTRY_URI``), downloads it (every file checked against
its manifest's sha256) and lists the fold checkpoints the workers published to ``MELANOMA_ARTIFACT_STORE``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from collections import Counter

LOCATION = "melanoma"
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
RUNS = "{ runsOrError { ... on Runs { results { runId jobName status } } } }"
LATEST_MATERIALIZATION = """
query Latest($key: AssetKeyInput!) {
  assetOrError(assetKey: $key) { ... on Asset { assetMaterializations(limit: 1) { runId } } }
}
"""
FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}
BAD = {"FAILURE", "CANCELED"}
GOAL_ASSETS = ("serving_model", "gradcam_gallery")


class SmokeFailure(RuntimeError):
    """A check of the smoke test failed; the message says which and shows the evidence."""


def graphql(ui: str, query: str, variables: dict | None = None) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(f"{ui}/graphql", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        payload = json.loads(response.read())
    if "errors" in payload:
        raise SmokeFailure(f"GraphQL errors: {payload['errors']}")
    return payload["data"]


def wait_for_webserver(ui: str, deadline: float) -> None:
    while True:
        try:
            with urllib.request.urlopen(f"{ui}/server_info", timeout=5):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            if time.monotonic() > deadline:
                raise SmokeFailure(f"the Dagster webserver did not answer on {ui}: {exc}") from exc
            time.sleep(2)


def runs(ui: str) -> list[dict]:
    return graphql(ui, RUNS)["runsOrError"]["results"]


def by_status(all_runs: list[dict]) -> dict[str, int]:
    return dict(sorted(Counter(r["status"] for r in all_runs).items()))


def launch_prepare_data(ui: str, deadline: float) -> str:
    """Launch ``prepare_data``; retried while the webserver is still loading the code location."""
    params = {
        "selector": {
            "repositoryLocationName": LOCATION,
            "repositoryName": "__repository__",
            "pipelineName": "prepare_data",
        },
        "mode": "default",
        "executionMetadata": {"tags": [{"key": "melanoma/test", "value": "docker-smoke"}]},
    }
    while True:
        try:
            launched = graphql(ui, LAUNCH, {"params": params})["launchPipelineExecution"]
        except SmokeFailure as exc:  # e.g. the location is not loaded yet
            launched = {"__typename": "GraphQLError", "message": str(exc)}
        if launched["__typename"] == "LaunchRunSuccess":
            return launched["run"]["runId"]
        if time.monotonic() > deadline:
            raise SmokeFailure(f"could not launch prepare_data: {launched}")
        time.sleep(3)


def materialized(ui: str, asset: str) -> bool:
    found = graphql(ui, LATEST_MATERIALIZATION, {"key": {"path": [asset]}})["assetOrError"]
    return bool(found.get("assetMaterializations"))


def run_graph(ui: str, timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    wait_for_webserver(ui, deadline)
    first = launch_prepare_data(ui, deadline)
    print(f"[smoke] launched prepare_data: run {first}", file=sys.stderr)
    seen = ""
    while True:
        all_runs = runs(ui)
        failed = [r for r in all_runs if r["status"] in BAD]
        if failed:
            raise SmokeFailure(f"runs ended badly: {failed} (see `docker compose logs dagster-code`)")
        counts = by_status(all_runs)
        summary = f"{len(all_runs)} runs {counts}"
        if summary != seen:
            print(f"[smoke] {summary}", file=sys.stderr)
            seen = summary
        busy = [r for r in all_runs if r["status"] not in FINISHED]
        if not busy and all(materialized(ui, asset) for asset in GOAL_ASSETS):
            return counts
        if time.monotonic() > deadline:
            raise SmokeFailure(f"the graph did not finish within {timeout:.0f} s: {all_runs}")
        time.sleep(5)


def history(ui: str, timeout: float) -> dict[str, int]:
    wait_for_webserver(ui, time.monotonic() + timeout)
    return by_status(runs(ui))


def predict(app: str, image: str, expect: str, timeout: float) -> dict:
    """One ``/predict`` call (no TTA, no CAM), retried until the app is up; checks the served version."""
    from gradio_client import Client, handle_file

    deadline = time.monotonic() + timeout
    while True:
        try:
            client = Client(app, verbose=False, analytics_enabled=False)
            answer, *_ = client.predict(
                handle_file(image), "55", "male", "torso", False, "none", None, api_name="/predict"
            )
            break
        except Exception as exc:  # the app may still be starting: retried until the deadline
            if time.monotonic() > deadline:
                raise SmokeFailure(f"no answer from the app at {app}: {exc!r}") from exc
            time.sleep(3)
    if answer.get("model_version") != expect:
        raise SmokeFailure(f"the app served {answer.get('model_version')!r}, expected {expect!r}: {answer}")
    return {k: answer.get(k) for k in ("model_version", "backbone", "probability", "decision")}


def placement(step: str, workers: int) -> dict:
    """``{"workers": [...], "steps": {partition: [worker, ...]}}`` of every ``step`` the instance ran."""
    import dagster as dg

    instance = dg.DagsterInstance.get()
    steps: dict[str, list[str]] = {}
    for run in instance.get_runs():
        partition = run.tags.get("dagster/partition", run.run_id)
        for entry in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
            event = entry.dagster_event
            metadata = (event.engine_event_data.metadata or {}) if event.step_key == step else {}
            if "Celery worker" in metadata:
                steps.setdefault(partition, []).append(str(metadata["Celery worker"].value).split("@")[0])
    names = sorted({name for placed in steps.values() for name in placed})
    if len(names) < workers:
        raise SmokeFailure(
            f"{step} ran on {names or 'no Celery worker'}, expected {workers} different workers: {steps} "
            "(is MELANOMA_EXECUTOR=celery set, and the training pool's limit the worker count?)"
        )
    return {"workers": names, "steps": dict(sorted(steps.items()))}


def bucket() -> dict:
    """The promoted bundle, downloaded and verified from the bucket, and the fold checkpoints published there."""
    import os

    import boto3

    from melanoma_ml.config import load_config
    from melanoma_ml.serving.remote_registry import open_registry

    config = load_config(os.environ.get("MELANOMA_PROFILE") or "demo")
    if not (config.serving.registry_uri or "").startswith("s3://"):
        raise SmokeFailure(f"the registry is not in the bucket: registry_uri={config.serving.registry_uri!r}")
    registry = open_registry(config)
    pointer = registry.pointer()
    if pointer is None:
        raise SmokeFailure(f"no promoted version in {config.serving.registry_uri}")
    folder = registry.version_path(pointer["version"])  # every file checked against the manifest
    bundle = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    store = os.environ.get("MELANOMA_ARTIFACT_STORE", "")
    name, _, prefix = store.removeprefix("s3://").partition("/")
    client = boto3.client("s3")
    commit_keys = [
        item["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name, Prefix=f"{prefix}/commits/")
        for item in page.get("Contents", [])
    ]
    checkpoints = set()
    for key in commit_keys:
        files = json.loads(client.get_object(Bucket=name, Key=key)["Body"].read())["files"]
        checkpoints |= {"/".join(f.split("/")[:3]) for f in files if f.startswith("checkpoints/")}
    if not commit_keys or not checkpoints:
        raise SmokeFailure(f"{store}: {len(commit_keys)} commits, no fold checkpoint published")
    return {
        "version": pointer["version"],
        "bundle_files": bundle,
        "store_commits": len(commit_keys),
        "checkpoints": sorted(checkpoints),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="HTTP checks of deploy/smoke")
    parser.add_argument("command", choices=["run-graph", "history", "predict", "placement", "bucket"])
    parser.add_argument("--ui", help="Dagster webserver URL")
    parser.add_argument("--app", help="Gradio app URL")
    parser.add_argument("--image", help="image file to upload")
    parser.add_argument("--expect", help="model version the app must answer with")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--step", default="fold_model", help="placement: the step whose workers to read")
    parser.add_argument("--workers", type=int, default=2, help="placement: how many workers it must span")
    args = parser.parse_args(argv)
    try:
        if args.command == "run-graph":
            result: dict = run_graph(args.ui, args.timeout)
        elif args.command == "history":
            result = history(args.ui, args.timeout)
        elif args.command == "placement":
            result = placement(args.step, args.workers)
        elif args.command == "bucket":
            result = bucket()
        else:
            result = predict(args.app, args.image, args.expect, args.timeout)
    except SmokeFailure as exc:
        print(f"[smoke] FAILED: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
