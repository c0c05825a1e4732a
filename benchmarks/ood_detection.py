"""Which out-of-distribution score to serve: Mahalanobis on pooled embeddings vs the energy of the logit.

    python benchmarks/ood_detection.py                    # both experiments, ~5 min on 2 CPU cores
    python benchmarks/ood_detection.py --train-on synthetic --epochs 3

For each training set (``--train-on``) it trains one tiny model with the project's own steps
(``load_configured_data`` -> ``assign_folds`` -> ``build_image_cache`` -> ``train_fold`` on fold 0,
``test_efficientnet`` from random init), then fits ``melanoma_ml.serving.ood`` on the fold's TRAINING
images (Mahalanobis: ``fit_bundle_ood``, the detector promotion ships: cached pixels, class means + shared
Ledoit-Wolf covariance, threshold = 99th percentile of 5-fold patient-grouped cross-fitted training
scores, at most ``--max-fit-images`` rows; energy: 99th percentile of the training images' energies)
and scores:

* **in distribution (held out)**: fold 0's validation images of the training set (never trained on);
* **shifted dermoscopy** (reported, not counted as OOD): the ``second_clinic`` synthetic domain (same
  patients and labels, another look) and, for a synthetic-trained model, the real HAM10000 sample
  (``../shared/data/isic_sample``, read in place, never copied); for a real-trained model, synthetic images;
* **out of distribution**: the sample images shipped with scikit-image, scikit-learn and matplotlib (plus 3
  random square crops of each), uniform noise, text on white (PIL ImageDraw) and flat colours.

Every image goes the serving way: ``load_resized`` (the app's decoder) -> ``preprocess`` (normalise; no
TTA) with all metadata missing (an out-of-distribution image has none); generated arrays skip the decoder. Printed per set:
detection AUROC against the held-out in-distribution images (sklearn ``roc_auc_score``; 95% CI from 1,000
bootstrap resamples of each set independently) and the share flagged at each threshold. Caveats: one
fold, one seed, a 64 px random-init model; the in-distribution flag rate estimates the ~1% the rule aims at.
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
from PIL import Image, ImageDraw  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from melanoma_ml import schema  # noqa: E402
from melanoma_ml.config import PipelineConfig, SyntheticConfig, load_config, synthetic_domain  # noqa: E402
from melanoma_ml.images.cache import load_resized  # noqa: E402
from melanoma_ml.images.io import load_rgb  # noqa: E402
from melanoma_ml.serving.inference import preprocess  # noqa: E402
from melanoma_ml.serving.ood import EnergyScorer, fit_bundle_ood, network_outputs  # noqa: E402
from melanoma_ml.spec import ModelSpec  # noqa: E402
from melanoma_ml.synthetic import generate_synthetic_dataset  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ISIC = REPO_ROOT.parent / "shared" / "data" / "isic_sample"
BACKBONE = "test_efficientnet"
FOLD = 0
N_GENERATED = 60  # images per generated OOD set (noise, text, flat)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train-on", choices=("synthetic", "isic", "both"), default="both")
    parser.add_argument("--isic-dir", type=Path, default=DEFAULT_ISIC)
    parser.add_argument("--max-isic", type=int, default=400, help="real images scored as a shifted set")
    parser.add_argument("--n-patients", type=int, default=120, help="synthetic patients (~4 images each)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--quantile", type=float, default=0.99)
    parser.add_argument("--max-fit-images", type=int, default=2000, help="serving.ood_max_fit_images")
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp folder")
    return parser.parse_args(argv)


# --- out-of-distribution image sets ---------------------------------------------------------------------


def sample_photos(rng: np.random.Generator) -> list[np.ndarray]:
    """Images shipped with scikit-image, scikit-learn and matplotlib, each plus 3 random square crops."""
    import matplotlib.cbook
    from sklearn.datasets import load_sample_images

    photos = [np.asarray(img) for img in load_sample_images().images]
    for name in ("grace_hopper.jpg", "logo2.png", "Minduka_Present_Blue_Pack.png"):
        photos.append(load_rgb(matplotlib.cbook.get_sample_data(name, asfileobj=False)))
    try:
        import skimage.data
    except ImportError:
        print("scikit-image is not installed (pip install -e '.[dev]'): its sample images are left out")
    else:
        folder = Path(skimage.data.__file__).parent
        photos += [load_rgb(p) for p in sorted(folder.iterdir()) if p.suffix in (".png", ".jpg", ".gif")]
    out = []
    for photo in photos:
        out.append(photo)
        h, w = photo.shape[:2]
        for _ in range(3):
            side = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            out.append(np.ascontiguousarray(photo[y : y + side, x : x + side]))
    return out


def noise_images(rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(N_GENERATED)]


def text_images(rng: np.random.Generator) -> list[np.ndarray]:
    """Screenshot-like dark text lines on white."""
    words = [
        "melanoma",
        "patient",
        "dermoscopy",
        "report",
        "upload",
        "image",
        "error",
        "file",
        "settings",
        "model",
        "version",
    ]
    out = []
    for _ in range(N_GENERATED):
        img = Image.new("RGB", (256, 256), "white")
        draw = ImageDraw.Draw(img)
        for line in range(int(rng.integers(4, 14))):
            text = " ".join(rng.choice(words, size=int(rng.integers(2, 6))))
            ink = tuple(int(v) for v in rng.integers(0, 80, 3))
            draw.text((int(rng.integers(2, 40)), 8 + line * 18), text, fill=ink)
        out.append(np.asarray(img))
    return out


def flat_images(rng: np.random.Generator) -> list[np.ndarray]:
    return [
        np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (256, 256, 3)).copy()
        for _ in range(N_GENERATED)
    ]


# --- training and scoring -------------------------------------------------------------------------------


def train_tiny(config: PipelineConfig, default_source: Path | None, workdir: Path):
    """The project's steps, fold 0 of 3: ``(folds table, image cache, net, spec)``."""
    from melanoma_ml.folds import assign_folds
    from melanoma_ml.images.cache import build_image_cache
    from melanoma_ml.metadata.sources import load_configured_data
    from melanoma_ml.training.checkpoint import load_checkpoint
    from melanoma_ml.training.train import train_fold

    clean = load_configured_data(config.data, default_source_dir=default_source).clean
    folds = assign_folds(clean, config.data.n_folds, config.data.fold_seed)
    cache = build_image_cache(folds, workdir / "cache", config.data.image_size)
    result = train_fold(config, BACKBONE, FOLD, folds, cache, workdir / "checkpoint")
    print(
        f"  trained {BACKBONE} fold {FOLD}: {result.n_train} train / {result.n_val} val images, "
        f"best epoch {result.best_epoch}, val AUROC {result.best_val_auroc:.3f}"
    )
    net, spec, _ = load_checkpoint(result.checkpoint_dir)
    return folds, cache, net, spec


def outputs(net: torch.nn.Module, spec: ModelSpec, images: list) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, logits) the serving way; ``images`` are paths (decoded as the app decodes an upload)
    or uint8 arrays, 64 at a time."""
    missing = spec.encoder.encode_one(None, None, None)
    feats, logits = [], []
    for start in range(0, len(images), 64):
        chunk = [
            img if isinstance(img, np.ndarray) else load_resized(img, spec.image_size)
            for img in images[start : start + 64]
        ]
        x = preprocess(chunk, spec)
        f, z = network_outputs(net, x, torch.from_numpy(np.stack([missing] * len(chunk))))
        feats.append(f)
        logits.append(z)
    return np.concatenate(feats), np.concatenate(logits)


def auroc_ci(inside: np.ndarray, outside: np.ndarray, n_boot: int, rng: np.random.Generator) -> str:
    y = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    point = roc_auc_score(y, np.r_[inside, outside])
    boots = [
        roc_auc_score(y, np.r_[rng.choice(inside, len(inside)), rng.choice(outside, len(outside))])
        for _ in range(n_boot)
    ]
    low, high = np.quantile(boots, [0.025, 0.975])
    return f"{point:.3f} [{low:.3f}, {high:.3f}]"


def run_experiment(name: str, args: argparse.Namespace, workdir: Path, sets: dict, rng: np.random.Generator):
    overrides = {
        "artifact_root": str(workdir),
        "data": {"image_size": args.image_size, "n_folds": 3},
        "model": {"pretrained": False},
        "training": {
            "epochs": args.epochs,
            "batch_size": 32,
            "accelerator": "cpu",
            "devices": 1,
            "num_workers": 0,
            "seed": args.seed,
        },
    }
    synthetic_cfg = SyntheticConfig(n_patients=args.n_patients, image_size=128, seed=args.seed)
    default_syn = generate_synthetic_dataset(workdir / "synthetic_default", synthetic_cfg)
    second = synthetic_cfg.model_copy(update={"domain": synthetic_domain("second_clinic")})
    second_syn = generate_synthetic_dataset(workdir / "synthetic_second_clinic", second)
    if name == "synthetic":
        config, default_source = load_config("tiny", overrides), default_syn.root
    else:
        overrides["data"] |= {"source_dir": str(args.isic_dir), "layout": "auto"}
        config, default_source = load_config("tiny", overrides), None
    print(f"\n== trained on {name} ({workdir}) ==")
    folds, cache, net, spec = train_tiny(config, default_source, workdir)

    train_rows = folds[(folds[schema.FOLD] != FOLD)]
    val_rows = folds[(folds[schema.FOLD] == FOLD) & ~folds[schema.IS_EXTERNAL]]
    started = time.perf_counter()
    maha = fit_bundle_ood(
        net, spec, train_rows, cache, seed=args.seed, quantile=args.quantile, max_images=args.max_fit_images
    )
    maha_seconds = time.perf_counter() - started
    _, train_z = outputs(net, spec, list(train_rows[schema.IMAGE_PATH]))
    energy = EnergyScorer.fit(train_z, quantile=args.quantile)
    print(
        f"  Mahalanobis fitted by fit_bundle_ood on {maha.n_fit} training images ({maha.dim}-d embeddings) "
        f"in {maha_seconds:.1f} s; energy threshold on {len(train_z)}"
    )

    val_names = set(val_rows[schema.IMAGE])
    shifted: dict[str, list] = {}
    if name == "synthetic":
        shifted["second_clinic (val patients)"] = [
            second_syn.image_dir / f"{n}.jpg" for n in sorted(val_names)
        ]
        shifted["real HAM10000 sample"] = sets["isic"]
    else:
        table = pd.read_csv(default_syn.csv_path)
        shifted["synthetic default"] = [default_syn.image_dir / f"{n}.jpg" for n in table[schema.IMAGE]]
        shifted["synthetic second_clinic"] = [second_syn.image_dir / f"{n}.jpg" for n in table[schema.IMAGE]]

    inside_f, inside_z = outputs(net, spec, list(val_rows[schema.IMAGE_PATH]))
    inside = {"mahalanobis": maha.score(inside_f), "energy": energy.score(inside_z)}
    rows = [
        (
            "in-dist held out (val fold)",
            "ID",
            len(inside_f),
            "-",
            "-",
            *_flag_rates(maha, energy, inside_f, inside_z),
        )
    ]
    groups = [("shifted", shifted), ("OOD", {k: v for k, v in sets.items() if k != "isic"})]
    ood_pooled = {"mahalanobis": [], "energy": []}
    for kind, named in groups:
        for set_name, images in named.items():
            if not images:
                continue
            f, z = outputs(net, spec, images)
            scores = {"mahalanobis": maha.score(f), "energy": energy.score(z)}
            if kind == "OOD":
                for key in ood_pooled:
                    ood_pooled[key].append(scores[key])
            rows.append(
                (
                    set_name,
                    kind,
                    len(f),
                    auroc_ci(inside["mahalanobis"], scores["mahalanobis"], args.n_bootstrap, rng),
                    auroc_ci(inside["energy"], scores["energy"], args.n_bootstrap, rng),
                    *_flag_rates(maha, energy, f, z),
                )
            )
    pooled = {k: np.concatenate(v) for k, v in ood_pooled.items()}
    rows.append(
        (
            "all OOD sets pooled",
            "OOD",
            len(pooled["mahalanobis"]),
            auroc_ci(inside["mahalanobis"], pooled["mahalanobis"], args.n_bootstrap, rng),
            auroc_ci(inside["energy"], pooled["energy"], args.n_bootstrap, rng),
            f"{(pooled['mahalanobis'] > maha.threshold).mean():.0%}",
            f"{(pooled['energy'] > energy.threshold).mean():.0%}",
        )
    )
    header = (
        "set",
        "kind",
        "n",
        "AUROC mahalanobis [95% CI]",
        "AUROC energy [95% CI]",
        "flagged maha",
        "flagged energy",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row) + " |")


def _flag_rates(maha, energy, f, z) -> tuple[str, str]:
    return f"{maha.flags(f).mean():.1%}", f"{energy.flags(z).mean():.1%}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    isic: list[Path] = []
    if (args.isic_dir / "images").is_dir():
        isic = sorted((args.isic_dir / "images").glob("*.jpg"))
        isic = [isic[i] for i in sorted(rng.choice(len(isic), min(args.max_isic, len(isic)), replace=False))]
    elif args.train_on in ("isic", "both"):
        print(f"{args.isic_dir} has no images/ folder: the real-image experiment is skipped")
    sets = {
        "isic": isic,
        "sample photos + crops (skimage/sklearn/mpl)": sample_photos(rng),
        "uniform noise": noise_images(rng),
        "text on white": text_images(rng),
        "flat colour": flat_images(rng),
    }
    experiments = ["synthetic", "isic"] if args.train_on == "both" else [args.train_on]
    if not isic:
        experiments = [e for e in experiments if e != "isic"]
    with tempfile.TemporaryDirectory(prefix="ood_") as tmp:
        root = args.workdir or Path(tmp)
        for name in experiments:
            run_experiment(name, args, root / name, sets, rng)
    print(
        f"\ncommand: python {' '.join(sys.argv)}; {time.perf_counter() - started:.0f} s; torch threads {torch.get_num_threads()}"
    )
    return 0


if __name__ == "__main__":
    with machine_load():
        code = main()
    raise SystemExit(code)
