"""GPU smoke test: one partition of the ``full`` profile for a few hundred steps, with throughput and memory.

Trains ``--backbone`` (``efficientnet_b0``) on fold 0 through ``train_fold`` with the ``full`` profile's
hardware settings (``training.precision``, ``channels_last`` and ``num_workers`` at ``auto``: bf16-mixed,
NHWC and min(CPUs - 1, 8) loader workers on a recent GPU) for about ``--steps`` optimizer steps, then
prints:

- training img/s (``FoldResult.train_images_per_second``: loading + forward + backward, no validation),
- peak GPU memory (``torch.cuda.max_memory_allocated``),
- GPU utilisation over the ``train_fold`` call (every ``--sample-s`` seconds: ``pynvml`` when installed,
  else ``nvidia-smi --query-gpu=utilization.gpu``; validation and setup are in it too),
- the resolved precision / memory format / workers, epochs and steps run, best validation AUROC, wall time.

Data: ``--data`` (any ISIC layout; default ``../shared/data/isic_sample``, the HAM10000 sample) when it
exists, else synthetic images (``melanoma_ml.synthetic``). Weights start random (``model.pretrained:
false``; ``--pretrained PATH`` takes a local weights file), so the AUROC says only that training ran.

Without CUDA it exits with status 2 and says so. ``--dry-run`` is the CPU fallback that checks the script
itself: a tiny timm test model on a few synthetic 64 px images for a few steps, through the same code path
(channels-last and loader workers forced on, as on a GPU; fp32).

Usage::

    .venv/bin/python benchmarks/gpu_smoke.py [--data DIR] [--steps 300] [--backbone efficientnet_b0]
        [--batch-size 32] [--size 256] [--workdir DIR] [--dry-run]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from melanoma_ml.runtime import quiet_network_chatter  # noqa: E402  (before albumentations loads)

quiet_network_chatter()
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _common import machine_load  # noqa: E402

from melanoma_ml.config import PipelineConfig, load_config  # noqa: E402
from melanoma_ml.pipeline import build_cache, clean_source, make_folds, prepare_source  # noqa: E402
from melanoma_ml.training.gpu_probe import UtilisationSampler, utilisation_reader, with_step_budget  # noqa: E402
from melanoma_ml.training.hardware import resolve_hardware  # noqa: E402
from melanoma_ml.training.train import split_fold, train_fold  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "isic_sample"
NO_CUDA_EXIT = 2
FOLD = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help=f"dataset folder (default {DEFAULT_DATA})")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps to train (about)")
    parser.add_argument("--backbone", default="efficientnet_b0")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=256, help="training image side")
    parser.add_argument("--pretrained", default="false", help="false, or a local weights file")
    parser.add_argument("--synthetic-patients", type=int, default=400, help="when no --data folder exists")
    parser.add_argument("--sample-s", type=float, default=0.5, help="GPU utilisation sampling period")
    parser.add_argument("--workdir", type=Path, default=None, help="artifacts here (default: a temp dir)")
    parser.add_argument(
        "--dry-run", action="store_true", help="CPU check of the script: tiny model, few steps"
    )
    args = parser.parse_args(argv)
    if args.dry_run:
        args.backbone, args.size, args.batch_size = "test_efficientnet", 64, 8
        args.steps = min(args.steps, 6)
        args.synthetic_patients = min(args.synthetic_patients, 24)
    return args


def smoke_config(args: argparse.Namespace, artifact_root: Path) -> PipelineConfig:
    """The ``full`` profile for one backbone on fold 0, epochs and batch limit sized for ``--steps``."""
    data: dict[str, Any] = {"image_size": args.size, "layout": "auto", "test_fraction": 0.0}
    source = args.data if args.data is not None else (None if args.dry_run else DEFAULT_DATA)
    if source is not None and Path(source).exists():
        data["source_dir"] = str(source)
    else:
        source_px = 96 if args.dry_run else 512
        data.update(
            allow_synthetic=True,  # the full profile refuses synthetic data unless asked for it
            n_folds=2 if args.dry_run else 5,
            synthetic={
                "n_patients": args.synthetic_patients,
                "images_per_patient": (2, 3),
                "image_size": source_px,
            },
        )
    training: dict[str, Any] = {"batch_size": args.batch_size}
    if args.dry_run:  # what a GPU run resolves to, minus mixed precision and the device lease
        training.update(accelerator="cpu", device_pool="off", channels_last=True, num_workers=1)
    model: dict[str, Any] = {"pretrained": args.pretrained}
    if args.dry_run:
        model["meta_hidden"] = [16, 8]
    return load_config(
        "full",
        {
            "artifact_root": str(artifact_root),
            "backbones": [args.backbone],
            "data": data,
            "model": model,
            "training": training,
        },
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "gpu_smoke: torch sees no CUDA device (torch "
            f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}); this smoke test needs a GPU. "
            "Run it on a GPU machine, or pass --dry-run for the CPU check of the script.",
            file=sys.stderr,
        )
        return NO_CUDA_EXIT
    with tempfile.TemporaryDirectory(prefix="gpu-smoke-") as tmp:
        root = args.workdir or Path(tmp)
        config = smoke_config(args, root / "artifacts")
        started = time.perf_counter()
        source = prepare_source(config)
        folds = make_folds(config, clean_source(config, source).clean)
        cache = build_cache(config, folds)
        train_rows, _val_rows = split_fold(folds, FOLD)
        config = with_step_budget(config, len(train_rows), args.steps)
        prepared_s = time.perf_counter() - started
        plan = resolve_hardware(config.training)
        print(
            f"data: {'synthetic' if source.synthetic else source.root} ({len(folds)} images, fold {FOLD}: "
            f"{len(train_rows)} train), cache {cache.size} px, prepared in {prepared_s:.1f} s\n"
            f"plan: {plan.device}, precision {plan.precision}, channels_last {plan.channels_last}, "
            f"{plan.num_workers} loader workers (prefetch {plan.prefetch_factor}), pin_memory {plan.pin_memory}; "
            f"{config.training.epochs} epochs x {config.training.limit_train_batches} batches of "
            f"{config.training.batch_size}",
            flush=True,
        )
        gpu = plan.device == "cuda"
        if gpu:
            torch.cuda.reset_peak_memory_stats()
            how, read = utilisation_reader(torch.cuda.current_device())
        else:
            how, read = "none (CPU)", lambda: 0.0
        sampler = UtilisationSampler(read, args.sample_s)
        if gpu:
            with sampler:
                result = train_fold(config, args.backbone, FOLD, folds, cache, root / "fold")
            peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
            utilisation = f"{sampler.summary()} via {how}"
        else:
            result = train_fold(config, args.backbone, FOLD, folds, cache, root / "fold")
            peak, utilisation = "n/a (CPU dry run)", "n/a (CPU dry run)"
    steps = result.epochs_run * int(config.training.limit_train_batches or 0)
    print(
        f"{args.backbone} {cache.size} px on {', '.join(result.devices)}: "
        f"{result.train_images_per_second:.1f} train img/s over {steps} steps ({result.epochs_run} epochs)\n"
        f"peak GPU memory (max_memory_allocated): {peak}\n"
        f"GPU utilisation during train_fold: {utilisation}\n"
        f"best val AUROC {result.best_val_auroc:.3f} (epoch {result.best_epoch}), train_fold wall "
        f"{result.wall_time_s:.1f} s"
    )
    return 0


if __name__ == "__main__":
    with machine_load():
        code = main()
    sys.exit(code)
