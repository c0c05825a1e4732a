"""The trust table of a finished run: out-of-fold vs locked-test numbers, best fold vs fold ensemble, calibration.

Reads a finished pipeline run (``--artifact-root``, e.g. ``benchmarks/real_isic_sample.py --workdir``),
re-scores its locked test split with every fold model (``evaluation.holdout.evaluate_test_sets``, the same
function the ``test_evaluation`` asset runs; nothing is re-trained, nothing is tuned on the test rows) and
prints, per backbone:

* the fold-model mean (what ``serving.ensemble: folds`` serves) and the best single fold (``best_fold``):
  out-of-fold AUC [CI] and test AUC [CI], test pAUC (ISIC 2024: area above TPR 0.8, max 0.2), sensitivity
  and specificity on test at the threshold tuned out-of-fold for ``evaluation.target_sensitivity``;
* ECE and Brier on test before and after each model's calibrator (fitted on its out-of-fold rows only);
* the paired test AUC difference, fold-model mean minus best fold (patient/lesion-cluster bootstrap);
* the fold-model mean averaged in probability vs logit space (``serving.ensemble_average``), and the ECE
  a perfectly calibrated model would show on a test set of this size (its noise floor);
* what the registry serves (``current``): model, runtime, detector and the test metrics in its manifest.

Usage::

    .venv/bin/python benchmarks/test_split_report.py --artifact-root /tmp/real_isic/accept [--image-size 128]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from melanoma_ml.runtime import quiet_network_chatter

quiet_network_chatter()
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import machine_load, open_run  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact-root", type=Path, required=True)
    parser.add_argument("--image-size", type=int, default=128, help="data.image_size of the run")
    args = parser.parse_args(argv)
    with machine_load():
        report(args)


def report(args: argparse.Namespace) -> None:
    from melanoma_ml.evaluation import evaluate_predictions
    from melanoma_ml.evaluation.holdout import INTERNAL_TEST, evaluate_test_sets, served_fold
    from melanoma_ml.images.cache import ImageCache
    from melanoma_ml.serving.model_card import ood_text, runtime_text

    run = open_run(args.artifact_root, {"data": {"image_size": args.image_size}})
    config, paths = run.config, run.paths
    folds_table = run.folds_table()
    backbones = run.backbones()
    fold_results = {b: run.fold_results(b) for b in backbones}
    reports = {b: run.report(b) for b in backbones}
    cache = ImageCache.open(paths.cache(args.image_size))
    with tempfile.TemporaryDirectory(prefix="test-split-report-") as tmp:
        tested = evaluate_test_sets(config, fold_results, reports, folds_table, cache, Path(tmp), Path(tmp))
    print(f"test sets: {tested.test_sets}")
    for note in tested.notes:
        print(f"note: {note}")
    level = int(round(config.evaluation.ci_level * 100))
    print(
        f"\nAll CIs {level}%, patient/lesion-cluster bootstrap ({config.evaluation.n_bootstrap} resamples)."
    )
    header = "| model | OOF AUC | test AUC | test pAUC | sens / spec on test at OOF threshold | ECE test before -> after | Brier before -> after |"
    print(header)
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in tested.results:
        if r.test_set != INTERNAL_TEST:
            continue
        oof_auc = r.oof_auc
        if r.kind == "best_fold":  # its own validation rows, with a CI
            best = served_fold(fold_results[r.backbone])
            oof_auc = evaluate_predictions(best.oof, config.evaluation).metric("auc")
        m = r.report.metric
        cal = r.calibration.report if r.calibration is not None else {}
        ece = (
            f"{cal['ece_before'].text(show_level=False)} -> {cal['ece_after'].text(show_level=False)}"
            if cal
            else "-"
        )
        brier = f"{cal['brier_before'].value:.3f} -> {cal['brier_after'].value:.3f}" if cal else "-"
        method = r.calibration.method if r.calibration is not None else None
        print(
            f"| {r.model} | {oof_auc.text(show_level=False)} | {m('auc').text(show_level=False)} | "
            f"{m('pauc').text(show_level=False)} | {m('sensitivity').value:.3f} / {m('specificity').value:.3f} "
            f"(threshold {r.report.threshold.value:.3f}) | {ece} ({method}) | {brier} |"
        )
    for c in tested.comparisons:
        print(
            f"\n{c['test_set']}: {c['a']} minus {c['b']}: test AUC difference {c['diff']:+.4f} "
            f"[{c['lo']:+.4f}, {c['hi']:+.4f}] (paired on {c['n']} images, {c['n_groups']} clusters)"
        )
    for backbone in backbones:
        average_spaces(config, backbone, fold_results[backbone], folds_table, cache)
    registry = run.registry()
    current = registry.current()
    if current is None:
        print("\nregistry: nothing served")
        return
    manifest = registry.manifest(current)
    print(f"\nserved {current}: {manifest.describe_model()}; runtime: {runtime_text(manifest)}")
    print(f"  out-of-distribution check: {ood_text(manifest)}")
    for name, tested_set in (manifest.test_metrics or {}).items():
        auc = tested_set.metrics["auc"].text(show_level=False)
        extra = tested_set.metrics.get("ece")  # of the served (calibrated, TTA) probabilities
        ece = "" if extra is None else f", served ECE {extra.text(show_level=False)}"
        print(f"  test set {name}: {tested_set.n_images} images, AUC {auc}{ece}")


def average_spaces(config, backbone: str, folds, folds_table, cache, n_draws: int = 1000) -> None:
    """The fold-model mean in probability vs logit space on the locked test split, and the ECE a perfectly
    calibrated model would show on a test set this small (labels drawn from the calibrated probabilities)."""
    import numpy as np
    import pandas as pd

    from melanoma_ml.evaluation import evaluate_predictions
    from melanoma_ml.evaluation.calibration import calibrator_from_dict, fit_served_calibration
    from melanoma_ml.evaluation.ensemble import average_probabilities, averaged_oof
    from melanoma_ml.evaluation.holdout import prediction_table
    from melanoma_ml.evaluation.metrics import expected_calibration_error
    from melanoma_ml.folds import locked_test_mask
    from melanoma_ml.training.predict import predict_rows

    rows = folds_table[locked_test_mask(folds_table)].reset_index(drop=True)
    if rows.empty:
        return
    per_fold = [predict_rows(r, rows, cache, config.training) for r in folds]
    # each fold model's (already view-averaged) probabilities, averaged across the members by the one
    # ensemble average the served bundle uses (serving.ensemble_average)
    means = {space: average_probabilities(per_fold, space) for space in ("probability", "logit")}
    pooled = pd.concat([r.oof for r in folds], ignore_index=True)
    y = rows["target"].to_numpy()
    bins = config.evaluation.ece_bins
    rng = np.random.default_rng(0)
    print(f"\n{backbone}: fold-model mean on the locked test split ({len(rows)} images), by averaging space")
    print(
        "| average | test AUC | ECE raw | ECE calibrated | ECE of a perfectly calibrated model here (median [95%]) |"
    )
    print("| --- | --- | --- | --- | --- |")
    for space, mean in means.items():
        oof = averaged_oof(
            [pooled], space
        )  # one model per out-of-fold image: the space changes nothing there
        report = evaluate_predictions(prediction_table(rows, mean, backbone), config.evaluation)
        calibration = fit_served_calibration(config, oof, report.threshold.value).stored
        served = mean if calibration is None else calibrator_from_dict(calibration["parameters"]).apply(mean)
        floor = [expected_calibration_error(rng.binomial(1, served), served, bins) for _ in range(n_draws)]
        lo, mid, hi = np.percentile(floor, [2.5, 50, 97.5])
        print(
            f"| {space} | {report.metric('auc').text(show_level=False)} | "
            f"{expected_calibration_error(y, mean, bins):.3f} | {expected_calibration_error(y, served, bins):.3f} | "
            f"{mid:.3f} [{lo:.3f}, {hi:.3f}] |"
        )


if __name__ == "__main__":
    main()
