"""The demo through Dagster: materialize the whole graph on the ``$DAGSTER_HOME`` instance, then report.

``melanoma-ml demo --dagster`` calls ``materialize_demo`` (``./dev demo`` runs that, then ``dagster dev``), so
every run, materialization, check result and plot of the demo is already in the UI's history. Without
``--dagster`` the same command runs the same steps in plain Python (``melanoma_ml.pipeline.run_all``).
"""

from __future__ import annotations

import filecmp
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg

from melanoma_assets.definitions import build_definitions
from melanoma_assets.partitions import TrainingGrid
from melanoma_assets.resources import default_settings
from melanoma_assets.runner import materialize_graph
from melanoma_ml.config import load_config
from melanoma_ml.errors import InputValueError
from melanoma_ml.pipeline import require_data_source

EXIT_OK, EXIT_FAILED = 0, 1

DEFAULT_HOME = ".dagster_home"
"""The instance folder ``./dev`` uses (``$ROOT/.dagster_home``, with the project's dagster.yaml copied in)."""

QUIET_LOG_LEVEL = "WARNING"
"""Console level of the demo's runs unless ``events``: warnings and errors show, the DEBUG event stream not."""


def demo_instance(progress: Callable[[str], Any] = print) -> dg.DagsterInstance:
    """The instance the demo records its runs on: ``$DAGSTER_HOME``, else the project's default home.

    Without ``$DAGSTER_HOME``, a folder holding ``dagster.yaml`` (the project root) gets what ``./dev`` sets
    up: ``./.dagster_home`` with that dagster.yaml copied in, so ``./dev ui`` (and ``dagster dev`` run
    there) shows the runs.

    Raises:
        InputValueError: ``$DAGSTER_HOME`` is not an existing absolute folder, or it is unset and the
            current folder has no dagster.yaml; the message says how to set it.
    """
    home = os.environ.get("DAGSTER_HOME")
    if home:
        path = Path(home).expanduser()
        if not path.is_absolute() or not path.is_dir():
            raise InputValueError(
                f"DAGSTER_HOME={home} is not an existing absolute folder: create it and copy the project's "
                f"dagster.yaml there (mkdir -p {path} && cp dagster.yaml {path}/), or unset DAGSTER_HOME and "
                "run from the project folder"
            )
        return dg.DagsterInstance.get()
    project_yaml = Path.cwd() / "dagster.yaml"
    if not project_yaml.is_file():
        raise InputValueError(
            f"demo --dagster needs a Dagster instance: DAGSTER_HOME is not set and {Path.cwd()} has no "
            "dagster.yaml; run it from the project folder (or ./dev demo), or set one up with "
            "`mkdir -p ~/dagster_home && cp dagster.yaml ~/dagster_home/ && export DAGSTER_HOME=~/dagster_home`"
        )
    path = Path.cwd() / DEFAULT_HOME
    path.mkdir(exist_ok=True)
    if not (path / "dagster.yaml").is_file() or not filecmp.cmp(
        project_yaml, path / "dagster.yaml", shallow=False
    ):
        shutil.copyfile(project_yaml, path / "dagster.yaml")
    progress(f"[dagster] DAGSTER_HOME is not set: runs are kept in {path} (as ./dev does)")
    return dg.DagsterInstance.from_config(str(path))


def materialize_demo(
    profile: str,
    overrides: dict[str, Any] | None = None,
    progress: Callable[[str], Any] = print,
    *,
    events: bool = False,
) -> int:
    """Materialize every asset and partition of ``profile`` (with ``overrides``) and print a summary.

    Prints the ``[dagster]`` stage lines and Dagster's warnings and errors; ``events`` also prints each
    run's DEBUG event stream (every event is in the instance's event log, shown by the UI, either way).

    Returns:
        0 when every stage succeeded, 1 when one failed (the run in the UI has the details).

    Raises:
        InputValueError: ``overrides`` change the backbones or the number of folds, which fix the
            training partitions when the definitions load (set those through the profile or
            ``MELANOMA_BACKBONES`` / ``MELANOMA_DATA__N_FOLDS`` instead); the settings would train on
            synthetic data they do not allow (``require_data_source``); or no instance is set up
            (``demo_instance``).
    """
    settings = default_settings(profile, overrides)
    config = settings.config()
    if TrainingGrid.from_config(config) != TrainingGrid.from_config(load_config(profile)):
        raise InputValueError(
            f"with --dagster, backbones and data.n_folds come from profile {profile!r} and MELANOMA_* "
            f"settings (they fix the training partitions); drop them from --set, or set them with "
            "MELANOMA_BACKBONES / MELANOMA_DATA__N_FOLDS"
        )
    require_data_source(config)  # refused here in one line, not as a failed Dagster run
    log_level = None if events else QUIET_LOG_LEVEL
    started = time.perf_counter()
    with demo_instance(progress) as instance:
        run = materialize_graph(
            build_definitions(profile),
            {"settings": settings},
            instance,
            progress,
            console_log_level=log_level,
        )
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
