"""Wall time of the whole graph through Dagster (in-process materialize) vs the same step functions called
directly (``melanoma_ml.pipeline.run_all``), in one process, each into a fresh artifact root.

    python benchmarks/dagster_overhead.py --profile demo      # trains: minutes on 2 idle CPU cores
    python benchmarks/dagster_overhead.py --profile tiny      # under a minute

Heavy libraries are imported before either clock starts, so neither side pays the cold imports. Both wall
time and process CPU time (all threads) are reported: on a shared, oversubscribed machine the CPU time is
the steadier measure of the extra work Dagster does. Both sides run the same quality checks
(``run_all`` calls the functions behind the Dagster asset checks), so the difference is Dagster itself:
run/step bookkeeping, event storage, IO-manager pickling and metadata rendering.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

from _common import machine_load

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


class Clock:
    """Wall and process CPU seconds of a block."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def warm_imports() -> None:
    import melanoma_ml.serving.explain  # noqa: F401
    import melanoma_ml.training.train  # noqa: F401


def run_direct(profile: str, root: Path) -> Clock:
    from melanoma_ml.config import load_config
    from melanoma_ml.pipeline import run_all

    config = load_config(profile, {"artifact_root": str(root)})
    with Clock() as clock:
        result = run_all(config, progress=lambda line: print(f"  direct {line}", flush=True))
    print(f"  direct: promotion -> {result.promotion.decision.reason}")
    return clock


def run_dagster(profile: str, root: Path, home: Path, sqlite: bool) -> Clock:
    import dagster as dg

    from melanoma_assets.definitions import build_definitions
    from melanoma_assets.resources import ArtifactStorage, DataSource, PipelineSettings, TrainingHardware
    from melanoma_assets.runner import materialize_graph

    settings = PipelineSettings(
        profile=profile,
        storage=ArtifactStorage(root=str(root)),
        hardware=TrainingHardware(),
        source=DataSource(),
    )
    resources = {"settings": settings, "io_manager": dg.FilesystemIOManager(base_dir=str(home / "io"))}
    home.mkdir(parents=True, exist_ok=True)
    defs = build_definitions(profile)
    instance = (
        dg.instance_for_test(temp_dir=str(home))
        if sqlite
        else contextlib.nullcontext(dg.DagsterInstance.ephemeral())
    )
    with instance as instance, Clock() as clock:
        run = materialize_graph(
            defs, resources, instance, progress=lambda line: print(f"  {line}", flush=True)
        )
    if not run.success:
        raise SystemExit("the Dagster run failed; see the log above")
    print("  dagster stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in run.stage_seconds.items()))
    return clock


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", default="demo", help="melanoma_ml.config profile (demo, tiny, full)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    parser.add_argument(
        "--repeat", type=int, default=1, help="alternating runs of each side (min and median)"
    )
    parser.add_argument(
        "--sqlite",
        action="store_true",
        help="record runs in a SQLite instance (what `dagster dev` uses) instead of an in-memory one",
    )
    args = parser.parse_args()
    logging.getLogger("dagster").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    directs: list[Clock] = []
    dagsters: list[Clock] = []
    with tempfile.TemporaryDirectory(prefix="dagster-overhead-") as tmp:
        work = args.workdir or Path(tmp)
        warm_imports()
        for i in range(args.repeat):  # alternate, so slow phases of a shared machine hit both sides
            directs.append(run_direct(args.profile, work / f"direct{i}"))
            dagsters.append(
                run_dagster(args.profile, work / f"dagster{i}", work / f"dagster_home{i}", args.sqlite)
            )

    load = os.getloadavg()[0]
    numbers: dict[str, object] = {
        "profile": args.profile,
        "instance": "sqlite" if args.sqlite else "in-memory",
        "repeat": args.repeat,
        "cpu_count": os.cpu_count(),
        "load_average_1min_at_end": round(load, 2),
    }
    for measure in ("wall", "cpu"):
        direct = [getattr(c, measure) for c in directs]
        dagster = [getattr(c, measure) for c in dagsters]
        for name, pick in (("min", min), ("median", statistics.median)):
            d, g = pick(direct), pick(dagster)
            numbers[f"{measure}_{name}_direct_s"] = round(d, 2)
            numbers[f"{measure}_{name}_dagster_s"] = round(g, 2)
            numbers[f"{measure}_{name}_overhead_pct"] = round((g - d) / d * 100, 1)
            print(
                f"{args.profile} {measure:>4} {name:>6}: direct {d:7.1f} s, through Dagster {g:7.1f} s "
                f"({(g - d) / d * 100:+.1f}%)"
            )
    print(
        f"({numbers['instance']} instance, {args.repeat} runs each, load average {load:.1f} on {os.cpu_count()} cores)"
    )
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=2) + "\n")


if __name__ == "__main__":
    with machine_load():
        main()
