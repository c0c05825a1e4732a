"""Two finished training runs of one backbone on the same folds: training speed and out-of-fold AUC, paired.

For runs that differ in one training setting (e.g. ``training.channels_last``, ``training.precision``) on
the same data and folds, it prints each fold's train img/s and best validation AUROC, the train img/s ratio
(b / a, from the folds' own ``result.json``), both pooled out-of-fold AUCs and their paired difference
``b - a`` on the same images (patient/lesion-cluster bootstrap CI, ``evaluation.compare``).

Usage::

    .venv/bin/python benchmarks/compare_runs.py --a /tmp/real_isic/accept --b /tmp/real_isic/cl \\
        [--backbone efficientnet_b0] [--names fp32 channels-last]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from _common import machine_load, open_run

from melanoma_ml.config import EvaluationConfig
from melanoma_ml.evaluation.compare import paired_auc_difference


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", type=Path, required=True, help="artifact root of the baseline run")
    parser.add_argument("--b", type=Path, required=True, help="artifact root of the variant run")
    parser.add_argument("--backbone", default="efficientnet_b0")
    parser.add_argument("--names", nargs=2, default=("a", "b"))
    args = parser.parse_args(argv)
    with machine_load():
        compare(args)


def compare(args: argparse.Namespace) -> None:
    config = EvaluationConfig()
    oofs, speed = [], []
    for name, root in zip(args.names, (args.a, args.b), strict=True):
        run = open_run(root)
        results = run.fold_results(args.backbone)
        for r in results:
            print(
                f"{name} fold {r.fold}: {r.train_images_per_second:.1f} train img/s, best epoch "
                f"{r.best_epoch}/{r.epochs_run}, val AUROC {r.best_val_auroc:.3f}"
            )
        oofs.append(run.oof(args.backbone))
        speed.append(statistics.median(r.train_images_per_second for r in results))
    print(f"median train img/s: {args.names[0]} {speed[0]:.1f}, {args.names[1]} {speed[1]:.1f} "
          f"({speed[1] / speed[0]:.2f}x)")  # fmt: skip
    diff = paired_auc_difference(oofs[1], oofs[0], config, names=(args.names[1], args.names[0]))
    level = int(round(config.ci_level * 100))
    print(
        f"pooled OOF AUC: {args.names[0]} {diff['auc_b']:.4f}, {args.names[1]} {diff['auc_a']:.4f}; "
        f"{args.names[1]} - {args.names[0]} = {diff['diff']:+.4f} [{diff['lo']:+.4f}, {diff['hi']:+.4f}] "
        f"({level}% paired cluster bootstrap, {diff['n']} images, {diff['n_groups']} clusters)"
    )


if __name__ == "__main__":
    main()
