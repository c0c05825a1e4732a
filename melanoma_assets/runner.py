"""Materialize the whole graph in-process, partition by partition (tests, benchmark, scripted runs).

``dagster.materialize`` takes one partition key per call, so the graph runs in three stages: the
unpartitioned data assets, every backbone x fold training partition, then evaluation and serving.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from melanoma_assets.groups import DATA, EVALUATION, SERVING, TRAINING


@dataclass
class GraphRun:
    """Every ``materialize`` result of one whole-graph run, with per-stage wall times."""

    results: list[dg.ExecuteInProcessResult] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def success(self) -> bool:
        return bool(self.results) and all(r.success for r in self.results)

    def check_evaluations(self) -> list[Any]:
        return [e for r in self.results for e in r.get_asset_check_evaluations()]


def materialize_graph(
    defs: dg.Definitions,
    resources: Mapping[str, Any],
    instance: dg.DagsterInstance,
    progress: Callable[[str], Any] = print,
    *,
    console_log_level: str | None = None,
) -> GraphRun:
    """Materialize every asset of ``defs`` (all partitions) with ``resources`` on ``instance``.

    Stops at the first failed stage (``GraphRun.success`` is then False). ``console_log_level`` (e.g.
    ``"WARNING"``) is the level of the runs' console logger; None keeps Dagster's (DEBUG: every event).
    The instance's event log records every event either way.
    """
    run_config = None
    if console_log_level is not None:
        run_config = {"loggers": {"console": {"config": {"log_level": console_log_level}}}}
    assets = [*defs.assets, *(defs.asset_checks or [])]
    run = GraphRun()
    graph = defs.resolve_asset_graph()
    training = graph.get(dg.AssetKey("fold_model")).partitions_def
    stages: list[tuple[str, dg.AssetSelection, str | None]] = [("data", dg.AssetSelection.groups(DATA), None)]
    stages += [
        (f"train {key}", dg.AssetSelection.groups(TRAINING), key) for key in training.get_partition_keys()
    ]
    stages.append(("evaluate+serve", dg.AssetSelection.groups(EVALUATION, SERVING), None))
    for name, selection, partition_key in stages:
        progress(f"[dagster] {name} ...")
        started = time.perf_counter()
        result = dg.materialize(
            assets,
            selection=selection,
            run_config=run_config,
            partition_key=partition_key,
            resources=dict(resources),
            instance=instance,
            raise_on_error=False,
        )
        run.stage_seconds[name] = time.perf_counter() - started
        run.results.append(result)
        if not result.success:
            progress(f"[dagster] {name} FAILED")
            break
    return run
