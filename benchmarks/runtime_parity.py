"""Parity of every serving runtime/precision with eager fp32 on a finished pipeline run's out-of-fold rows.

For each fold checkpoint of ``--backbone`` under ``--artifact-root`` it scores the fold's own validation
images (from the image cache the fold was trained on; metadata from the run's folds table) with 8-view
dihedral TTA (the library's ``inference.view_logits`` and ``average_members``, as a served bundle does), once with eager fp32 PyTorch and once with
each offered runtime/precision (``melanoma_ml.serving.runtimes``; int8 is calibrated on
``--calibration-images`` of the fold's own training images). Pooled over folds it prints, per runtime:

* the largest |probability difference| from eager fp32 over every view, and over the TTA means;
* the pooled OOF AUC of eager fp32 and of the runtime, and their paired difference with a
  cluster-bootstrap CI (``evaluation.compare.paired_auc_difference``: the same patient/lesion clusters
  resampled for both);
* ms per image for its 8 views (one call, batch 8, median of ``--timing-repeats``, ``--threads`` threads);
* whether it qualifies as the default: the difference CI lies within +-0.002 (issue 12's rule).

It also checks that eager fp32 on the un-augmented view reproduces the stored OOF probabilities (the
cache, normalisation and metadata encoding are the ones training used).

Usage::

    .venv/bin/python benchmarks/runtime_parity.py --artifact-root artifacts [--backbone efficientnet_b0]
        [--threads 2] [--calibration-images 64] [--n-bootstrap 1000] [--max-images-per-fold N] [--csv OUT]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _common import machine_load, median_seconds, open_run

from melanoma_ml import schema
from melanoma_ml.config import RUNTIME_PRECISIONS, EvaluationConfig
from melanoma_ml.evaluation.compare import paired_auc_difference
from melanoma_ml.images.cache import ImageCache
from melanoma_ml.serving.inference import N_VIEWS, average_members, dihedral_views, view_logits
from melanoma_ml.serving.network_inputs import normalize
from melanoma_ml.serving.runtimes import REFERENCE, RuntimeChoice, export_runtime, load_logits_fn
from melanoma_ml.spec import ModelSpec
from melanoma_ml.training.checkpoint import load_checkpoint
from melanoma_ml.training.train import PROB, split_fold

DEFAULT_MARGIN = 0.002
"""A runtime is offered as the default only if its AUC difference CI lies within +-this (issue 12)."""
BATCH_IMAGES = 16
LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Scores:
    """One runtime's scores, pooled over folds."""

    view_probs: list[np.ndarray] = field(default_factory=list)  # (8 * n,) per fold, view-major per batch
    tta_probs: list[np.ndarray] = field(default_factory=list)  # (n,) per fold
    ms_per_image: list[float] = field(default_factory=list)  # one median per fold
    note: str = ""


def offered_choices() -> list[RuntimeChoice]:
    """Every offered runtime/precision but the reference; openvino only when it is installed."""
    choices = []
    for runtime, precisions in RUNTIME_PRECISIONS.items():
        if runtime == "openvino":
            try:
                import openvino  # noqa: F401
            except ImportError:
                print("openvino: skipped, not installed (optional: pip install openvino)")
                continue
        choices += [RuntimeChoice(runtime, p) for p in precisions if RuntimeChoice(runtime, p) != REFERENCE]
    return choices


def images_and_meta(
    rows: pd.DataFrame, cache: ImageCache, pixels: np.ndarray, spec: ModelSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised ``(n, 3, S, S)`` images of ``rows`` from the cache and their encoded metadata."""
    x = normalize(np.asarray(pixels[cache.rows_for(rows[schema.IMAGE])]), spec)
    meta = torch.from_numpy(np.ascontiguousarray(spec.encoder.transform(rows), dtype=np.float32))
    return x, meta


def score(fn: LogitsFn, x: torch.Tensor, meta: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-view probabilities ``(8, n)`` and TTA means ``(n,)``, in batches of ``BATCH_IMAGES`` images, through
    the library's TTA path (``view_logits``: all views in one call; ``average_members``: the view mean)."""
    views, means = [], []
    for start in range(0, x.shape[0], BATCH_IMAGES):
        logits = view_logits(fn, x[start : start + BATCH_IMAGES], meta[start : start + BATCH_IMAGES])
        views.append(torch.sigmoid(logits.double()).numpy())
        means.append(average_members([logits], "probability").double().numpy())
    return np.concatenate(views, axis=1), np.concatenate(means)


def ms_per_image(fn: LogitsFn, x: torch.Tensor, meta: torch.Tensor, repeats: int) -> float:
    """Median ms of one call on the 8 views of one image (after one warm-up call)."""
    views, view_meta = dihedral_views(x[:1]), meta[:1].repeat(N_VIEWS, 1)
    return 1000 * median_seconds(lambda: fn(views, view_meta), repeats, warmup=1)


def calibration_views(
    train_rows: pd.DataFrame, n: int, seed: int, cache: ImageCache, pixels: np.ndarray, spec: ModelSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    picked = train_rows.sample(n=min(n, len(train_rows)), random_state=seed)
    x, meta = images_and_meta(picked, cache, pixels, spec)
    return dihedral_views(x), meta.repeat(N_VIEWS, 1)


def run(args: argparse.Namespace) -> pd.DataFrame:
    finished = open_run(Path(args.artifact_root).expanduser())
    paths, table = finished.paths, finished.folds_table()
    torch.set_num_threads(args.threads)
    choices = offered_choices()
    scores = {REFERENCE: Scores(), **{c: Scores() for c in choices}}
    oofs, reproduce_gap = [], 0.0
    for result in finished.fold_results(args.backbone):
        if args.folds is not None and result.fold not in args.folds:
            continue
        net, spec, _ = load_checkpoint(result.checkpoint_dir)
        net = net.eval().requires_grad_(False)
        cache = ImageCache.open(paths.cache(spec.image_size))
        pixels = cache.array()
        oof = result.oof if args.max_images_per_fold is None else result.oof.head(args.max_images_per_fold)
        rows = table.set_index(schema.IMAGE).loc[oof[schema.IMAGE]].reset_index()
        x, meta = images_and_meta(rows, cache, pixels, spec)
        train_rows, _ = split_fold(table, result.fold)
        calibration = calibration_views(train_rows, args.calibration_images, result.fold, cache, pixels, spec)
        print(f"fold {result.fold}: {len(rows)} validation images, {spec.image_size} px", flush=True)
        exported: dict[str, tuple[str, str] | None] = {}  # openvino runs onnxruntime's files: export once
        with tempfile.TemporaryDirectory(prefix="runtime-parity-") as tmp:
            for choice, bucket in scores.items():
                try:
                    if not choice.needs_file or choice.precision not in exported:
                        file = export_runtime(
                            net, spec, Path(tmp), f"fold{result.fold}", choice, calibration=calibration
                        )
                    if choice.needs_file:
                        file = exported.setdefault(choice.precision, file)
                    fn = load_logits_fn(Path(tmp), choice, file, net, threads=args.threads)
                except Exception as err:  # one runtime that cannot export this model is reported, not fatal
                    bucket.note = f"failed: {type(err).__name__}: {err}"[:120]
                    print(f"  {choice}: {bucket.note}", flush=True)
                    continue
                views, means = score(fn, x, meta)
                bucket.view_probs.append(views.reshape(-1))
                bucket.tta_probs.append(means)
                bucket.ms_per_image.append(ms_per_image(fn, x, meta, args.timing_repeats))
                if choice == REFERENCE:
                    reproduce_gap = max(reproduce_gap, float(np.abs(views[0] - oof[PROB].to_numpy()).max()))
        oofs.append(oof)
    print(f"eager fp32 un-augmented view vs the stored OOF probabilities: max |diff| {reproduce_gap:.2g}")
    return summarise(pd.concat(oofs, ignore_index=True), scores, args)


def summarise(
    oof: pd.DataFrame, scores: dict[RuntimeChoice, Scores], args: argparse.Namespace
) -> pd.DataFrame:
    reference = scores[REFERENCE]
    ref_views, ref_tta = np.concatenate(reference.view_probs), np.concatenate(reference.tta_probs)
    eager = oof.assign(**{PROB: ref_tta})
    evaluation = EvaluationConfig(n_bootstrap=args.n_bootstrap)
    out = []
    for choice, bucket in scores.items():
        row: dict[str, object] = {"runtime": str(choice), "note": bucket.note}
        if len(bucket.tta_probs) != len(reference.tta_probs):
            out.append(row)
            continue
        tta = np.concatenate(bucket.tta_probs)
        diff = paired_auc_difference(
            oof.assign(**{PROB: tta}), eager, evaluation, names=(str(choice), "eager")
        )
        row.update(
            max_view_gap=float(np.abs(np.concatenate(bucket.view_probs) - ref_views).max()),
            max_tta_gap=float(np.abs(tta - ref_tta).max()),
            auc_eager=diff["auc_b"],
            auc=diff["auc_a"],
            auc_diff=diff["diff"],
            diff_lo=diff["lo"],
            diff_hi=diff["hi"],
            ms_per_image=float(np.median(bucket.ms_per_image)),
            default_ok=bool(diff["lo"] >= -DEFAULT_MARGIN and diff["hi"] <= DEFAULT_MARGIN),
        )
        out.append(row)
    frame = pd.DataFrame(out)
    frame["vs_eager"] = frame["ms_per_image"].rdiv(frame["ms_per_image"].iloc[0])
    return frame


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact-root", required=True, help="artifact root of a finished pipeline run")
    parser.add_argument("--backbone", default="efficientnet_b0")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--calibration-images", type=int, default=64, help="training images per fold (int8)")
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    parser.add_argument("--timing-repeats", type=int, default=7)
    parser.add_argument("--folds", type=int, nargs="+", default=None, help="only these folds (default: all)")
    parser.add_argument("--max-images-per-fold", type=int, default=None, help="first N validation rows only")
    parser.add_argument("--csv", type=Path, default=None, help="also write the table to this CSV file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with machine_load():
        frame = run(args)
        print_table(frame, args)
    if args.csv is not None:
        frame.to_csv(args.csv, index=False)
    return 0


def print_table(frame: pd.DataFrame, args: argparse.Namespace) -> None:
    n = "all" if args.max_images_per_fold is None else f"first {args.max_images_per_fold}"
    print(
        f"\n{args.backbone}, {n} validation images of every fold, 8-view TTA, {args.threads} threads; AUC "
        f"difference = runtime - eager fp32 with a {args.n_bootstrap}-resample paired cluster bootstrap 95% CI; "
        f"default_ok: CI within +-{DEFAULT_MARGIN}"
    )
    with pd.option_context(
        "display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4g}".format
    ):
        print(frame.to_string(index=False))


if __name__ == "__main__":
    sys.exit(main())
