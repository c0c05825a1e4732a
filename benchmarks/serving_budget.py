"""The served budget, members x views: locked-test AUC with a paired CI against 5x8, and latency per image.

For each row (``--rows``, default 1x8 3x8 5x8 5x2 5x1 3x1: members x dihedral views per member):

* **AUC** on the locked test split of a finished run (``--artifact-root``) whose promoted bundle is a fold
  ensemble (``serving.ensemble: folds``, all k members): the first ``members`` members of that bundle (what
  ``serving.max_members`` promotes: the best fold by validation AUROC, then the others by fold) averaged
  over ``views`` views (``serving.views``: ``network_inputs.VIEW_SUBSETS``), calibrated by the bundle's
  calibrator (fitted on the full ensemble's out-of-fold rows: an approximation for smaller rows; AUC moves
  only where the calibrator ties scores). The test images are decoded as ``predict`` decodes them and
  scored once by ``inference.members_view_logits`` at 8 views; each row takes its members and views of
  that table and averages them with ``inference.average_members``. The printed self-check is each row's
  largest difference from ``inference.score`` on a bundle of just those members (the app's function). The
  difference to the reference row (most members, most views: 5x8) has a paired patient-bootstrap CI
  (``evaluation.paired_auc_difference``: the same resampled patients for both).
* **Latency** per image of the served path: a random-weight bundle of ``--latency-backbone`` (default
  efficientnet_b0 at 256 px) with ``members`` fold members, exported as promotion exports it
  (``serving.runtime: auto``: the members in one merged ONNX Runtime graph), timed per request as the app
  serves one upload: decode a 600x450 JPEG (``images.cache.load_resized``), then ``inference.score`` with
  ``views``; p50/p95 of ``--requests`` requests after ``--warmup``, and p50 as a ratio to the 1x8 row (one
  network, 8 views). ``--separate`` adds rows with one ONNX Runtime session per member (the layout before
  members were merged) for the largest member count.

One run, no repeats: the load average before and after is printed; rerun on an idle machine before
quoting a latency. ``--dry-run`` checks the script end to end on a CPU: it trains a tiny synthetic run
with as many folds as the rows need in a temporary folder and times ``test_efficientnet`` at 64 px (torch
unless ``--latency-runtime`` says otherwise).

Usage::

    .venv/bin/python benchmarks/serving_budget.py --artifact-root /tmp/real_isic/accept
        [--rows 1x8 3x8 5x8 5x2 5x1 3x1] [--latency-backbone efficientnet_b0:256] [--requests 30]
        [--warmup 3] [--n-bootstrap 1000] [--separate] [--csv budget.csv] [--test-set ph2] [--dry-run]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import load_average, machine_load, open_run, percentiles, random_bundle, upload  # noqa: E402

from melanoma_ml.runtime import quiet_network_chatter  # noqa: E402

quiet_network_chatter()

DEFAULT_ROWS = ("1x8", "3x8", "5x8", "5x2", "5x1", "3x1")
SCORE_BATCH = 32
"""Test images per ``members_view_logits`` call (x 8 views per member)."""


@dataclasses.dataclass(frozen=True)
class Budget:
    members: int
    views: int

    @property
    def label(self) -> str:
        return f"{self.members}x{self.views}"


def parse_rows(texts: Sequence[str]) -> list[Budget]:
    """``["5x8", ...]`` as budgets; views must be a ``VIEW_SUBSETS`` size."""
    from melanoma_ml.serving.network_inputs import VIEW_SUBSETS

    rows = []
    for text in texts:
        members, _, views = text.partition("x")
        if not (members.isdigit() and views.isdigit()) or int(members) < 1 or int(views) not in VIEW_SUBSETS:
            raise SystemExit(
                f"--rows {text!r}: write MEMBERSxVIEWS, e.g. 5x8, with views one of {sorted(VIEW_SUBSETS)}"
            )
        rows.append(Budget(int(members), int(views)))
    return rows


# ---------------------------------------------------------------- AUC on the locked test split


def test_rows_and_images(run, size: int, test_set: str) -> tuple[Any, list, list[dict[str, Any]]]:
    """The rows of ``test_set`` (the locked split, ``internal``, or a ``data.test_sources`` name) of ``run``,
    their images decoded as ``predict`` decodes them, their metadata."""
    from melanoma_ml.evaluation.holdout import INTERNAL_TEST, untouched_test_sets
    from melanoma_ml.features import metadata_dict
    from melanoma_ml.images.cache import load_resized

    sets, _ = untouched_test_sets(run.config, run.folds_table())
    if test_set != INTERNAL_TEST and test_set not in sets:
        raise SystemExit(f"--test-set {test_set!r} is not a test set of {run.paths.root}: {sorted(sets)}")
    if test_set not in sets:
        raise SystemExit(
            f"the run under {run.paths.root} has no locked test split (data.test_fraction was 0): nothing to "
            "measure AUC on; pass a run trained with a test split"
        )
    rows = sets[test_set]
    if rows["target"].nunique() < 2:
        raise SystemExit(f"test set {test_set} of {run.paths.root} holds one class only: no AUC")
    images = [
        load_resized(str(p), size, max_pixels=run.config.serving.max_image_pixels) for p in rows["image_path"]
    ]
    return rows, images, [metadata_dict(r) for r in rows.itertuples(index=False)]


def view_logit_table(bundle, images: list, metadata: list[dict[str, Any]]):
    """Each member's ``(8, n)`` view logits of the test images: one pass, every member, all 8 views."""
    import torch

    from melanoma_ml.serving.inference import members_view_logits, shared_preprocess
    from melanoma_ml.serving.network_inputs import N_VIEWS, encode_metadata

    encoded = [encode_metadata(metadata, s.spec, len(images)) for s in bundle.scorers]
    parts = []
    for start in range(0, len(images), SCORE_BATCH):
        chunk, cache = images[start : start + SCORE_BATCH], {}
        inputs = [
            (shared_preprocess(cache, chunk, s.spec, start), meta[start : start + SCORE_BATCH])
            for s, meta in zip(bundle.scorers, encoded, strict=True)
        ]
        parts.append(members_view_logits(bundle.scorers, inputs, N_VIEWS))
    return [torch.cat([part[m] for part in parts], dim=1) for m in range(len(bundle.scorers))]


def row_probabilities(bundle, table, budget: Budget):
    """Served probabilities of ``budget`` from the logit table: its members, its views, averaged and
    calibrated as ``inference.score`` does."""
    from melanoma_ml.serving.calibrated import served_probabilities
    from melanoma_ml.serving.inference import average_members
    from melanoma_ml.serving.network_inputs import VIEW_SUBSETS

    kept = list(VIEW_SUBSETS[budget.views])
    logits = [member[kept] for member in table[: budget.members]]
    raw = average_members(logits, bundle.manifest.ensemble.average).numpy()
    return served_probabilities(bundle.manifest, raw)


def served_gap(bundle, images, metadata, table, budget: Budget, n: int = 8) -> float:
    """Largest |row probability - ``inference.score`` on a bundle of the row's members| on ``n`` images."""
    import numpy as np

    from melanoma_ml.serving.inference import score

    members = dataclasses.replace(bundle, scorers=bundle.scorers[: budget.members])
    served = score(members, images[:n], metadata[:n], views=budget.views).prob
    ours = row_probabilities(bundle, [t[:, :n] for t in table], budget)
    return float(np.max(np.abs(served - ours)))


def auc_rows(run, rows: list[Budget], n_bootstrap: int, test_set: str) -> dict[str, dict[str, Any]]:
    """Per row: ``auc``, its paired difference to the reference row with CI, and the self-check."""
    from melanoma_ml import schema
    from melanoma_ml.evaluation import paired_auc_difference

    bundle = run.served_bundle()
    n_members = len(bundle.scorers)
    most = max(r.members for r in rows)
    if n_members < most:
        raise SystemExit(
            f"the served bundle {bundle.version} averages {n_members} member(s) ({bundle.manifest.describe_model()}); "
            f"the rows need {most}: promote a fold ensemble of at least {most} folds (serving.ensemble: folds, "
            "data.n_folds) or pass smaller --rows"
        )
    test, images, metadata = test_rows_and_images(run, bundle.spec.image_size, test_set)
    print(
        f"AUC: bundle {bundle.version} ({bundle.manifest.describe_model()}, {bundle.spec.image_size} px, "
        f"runtime {bundle.manifest.runtime.runtime if bundle.manifest.runtime else 'torch'}), test set {test_set}: "
        f"{len(test)} images of {test[schema.GROUP].nunique()} patients, {int(test['target'].sum())} melanoma"
    )
    started = time.perf_counter()
    table = view_logit_table(bundle, images, metadata)
    print(
        f"scored {len(images)} test images x {n_members} members x 8 views in {time.perf_counter() - started:.1f} s"
    )
    reference = max(rows, key=lambda r: (r.members, r.views))
    evaluation = run.config.evaluation.model_copy(update={"n_bootstrap": n_bootstrap})
    frame = test[[schema.IMAGE, schema.GROUP, "target"]].reset_index(drop=True)
    probs = {r.label: row_probabilities(bundle, table, r) for r in rows}
    out = {}
    for r in rows:
        diff = paired_auc_difference(
            frame.assign(prob=probs[r.label]),
            frame.assign(prob=probs[reference.label]),
            evaluation,
            names=(r.label, reference.label),
        )
        out[r.label] = {
            "auc": diff["auc_a"],
            "diff": diff["diff"],
            "diff_lo": diff["lo"],
            "diff_hi": diff["hi"],
            "ci_includes_0": diff["lo"] <= 0 <= diff["hi"],
            "check_vs_score": served_gap(bundle, images, metadata, table, r),
            "reference": reference.label,
            "ci_level": diff["ci_level"],
            "n_bootstrap": diff["n_bootstrap"],
        }
    return out


# ---------------------------------------------------------------- latency of the served path


def latency_rows(
    rows: list[Budget],
    backbone: str,
    size: int,
    runtime: str,
    requests: int,
    warmup: int,
    separate: bool,
    work: Path,
) -> dict[str, dict[str, Any]]:
    """Per row (and ``<row> separate`` rows): p50/p95 ms per request of decode + ``inference.score``."""
    from melanoma_ml.images.cache import load_resized
    from melanoma_ml.serving.inference import score
    from melanoma_ml.serving.registry import ModelRegistry

    jpeg = upload(work / "upload.jpg")
    record = {"age": 55, "sex": "female", "site": None}
    out: dict[str, dict[str, Any]] = {}
    bundles = {}
    for members in sorted({r.members for r in rows}):
        root = work / f"{backbone}-{members}-registry"
        started = time.perf_counter()
        random_bundle(root, backbone, size, members=members, runtime=runtime, tolerance=1e-3)
        bundle = ModelRegistry(root).load_current()
        layout = describe_layout(bundle)
        print(
            f"latency bundle: {members} x {backbone} at {size} px, {layout} (built in {time.perf_counter() - started:.0f} s)"
        )
        bundles[members] = bundle
    timed = [(r.label, bundles[r.members], r.views) for r in rows]
    if separate:
        most = max(r.members for r in rows)
        alone = separate_sessions(bundles[most], work / "separate")
        timed += [(f"{r.label} separate", alone, r.views) for r in rows if r.members == most]
    for label, bundle, views in timed:

        def once(bundle=bundle, views=views) -> None:
            view = load_resized(str(jpeg), bundle.spec.image_size)
            score(bundle, [view], [record], views=views)

        for _ in range(warmup):
            once()
        seconds = []
        for _ in range(requests):
            start = time.perf_counter()
            once()
            seconds.append(time.perf_counter() - start)
        p50, p95 = percentiles(seconds)
        out[label] = {"p50_ms": p50, "p95_ms": p95, "layout": describe_layout(bundle)}
    return out


def describe_layout(bundle) -> str:
    """How the bundle's members run: ``1 merged ONNX Runtime session``, ``5 ONNX Runtime sessions``, ..."""
    merged = {id(s.merged.runner) for s in bundle.scorers if s.merged is not None}
    alone = [s for s in bundle.scorers if s.merged is None]
    parts = []
    if merged:
        parts.append(
            f"{sum(s.merged is not None for s in bundle.scorers)} members in {len(merged)} merged ONNX Runtime session"
        )
    if alone:
        runtimes = [
            m.runtime.runtime if m.runtime else "torch"
            for m, s in zip(bundle.manifest.ensemble.members, bundle.scorers, strict=True)
            if s.merged is None
        ]
        parts.append(f"{len(alone)} member(s) alone ({', '.join(sorted(set(runtimes)))})")
    return "; ".join(parts)


def separate_sessions(bundle, folder: Path):
    """``bundle`` with one ONNX Runtime session per member (each member exported alone), to compare."""
    from melanoma_ml.serving.bundle import Scorer
    from melanoma_ml.serving.runtimes import RuntimeChoice, export_onnx, load_logits_fn
    from melanoma_ml.weights import load_weights

    folder.mkdir(parents=True, exist_ok=True)
    scorers = []
    for index, member in enumerate(bundle.manifest.ensemble.members):
        net = load_weights(member.model_spec, bundle.path / member.weights.name).eval()
        name = f"member{index}.onnx"
        sha256 = export_onnx(net, member.model_spec, folder / name)
        logits = load_logits_fn(folder, RuntimeChoice("onnxruntime", "fp32"), (name, sha256), net)
        scorers.append(Scorer(member.model_spec, logits))
    return dataclasses.replace(bundle, scorers=tuple(scorers))


# ---------------------------------------------------------------- a tiny run for --dry-run


def tiny_run(root: Path, n_folds: int) -> Path:
    """A synthetic ``n_folds``-fold run with a locked test split, trained for one epoch and promoted (torch)."""
    from melanoma_ml.config import load_config
    from melanoma_ml.pipeline import run_all

    config = load_config(
        "tiny",
        {
            "artifact_root": str(root),
            "data": {"n_folds": n_folds, "test_fraction": 0.25, "synthetic": {"n_patients": 60}},
            "training": {"epochs": 1},
            "evaluation": {"promotion_auc_floor": 0.0},
        },
    )
    run_all(config, progress=lambda message: None)
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--artifact-root", type=Path, default=None, help="finished run with a promoted fold ensemble"
    )
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), help="MEMBERSxVIEWS budgets")
    parser.add_argument(
        "--latency-backbone", default=None, help="backbone:px of the timed bundles (efficientnet_b0:256)"
    )
    parser.add_argument(
        "--requests", type=int, default=None, help="timed requests per row (30; 3 in --dry-run)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed requests first (3; 1 in --dry-run)")
    parser.add_argument(
        "--n-bootstrap",
        type=int,
        default=None,
        help="patient resamples of the paired CI (1000; 50 in --dry-run)",
    )
    parser.add_argument(
        "--separate", action="store_true", help="also time one ONNX Runtime session per member"
    )
    parser.add_argument("--csv", type=Path, default=None, help="write the table here too")
    parser.add_argument(
        "--test-set",
        default="internal",
        help="whose AUC: 'internal' (the locked split, default) or a data.test_sources name, e.g. ph2",
    )
    parser.add_argument(
        "--latency-runtime",
        default=None,
        help="serving.runtime of the timed bundles (default auto; torch in --dry-run)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny synthetic run (as many folds as --rows need), test_efficientnet:64",
    )
    args = parser.parse_args(argv)
    if args.artifact_root is None and not args.dry_run:
        parser.error("pass --artifact-root (a finished run with a promoted fold ensemble) or --dry-run")

    rows = parse_rows(args.rows)
    dry = args.dry_run  # a dry run's defaults are small; what is passed is kept
    args.latency_backbone = args.latency_backbone or (
        "test_efficientnet:64" if dry else "efficientnet_b0:256"
    )
    args.latency_runtime = args.latency_runtime or ("torch" if dry else "auto")
    args.requests = args.requests or (3 if dry else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if dry else 3)
    args.n_bootstrap = args.n_bootstrap or (50 if dry else 1000)
    if not 1 <= args.requests <= 1000:
        parser.error("--requests must be between 1 and 1000")

    import torch

    backbone, _, size = args.latency_backbone.partition(":")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs visible, CPU only"
    )
    with machine_load(), tempfile.TemporaryDirectory(prefix="serving-budget-") as tmp:
        work = Path(tmp)
        most = max(r.members for r in rows)
        root = tiny_run(work / "run", max(2, most)) if args.dry_run else args.artifact_root
        auc = auc_rows(open_run(root), rows, args.n_bootstrap, args.test_set)
        print(f"load average after the AUC pass: {load_average()}")
        latency = latency_rows(
            rows,
            backbone,
            int(size or 256),
            args.latency_runtime,
            args.requests,
            args.warmup,
            args.separate,
            work,
        )
    report(rows, auc, latency, args)


def report(rows: list[Budget], auc: dict, latency: dict, args: argparse.Namespace) -> None:
    import pandas as pd

    base = latency[rows[0].label]["p50_ms"] if "1x8" not in latency else latency["1x8"]["p50_ms"]
    reference = next(iter(auc.values()))["reference"]
    level = next(iter(auc.values()))["ci_level"]
    table = []
    for label, timing in latency.items():
        row = auc.get(label.split()[0], {})
        table.append(
            {
                "budget": label,
                "auc": row.get("auc"),
                f"diff_vs_{reference}": row.get("diff"),
                "diff_lo": row.get("diff_lo"),
                "diff_hi": row.get("diff_hi"),
                "ci_includes_0": row.get("ci_includes_0"),
                "p50_ms": timing["p50_ms"],
                "p95_ms": timing["p95_ms"],
                "p50_vs_1x8": timing["p50_ms"] / base,
                "check_vs_score": row.get("check_vs_score"),
                "layout": timing["layout"],
            }
        )
    frame = pd.DataFrame(table)
    print()
    print(
        f"members x views | test AUC | AUC - {reference} [{level:.0%} paired patient-bootstrap CI] | "
        f"p50 ms | p95 ms | p50 / 1x8 | max |row - inference.score|"
    )
    for r in table:
        auc_text = "" if r["auc"] is None else f"{r['auc']:.4f}"
        diff = r[f"diff_vs_{reference}"]
        diff_text = "" if diff is None else f"{diff:+.4f} [{r['diff_lo']:+.4f}, {r['diff_hi']:+.4f}]"
        check = "" if r["check_vs_score"] is None else f"{r['check_vs_score']:.1e}"
        print(
            f"{r['budget']:<14} | {auc_text:>8} | {diff_text:>27} | {r['p50_ms']:8.1f} | {r['p95_ms']:8.1f} | "
            f"{r['p50_vs_1x8']:5.2f}x | {check}"
        )
    print(
        f"\n{args.latency_backbone} random weights, one request = decode a 600x450 JPEG + inference.score; "
        f"{args.requests} requests after {args.warmup} warm-up. Target: p50 <= 1.5x 1x8 with a CI that includes 0."
    )
    if args.csv is not None:
        frame.to_csv(args.csv, index=False)
        print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
