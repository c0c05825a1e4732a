"""Test-set evaluation: each backbone and its served fold model scored on data nothing was tuned on.

Two models per backbone, on the locked test split (``internal``) and on each external test set:

* ``ensemble``: the backbone's k fold models, their test probabilities averaged (arithmetic mean in
  probability space), at the threshold tuned on the backbone's pooled out-of-fold predictions;
* ``served``: the fold model a promotion would serve (``served_fold``: best validation AUROC), at the
  threshold its bundle carries (tuned on that fold's own validation rows).

Both thresholds are fixed BEFORE the test rows are seen and never re-tuned on them
(``evaluate_predictions(threshold=...)``). Each result carries the out-of-fold AUC of the same model and
the optimism gap ``oof AUC - test AUC``. Nothing here picks a model: ranking and the promotion gate read
out-of-fold numbers only. numpy/pandas only; the pipeline step does the predicting.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from melanoma_ml import schema
from melanoma_ml.atomic import atomic_write_json, to_jsonable
from melanoma_ml.config import EvaluationConfig
from melanoma_ml.evaluation.estimate import Estimate
from melanoma_ml.evaluation.inputs import BACKBONE, PROB
from melanoma_ml.evaluation.report import FIXED_THRESHOLD_SETTING as _FIXED
from melanoma_ml.evaluation.report import EvaluationReport, evaluate_predictions
from melanoma_ml.evaluation.threshold import threshold_for_sensitivity

if TYPE_CHECKING:
    from melanoma_ml.config import PipelineConfig
    from melanoma_ml.images.cache import ImageCache
    from melanoma_ml.training.train import FoldResult

INTERNAL_TEST = "internal"
"""Name of the locked test split (``data.test_fraction``) among the test sets."""

NO_TEST_NOTE = (
    "No untouched test set exists (data.test_fraction is 0 and no data.test_sources are set): every number "
    "is out-of-fold, measured on data that also chose the epoch, the threshold and the model."
)
SUMMARY_FILE = "test_evaluation.json"
PREDICTION_COLUMNS = (
    schema.IMAGE,
    schema.PATIENT,
    schema.GROUP,
    schema.TARGET,
    schema.SEX,
    schema.AGE,
    schema.SITE,
)

TABLE_COLUMNS = (
    "test_set", "model", "kind", "test_auc", "test_auc_lo", "test_auc_hi", "test_pauc", "sensitivity",
    "specificity", "threshold", "oof_auc", "optimism_gap", "n_images", "n_melanoma",
)  # fmt: skip
"""Columns of ``TestEvaluation.table``: ``TestResult.row`` keys."""

ModelKind = Literal["ensemble", "served"]


def served_fold(fold_results: Sequence[FoldResult]) -> FoldResult:
    """The fold model a promotion serves for a backbone: the one with the best validation AUROC."""
    return max(fold_results, key=lambda r: r.best_val_auroc)


@dataclass(frozen=True)
class TestResult:
    """One model scored on one test set.

    Attributes:
        backbone: The backbone.
        kind: ``ensemble`` (mean of the k fold models) or ``served`` (the served fold model).
        fold: The served fold (None for the ensemble).
        test_set: ``internal`` or an external test set's name.
        report: The test report (threshold fixed beforehand; patient-cluster bootstrap CIs).
        oof_auc: The same model's out-of-fold AUC (the ensemble: the backbone's pooled out-of-fold AUC).
    """

    __test__ = False  # not a pytest class

    backbone: str
    kind: ModelKind
    fold: int | None
    test_set: str
    report: EvaluationReport
    oof_auc: Estimate

    @property
    def model(self) -> str:
        return (
            f"{self.backbone} (fold-model mean)" if self.fold is None else f"{self.backbone} fold {self.fold}"
        )

    @property
    def test_auc(self) -> Estimate:
        return self.report.metric("auc")

    @property
    def optimism_gap(self) -> float:
        """Out-of-fold AUC minus test AUC (positive: the out-of-fold number was optimistic)."""
        return self.oof_auc.value - self.test_auc.value

    def row(self) -> dict[str, Any]:
        auc, pauc = self.test_auc, self.report.metric("pauc")
        sens, spec = self.report.metric("sensitivity"), self.report.metric("specificity")
        return {
            "test_set": self.test_set,
            "model": self.model,
            "kind": self.kind,
            "test_auc": auc.value,
            "test_auc_lo": auc.lo,
            "test_auc_hi": auc.hi,
            "test_pauc": pauc.value,
            "sensitivity": sens.value,
            "specificity": spec.value,
            "threshold": self.report.threshold.value,
            "oof_auc": self.oof_auc.value,
            "optimism_gap": self.optimism_gap,
            "n_images": self.report.n_images,
            "n_melanoma": self.report.n_melanoma,
        }


@dataclass(frozen=True)
class TestEvaluation:
    """Every model on every test set, plus what each test set held.

    Attributes:
        results: One ``TestResult`` per (backbone, kind, test set).
        test_sets: Per test set, its counts (rows scored, melanoma, rows excluded as training duplicates).
        notes: Why a test set was not scored (e.g. a single class), or :data:`NO_TEST_NOTE`.
    """

    __test__ = False  # not a pytest class

    results: list[TestResult]
    test_sets: dict[str, dict[str, int]]
    notes: list[str] = field(default_factory=list)

    @property
    def has_test(self) -> bool:
        return bool(self.results)

    def table(self) -> pd.DataFrame:
        """One row per result: test AUC [CI], sensitivity/specificity, threshold, OOF AUC and the gap."""
        return pd.DataFrame([r.row() for r in self.results], columns=list(TABLE_COLUMNS))

    def find(self, backbone: str, kind: ModelKind, test_set: str = INTERNAL_TEST) -> TestResult | None:
        for result in self.results:
            if (result.backbone, result.kind, result.test_set) == (backbone, kind, test_set):
                return result
        return None

    def headline(self, backbone: str, kind: ModelKind) -> TestResult | None:
        """The result shown first: the locked test split, else the first external test set scored."""
        found = self.find(backbone, kind)
        if found is not None:
            return found
        return next((r for r in self.results if (r.backbone, r.kind) == (backbone, kind)), None)

    def served_test_metrics(self, backbone: str) -> dict[str, dict[str, Any]] | None:
        """What a bundle of ``backbone``'s served fold stores as ``test_metrics`` (``manifest.TestMetrics``): per
        test set, ``metrics`` (``Estimate`` dicts), ``n_images``, ``n_melanoma``; None without a test set."""
        out = {
            r.test_set: {
                "metrics": r.report.to_dict()["metrics"],
                "n_images": r.report.n_images,
                "n_melanoma": r.report.n_melanoma,
            }
            for r in self.results
            if (r.backbone, r.kind) == (backbone, "served")
        }
        return out or None

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(
            {
                "rows": self.table().to_dict("records"),
                "test_sets": self.test_sets,
                "notes": self.notes,
                "reports": {f"{r.test_set}/{r.model}": r.report.figures for r in self.results},
            },
            "test evaluation",
        )

    def save(self, out_dir: Path) -> Path:
        return atomic_write_json(Path(out_dir) / SUMMARY_FILE, self.to_dict())


def prediction_table(rows: pd.DataFrame, probs: np.ndarray, backbone: str) -> pd.DataFrame:
    """A predictions table (``evaluate_predictions``'s input) for test ``rows`` and their probabilities."""
    frame = rows[[c for c in PREDICTION_COLUMNS if c in rows.columns]].reset_index(drop=True).copy()
    frame[PROB] = np.asarray(probs, dtype=np.float64)
    frame[BACKBONE] = backbone
    return frame


def evaluate_backbone_on_test(
    backbone: str,
    fold_results: Sequence[FoldResult],
    oof_report: EvaluationReport,
    test_set: str,
    rows: pd.DataFrame,
    fold_probs: Mapping[int, np.ndarray],
    config: EvaluationConfig,
    out_dir: Path | None = None,
) -> list[TestResult]:
    """The ensemble and the served fold model of ``backbone`` on one test set (see the module docstring).

    Args:
        fold_results: The backbone's k folds (their ``oof`` give the served fold's threshold and OOF AUC).
        oof_report: The backbone's out-of-fold report (its tuned threshold and AUC).
        rows: The test rows (``group_id``, ``target``, metadata).
        fold_probs: Fold -> that fold model's probabilities for ``rows``, in order.
        out_dir: Where the two reports (figures + ``report.json``) go: ``<out_dir>/<backbone>/{ensemble,
            fold<k>}``; nothing is written when None.
    """
    served = served_fold(fold_results)
    mean = np.mean([fold_probs[r.fold] for r in fold_results], axis=0)
    ensemble = evaluate_predictions(
        prediction_table(rows, mean, backbone),
        config,
        None if out_dir is None else out_dir / backbone / "ensemble",
        name=f"{backbone} (mean of {len(fold_results)} fold models) on test set {test_set}",
        threshold=oof_report.threshold.value,
    )
    served_oof = served.oof
    served_threshold = threshold_for_sensitivity(
        served_oof[schema.TARGET].to_numpy(), served_oof[PROB].to_numpy(), config.target_sensitivity
    )
    served_report = evaluate_predictions(
        prediction_table(rows, fold_probs[served.fold], backbone),
        config,
        None if out_dir is None else out_dir / backbone / f"fold{served.fold}",
        name=f"{backbone} fold {served.fold} (served model) on test set {test_set}",
        threshold=served_threshold,
    )
    return [
        TestResult(backbone, "ensemble", None, test_set, ensemble, oof_report.metric("auc")),
        TestResult(backbone, "served", served.fold, test_set, served_report, _served_oof_auc(served, config)),
    ]


def _served_oof_auc(served: FoldResult, config: EvaluationConfig) -> Estimate:
    """The served fold's AUC on its own validation rows (as its bundle reports it; point value only)."""
    from melanoma_ml.evaluation.metrics import roc_auc

    y, p = served.oof[schema.TARGET].to_numpy(), served.oof[PROB].to_numpy()
    return Estimate(roc_auc(y, p), math.nan, math.nan, config.ci_level)


def scorable(rows: pd.DataFrame) -> str:
    """Why ``rows`` cannot be scored (empty, or a single class), or "" when they can."""
    if rows.empty:
        return "no rows left to score"
    classes = set(pd.to_numeric(rows[schema.TARGET], errors="coerce").dropna().astype(int))
    if classes != {0, 1}:
        return f"a single class ({sorted(classes)}): AUC and sensitivity cannot be computed"
    return ""


def untouched_problems(
    tested: TestEvaluation, fold_results: Mapping[str, Sequence[FoldResult]], folds_table: pd.DataFrame
) -> tuple[list[str], dict[str, Any]]:
    """Did the locked test split stay locked? Problems, and the evidence counted.

    Checks, from the artifacts themselves: no test-split row is in any fold's training rows
    (``folds.split_masks``) or any fold model's out-of-fold predictions (which tuned the epoch, the
    threshold and the ranking), and every test report's threshold was fixed beforehand.
    """
    from melanoma_ml.folds import locked_test_mask, split_masks

    problems: list[str] = []
    locked = folds_table[locked_test_mask(folds_table)]
    test_images = set(locked[schema.IMAGE].astype("str"))
    test_groups = set(locked[schema.GROUP].astype("str"))
    folds = sorted({r.fold for results in fold_results.values() for r in results})
    for fold in folds:
        train, _valid = split_masks(folds_table, fold)
        trained = folds_table.loc[train, schema.GROUP].astype("str")
        if leaked := sorted(set(trained) & test_groups):
            problems.append(f"fold {fold} trains on {len(leaked)} test-split group(s), e.g. {leaked[:3]}")
    for backbone, results in fold_results.items():
        for result in results:
            seen = set(result.oof[schema.IMAGE].astype("str")) & test_images
            if seen:
                problems.append(
                    f"{backbone} fold {result.fold} validated on {len(seen)} test-split image(s), "
                    f"e.g. {sorted(seen)[:3]}"
                )
    retuned = [f"{r.test_set}/{r.model}" for r in tested.results if not r.report.settings.get(_FIXED)]
    if retuned:
        problems.append(f"threshold tuned on the test set instead of fixed beforehand: {retuned}")
    evidence = {"test_images": len(test_images), "test_groups": len(test_groups), "folds_checked": len(folds)}
    return problems, evidence


def evaluate_test_sets(
    config: PipelineConfig,
    fold_results: Mapping[str, Sequence[FoldResult]],
    reports: Mapping[str, EvaluationReport],
    folds_table: pd.DataFrame,
    cache: ImageCache,
    out_root: Path,
    cache_root: Path,
) -> TestEvaluation:
    """Score every backbone's fold models on the locked test split (``folds_table`` rows of fold -2) and on
    each ``data.test_sources`` set (cached beside the training cache), at thresholds fixed out-of-fold.

    Writes ``out_root/<test set>/<backbone>/{ensemble,fold<k>}/`` and ``out_root/test_evaluation.json``;
    external sets are cached under ``cache_root/test-<name>/<size>px``. A set that cannot be scored (a single class, say) is skipped with a note saying why.
    """
    from melanoma_ml.folds import TEST_FOLD, locked_test_mask
    from melanoma_ml.images.cache import build_image_cache
    from melanoma_ml.metadata.test_sources import load_test_sources
    from melanoma_ml.training.predict import predict_rows

    sets: dict[str, tuple[pd.DataFrame, Any]] = {}
    counts: dict[str, dict[str, int]] = {}
    internal = folds_table[locked_test_mask(folds_table)].reset_index(drop=True)
    if len(internal):
        sets[INTERNAL_TEST] = (internal, cache)
        counts[INTERNAL_TEST] = {
            "rows_scored": len(internal),
            "melanoma": int(internal["target"].sum()),
        }
    training = folds_table[folds_table["fold"] != TEST_FOLD]
    size = config.data.image_size
    for test_set in load_test_sources(config.data, training):
        counts[test_set.name] = test_set.counts()
        if len(test_set.rows):
            folder = cache_root / f"test-{test_set.name}" / f"{size}px"
            sets[test_set.name] = (test_set.rows, build_image_cache(test_set.rows, folder, size))
    results, notes = [], []
    for name, (rows, set_cache) in sets.items():
        if why := scorable(rows):
            notes.append(f"test set {name} not scored: {why}")
            continue
        for backbone, folds in fold_results.items():
            probs = {r.fold: predict_rows(r, rows, set_cache, config.training) for r in folds}
            results += evaluate_backbone_on_test(
                backbone, folds, reports[backbone], name, rows, probs, config.evaluation, out_root / name
            )
    if not sets:
        notes.append(NO_TEST_NOTE)
    evaluation = TestEvaluation(results, counts, notes)
    evaluation.save(out_root)
    return evaluation
