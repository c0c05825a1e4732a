"""Champion/challenger: offer the served model to the promotion gate and register it when it wins.

The leaderboard ranks backbones on their pooled out-of-fold predictions; ``serving.ensemble`` says what
of the candidate is served (``served_choice``): its best fold model (``best_fold``), all its fold models
averaged (``folds``) or the fold models of the best k backbones (``top_k``). Everything the gate and the
bundle say is about that model and read from its out-of-fold rows (``ServedChoice.oof``: for one fold
model its own validation rows, for an ensemble every training image scored by the member(s) that never
trained on it): the metrics and tuned threshold (``served_model_report``), the calibrator, and the AUC
lower bound held against the floor. Against a champion, the candidate's out-of-fold predictions are
compared with the champion's stored ones on the images both have (``paired_difference_with_champion``).
The bundle stores those rows (manifest ``oof``, columns ``OOF_KEEP``) for the next comparison. Test-set
numbers go into the bundle for its readers and never into the decision. The gate itself
(``promotion.decide_promotion``) is pure; this module reads the registry and moves its pointer, and
``packaging.register_served_model`` writes the winner's bundle.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from melanoma_ml.config import EnsembleKind, PipelineConfig
from melanoma_ml.errors import InputFileNotFoundError
from melanoma_ml.evaluation import EvaluationReport, evaluate_predictions, paired_auc_difference
from melanoma_ml.evaluation.ensemble import averaged_oof
from melanoma_ml.evaluation.external import ExternalScore, auc_gap
from melanoma_ml.evaluation.holdout import served_fold
from melanoma_ml.evaluation.ranking import report_oof
from melanoma_ml.serving.manifest import BundleManifest, ValidationPredictions
from melanoma_ml.serving.packaging import TestMetricsOf, register_served_model
from melanoma_ml.serving.promotion import GateDecision, decide_promotion
from melanoma_ml.serving.remote_registry import open_registry

if TYPE_CHECKING:
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
        fold: The candidate's best fold model (validation AUROC): the bundle's explained member 0.
        served_model: What the bundle serves (``ServedChoice.name``), e.g. a mean of 5 fold models.
    """

    decision: GateDecision
    candidate: str
    champion_before: str | None
    champion_after: str | None
    registered: str | None
    fold: int
    served_model: str = ""


@dataclass(frozen=True)
class ServedChoice:
    """What a promotion would serve (``serving.ensemble``) and the out-of-fold rows that describe it.

    Attributes:
        kind: ``best_fold``, ``folds`` or ``top_k``.
        members: The fold models served; member 0 (the candidate's best fold by validation AUROC) is the
            network Grad-CAM explains and the out-of-distribution detector reads.
        oof: The served model's out-of-fold predictions (``OOF_KEEP`` columns at least): for one fold model
            its own validation rows; for an ensemble every training image, scored by the member(s) that
            did not train on it (averaged across backbones for ``top_k``). The threshold, the calibrator,
            the bundle's metrics and the gate's paired comparison all read these rows.
        average: The space members are averaged in (``serving.ensemble_average``).
        name: How reports and the gate name it.
    """

    kind: EnsembleKind
    members: tuple[FoldResult, ...]
    oof: pd.DataFrame
    average: str
    name: str

    @property
    def explained(self) -> FoldResult:
        return self.members[0]

    @property
    def checkpoints(self) -> frozenset[str]:
        return frozenset(m.weights_sha256 for m in self.members)


def served_choice(
    config: PipelineConfig,
    candidate: str,
    fold_results: Mapping[str, Sequence[FoldResult]],
    backbones: Sequence[str] = (),
) -> ServedChoice:
    """The model ``serving.ensemble`` serves for ``candidate``.

    Args:
        fold_results: Backbone -> its fold models (at least the candidate's).
        backbones: The leaderboard's best backbones, the candidate first (``Leaderboard.top_backbones``);
            ``top_k`` averages the first ``serving.ensemble_top_k`` of them.
    """
    serving = config.serving
    best = served_fold(fold_results[candidate])
    others = [r for r in fold_results[candidate] if r is not best]
    if serving.ensemble == "best_fold" or not others:
        return ServedChoice("best_fold", (best,), best.oof, "probability", f"{candidate} fold {best.fold}")
    if serving.ensemble == "folds" or len(backbones) < 2:
        members = (best, *others)[: serving.max_members]  # serving.max_members: the first ones only
        if len(members) == 1:
            return ServedChoice(
                "best_fold", (best,), best.oof, "probability", f"{candidate} fold {best.fold}"
            )
        oof = report_oof(config, candidate)  # each image scored by the served member that did not train on it
        oof = oof[oof["fold"].isin([m.fold for m in members])].reset_index(drop=True)
        name = f"{candidate} ({serving.ensemble_average} mean of {len(members)} fold models)"
        return ServedChoice("folds", members, oof, serving.ensemble_average, name)
    chosen = list(backbones)[: serving.ensemble_top_k]
    members = [best, *others] + [r for b in chosen[1:] for r in fold_results[b]]
    oof = averaged_oof([report_oof(config, b) for b in chosen], serving.ensemble_average)
    name = f"{'+'.join(chosen)} ({serving.ensemble_average} mean of {len(members)} fold models)"
    return ServedChoice("top_k", tuple(members), oof, serving.ensemble_average, name)


def challenge_champion(
    config: PipelineConfig,
    choice: ServedChoice,
    *,
    data_version: str,
    folds_table: pd.DataFrame | None = None,
    test_metrics: TestMetricsOf | None = None,
    external: Sequence[ExternalScore] = (),
    selection: Mapping[str, Any] | None = None,
    staged_check: StagedCheck | None = None,
) -> PromotionOutcome:
    """Offer ``choice`` to the gate; on promotion register a bundle and move ``current``.

    ``staged_check`` (``feedback_gate.feedback_check``: the clinic's labelled cases): when there is a
    champion and the other rules promote, it runs on the staged candidate bundle before registration and
    returns the final decision (the candidate and the champion scored on those cases, paired AUC in the
    evidence); a refusal there registers nothing.

    A rejected candidate, or one whose networks are already served, writes nothing. ``folds_table`` (with
    the image cache under the artifact root) lets the bundle carry an exported runtime checked on real
    images and an out-of-distribution detector fitted on training images. ``test_metrics`` measures the
    staged bundle on the untouched test sets (``batch.served_test_metrics``: as ``predict`` scores) for
    its manifest. The gate never sees the locked test split's numbers; it reads the external test sets'
    (``external``: ``Leaderboard.external``) for the served model (:func:`external_for`), with its gap to
    the served model's own out-of-fold AUC, and blocks on ``evaluation.max_external_gap``. ``selection``
    (``Leaderboard.selection``) says how the candidate was chosen; when external sets chose or gated it, the
    bundle's ``test_metrics`` mark them ``used_in_selection``.
    """
    candidate = choice.explained.backbone
    best = choice.explained
    registry = open_registry(config)
    champion = registry.current()
    champion_metrics, paired, paired_note = None, None, ""
    if champion is not None:
        manifest = registry.manifest(champion)
        if served_checkpoints(manifest) == choice.checkpoints:
            already = GateDecision(
                False, f"candidate {choice.name} is already served as {champion} (same weights)"
            )
            return PromotionOutcome(already, candidate, champion, champion, None, best.fold, choice.name)
        champion_metrics = manifest.metrics
        candidate_oof = choice.oof if choice.kind != "best_fold" else _pooled_oof(config, candidate, best)
        paired, paired_note = paired_difference_with_champion(config, candidate_oof, manifest.oof_frame())
    served = served_model_report(config, choice)
    served_auc = served.metric("auc")
    decision = decide_promotion(
        served.to_dict()["metrics"],
        champion_metrics,
        paired,
        auc_floor=config.evaluation.promotion_auc_floor,
        candidate_name=choice.name,
        champion_name=champion or "none",
        paired_note=paired_note,
        external={
            s.test_set: {"auc": s.auc, "gap": auc_gap(s.auc, served_auc)}
            for s in external_for(choice, external)
        },
        max_external_gap=config.evaluation.max_external_gap,
        selection=selection,
    )
    if not decision.promote:
        return PromotionOutcome(decision, candidate, champion, champion, None, best.fold, choice.name)
    chose = {s.test_set for s in external} if selection and selection.get("selection_bias") else set()
    measure = marked_selection(test_metrics, chose)
    checked: list[GateDecision] = []
    if champion is not None and staged_check is not None:
        measure = _check_then_measure(staged_check, decision, champion, measure, checked)
    try:
        version = register_served_model(
            config,
            choice,
            served,
            decision.reason,
            data_version=data_version,
            folds_table=folds_table,
            test_metrics=measure,
        )
    except RefusedWhileStaged as refused:
        return PromotionOutcome(refused.decision, candidate, champion, champion, None, best.fold, choice.name)
    decision = checked[-1] if checked else decision
    registry.promote(version, reason=decision.reason)
    return PromotionOutcome(decision, candidate, champion, version, version, best.fold, choice.name)


StagedCheck = Callable[[Path, "GateDecision", str], "GateDecision"]
"""``(staged bundle folder, the gate's decision, champion version) -> final decision``, run before registration."""


class RefusedWhileStaged(Exception):
    """A ``staged_check`` refused the staged candidate: nothing is registered (the staging folder goes)."""

    def __init__(self, decision: GateDecision) -> None:
        super().__init__(decision.reason)
        self.decision = decision


def _check_then_measure(
    check: StagedCheck,
    decision: GateDecision,
    champion: str,
    measure: TestMetricsOf | None,
    checked: list[GateDecision],
) -> TestMetricsOf:
    """``register_served_model``'s ``test_metrics``: ``check`` the staged folder first (its decision is appended
    to ``checked``; a refusal raises ``RefusedWhileStaged``), then ``measure`` it."""

    def run(folder: Path) -> Mapping[str, Any] | None:
        checked.append(check(folder, decision, champion))
        if not checked[-1].promote:
            raise RefusedWhileStaged(checked[-1])
        return None if measure is None else measure(folder)

    return run


def external_for(choice: ServedChoice, scores: Sequence[ExternalScore]) -> list[ExternalScore]:
    """The external scores of the very model ``choice`` serves: the same kind, backbone(s) and fold.

    A ``top_k`` choice matches the test evaluation's top-k mean only when both average the same backbones
    (the test evaluation takes the top k by out-of-fold AUC; under ``evaluation.select_on`` external or
    worst the served ones may differ, and then there are no external numbers for it).
    """
    backbone = "+".join(dict.fromkeys(m.backbone for m in choice.members))
    fold = choice.explained.fold if choice.kind == "best_fold" else None
    return [s for s in scores if (s.kind, s.backbone, s.fold) == (choice.kind, backbone, fold)]


def marked_selection(test_metrics: TestMetricsOf | None, chose: set[str]) -> TestMetricsOf | None:
    """``test_metrics`` with ``used_in_selection`` set on the test sets in ``chose`` (their numbers picked or
    gated the model: the card then says they are no longer untouched estimates)."""
    if test_metrics is None or not chose:
        return test_metrics

    def measure(folder: Path) -> Mapping[str, Any] | None:
        tested = test_metrics(folder)
        if tested is None:
            return None
        return {name: {**entry, "used_in_selection": name in chose} for name, entry in tested.items()}

    return measure


def _pooled_oof(config: PipelineConfig, candidate: str, best: FoldResult) -> pd.DataFrame:
    """The candidate backbone's pooled out-of-fold rows (the gate's paired comparison), else its best fold's."""
    try:
        return report_oof(config, candidate)
    except InputFileNotFoundError:
        return best.oof


def served_checkpoints(manifest: BundleManifest) -> frozenset[str]:
    """The fold checkpoints (weights sha256) a registered bundle serves; empty when it does not say."""
    return frozenset(m.checkpoint_sha256 for m in manifest.ensemble.members if m.checkpoint_sha256)


def served_model_report(config: PipelineConfig, choice: ServedChoice | FoldResult) -> EvaluationReport:
    """Evaluation of the served model on its out-of-fold rows (``ServedChoice.oof``).

    This is what its bundle reports: the tuned threshold (``threshold_for_sensitivity`` on those rows) and
    the metrics with their CIs. A ``FoldResult`` is read as that one fold model. Nothing is written.

    Raises:
        ValueError: the rows hold a single class (re-make the folds).
    """
    if not isinstance(choice, ServedChoice):
        choice = ServedChoice(
            "best_fold", (choice,), choice.oof, "probability", f"{choice.backbone} fold {choice.fold}"
        )
    return evaluate_predictions(choice.oof, config.evaluation, name=choice.name)


def register_fold_model(
    config: PipelineConfig,
    best: FoldResult,
    report: EvaluationReport,
    reason: str,
    *,
    data_version: str,
) -> str:
    """Register one fold model as a new registry version (not yet current): ``packaging.register_served_model``
    of it as a ``best_fold`` choice."""
    choice = ServedChoice("best_fold", (best,), best.oof, "probability", f"{best.backbone} fold {best.fold}")
    return register_served_model(config, choice, report, reason, data_version=data_version)


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
