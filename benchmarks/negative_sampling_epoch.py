"""Epoch time with and without negative down-sampling (``training.negative_ratio``) on a synthetic ISIC 2024 set.

Both runs train the same backbone on the same fold of the same cached images (synthetic ISIC 2024 layout,
HDF5 images, ``isic2024_tbp`` tabular features, few melanomas as in ISIC 2024); only the ratio differs. The
down-sampled loader draws every melanoma and ``ratio`` times as many benign images per epoch (a new draw each
epoch); validation always scores every validation image. Prints, per run, training seconds per epoch (time
in training epochs: loading, augmentation, forward, backward), wall seconds per epoch (with validation and
the checkpoint save) and images drawn per epoch, then the ratios; and the 1-minute load average before and
after, since the machine may be shared.

    python benchmarks/negative_sampling_epoch.py --patients 500 --size 64 --ratio 3 --epochs 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
from _common import machine_load

from melanoma_ml import schema
from melanoma_ml.config import SyntheticConfig, load_config
from melanoma_ml.folds import assign_folds
from melanoma_ml.images.cache import build_image_cache
from melanoma_ml.metadata.layouts import load_dataset
from melanoma_ml.synthetic_isic2024 import generate_isic2024_dataset
from melanoma_ml.training.data import NegativeDownsampler
from melanoma_ml.training.train import split_fold, train_fold


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=500, help="~4 images each")
    parser.add_argument("--size", type=int, default=64, help="training (cache) size; originals are 2x")
    parser.add_argument(
        "--melanoma-rate", type=float, default=0.05, help="share of lesions that are melanoma"
    )
    parser.add_argument("--ratio", type=float, default=3.0, help="negatives per positive per epoch")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--backbone", default="test_efficientnet")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthetic = SyntheticConfig(
            n_patients=args.patients,
            images_per_patient=(3, 5),
            image_size=2 * args.size,
            melanoma_rate=args.melanoma_rate,
            layout="isic2024",
        )
        made = generate_isic2024_dataset(root / "isic2024", synthetic)
        clean = load_dataset(made.root, hash_images=False).clean
        folds = assign_folds(clean, 2, 42, test_fraction=0.0)
        cache = build_image_cache(folds, root / "cache", args.size)
        train_rows, val_rows = split_fold(folds, 0)
        n_pos = int(train_rows[schema.TARGET].sum())
        print(
            f"{len(folds)} images ({int(folds[schema.TARGET].sum())} melanoma) at {args.size} px, "
            f"{args.backbone}, fold 0: {len(train_rows)} training ({n_pos} melanoma), {len(val_rows)} validation; "
            f"{args.epochs} epochs, {torch.get_num_threads()} torch threads on {os.cpu_count()} CPUs"
        )
        load_before = os.getloadavg()[0]
        rows = {}
        for label, ratio in (("off", None), (f"ratio {args.ratio:g}", args.ratio)):
            config = load_config(
                "demo",
                {
                    "artifact_root": str(root / "artifacts"),
                    "backbones": [args.backbone],
                    "data": {"image_size": args.size},
                    "model": {"tabular_features": "isic2024_tbp"},
                    "training": {
                        "epochs": args.epochs,
                        "early_stopping_patience": args.epochs + 1,
                        "negative_ratio": ratio,
                    },
                },
            )
            drawn = len(train_rows)
            if ratio is not None:
                drawn = len(NegativeDownsampler(train_rows[schema.TARGET].to_numpy(), ratio, 0))
            result = train_fold(
                config, args.backbone, 0, folds, cache, root / "out" / label.replace(" ", "-")
            )
            train_s = drawn / result.train_images_per_second
            rows[label] = (train_s, result.wall_time_s / result.epochs_run, drawn)
            print(
                f"  {label:<10} {train_s:6.2f} s/epoch training, {rows[label][1]:6.2f} s/epoch wall "
                f"(with validation), {drawn} images drawn per epoch, val AUROC {result.best_val_auroc:.3f}"
            )
        off, sampled = rows["off"], rows[f"ratio {args.ratio:g}"]
        print(
            f"speed-up off / ratio {args.ratio:g}: {off[0] / sampled[0]:.2f}x training time per epoch, "
            f"{off[1] / sampled[1]:.2f}x wall per epoch ({off[2] / sampled[2]:.2f}x fewer images drawn)"
        )
        print(f"1-minute load average: {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    with machine_load():
        main()
