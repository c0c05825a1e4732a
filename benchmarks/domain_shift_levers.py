"""Which standard levers against domain shift help on a shifted "second clinic" without hurting in-domain?

    .venv/bin/python benchmarks/domain_shift_levers.py            # ~5-10 min on 2 busy CPU cores
    .venv/bin/python benchmarks/domain_shift_levers.py --levers baseline shades_of_gray --epochs 4

Data: the synthetic generator at its default look (``SYNTHETIC_DOMAINS['default']``) is the training
clinic. The same patients, lesions and labels rendered with the ``second_clinic`` look (warmer camera,
stronger lens, soft optics, dark dermoscope corners, less hair, sensor noise) are the shifted set. The locked
test split (``data.test_fraction``, patient-grouped, made once by ``assign_folds``) is scored twice: its
default-look images (**in-domain**) and the same images in the second clinic's look (**shifted**), so the
two AUCs differ only by the acquisition. No test patient is trained on, early-stopped on or tuned on.

Each lever is trained with the project's own steps (``load_configured_data`` -> ``assign_folds`` ->
``build_image_cache`` -> ``train_fold``, the demo profile's settings, ``test_efficientnet`` from random
init) and scored with ``predict_rows`` (the evaluation path; no TTA) as the mean probability of its first
``--fold-models`` fold models (default 1, fold 0: a fold takes ~3 min on 2 busy CPU cores):

* ``baseline``: the demo settings;
* ``shades_of_gray``: ``data.color_constancy = shades_of_gray`` (training, evaluation and serving);
* ``strong_aug``: ``training.augmentation.preset = strong``;
* ``both``: the two together;
* ``multi_source``: baseline plus a third synthetic clinic (another look, ``THIRD_CLINIC``, other patients)
  as a training-only ``data.external_sources`` entry. It adds images, so it is not a same-size comparison.
  The third clinic is deliberately unlike the second (a cooler camera, a weaker lens).

Reported: AUC with a 95% patient-cluster bootstrap CI (``evaluate_predictions``) on each set, and each
lever minus baseline on the same images with a paired cluster-bootstrap CI (``paired_auc_difference``).
Caveats: one seed, synthetic data, a 64 px random-init model; the levers' effect on real clinics can differ.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from melanoma_ml.runtime import quiet_network_chatter  # noqa: E402  (before albumentations loads)

quiet_network_chatter()
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from _common import machine_load  # noqa: E402

from melanoma_ml import schema  # noqa: E402
from melanoma_ml.config import (  # noqa: E402
    PipelineConfig,
    SyntheticConfig,
    SyntheticDomain,
    deep_merge,
    load_config,
    synthetic_domain,
)
from melanoma_ml.evaluation.compare import paired_auc_difference  # noqa: E402
from melanoma_ml.evaluation.inputs import PROB  # noqa: E402
from melanoma_ml.evaluation.report import evaluate_predictions  # noqa: E402
from melanoma_ml.folds import EXTERNAL_FOLD, TEST_FOLD, assign_folds  # noqa: E402
from melanoma_ml.images.cache import build_image_cache  # noqa: E402
from melanoma_ml.metadata.sources import load_configured_data  # noqa: E402
from melanoma_ml.synthetic import generate_synthetic_dataset  # noqa: E402
from melanoma_ml.training.predict import predict_rows  # noqa: E402
from melanoma_ml.training.train import train_fold  # noqa: E402

BACKBONE = "test_efficientnet"
THIRD_CLINIC = SyntheticDomain(
    colour_cast=(0.92, 1.0, 1.1),
    scale=0.85,
    blur_sigma=0.003,
    vignette_rate=0.5,
    hair_rate=0.3,
    noise_std=3.0,
)
"""The extra training source of ``multi_source``: a cooler camera and a weaker lens than the default."""

LEVERS: dict[str, dict] = {
    "baseline": {},
    "shades_of_gray": {"data": {"color_constancy": "shades_of_gray"}},
    "strong_aug": {"training": {"augmentation": {"preset": "strong"}}},
    "both": {
        "data": {"color_constancy": "shades_of_gray"},
        "training": {"augmentation": {"preset": "strong"}},
    },
    "multi_source": {},  # the external source is added to the training table, see main()
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--levers", nargs="+", choices=list(LEVERS), default=list(LEVERS))
    parser.add_argument("--n-patients", type=int, default=200, help="synthetic patients (~4 images each)")
    parser.add_argument("--test-fraction", type=float, default=0.4, help="patients locked as the test split")
    parser.add_argument("--n-folds", type=int, default=3, help="CV folds (validation for early stopping)")
    parser.add_argument(
        "--fold-models", type=int, default=1, help="models per lever (folds 0..k-1), probabilities averaged"
    )
    parser.add_argument("--epochs", type=int, default=8, help="the demo profile's 8")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="data, training and bootstrap seed")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp folder")
    return parser.parse_args(argv)


def generate(workdir: Path, args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """Default and second-clinic looks of the same patients, and a third clinic of other patients."""
    base = SyntheticConfig(n_patients=args.n_patients, image_size=128, seed=args.seed)
    default = generate_synthetic_dataset(workdir / "default", base)
    second = generate_synthetic_dataset(
        workdir / "second_clinic", base.model_copy(update={"domain": synthetic_domain("second_clinic")})
    )
    third_cfg = base.model_copy(
        update={"domain": THIRD_CLINIC, "seed": args.seed + 1, "n_patients": args.n_patients // 2}
    )
    third = generate_synthetic_dataset(workdir / "third_clinic_raw", third_cfg)
    return default.root, second.image_dir, _renamed(third.root, third.csv_path, workdir / "third_clinic")


def _renamed(root: Path, csv_path: Path, out: Path) -> Path:
    """A copy of a synthetic set with ``C3_``-prefixed ids (the generator's ids restart at 1 for any seed,
    and ``external_sources`` drops rows whose id is already in the primary set)."""
    table = pd.read_csv(csv_path)
    images = out / "jpeg" / "train"
    images.mkdir(parents=True, exist_ok=True)
    for name in table[schema.IMAGE]:
        (images / f"C3_{name}.jpg").write_bytes((root / "jpeg" / "train" / f"{name}.jpg").read_bytes())
    for column in (schema.IMAGE, schema.PATIENT, schema.LESION):
        if column in table:
            table[column] = "C3_" + table[column].astype(str)
    table.to_csv(out / "train.csv", index=False)
    return out


def lever_config(args: argparse.Namespace, workdir: Path, lever: str, third: Path) -> PipelineConfig:
    overrides = {
        "artifact_root": str(workdir / "artifacts"),
        "backbones": [BACKBONE],
        "data": {
            "image_size": args.image_size,
            "n_folds": args.n_folds,
            "test_fraction": args.test_fraction,
            "external_sources": [{"path": str(third), "layout": "isic2020", "name": "third_clinic"}],
        },
        "training": {
            "epochs": args.epochs,
            "accelerator": "cpu",
            "devices": 1,
            "device_pool": "off",
            "num_workers": 0,
            "seed": args.seed,
        },
        "evaluation": {"n_bootstrap": args.n_bootstrap, "bootstrap_seed": args.seed},
    }
    return load_config("demo", deep_merge(overrides, LEVERS[lever]))


def predictions(rows: pd.DataFrame, prob: np.ndarray) -> pd.DataFrame:
    out = rows[[schema.IMAGE, schema.GROUP, schema.TARGET]].reset_index(drop=True)
    out[PROB] = prob
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="domain_shift_") as tmp:
        workdir = args.workdir or Path(tmp)
        default_root, second_images, third = generate(workdir, args)
        config = lever_config(args, workdir, "baseline", third)
        # One folds table for every lever (the primary split does not depend on the lever).
        clean = load_configured_data(config.data, default_source_dir=default_root).clean
        folds = assign_folds(clean, config.data.n_folds, config.data.fold_seed, config.data.test_fraction)
        cache = build_image_cache(folds, workdir / "cache_default", config.data.image_size)
        test = folds[folds[schema.FOLD] == TEST_FOLD].reset_index(drop=True)
        shifted = test.assign(
            **{schema.IMAGE_PATH: [str(second_images / f"{n}.jpg") for n in test[schema.IMAGE]]}
        )
        shifted_cache = build_image_cache(shifted, workdir / "cache_second_clinic", config.data.image_size)
        primary = folds[~folds[schema.IS_EXTERNAL]]
        n_external = int((folds[schema.FOLD] == EXTERNAL_FOLD).sum())
        print(
            f"data: {len(primary) - len(test)} training images ({primary.loc[primary[schema.FOLD] >= 0, schema.PATIENT].nunique()} "
            f"patients, {args.n_folds} folds), test split {len(test)} images / {test[schema.PATIENT].nunique()} "
            f"patients / {int(test[schema.TARGET].sum())} melanoma; multi_source adds {n_external} third-clinic images"
        )

        preds: dict[str, dict[str, pd.DataFrame]] = {}
        for lever in args.levers:
            lever_started = time.perf_counter()
            cfg = lever_config(args, workdir, lever, third)
            table = folds if lever == "multi_source" else primary
            probs = {"in-domain": [], "second_clinic": []}
            for fold in range(min(args.fold_models, cfg.data.n_folds)):
                result = train_fold(
                    cfg, BACKBONE, fold, table, cache, workdir / "models" / lever / f"fold{fold}"
                )
                probs["in-domain"].append(predict_rows(result, test, cache, cfg.training))
                probs["second_clinic"].append(predict_rows(result, shifted, shifted_cache, cfg.training))
            preds[lever] = {name: predictions(test, np.mean(p, axis=0)) for name, p in probs.items()}
            print(
                f"  trained {lever}: {len(probs['in-domain'])} fold model(s) in "
                f"{time.perf_counter() - lever_started:.0f} s",
                flush=True,
            )

    evaluation = config.evaluation
    print("\n| lever | in-domain AUC [95% CI] | second_clinic AUC [95% CI] | shifted - in-domain |")
    print("|---|---|---|---|")
    aucs: dict[str, dict[str, float]] = {}
    for lever, sets in preds.items():
        cells = []
        for name, frame in sets.items():
            report = evaluate_predictions(frame, evaluation, name=f"{lever} on {name}")
            auc = report.metrics.set_index("metric").loc["auc"]
            aucs.setdefault(lever, {})[name] = float(auc["value"])
            cells.append(f"{auc['value']:.3f} [{auc['lo']:.3f}, {auc['hi']:.3f}]")
        drop = aucs[lever]["second_clinic"] - aucs[lever]["in-domain"]
        print(f"| {lever} | {cells[0]} | {cells[1]} | {drop:+.3f} |")

    if "baseline" in preds:
        print("\n| lever - baseline | in-domain diff [95% CI] | second_clinic diff [95% CI] | keep? |")
        print("|---|---|---|---|")
        for lever in [name for name in preds if name != "baseline"]:
            diffs = {
                name: paired_auc_difference(
                    preds[lever][name], preds["baseline"][name], evaluation, names=(lever, "baseline")
                )
                for name in ("in-domain", "second_clinic")
            }
            helps = diffs["second_clinic"]["lo"] > 0
            no_harm = diffs["in-domain"]["hi"] >= 0
            cells = [f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]" for d in diffs.values()]
            print(f"| {lever} | {cells[0]} | {cells[1]} | {'yes' if helps and no_harm else 'no'} |")
    print(
        f"\ncommand: python {' '.join(sys.argv)}; {time.perf_counter() - started:.0f} s; "
        f"torch threads {torch.get_num_threads()}; paired CIs: {evaluation.n_bootstrap} patient resamples"
    )
    return 0


if __name__ == "__main__":
    with machine_load():
        code = main()
    raise SystemExit(code)
