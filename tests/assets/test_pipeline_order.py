"""One run order: ``pipeline.STEPS`` (what ``run_all`` walks) is the Dagster asset graph, step for step.

Each step is named after the asset it backs (``evaluation`` for every ``evaluation/<backbone>``). The test
fails when an asset, an upstream edge, a multi-asset output or a blocking check exists on one side only,
or when the plain order would run a step before one it reads.
"""

from __future__ import annotations

import dagster as dg
import pytest

from melanoma_assets.definitions import build_definitions
from melanoma_assets.groups import DATA, EVALUATION, MONITORING, SCORING, SERVING, TRAINING
from melanoma_ml.pipeline import STEPS

RUNNER_STAGES = (DATA, TRAINING, EVALUATION, SERVING)
"""The group order ``melanoma_assets.runner.materialize_graph`` materializes in."""

OUTSIDE_THE_RUN = {
    "batch_scores": "scores drop-folder batches with the served model: partitioned by batch (one partition "
    "per incoming sub-folder, added by its sensor), so it runs when batches arrive, not in a retraining run",
    "serving_monitor": "compares a UTC day of the prediction log with the served bundle: partitioned by day and "
    "run by its daily schedule, not in a retraining run",
    "deployed_performance": "measures the served versions on the outcomes recorded by the end of a UTC day: "
    "partitioned by day and run by its daily automation condition, not in a retraining run",
}
"""Assets of the graph that are not steps of ``run_all``, with the reason; each must sit downstream of the
run in the ``scoring`` or ``monitoring`` group, be partitioned by its own (dynamic or daily) partitions and
be read by no step."""


def step_name(key: dg.AssetKey) -> str:
    return key.path[0]  # evaluation/<backbone> -> evaluation; every other key has one part


@pytest.fixture(scope="module")
def graph():
    return build_definitions("demo").resolve_asset_graph()  # two backbones, so evaluation/* fans out


def producers() -> dict[str, str]:
    """Asset name -> the step that materializes it."""
    return {name: step.name for step in STEPS for name in (step.name, *step.also_writes)}


def run_keys(graph) -> list[dg.AssetKey]:
    """The graph's assets that ``run_all`` materializes (all but ``OUTSIDE_THE_RUN``)."""
    return [key for key in graph.get_all_asset_keys() if step_name(key) not in OUTSIDE_THE_RUN]


def test_the_steps_materialize_exactly_the_graphs_assets(graph) -> None:
    assert set(producers()) == {step_name(key) for key in run_keys(graph)}
    assert len({step.name for step in STEPS}) == len(STEPS)


def test_assets_outside_the_run_are_downstream_scoring_assets_no_step_reads(graph) -> None:
    read = {name for step in STEPS for name in step.reads}
    for name in OUTSIDE_THE_RUN:
        node = graph.get(dg.AssetKey(name))
        assert node.group_name in (SCORING, MONITORING), name
        assert isinstance(
            node.partitions_def, dg.DynamicPartitionsDefinition | dg.TimeWindowPartitionsDefinition
        ), name
        assert name not in read and name not in producers(), name
        assert {step_name(k) for k in node.parent_keys} <= set(producers()), name  # downstream of the run
        assert not node.child_keys, name


def test_each_step_reads_exactly_its_assets_upstream_assets(graph) -> None:
    by_name = {step.name: step for step in STEPS}
    for key in run_keys(graph):
        step = by_name[producers()[step_name(key)]]
        upstream = {step_name(parent) for parent in graph.get(key).parent_keys}
        assert upstream == set(step.inputs), f"{key.to_user_string()}: graph {upstream}, STEPS {step.inputs}"


def test_each_step_runs_the_blocking_checks_of_its_asset_with_their_inputs(graph) -> None:
    declared = {
        (step.name, check, frozenset(reads)) for step in STEPS for check, reads in step.checks.items()
    }
    in_graph = set()
    for check_key in graph.asset_check_keys:
        if step_name(check_key.asset_key) in OUTSIDE_THE_RUN:
            continue  # e.g. serving_monitor's WARN checks: not in the run
        node = graph.get(check_key)
        assert node.blocking, f"{check_key.name} is not blocking, but run_all stops on it"
        asset = step_name(check_key.asset_key)
        reads = frozenset(step_name(k) for k in node.parent_entity_keys) - {asset}
        in_graph.add((producers()[asset], check_key.name, reads))
    assert declared == in_graph


def test_the_plain_order_runs_every_step_after_what_it_reads_and_in_the_runners_stages(graph) -> None:
    done: set[str] = set()
    for step in STEPS:
        assert set(step.reads) <= done, f"{step.name} reads {set(step.reads) - done} before they are made"
        done.update((step.name, *step.also_writes))
    groups = {step_name(key): graph.get(key).group_name for key in run_keys(graph)}
    stages = [RUNNER_STAGES.index(groups[step.name]) for step in STEPS]
    assert stages == sorted(stages), list(zip([s.name for s in STEPS], stages, strict=True))
