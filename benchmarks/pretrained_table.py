"""One table for finished real-data runs: in-domain, locked test and another clinic, paired against a baseline.

Reads finished ``benchmarks/real_isic_sample.py`` runs (each ``--workdir`` holds the ``results.json`` with
the run's full config) and scores every untouched test set of each run (the locked test split and each
``data.test_sources`` set, e.g. PH2) with the run's **promoted bundle on predict's path**
(``serving.batch.score_path``: the sha256-verified bundle, 8-view TTA, its calibrator, its threshold fixed
out-of-fold; nothing is tuned on test rows). Per run it prints:

* OOF AUC [95% patient/lesion-cluster bootstrap CI] (the pooled out-of-fold report: what the gate ranks on);
* AUC [CI] on each test set, and the paired AUC difference against ``--baseline`` on the same images
  (``evaluation.compare.paired_auc_difference``: the same cluster resamples for both models);
* ECE of the served (calibrated) probabilities on each test set (training prevalence, 10 bins);
* the out-of-distribution flag rate on each external set (the bundle's detector, its own quantile);
* training throughput (mean train img/s over folds, from each fold's ``result.json``; timings from a
  shared machine are only comparable inside one run of this table's inputs).

Usage::

    .venv/bin/python benchmarks/pretrained_table.py --run A=/tmp/real/b0_128 --run B=/tmp/real/lite0_128 \\
        [--baseline A] [--json /tmp/real/table.json]

A run that trained several backbones gives one row per backbone with ``--run NAME=WORKDIR@BACKBONE``
(``--scores test-evaluation``: that backbone's fold-model mean), and ``@A+B`` names its ``serving.ensemble:
top_k`` mean (OOF: the backbones' pooled out-of-fold predictions averaged per image, as the gate ranks it).
With ``--scores served`` a run has one row, its promoted bundle, whatever it serves.

Scores are cached per run in ``<workdir>/served_test_scores.parquet`` (delete it after re-promoting).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from melanoma_ml.runtime import quiet_network_chatter

quiet_network_chatter()
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import FinishedRun, machine_load, open_run  # noqa: E402

SCORES_FILE = "served_test_scores.parquet"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--run",
        action="append",
        required=True,
        help="NAME=WORKDIR[@BACKBONE] of a finished run (BACKBONE: one of its backbones, or A+B for its "
        "top_k mean)",
    )
    parser.add_argument("--baseline", default=None, help="run NAME the differences are against (first run)")
    parser.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    parser.add_argument(
        "--scores",
        choices=("served", "test-evaluation"),
        default="served",
        help="served: each run's promoted bundle on predict's path (TTA, calibrator); test-evaluation: the "
        "fold-model mean without TTA as the test_evaluation asset scored it (reports/test/<set>/<backbone>/"
        "folds/predictions.parquet; an older run's ensemble/), for runs whose promotion did not finish",
    )
    return parser.parse_args(argv)


def open_finished(workdir: Path) -> FinishedRun:
    """The run under ``workdir`` with the exact config its ``results.json`` recorded."""
    if not (workdir / "results.json").is_file():
        raise SystemExit(
            f"{workdir / 'results.json'} not found: pass the --workdir of a finished benchmarks/real_isic_sample.py run"
        )
    return open_run(workdir)


def served_scores(run: FinishedRun, workdir: Path) -> Any:
    """Every untouched test row of ``run`` scored by its promoted bundle on predict's path (cached)."""
    import pandas as pd

    from melanoma_ml.evaluation.holdout import untouched_test_sets
    from melanoma_ml.serving.batch import PROBABILITY, score_path

    cache = workdir / SCORES_FILE
    if cache.is_file():
        return pd.read_parquet(cache)
    sets, _ = untouched_test_sets(run.config, run.folds_table())
    bundle = run.served_bundle()
    serving = run.config.serving
    frames = []
    with tempfile.TemporaryDirectory(prefix="pretrained-table-") as folder:
        for name, rows in sets.items():
            csv = Path(folder) / f"{name}.csv"
            columns = ["image_name", "image_path", "age_approx", "sex", "anatom_site_general_challenge"]
            rows[[c for c in columns if c in rows.columns]].to_csv(csv, index=False)
            scored = score_path(
                csv,
                bundle,
                max_pixels=serving.max_image_pixels,
                min_age=serving.min_age,
                max_age=serving.max_age,
            ).scored
            labels = rows.set_index(rows["image_name"].astype(str))
            # predict's probability column is called "target": keep it as "prob" before the labels arrive
            scored = scored.rename(columns={PROBABILITY: "prob"}).assign(
                image_name=scored["image_name"].astype(str)
            )
            scored["target"] = labels.loc[scored["image_name"], "target"].to_numpy()
            scored["group_id"] = labels.loc[scored["image_name"], "group_id"].to_numpy()
            scored["test_set"] = name
            scored["threshold"] = bundle.manifest.threshold
            frames.append(scored)
    table = pd.concat(frames, ignore_index=True)
    table.to_parquet(cache)
    return table


def test_evaluation_scores(run: FinishedRun, backbone: str) -> Any:
    """The fold-model mean's test predictions the ``test_evaluation`` asset wrote (no TTA; no OOD flags): its
    ``folds`` report folder, or the ``ensemble`` one of a run from before that name; ``A+B``: the ``top_k``
    folder."""
    import pandas as pd

    from melanoma_ml.evaluation.holdout import PREDICTIONS_FILE, written_report_folder

    kind = "top_k" if "+" in backbone else "folds"
    frames = []
    for folder in sorted(p for p in run.paths.test_reports.iterdir() if p.is_dir()):
        predictions = written_report_folder(folder, _written_name(folder, backbone), kind) / PREDICTIONS_FILE
        if not predictions.is_file():
            raise SystemExit(f"{predictions} not found: the run's test_evaluation step did not finish")
        table = pd.read_parquet(predictions)
        frames.append(table.assign(test_set=_set_name(run, folder.name), threshold=float("nan"), error=""))
    if not frames:
        raise SystemExit(f"no test evaluation under {run.paths.test_reports}")
    return pd.concat(frames, ignore_index=True)


def _written_name(set_dir: Path, backbone: str) -> str:
    """``A+B`` as the test evaluation named its folder: the backbones in leaderboard order, which may be
    ``B+A``."""
    parts = set(backbone.split("+"))
    for folder in sorted(set_dir.iterdir()) if "+" in backbone else []:
        if set(folder.name.split("+")) == parts:
            return folder.name
    return backbone


def oof_auc(run: FinishedRun, backbone: str) -> Any:
    """The out-of-fold AUC estimate of ``backbone``, or of ``A+B``'s top_k mean (pooled out-of-fold
    predictions averaged per image with ``serving.ensemble_average``, as ``top_k_model`` fixes it)."""
    from melanoma_ml.evaluation.ensemble import averaged_oof
    from melanoma_ml.evaluation.report import evaluate_predictions

    if "+" not in backbone:
        return run.report(backbone).metric("auc")
    pooled = [run.oof(b) for b in backbone.split("+")]
    averaged = averaged_oof(pooled, run.config.serving.ensemble_average)
    return evaluate_predictions(averaged, run.config.evaluation).metric("auc")


def summarise(
    name: str, run: FinishedRun, backbone: str, scores: Any, baseline: Any | None
) -> dict[str, Any]:
    """The table row of one run's ``backbone`` (``baseline``: the baseline row's scores, for paired
    differences)."""
    import numpy as np

    from melanoma_ml.evaluation.compare import paired_auc_difference
    from melanoma_ml.evaluation.metrics import expected_calibration_error, roc_auc
    from melanoma_ml.evaluation.report import evaluate_predictions

    cfg = run.config.evaluation
    oof = oof_auc(run, backbone)
    parts = backbone.split("+")
    folds = [f for part in parts for f in run.fold_results(part)]
    row: dict[str, Any] = {
        "run": name,
        "backbone": backbone,
        "pretrained": "; ".join(str(run.config.model_for(part).pretrained) for part in parts),
        "image_size": run.config.data.image_size,
        "oof_auc": [oof.value, oof.lo, oof.hi],
        "train_img_per_s": statistics.mean(f.train_images_per_second for f in folds),
        "best_epochs": [f.best_epoch for f in folds],
        "sets": {},
    }
    for test_set, rows in scores.groupby("test_set", sort=False):
        table = _prediction_table(rows, name)
        threshold = float(rows["threshold"].iloc[0])
        report = evaluate_predictions(
            table, cfg, name=f"{name} on {test_set}", threshold=None if threshold != threshold else threshold
        )
        auc = report.metric("auc")
        entry: dict[str, Any] = {
            "n": len(table),
            "melanoma": int(table["target"].sum()),
            "auc": [auc.value, auc.lo, auc.hi],
            "ece": expected_calibration_error(
                table["target"].to_numpy(), table["prob"].to_numpy(), cfg.ece_bins
            ),
            "ood_flag_rate": float(np.mean(rows["ood_flag"].astype(float))) if "ood_flag" in rows else None,
        }
        assert abs(entry["auc"][0] - roc_auc(table["target"].to_numpy(), table["prob"].to_numpy())) < 1e-12
        if baseline is not None:
            base = _prediction_table(baseline[baseline["test_set"] == test_set], "baseline")
            diff = paired_auc_difference(table, base, cfg, names=(name, "baseline"))
            entry["diff_vs_baseline"] = [diff["diff"], diff["lo"], diff["hi"]]
        row["sets"][str(test_set)] = entry
    return row


def picked_backbone(run: FinishedRun, asked: str, scores: str) -> str:
    """The backbone (or ``A+B`` top_k mean) a row reports: ``asked``, else the run's only backbone, else
    (served scores) the backbones the promoted bundle serves."""
    trained = run.config.backbones
    if asked:
        unknown = [part for part in asked.split("+") if part not in trained]
        if unknown:
            raise SystemExit(f"@{asked}: {unknown} not trained in {run.paths.root}; it trained {trained}")
        if scores == "served" and len(trained) > 1:
            raise SystemExit(
                f"@{asked}: --scores served scores the run's promoted bundle; drop @ or use --scores test-evaluation"
            )
        return asked
    if len(trained) == 1:
        return trained[0]
    if scores == "served":
        members = [m.model_spec.backbone for m in run.served_bundle().manifest.ensemble.members]
        return "+".join(dict.fromkeys(members))
    raise SystemExit(f"{run.paths.root} trained {trained}: add @BACKBONE (or @A+B for their top_k mean)")


def _set_name(run: FinishedRun, folder_name: str) -> str:
    """The test set a report folder holds. Runs from before test sources were named wrote an unnamed
    source's reports under a name derived from its layout (e.g. ``ISIC2020`` for PH2); with one external
    source that folder can only be it, so it gets the source's name and pairs with newer runs' rows."""
    from melanoma_ml.evaluation.holdout import INTERNAL_TEST

    names = [source.name for source in run.config.data.test_sources]
    if folder_name == INTERNAL_TEST or folder_name in names or len(names) != 1:
        return folder_name
    return str(names[0])


def _prediction_table(scored: Any, name: str) -> Any:
    """``evaluate_predictions``'s input from scored rows; a row whose image failed to decode is refused."""
    from melanoma_ml.serving.batch import ERROR

    failed = scored[scored[ERROR] != ""]
    if len(failed):
        raise SystemExit(f"{name}: {len(failed)} test image(s) failed to score: {failed[ERROR].iloc[0]}")
    table = scored.assign(prob=scored["prob"].astype(float), backbone=name)
    return table[["image_name", "group_id", "target", "prob", "backbone"]].reset_index(drop=True)


def print_table(rows: list[dict[str, Any]], baseline: str) -> None:
    sets = list(rows[0]["sets"])

    def ci(v: list[float]) -> str:
        return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"

    def diff(v: list[float] | None) -> str:
        return "" if v is None else f"{v[0]:+.3f} [{v[1]:+.3f}, {v[2]:+.3f}]"

    header = ["run", "backbone (init)", "px", "OOF AUC"]
    for s in sets:
        header += [f"{s} AUC", f"{s} - {baseline}", f"{s} ECE", f"{s} OOD flags"]
    header += ["train img/s", "best epochs"]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for row in rows:
        cells = [
            row["run"],
            f"{row['backbone']} ({row['pretrained']})",
            str(row["image_size"]),
            ci(row["oof_auc"]),
        ]
        for s in sets:
            e = row["sets"][s]
            rate = "" if e["ood_flag_rate"] is None else f"{e['ood_flag_rate']:.0%}"
            cells += [ci(e["auc"]), diff(e.get("diff_vs_baseline")), f"{e['ece']:.3f}", rate]
        cells += [f"{row['train_img_per_s']:.1f}", ",".join(map(str, row["best_epochs"]))]
        print("| " + " | ".join(cells) + " |")
    for s in sets:
        e = rows[0]["sets"][s]
        print(f"{s}: {e['n']} images, {e['melanoma']} melanoma")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    runs = []
    for text in args.run:
        name, sep, where = text.partition("=")
        if not sep:
            raise SystemExit(f"--run {text!r}: write NAME=WORKDIR[@BACKBONE]")
        where, _, backbone = where.partition("@")
        runs.append((name, Path(where).expanduser().resolve(), backbone))
    baseline_name = args.baseline or runs[0][0]
    scores = {}
    opened = {}
    chosen = {}
    for name, workdir, backbone in runs:
        opened[name] = open_finished(workdir)
        chosen[name] = picked_backbone(opened[name], backbone, args.scores)
        if args.scores == "served":
            scores[name] = served_scores(opened[name], workdir)
        else:
            scores[name] = test_evaluation_scores(opened[name], chosen[name])
    if baseline_name not in scores:
        raise SystemExit(f"--baseline {baseline_name!r} is not one of the runs {list(scores)}")
    rows = [
        summarise(
            name,
            opened[name],
            chosen[name],
            scores[name],
            None if name == baseline_name else scores[baseline_name],
        )
        for name, _, _ in runs
    ]
    print_table(rows, baseline_name)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    with machine_load():
        main()
