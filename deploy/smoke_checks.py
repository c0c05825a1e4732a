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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="HTTP checks of deploy/smoke")
    parser.add_argument("command", choices=["run-graph", "history", "predict"])
    parser.add_argument("--ui", help="Dagster webserver URL")
    parser.add_argument("--app", help="Gradio app URL")
    parser.add_argument("--image", help="image file to upload")
    parser.add_argument("--expect", help="model version the app must answer with")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args(argv)
    try:
        if args.command == "run-graph":
            result: dict = run_graph(args.ui, args.timeout)
        elif args.command == "history":
            result = history(args.ui, args.timeout)
        else:
            result = predict(args.app, args.image, args.expect, args.timeout)
    except SmokeFailure as exc:
        print(f"[smoke] FAILED: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
