"""The demo through Dagster: materialize the whole graph on the ``$DAGSTER_HOME`` instance, then report.

``melanoma-ml demo --dagster`` calls ``materialize_demo`` (``./dev demo`` runs that, then ``dagster dev``), so
every run, materialization, check result and plot of the demo is already in the UI's history. Without
``--dagster`` the same command runs the same steps in plain Python (``melanoma_ml.pipeline.run_all``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import dagster as dg

from melanoma_assets.definitions import build_definitions
from melanoma_assets.partitions import TrainingGrid
from melanoma_assets.resources import default_settings
from melanoma_assets.runner import materialize_graph
from melanoma_ml.config import load_config
from melanoma_ml.errors import InputValueError

EXIT_OK, EXIT_FAILED = 0, 1


def materialize_demo(
    profile: str, overrides: dict[str, Any] | None = None, progress: Callable[[str], Any] = print
) -> int:
    """Materialize every asset and partition of ``profile`` (with ``overrides``) and print a summary.

    Returns:
        0 when every stage succeeded, 1 when one failed (the run in the UI has the details).

    Raises:
        InputValueError: ``overrides`` change the backbones or the number of folds, which fix the
            training partitions when the definitions load (set those through the profile or
            ``MELANOMA_BACKBONES`` / ``MELANOMA_DATA__N_FOLDS`` instead).
    """
    settings = default_settings(profile, overrides)
    config = settings.config()
    if TrainingGrid.from_config(config) != TrainingGrid.from_config(load_config(profile)):
        raise InputValueError(
            f"with --dagster, backbones and data.n_folds come from profile {profile!r} and MELANOMA_* "
            f"settings (they fix the training partitions); drop them from --set, or set them with "
            "MELANOMA_BACKBONES / MELANOMA_DATA__N_FOLDS"
        )
    started = time.perf_counter()
    with dg.DagsterInstance.get() as instance:
        run = materialize_graph(build_definitions(profile), {"settings": settings}, instance, progress)
    wall = time.perf_counter() - started
    if not run.success:
        print(
            f"[dagster] the {profile} graph failed after {wall:.0f} s; open the run in the UI",
            file=sys.stderr,
        )
        return EXIT_FAILED
    failed_checks = [e.check_name for e in run.check_evaluations() if not e.passed]
    outcome = run.results[-1].output_for_node("serving_model")
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in run.stage_seconds.items())
    progress(f"[dagster] whole {profile} graph materialized in {wall:.0f} s ({stages})")
    progress(f"[dagster] asset checks: {len(run.check_evaluations())} run, failed: {failed_checks or 'none'}")
    progress(f"[dagster] promotion: {outcome.decision.reason}")
    progress(
        f"[dagster] served model: {outcome.champion_before or 'none'} -> {outcome.champion_after or 'none'} "
        f"under {config.artifact_root}/registry"
    )
    return EXIT_OK
