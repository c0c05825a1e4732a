"""Test-set evaluation: each backbone and its served fold model scored on data nothing was tuned on.

Two models per backbone, on the locked test split (``internal``) and on each external test set, named by
what ``serving.ensemble`` would serve of it (``config.EnsembleKind``):

* ``folds``: the backbone's k fold models, their test probabilities averaged in
  ``serving.ensemble_average`` space (as a ``folds`` bundle averages them), at the threshold tuned on the
  backbone's pooled out-of-fold predictions;
* ``best_fold``: the fold model a ``best_fold`` promotion would serve (``served_fold``: best validation
  AUROC), at the threshold its bundle carries (tuned on that fold's own validation rows);

plus, with ``serving.ensemble: top_k``, the ``top_k`` mean (:func:`top_k_model`). Runs before these words
wrote ``ensemble`` and ``served``: :func:`tested_kind` reads them back.

Everything a result applies is fixed on that model's own out-of-fold rows before any test row is seen
(:class:`ModelUnderTest`): the threshold (never re-tuned on test, ``evaluate_predictions(threshold=...)``)
and the post-hoc calibrator a bundle of it would serve (``evaluation.calibration.fit_served_calibration``, as
promotion fits it). The test report scores the raw probabilities; :class:`CalibrationOnTest` adds ECE
and Brier before/after that calibrator on the same test rows (paired patient-bootstrap CIs) and the
decision of the calibrated threshold. Each result carries the out-of-fold AUC of the same model and the
optimism gap ``oof AUC - test AUC``. Nothing here picks a model: ranking and the promotion gate read
out-of-fold numbers only. numpy/pandas only; the pipeline step does the predicting.

These rows compare candidates. The served model's own test numbers (a bundle's ``test_metrics``, the
model card) are not taken from them: promotion scores the same test rows with the staged bundle through
``melanoma-ml predict``'s path (the bundle's views, the bundle's calibrator) and :func:`bundle_test_metrics`
turns those served probabilities into the card's numbers (``serving.batch.served_test_metrics``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast, get_args

import numpy as np
import pandas as pd

from melanoma_ml import schema
from melanoma_ml.atomic import atomic_write_bytes, atomic_write_json, parquet_bytes, to_jsonable
from melanoma_ml.config import EnsembleKind, EvaluationConfig
from melanoma_ml.errors import InputValueError
from melanoma_ml.evaluation.calibration import calibrated_probabilities, fit_served_calibration
from melanoma_ml.evaluation.ensemble import average_probabilities, averaged_oof
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
PREDICTIONS_FILE = "predictions.parquet"
"""Each tested model's raw test probabilities, beside its report (``<set>/<backbone>/<model>/``)."""
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
    "specificity", "threshold", "oof_auc", "optimism_gap", "n_images", "n_melanoma", "calibration",
    "ece_before", "ece_after", "ece_after_lo", "ece_after_hi", "brier_before", "brier_after",
)  # fmt: skip
"""Columns of ``TestEvaluation.table``: ``TestResult.row`` keys."""

OLD_KIND_WORDS: dict[str, EnsembleKind] = {"ensemble": "folds", "served": "best_fold"}
"""The test evaluation's kinds before they took ``serving.ensemble``'s words (``test_evaluation.json``, the
report folders and the pickled results of older runs)."""

OLD_FOLDERS = {"folds": "ensemble"}
"""Report folders older runs wrote under another name (the fold-model mean's, under ``ensemble/``)."""


def tested_kind(word: str) -> EnsembleKind:
    """A test-evaluation kind in ``serving.ensemble``'s words: ``best_fold``, ``folds`` or ``top_k`` pass,
    an older run's ``served`` and ``ensemble`` become ``best_fold`` and ``folds``.

    Raises:
        InputValueError: ``word`` is neither (names the words it reads).
    """
    if word in get_args(EnsembleKind):
        return cast(EnsembleKind, word)
    if word in OLD_KIND_WORDS:
        return OLD_KIND_WORDS[word]
    raise InputValueError(
        f"unknown test-evaluation model kind {word!r}: expected one of {list(get_args(EnsembleKind))} "
        f"(or an older run's {list(OLD_KIND_WORDS)})"
    )


def model_folder(kind: EnsembleKind, fold: int | None) -> str:
    """A tested model's report folder under ``<test set>/<backbone>/``: ``fold<k>`` for ``best_fold``,
    else the kind (``folds``, ``top_k``)."""
    return f"fold{fold}" if kind == "best_fold" else kind


def written_report_folder(set_dir: Path, backbone: str, kind: EnsembleKind, fold: int | None = None) -> Path:
    """Where a test evaluation wrote ``backbone``'s ``kind`` model on the test set of ``set_dir``
    (``<test set>/<backbone>/<model_folder>``), or where an older run wrote it (:data:`OLD_FOLDERS`) when
    only that one exists."""
    folder = Path(set_dir) / backbone / model_folder(kind, fold)
    old = OLD_FOLDERS.get(folder.name)
    if old is not None and not folder.exists() and (folder.parent / old).exists():
        return folder.parent / old
    return folder


def served_fold(fold_results: Sequence[FoldResult]) -> FoldResult:
    """The fold model a promotion serves for a backbone: the one with the best validation AUROC."""
    return max(fold_results, key=lambda r: r.best_val_auroc)


@dataclass(frozen=True, eq=False)
class ModelUnderTest:
    """A model as it stands before any test row is seen: what it averages, and what was fixed out-of-fold.

    Attributes:
        backbone: The backbone.
        kind: ``folds`` (the backbone's fold models, averaged), ``best_fold`` (its served fold model) or
            ``top_k`` (the fold models of the best backbones, averaged).
        fold: The served fold (None for a model of several fold models).
        members: The fold models whose test probabilities are averaged: folds of :attr:`backbone`, or
            ``(backbone, fold)`` pairs for ``top_k`` (several backbones).
        average: The space they are averaged in (``logit`` or ``probability``; ``serving.ensemble_average``).
        oof: The model's out-of-fold rows (each image scored by a fold model that never trained on it):
            the pooled rows of every fold for the ensemble, the fold's own validation rows for a fold model.
        oof_auc: The model's AUC on :attr:`oof`.
        threshold: Tuned on :attr:`oof` for ``evaluation.target_sensitivity`` (raw scale).
        calibration: ``fit_served_calibration``'s calibrator on :attr:`oof` (``StoredCalibration`` fields),
            or None when those rows cannot fit one (the model then serves raw probabilities).
        calibrated_threshold: :attr:`threshold`'s operating point on the calibrated scale.
    """

    __test__ = False  # not a pytest class

    backbone: str
    kind: EnsembleKind
    fold: int | None
    members: tuple[Any, ...]
    average: str
    oof: pd.DataFrame
    oof_auc: Estimate
    threshold: float
    calibration: dict[str, Any] | None
    calibrated_threshold: float

    @classmethod
    def fix(
        cls,
        config: PipelineConfig,
        backbone: str,
        kind: EnsembleKind,
        fold: int | None,
        members: Sequence[int],
        oof: pd.DataFrame,
        oof_auc: Estimate,
        threshold: float,
    ) -> ModelUnderTest:
        """Fit the calibrator on ``oof`` exactly as promotion does and keep it with the rest."""
        calibration, calibrated_threshold, _why_not = fit_served_calibration(config, oof, threshold)
        average = config.serving.ensemble_average
        return cls(
            backbone, kind, fold, tuple(members), average, oof, oof_auc, threshold, calibration,
            calibrated_threshold,
        )  # fmt: skip

    @property
    def title(self) -> str:
        if self.kind == "top_k":
            return f"{self.backbone} (mean of {len(self.members)} fold models of {self.backbone.count('+') + 1} backbones)"
        if self.fold is None:
            return f"{self.backbone} (mean of {len(self.members)} fold models)"
        return f"{self.backbone} fold {self.fold} (served model)"

    @property
    def folder(self) -> str:
        """Its report folder under ``<test set>/<backbone>/`` (:func:`model_folder`)."""
        return model_folder(self.kind, self.fold)

    def test_probabilities(self, fold_probs: Mapping[Any, np.ndarray]) -> np.ndarray:
        """Its members' probabilities (member key -> probabilities of the test rows, in order) averaged in
        :attr:`average` space."""
        return average_probabilities([fold_probs[f] for f in self.members], self.average)

    def calibrate(self, probs: np.ndarray) -> np.ndarray:
        """What a bundle of this model serves for raw ``probs`` (before any prior shift): the served path's
        own function (``calibration.calibrated_probabilities``) on the calibrator fixed out-of-fold."""
        return calibrated_probabilities(np.asarray(probs, dtype=np.float64), self.calibration)


def models_to_test(
    config: PipelineConfig, backbone: str, fold_results: Sequence[FoldResult], oof_report: EvaluationReport
) -> list[ModelUnderTest]:
    """``backbone``'s fold-model mean and its served fold model, each fixed on its own out-of-fold rows.

    Args:
        fold_results: The backbone's k folds (their ``oof`` give the served fold's threshold and OOF AUC).
        oof_report: The backbone's out-of-fold report (the ensemble's tuned threshold and AUC).
    """
    ordered = sorted(fold_results, key=lambda r: r.fold)
    pooled = pd.concat([r.oof for r in ordered], ignore_index=True)  # as ranking.backbone_oof pools them
    served = served_fold(fold_results)
    target_sensitivity = config.evaluation.target_sensitivity
    served_threshold = threshold_for_sensitivity(
        served.oof[schema.TARGET].to_numpy(), served.oof[PROB].to_numpy(), target_sensitivity
    )
    return [
        ModelUnderTest.fix(
            config, backbone, "folds", None, [r.fold for r in ordered], pooled,
            oof_report.metric("auc"), oof_report.threshold.value,
        ),
        ModelUnderTest.fix(
            config, backbone, "best_fold", served.fold, [served.fold], served.oof,
            _served_oof_auc(served, config.evaluation), served_threshold,
        ),
    ]  # fmt: skip


@dataclass(frozen=True)
class CalibrationOnTest:
    """A model's out-of-fold calibrator applied to its test probabilities: how well the served ones mean
    what they say on rows nothing was fitted on.

    Attributes:
        method: ``temperature``, ``platt`` or ``isotonic``; None when the out-of-fold rows could not fit a
            calibrator and the model serves raw probabilities (then every ``*_after`` equals ``*_before``).
        threshold: The operating threshold on the calibrated scale (fixed out-of-fold).
        report: ``calibration_report`` on the test rows: ``ece_before``/``ece_after``/``ece_change``,
            ``brier_*``, ``mean_prob_*`` and ``observed_rate`` as Estimates (patient-cluster bootstrap, the
            same resamples for before and after, so ``*_change`` has a paired CI).
        sensitivity: Of ``calibrated >= threshold`` on the test rows (the raw operating point's, up to the
            ties an isotonic step can make).
        specificity: Likewise.
    """

    method: str | None
    threshold: float
    report: dict[str, Estimate]
    sensitivity: float
    specificity: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "threshold": self.threshold,
            "sensitivity": self.sensitivity,
            "specificity": self.specificity,
            "report": {name: estimate.to_dict() for name, estimate in self.report.items()},
        }


def calibration_on_test(
    model: ModelUnderTest, rows: pd.DataFrame, probs: np.ndarray, config: EvaluationConfig
) -> CalibrationOnTest:
    """ECE and Brier before/after ``model``'s calibrator on test ``rows`` (raw ``probs``), with paired CIs."""
    from melanoma_ml.evaluation.calibration import calibration_report
    from melanoma_ml.evaluation.metrics import threshold_metrics

    y = pd.to_numeric(rows[schema.TARGET]).to_numpy(dtype=np.int8)
    raw = np.asarray(probs, dtype=np.float64)
    after = model.calibrate(raw)
    report = calibration_report(raw, after, y, rows[schema.GROUP].to_numpy(), config)
    at = threshold_metrics(y, after, model.calibrated_threshold)
    return CalibrationOnTest(
        method=None if model.calibration is None else model.calibration["method"],
        threshold=model.calibrated_threshold,
        report={name: Estimate.from_dict(value) for name, value in report.items()},
        sensitivity=at["sensitivity"],
        specificity=at["specificity"],
    )


@dataclass(frozen=True)
class TestResult:
    """One model scored on one test set.

    Attributes:
        backbone: The backbone.
        kind: ``folds`` (mean of the k fold models), ``best_fold`` (the served fold model) or ``top_k``.
            Read back in these words (:meth:`__setstate__`: an older run's pickled ``ensemble``/``served``).
        fold: The served fold (None for a mean of fold models).
        test_set: ``internal`` or an external test set's name.
        report: The test report (threshold fixed beforehand; patient-cluster bootstrap CIs).
        oof_auc: The same model's out-of-fold AUC (the ensemble: the backbone's pooled out-of-fold AUC).
        calibration: ECE and Brier before/after the model's out-of-fold calibrator on this test set.
        predictions: The test rows with this model's raw probabilities (``prediction_table``), or None.
    """

    __test__ = False  # not a pytest class

    backbone: str
    kind: EnsembleKind
    fold: int | None
    test_set: str
    report: EvaluationReport
    oof_auc: Estimate
    calibration: CalibrationOnTest | None = None
    predictions: pd.DataFrame | None = field(default=None, repr=False, compare=False)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling (a Dagster step value of an older run): its kind in today's words (:func:`tested_kind`)."""
        self.__dict__.update({**state, "kind": tested_kind(state["kind"])})

    @property
    def model(self) -> str:
        if self.kind == "top_k":
            return f"{self.backbone} (top_k fold-model mean)"
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
            **self._calibration_columns(),
        }

    def _calibration_columns(self) -> dict[str, Any]:
        if self.calibration is None:
            return {}
        report = self.calibration.report
        return {
            "calibration": self.calibration.method or "none",
            "ece_before": report["ece_before"].value,
            "ece_after": report["ece_after"].value,
            "ece_after_lo": report["ece_after"].lo,
            "ece_after_hi": report["ece_after"].hi,
            "brier_before": report["brier_before"].value,
            "brier_after": report["brier_after"].value,
        }


@dataclass(frozen=True)
class TestEvaluation:
    """Every model on every test set, plus what each test set held.

    Attributes:
        results: One ``TestResult`` per (backbone, kind, test set).
        test_sets: Per test set, its counts (rows scored, melanoma, rows excluded as training duplicates).
        notes: Why a test set was not scored (e.g. a single class), or :data:`NO_TEST_NOTE`.
        comparisons: ``folds_vs_best_fold``: the fold-model mean minus the best fold on each test set.
    """

    __test__ = False  # not a pytest class

    results: list[TestResult]
    test_sets: dict[str, dict[str, int]]
    notes: list[str] = field(default_factory=list)
    comparisons: list[dict[str, Any]] = field(default_factory=list)

    @property
    def has_test(self) -> bool:
        return bool(self.results)

    def table(self) -> pd.DataFrame:
        """One row per result: test AUC [CI], sensitivity/specificity, threshold, OOF AUC and the gap."""
        return pd.DataFrame([r.row() for r in self.results], columns=list(TABLE_COLUMNS))

    def find(self, backbone: str, kind: EnsembleKind, test_set: str = INTERNAL_TEST) -> TestResult | None:
        for result in self.results:
            if (result.backbone, result.kind, result.test_set) == (backbone, kind, test_set):
                return result
        return None

    def headline(self, backbone: str, kind: EnsembleKind) -> TestResult | None:
        """The result shown first: the locked test split, else the first external test set scored."""
        found = self.find(backbone, kind)
        if found is not None:
            return found
        return next((r for r in self.results if (r.backbone, r.kind) == (backbone, kind)), None)

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(
            {
                "rows": self.table().to_dict("records"),
                "test_sets": self.test_sets,
                "notes": self.notes,
                "folds_vs_best_fold": self.comparisons,
                "reports": {f"{r.test_set}/{r.model}": r.report.figures for r in self.results},
                "calibration": {
                    f"{r.test_set}/{r.model}": r.calibration.to_dict()
                    for r in self.results
                    if r.calibration is not None
                },
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


def top_k_model(
    config: PipelineConfig,
    fold_results: Mapping[str, Sequence[FoldResult]],
    reports: Mapping[str, EvaluationReport],
) -> ModelUnderTest | None:
    """The ``serving.ensemble: top_k`` model, fixed out-of-fold: every fold model of the
    ``serving.ensemble_top_k`` backbones with the best out-of-fold AUC (the leaderboard's order), averaged.

    Its out-of-fold rows average the backbones' pooled out-of-fold predictions per image
    (``ensemble.averaged_oof``); threshold and calibrator come from them. None unless ``serving.ensemble`` is
    ``top_k`` and at least two backbones were trained.
    """
    from melanoma_ml.evaluation.report import evaluate_predictions

    if config.serving.ensemble != "top_k" or len(fold_results) < 2:
        return None
    ranked = sorted(reports, key=lambda b: reports[b].metric("auc").value, reverse=True)
    chosen = [b for b in ranked if b in fold_results][: config.serving.ensemble_top_k]
    pooled = [pd.concat([r.oof for r in sorted(fold_results[b], key=lambda r: r.fold)], ignore_index=True)
              for b in chosen]  # fmt: skip
    oof = averaged_oof(pooled, config.serving.ensemble_average)
    threshold = threshold_for_sensitivity(
        oof[schema.TARGET].to_numpy(), oof[PROB].to_numpy(), config.evaluation.target_sensitivity
    )
    members = [(b, r.fold) for b in chosen for r in sorted(fold_results[b], key=lambda r: r.fold)]
    oof_auc = evaluate_predictions(oof, config.evaluation).metric("auc")
    return ModelUnderTest.fix(config, "+".join(chosen), "top_k", None, members, oof, oof_auc, threshold)


def evaluate_on_test(
    model: ModelUnderTest,
    test_set: str,
    rows: pd.DataFrame,
    fold_probs: Mapping[int, np.ndarray],
    config: EvaluationConfig,
    out_dir: Path | None = None,
) -> TestResult:
    """One model on one test set, at its out-of-fold threshold, with its calibrator's ECE/Brier before/after.

    Args:
        model: The model, fixed out-of-fold (``models_to_test``).
        rows: The test rows (``group_id``, ``target``, metadata).
        fold_probs: Fold -> that fold model's probabilities for ``rows``, in order.
        out_dir: Where the report (figures + ``report.json``) goes: ``<out_dir>/<backbone>/<model.folder>``;
            nothing is written when None.
    """
    probs = model.test_probabilities(fold_probs)
    report = evaluate_predictions(
        prediction_table(rows, probs, model.backbone),
        config,
        None if out_dir is None else out_dir / model.backbone / model.folder,
        name=f"{model.title} on test set {test_set}",
        threshold=model.threshold,
    )
    calibration = calibration_on_test(model, rows, probs, config)
    table = prediction_table(rows, probs, model.backbone)
    if out_dir is not None:
        atomic_write_bytes(out_dir / model.backbone / model.folder / PREDICTIONS_FILE, parquet_bytes(table))
    return TestResult(
        model.backbone, model.kind, model.fold, test_set, report, model.oof_auc, calibration, table
    )


def folds_vs_best_fold(results: Sequence[TestResult], config: EvaluationConfig) -> list[dict[str, Any]]:
    """Per backbone and test set: the fold-model mean minus the best fold model, paired AUC difference on
    the same test images (patient-cluster bootstrap). Reported beside the decision, never used for it."""
    from melanoma_ml.evaluation.compare import paired_auc_difference

    out = []
    for ens in (r for r in results if r.kind == "folds" and r.predictions is not None):
        served = next(
            (
                r
                for r in results
                if (r.backbone, r.test_set, r.kind) == (ens.backbone, ens.test_set, "best_fold")
            ),
            None,
        )
        if served is None or served.predictions is None:
            continue
        names = (ens.model, served.model)
        diff = paired_auc_difference(ens.predictions, served.predictions, config, names=names)
        out.append({"test_set": ens.test_set, "a": names[0], "b": names[1], **diff})
    return out


def _served_oof_auc(served: FoldResult, config: EvaluationConfig) -> Estimate:
    """The served fold's AUC on its own validation rows (as its bundle reports it; point value only)."""
    from melanoma_ml.evaluation.metrics import roc_auc

    y, p = served.oof[schema.TARGET].to_numpy(), served.oof[PROB].to_numpy()
    return Estimate(roc_auc(y, p), math.nan, math.nan, config.ci_level)


def unscorable_reason(rows: pd.DataFrame) -> str:
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

    Each model's calibrator is fitted once on its out-of-fold rows (``models_to_test``) and applied to every
    test set. Writes ``out_root/<test set>/<backbone>/{folds,fold<k>,top_k}/`` and ``out_root/test_evaluation.json``;
    external sets are cached under ``cache_root/test-<name>/<size>px``. A set that cannot be scored (a single class, say) is skipped with a note saying why.
    """
    from melanoma_ml.images.cache import build_image_cache
    from melanoma_ml.training.predict import predict_rows

    rows_by_set, counts = untouched_test_sets(config, folds_table)
    size = config.data.image_size
    sets: dict[str, tuple[pd.DataFrame, Any]] = {}
    for name, rows in rows_by_set.items():
        if name == INTERNAL_TEST:
            sets[name] = (rows, cache)
        else:
            folder = cache_root / f"test-{name}" / f"{size}px"
            sets[name] = (rows, build_image_cache(rows, folder, size))
    results, notes = [], []
    models: dict[str, list[ModelUnderTest]] = {}
    top_k: ModelUnderTest | None = None
    for name, (rows, set_cache) in sets.items():
        if why := unscorable_reason(rows):
            notes.append(f"test set {name} not scored: {why}")
            continue
        if not models:  # fitted once, and only when a test set is scored
            models = {b: models_to_test(config, b, folds, reports[b]) for b, folds in fold_results.items()}
            top_k = top_k_model(config, fold_results, reports)
        every: dict[Any, np.ndarray] = {}
        for backbone, folds in fold_results.items():
            probs = {r.fold: predict_rows(r, rows, set_cache, config.training) for r in folds}
            every |= {(backbone, fold): p for fold, p in probs.items()}
            results += [
                evaluate_on_test(model, name, rows, probs, config.evaluation, out_root / name)
                for model in models[backbone]
            ]
        if top_k is not None:
            results.append(evaluate_on_test(top_k, name, rows, every, config.evaluation, out_root / name))
    if not sets:
        notes.append(NO_TEST_NOTE)
    evaluation = TestEvaluation(results, counts, notes, folds_vs_best_fold(results, config.evaluation))
    evaluation.save(out_root)
    return evaluation


def untouched_test_sets(
    config: PipelineConfig, folds_table: pd.DataFrame
) -> tuple[dict[str, pd.DataFrame], dict[str, dict[str, int]]]:
    """The test sets nothing was trained, tuned or chosen on, and what each held.

    Returns:
        ``(rows, counts)``: test set name -> its rows (``image_path``, metadata, ``target``,
        ``group_id``): the locked test split of ``folds_table`` (``internal``, when it has rows) and each
        ``data.test_sources`` set with rows left after dropping training duplicates; and name -> its counts
        (every configured set, empty ones included).
    """
    from melanoma_ml.folds import TEST_FOLD, locked_test_mask
    from melanoma_ml.metadata.test_sources import load_test_sources

    rows: dict[str, pd.DataFrame] = {}
    counts: dict[str, dict[str, int]] = {}
    internal = folds_table[locked_test_mask(folds_table)].reset_index(drop=True)
    if len(internal):
        rows[INTERNAL_TEST] = internal
        counts[INTERNAL_TEST] = {"rows_scored": len(internal), "melanoma": int(internal["target"].sum())}
    training = folds_table[folds_table["fold"] != TEST_FOLD]
    for test_set in load_test_sources(config.data, training):
        counts[test_set.name] = test_set.counts()
        if len(test_set.rows):
            rows[test_set.name] = test_set.rows
    return rows, counts


def bundle_test_metrics(
    rows: pd.DataFrame, probs: np.ndarray, threshold: float, config: EvaluationConfig, name: str
) -> dict[str, Any]:
    """What a bundle stores for one test set (``manifest.TestMetrics``): ``metrics`` (``Estimate`` dicts),
    ``n_images``, ``n_melanoma``.

    Args:
        rows: The test rows scored (``target``, ``group_id``), in the order of ``probs``.
        probs: The served probabilities (``melanoma-ml predict``'s ``target`` column: TTA, calibrator).
        threshold: The served decision threshold, fixed before the test (never re-tuned here).
        name: How the report names the model and test set.
    """
    report = evaluate_predictions(prediction_table(rows, probs, name), config, name=name, threshold=threshold)
    return {
        "metrics": report.to_dict()["metrics"],
        "n_images": report.n_images,
        "n_melanoma": report.n_melanoma,
    }
