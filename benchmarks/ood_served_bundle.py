"""The out-of-distribution flag of a served bundle, on the images a real deployment would meet.

Loads the registry's current bundle under ``--artifact-root`` (a finished run, e.g.
``benchmarks/real_isic_sample.py --workdir``) and scores, the way the app does (``inference.score``: decode,
resize, normalise, no metadata, no TTA; the detector reads member 0's pooled embedding):

* **in distribution**: the run's locked test split (the folds table's rows of the test fold), images
  no member trained on and the detector was not fitted on, decoded from their original files;
* **out of distribution**: the sample photos shipped with scikit-image / scikit-learn / matplotlib (plus
  random crops), uniform noise, text on white and flat colours (``benchmarks/ood_detection.py``'s sets).

Printed per set: detection AUROC against the in-distribution images (95% CI, 1,000 bootstrap resamples of
each set) and the share flagged at the bundle's threshold.

Usage::

    .venv/bin/python benchmarks/ood_served_bundle.py --artifact-root /tmp/real_isic/accept
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from melanoma_ml.runtime import quiet_network_chatter

quiet_network_chatter()
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from _common import machine_load, open_run, tta_scores  # noqa: E402
from ood_detection import auroc_ci, flat_images, noise_images, sample_photos, text_images  # noqa: E402

from melanoma_ml.folds import locked_test_mask  # noqa: E402
from melanoma_ml.images.io import load_rgb  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact-root", type=Path, required=True)
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with machine_load():
        measure(args)


def measure(args: argparse.Namespace) -> None:
    run = open_run(args.artifact_root)
    bundle = run.served_bundle()
    if bundle.ood is None:
        raise SystemExit(f"the served bundle {bundle.version} under {args.artifact_root} has no OOD detector")
    folds = run.folds_table()
    test = folds[locked_test_mask(folds)]
    rng = np.random.default_rng(args.seed)
    sets = {
        "in distribution (locked test split)": [load_rgb(p) for p in test["image_path"]],
        "sample photos": sample_photos(rng),
        "uniform noise": noise_images(rng),
        "text on white": text_images(rng),
        "flat colour": flat_images(rng),
    }
    scores = {}
    for name, images in sets.items():
        result = tta_scores(bundle, images, [{}] * len(images), views=1)
        scores[name] = (result.ood_score, result.ood_flag)
    inside = scores["in distribution (locked test split)"][0]
    print(
        f"bundle {bundle.version}: {bundle.manifest.describe_model()}; detector {bundle.manifest.ood.method}, "
        f"threshold {bundle.ood.threshold:.4g}"
    )
    print("| set | images | detection AUROC [95% CI] | flagged |")
    print("| --- | --- | --- | --- |")
    outside_all = []
    for name, (values, flags) in scores.items():
        auroc = "-" if values is inside else auroc_ci(inside, values, args.n_bootstrap, rng)
        if values is not inside:
            outside_all.append(values)
        print(f"| {name} | {len(values)} | {auroc} | {flags.mean():.1%} |")
    pooled = np.concatenate(outside_all)
    flagged = np.concatenate([f for n, (_, f) in scores.items() if not n.startswith("in distribution")])
    print(
        f"| all out-of-distribution | {len(pooled)} | {auroc_ci(inside, pooled, args.n_bootstrap, rng)} | "
        f"{flagged.mean():.1%} |"
    )


if __name__ == "__main__":
    main()
