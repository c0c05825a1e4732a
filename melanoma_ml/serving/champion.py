"""Champion/challenger: offer one fold model to the promotion gate and register it when it wins.

The leaderboard ranks backbones on their pooled out-of-fold predictions, but one model is served: the
candidate's best fold model (highest validation AUROC). Everything the gate and the bundle say is about
that model: its metrics and tuned threshold come from its own validation rows (``served_model_report``)
and its AUC lower bound is held against the floor. Against a champion, the candidate's out-of-fold
predictions (each image predicted by a fold model that never trained on it) are compared with the
champion's stored ones on the images both have (``paired_difference_with_champion``). The bundle stores
the served fold's own out-of-fold rows (manifest ``oof``, columns ``OOF_KEEP``) for the next
comparison. The gate itself (``promotion.decide_promotion``) is pure; this module reads and writes the
registry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd

from melanoma_ml.config import PipelineConfig
from melanoma_ml.serving.manifest import ValidationPredictions

if TYPE_CHECKING:
    from melanoma_ml.evaluation import EvaluationReport
    from melanoma_ml.serving.promotion import GateDecision
    from melanoma_ml.training.train import FoldResult

OOF_KEEP = ValidationPredictions.columns()
"""Out-of-fold columns stored in a bundle's manifest (enough for a paired comparison later)."""


@dataclass(frozen=True)
class PromotionOutcome:
    """What the gate decided and where the registry pointer is afterwards.

    Attributes:
        decision: The gate's ``GateDecision`` (``promote``, ``reason``, ``evidence``).
        candidate: Backbone offered to the gate.
        champion_before: Version served before this step (None: nothing was served).
        champion_after: Version served after this step.
        registered: The new version (None when the candidate was rejected: nothing is written).
        fold: Which of the candidate's fold models went into the bundle (the best validation AUROC).
    """

    decision: GateDecision
    candidate: str
    champion_before: str | None
    champion_after: str | None
    registered: str | None
    fold: int


def challenge_champion(
    config: PipelineConfig,
    candidate: str,
    fold_results: Sequence[FoldResult],
    *,
    data_version: str,
    test_metrics: Mapping[str, Any] | None = None,
) -> PromotionOutcome:
    """Offer ``candidate``'s best fold model to the gate; on promotion register a bundle and move ``current``.

    A rejected candidate, or one whose weights are already served, writes nothing. ``test_metrics`` (that
    fold model on the untouched test sets) go into the bundle for its readers; the gate never sees them.
    """
    from melanoma_ml.evaluation.holdout import served_fold
    from melanoma_ml.evaluation.ranking import report_oof
    from melanoma_ml.serving.promotion import GateDecision, decide_promotion
    from melanoma_ml.serving.remote_registry import open_registry

    best = served_fold(fold_results)
    registry = open_registry(config)
    champion = registry.current()
    champion_metrics, paired, paired_note = None, None, ""
    if champion is not None:
        manifest = registry.manifest(champion)
        if manifest.checkpoint_sha256 == best.weights_sha256:
            already = GateDecision(
                False,
                f"candidate {candidate} fold {best.fold} is already served as {champion} (same weights)",
            )
            return PromotionOutcome(already, candidate, champion, champion, None, best.fold)
        champion_metrics = manifest.metrics
        paired, paired_note = paired_difference_with_champion(
            config, report_oof(config, candidate), manifest.oof_frame()
        )
    served = served_model_report(config, best)
    decision = decide_promotion(
        served.to_dict()["metrics"],
        champion_metrics,
        paired,
        auc_floor=config.evaluation.promotion_auc_floor,
        candidate_name=f"{candidate} fold {best.fold}",
        champion_name=champion or "none",
        paired_note=paired_note,
    )
    if not decision.promote:
        return PromotionOutcome(decision, candidate, champion, champion, None, best.fold)
    version = register_fold_model(
        config, best, served, decision.reason, data_version=data_version, test_metrics=test_metrics
    )
    registry.promote(version, reason=decision.reason)
    return PromotionOutcome(decision, candidate, champion, version, version, best.fold)


def served_model_report(config: PipelineConfig, fold_result: FoldResult) -> EvaluationReport:
    """Evaluation of one fold model on its own validation rows (its out-of-fold predictions).

    This is what a bundle of that model reports: the tuned threshold (``threshold_for_sensitivity`` on
    those rows) and the metrics with their CIs. Nothing is written.

    Raises:
        ValueError: the fold's validation rows hold a single class (re-make the folds).
    """
    from melanoma_ml.evaluation import evaluate_predictions

    name = f"{fold_result.backbone} fold {fold_result.fold}"
    return evaluate_predictions(fold_result.oof, config.evaluation, name=name)


def register_fold_model(
    config: PipelineConfig,
    best: FoldResult,
    report: EvaluationReport,
    reason: str,
    *,
    data_version: str,
    test_metrics: Mapping[str, Any] | None = None,
) -> str:
    """Register ``best``'s checkpoint as a new registry version (not yet current) and return the version.

    Args:
        report: ``served_model_report(config, best)``: its metrics go into the manifest; its threshold is
            re-tuned on the calibrated probabilities (``fit_served_calibration``), the served scale.
    """
    import melanoma_ml
    from melanoma_ml.serving.remote_registry import open_registry
    from melanoma_ml.training.checkpoint import load_checkpoint

    calibration, threshold = fit_served_calibration(config, best.oof, report.threshold.value)
    net, spec, _info = load_checkpoint(best.checkpoint_dir)
    return open_registry(config).register_bundle(
        net,
        spec,
        reason=reason,
        threshold=threshold,
        metrics=report.to_dict()["metrics"],
        data_version=data_version,
        code_version=f"melanoma_ml-{melanoma_ml.__version__}",
        fold=best.fold,
        checkpoint_sha256=best.weights_sha256,
        oof=ValidationPredictions.from_frame(best.oof),
        test_metrics=test_metrics,
        calibration=calibration,
    )


CALIBRATION_SPLITS = 5
"""Cross-fitting splits for choosing the calibrator (fewer when the served fold has fewer patients)."""


def fit_served_calibration(
    config: PipelineConfig, oof: pd.DataFrame, raw_threshold: float
) -> tuple[dict[str, Any] | None, float]:
    """The calibrator a bundle serves and the threshold on its scale, from the model's own out-of-fold rows.

    The method is chosen by cross-fitted NLL (``choose_calibrator``, patient-grouped splits) and refitted
    on all rows. The threshold is re-tuned on the calibrated probabilities with the report's own rule
    (``threshold_for_sensitivity`` at ``evaluation.target_sensitivity``), so ``calibrated >= threshold``
    is the same operating point as ``raw >= raw_threshold`` (identical flags for temperature and Platt
    scaling; isotonic steps may tie a few benign scores to the threshold). The stored report (ECE, Brier
    before/after with patient-bootstrap CIs) scores the cross-fitted predictions of the chosen method on
    these rows: no untouched test set is needed, and none of its rows is scored by a calibrator that saw it.

    Returns:
        ``(BundleManifest.calibration as a dict, threshold)``, or ``(None, raw_threshold)`` when the rows
        cannot be cross-fitted (fewer than 2 patients per split with both classes): the bundle then serves
        raw probabilities, and its model card says so.
    """
    import logging

    import numpy as np

    from melanoma_ml import schema
    from melanoma_ml.errors import InputValueError
    from melanoma_ml.evaluation.calibration import (
        calibration_report,
        choose_calibrator,
        cross_fitted_predictions,
    )
    from melanoma_ml.evaluation.threshold import threshold_for_sensitivity

    evaluation = config.evaluation
    n_groups = int(oof[schema.GROUP].nunique())
    n_melanoma_groups = int(oof.loc[oof[schema.TARGET] == 1, schema.GROUP].nunique())
    n_splits = min(CALIBRATION_SPLITS, n_groups, n_melanoma_groups)
    seed = evaluation.bootstrap_seed
    try:
        if n_splits < 2:
            raise InputValueError(
                f"only {n_melanoma_groups} patients with melanoma among the out-of-fold rows"
            )
        choice = choose_calibrator(oof, seed=seed, n_splits=n_splits, config=evaluation)
        method = choice.calibrator.method
        y = oof[schema.TARGET].to_numpy()
        raw = oof["prob"].to_numpy(dtype=np.float64)
        crossed = cross_fitted_predictions(raw, y, oof[schema.GROUP], [method], n_splits=n_splits, seed=seed)
        report = calibration_report(raw, crossed[method], y, oof[schema.GROUP], evaluation)
    except InputValueError as exc:
        logging.getLogger(__name__).warning("serving uncalibrated probabilities: %s", exc)
        return None, raw_threshold
    threshold = threshold_for_sensitivity(y, choice.calibrator.apply(raw), evaluation.target_sensitivity)
    calibration = {
        "method": method,
        "parameters": choice.calibrator.to_dict(),
        "prevalence": choice.prevalence,
        "n_rows": len(oof),
        "report": report,
        "report_on": f"the model's {len(oof)} out-of-fold rows, cross-fitted ({n_splits} patient-grouped splits)",
    }
    return calibration, threshold


def paired_difference_with_champion(
    config: PipelineConfig, candidate_oof: pd.DataFrame, champion_oof: pd.DataFrame
) -> tuple[dict[str, Any] | None, str]:
    """Candidate-minus-champion AUC difference on the images both were evaluated on.

    The champion's stored predictions (``champion_oof``: its manifest's ``oof_frame()``) are paired with
    the candidate's rows by image name; labels and groups are the candidate's (the current folds table),
    so a label fixed since the champion was promoted counts as fixed for both.

    Returns:
        ``(difference, note)``: ``paired_auc_difference``'s dict and a note on the overlap, or ``(None,
        why)`` (the gate then refuses, quoting ``why``) when the champion stores no out-of-fold
        predictions or the shared images hold fewer than ``evaluation.subgroup_min_cases`` melanoma or
        benign cases.
    """
    from melanoma_ml.evaluation import paired_auc_difference

    if champion_oof.empty:
        return None, "the champion's manifest stores no out-of-fold predictions (oof) to pair with"
    champion_prob = champion_oof[["image_name", "prob"]]
    cand = candidate_oof[candidate_oof["image_name"].isin(champion_prob["image_name"])]
    champ = cand.drop(columns=["prob"]).merge(
        champion_prob, on="image_name", how="left", validate="one_to_one"
    )
    melanoma = int((cand["target"] == 1).sum())
    benign = len(cand) - melanoma
    need = config.evaluation.subgroup_min_cases
    overlap = f"{len(cand)} shared images ({melanoma} melanoma, {benign} benign)"
    if min(melanoma, benign) < need:
        return None, (
            f"the candidate and the champion share only {overlap}; a paired AUC needs at least {need} of each "
            "class (evaluation.subgroup_min_cases); train on a folds table that still holds the champion's "
            "validation images, or promote by hand with ModelRegistry.promote if the change is intended"
        )
    difference = paired_auc_difference(cand, champ, config.evaluation, names=("candidate", "champion"))
    return difference, f"paired on {overlap}"
