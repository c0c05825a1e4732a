"""One fold trained data-parallel on two CPU processes (ddp_spawn, gloo) vs the same fold on one process.

Prints, per ``--seeds`` entry (``training.seed``), both fits' validation AUC on the same validation rows,
their paired difference (two-process minus one-process, patient/lesion-cluster bootstrap CI,
``evaluation.compare.paired_auc_difference``) and train img/s; then the spread of the difference over the
seeds. The fits differ by design: each rank sees half of every step's batches (the effective batch doubles)
and the distributed sampler shuffles differently, so the optimisation paths differ. ``tests/ml/test_ddp.py``
checks the plumbing (same rows, same order, one checkpoint folder); this prints the numbers the README quotes.

Usage::

    .venv/bin/python benchmarks/ddp_parity.py [--profile tiny] [--epochs 2] [--seeds 42 1 2] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
from pathlib import Path

from melanoma_ml.runtime import quiet_network_chatter

quiet_network_chatter()

from _common import machine_load  # noqa: E402

from melanoma_ml import pipeline  # noqa: E402
from melanoma_ml.config import PipelineConfig, TrainingConfig, load_config  # noqa: E402
from melanoma_ml.evaluation.compare import paired_auc_difference  # noqa: E402
from melanoma_ml.training.train import FoldResult, train_fold  # noqa: E402

BACKBONE = "test_efficientnet"
FOLD = 0


def config_for(args: argparse.Namespace, root: Path, seed: int, **training) -> PipelineConfig:
    return load_config(
        args.profile,
        {
            "artifact_root": str(root),
            "backbones": [BACKBONE],
            "training": {"accelerator": "cpu", "epochs": args.epochs, "seed": seed, **training},
        },
    )


def compare_once(args: argparse.Namespace, root: Path, seed: int) -> dict[str, float]:
    """Fold ``FOLD`` trained on one process and on two; both AUCs and their paired difference."""
    config = config_for(args, root, seed)
    cleaned = pipeline.clean_source(config, pipeline.prepare_source(config))
    folds = pipeline.make_folds(config, cleaned.clean)
    cache = pipeline.build_cache(config, folds)
    out = root / f"seed{seed}"
    one: FoldResult = train_fold(config, BACKBONE, FOLD, folds, cache, out / "one-process")
    ddp_config = config_for(args, root, seed, devices=2, strategy="ddp_spawn")
    two: FoldResult = train_fold(ddp_config, BACKBONE, FOLD, folds, cache, out / "two-processes")
    if two.oof["image_name"].tolist() != one.oof["image_name"].tolist():
        raise SystemExit(
            "the two fits predicted different validation rows: data-parallel prediction is broken"
        )
    diff = paired_auc_difference(two.oof, one.oof, config.evaluation, names=("two processes", "one process"))
    return {
        "seed": seed,
        "n_val": one.n_val,
        "auc_one": diff["auc_b"],
        "auc_two": diff["auc_a"],
        "diff": diff["diff"],
        "lo": diff["lo"],
        "hi": diff["hi"],
        "rate_one": one.train_images_per_second,
        "rate_two": two.train_images_per_second,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="tiny", help="config profile of the data and model (tiny)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[TrainingConfig().seed],
        help="training.seed values (default: the default)",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep the runs here (else a temp dir)")
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="ddp-parity-") as tmp:
        root = (args.workdir or Path(tmp)).resolve()
        print(
            f"{BACKBONE}, profile {args.profile}, fold {FOLD}, {args.epochs} epochs; two processes = "
            "training.devices 2, strategy ddp_spawn (gloo)"
        )
        print(
            "| seed | validation images | AUC one process | AUC two processes | two - one [95% CI] | train img/s one / two |"
        )
        print("| --- | --- | --- | --- | --- | --- |")
        rows = []
        for seed in args.seeds:
            r = compare_once(args, root, seed)
            rows.append(r)
            print(
                f"| {r['seed']} | {r['n_val']} | {r['auc_one']:.3f} | {r['auc_two']:.3f} | "
                f"{r['diff']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}] | {r['rate_one']:.1f} / {r['rate_two']:.1f} |",
                flush=True,
            )
    diffs = [r["diff"] for r in rows]
    if len(diffs) > 1:
        print(
            f"AUC difference over {len(diffs)} seeds: median {statistics.median(diffs):+.3f}, "
            f"min {min(diffs):+.3f}, max {max(diffs):+.3f}"
        )


if __name__ == "__main__":
    with machine_load():
        main()
