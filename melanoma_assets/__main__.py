"""``python -m melanoma_assets demo``: materialize the whole graph on the Dagster instance, then exit.

``./dev demo`` runs this and then starts ``dagster dev``, so every run, materialization, check result and
plot of the demo is already in the UI's history. Uses ``$DAGSTER_HOME`` (``./dev`` sets it to
``.dagster_home/``); the profile comes from ``--profile`` or ``MELANOMA_PROFILE`` (default ``demo``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m melanoma_assets", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="materialize every asset and partition, promote a model")
    demo.add_argument("--profile", default=None, help="profile in melanoma_ml.config.PROFILES")
    args = parser.parse_args(argv)

    import dagster as dg

    from melanoma_assets.definitions import build_definitions
    from melanoma_assets.partitions import profile_from_env
    from melanoma_assets.resources import default_settings
    from melanoma_assets.runner import materialize_graph

    profile = args.profile or profile_from_env()
    settings = default_settings(profile)
    started = time.perf_counter()
    with dg.DagsterInstance.get() as instance:
        run = materialize_graph(build_definitions(profile), {"settings": settings}, instance)
    wall = time.perf_counter() - started
    if not run.success:
        print(
            f"[dagster] the {profile} graph failed after {wall:.0f} s; open the run in the UI for details",
            file=sys.stderr,
        )
        return 1
    failed_checks = [e.check_name for e in run.check_evaluations() if not e.passed]
    outcome = run.results[-1].output_for_node("serving_model")
    print(
        f"[dagster] whole {profile} graph materialized in {wall:.0f} s "
        f"({', '.join(f'{k} {v:.0f}s' for k, v in run.stage_seconds.items())})"
    )
    print(f"[dagster] asset checks: {len(run.check_evaluations())} run, failed: {failed_checks or 'none'}")
    print(f"[dagster] promotion: {outcome.decision.reason}")
    print(
        f"[dagster] served model: {outcome.champion_before or 'none'} -> {outcome.champion_after or 'none'} "
        f"under {settings.config().artifact_root}/registry"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
