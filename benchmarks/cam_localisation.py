"""Does Grad-CAM of a trained network point at the lesion more than a random-init network's does?

On the synthetic demo data (the generator writes each image's lesion mask), train ``test_efficientnet``
on fold 0's training patients for a few epochs, then on fold 0's held-out validation images measure the
fraction of CAM mass inside the lesion mask (``melanoma_ml.evaluation.localisation``) for

* the trained network (the best epoch by validation AUROC, as ``train_fold`` keeps it),
* the same architecture at random init (same spec, seeded),

each as a mean over images with a 95% bootstrap CI, plus the paired difference (trained - random) over
the same images and the mask-area chance level (what a uniform map scores).

Usage::

    .venv/bin/python benchmarks/cam_localisation.py [--profile demo] [--epochs 8] [--method gradcam]
        [--workdir DIR] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import machine_load

BACKBONE = "test_efficientnet"
FOLD = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=("tiny", "demo"), default="demo", help="synthetic data profile")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--method", choices=("gradcam", "eigencam"), default="gradcam")
    parser.add_argument("--n-bootstrap", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0, help="random-init network and bootstrap seed")
    parser.add_argument("--workdir", type=Path, default=None, help="artifact root (default: a temp folder)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cam_localisation_") as tmp:
        return run(args, args.workdir or Path(tmp))


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    import torch

    from melanoma_ml import schema
    from melanoma_ml.artifacts import artifact_paths
    from melanoma_ml.config import load_config
    from melanoma_ml.evaluation.localisation import lesion_mask_view, paired_difference
    from melanoma_ml.features import metadata_dict
    from melanoma_ml.folds import assign_folds
    from melanoma_ml.images.cache import build_image_cache
    from melanoma_ml.images.io import load_rgb
    from melanoma_ml.metadata import load_dataset
    from melanoma_ml.serving.explain import cam_localisation
    from melanoma_ml.synthetic import generate_synthetic_dataset
    from melanoma_ml.training.checkpoint import load_checkpoint
    from melanoma_ml.training.train import train_fold

    started = time.perf_counter()
    config = load_config(
        args.profile,
        {
            "artifact_root": str(root),
            "backbones": [BACKBONE],
            "training": {"epochs": args.epochs, "accelerator": "cpu", "devices": 1},
        },
    )
    size = config.data.image_size
    paths = artifact_paths(config)
    dataset = generate_synthetic_dataset(paths.synthetic, config.data.synthetic)
    cleaning = load_dataset(dataset.root, layout="auto", check_images=True, hash_images=False)
    folds = assign_folds(cleaning.clean, config.data.n_folds, config.data.fold_seed)
    cache = build_image_cache(folds, paths.cache(size), size)
    result = train_fold(config, BACKBONE, FOLD, folds, cache, paths.checkpoint(BACKBONE, FOLD))
    trained, spec, _info = load_checkpoint(result.checkpoint_dir)
    torch.manual_seed(args.seed)
    random_init = spec.build_network().eval()
    print(
        f"trained {BACKBONE} fold {FOLD} in {time.perf_counter() - started:.0f} s: best epoch {result.best_epoch}"
    )

    rows = folds.set_index(schema.IMAGE).loc[result.oof[schema.IMAGE]].reset_index()
    images = [load_rgb(path) for path in rows[schema.IMAGE_PATH]]
    metadata = [metadata_dict(row) for row in rows.itertuples(index=False)]
    masks = [lesion_mask_view(dataset.mask_dir / f"{name}.png", size) for name in rows[schema.IMAGE]]
    common = {"method": args.method, "n_bootstrap": args.n_bootstrap, "seed": args.seed}
    scores = {
        "trained": cam_localisation(trained.eval(), spec, images, metadata, masks, **common),
        "random_init": cam_localisation(random_init, spec, images, metadata, masks, **common),
    }
    difference = paired_difference(
        scores["trained"].inside, scores["random_init"].inside, args.n_bootstrap, args.seed, 0.95
    )
    n_melanoma = int(rows[schema.TARGET].sum())
    print(
        f"\n{args.method} on {len(rows)} held-out validation images of fold {FOLD} ({n_melanoma} melanoma), "
        f"{size} px, {args.profile} synthetic data, layer {scores['trained'].target_layer}; "
        f"fold validation AUROC {result.best_val_auroc:.3f} at epoch {result.best_epoch}"
    )
    print(f"  chance (mask area, uniform map): {scores['trained'].mean_area.text()}")
    for name, score in scores.items():
        print(f"  CAM mass inside the lesion mask, {name:<11}: {score.mean_inside.text()}")
    print(f"  paired difference trained - random_init:       {difference.text()}")
    summary = {
        "images": len(rows),
        "melanoma": n_melanoma,
        "method": args.method,
        "image_size": size,
        "epochs": args.epochs,
        "val_auroc": result.best_val_auroc,
        "mask_area": scores["trained"].mean_area.to_dict(),
        **{f"inside_{name}": score.mean_inside.to_dict() for name, score in scores.items()},
        "difference": difference.to_dict(),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    with machine_load():
        main()
