"""The whole pipeline as plain step functions, shared by the Dagster assets, the CLI and the benchmark.

Each step takes the ``PipelineConfig`` plus earlier results, writes its artifacts under the artifact root
(``melanoma_ml.artifacts``) and returns a small result; the library modules it calls do the work. ``STEPS``
is the one run order: ``run_all`` walks it, and a test pins it to the Dagster asset graph (each step is
named after its asset). No Dagster here; torch, timm and lightning load inside the steps that need them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from melanoma_ml import checks
from melanoma_ml.artifacts import artifact_paths
from melanoma_ml.atomic import atomic_write_bytes, parquet_bytes
from melanoma_ml.config import PipelineConfig
from melanoma_ml.errors import InputValueError
from melanoma_ml.metadata import fingerprint
from melanoma_ml.steps import Step, StepRun, one_call

if TYPE_CHECKING:
    from melanoma_ml.evaluation import EvaluationReport
    from melanoma_ml.evaluation.holdout import TestEvaluation
    from melanoma_ml.evaluation.ranking import Leaderboard
    from melanoma_ml.images.cache import ImageCache
    from melanoma_ml.metadata.result import CleaningResult
    from melanoma_ml.serving.champion import PromotionOutcome
    from melanoma_ml.serving.gallery import Gallery
    from melanoma_ml.tabular.baseline import TabularBaseline
    from melanoma_ml.training.train import FoldResult


@dataclass(frozen=True)
class SourceInfo:
    """The primary dataset a run reads (external sources come from ``config.data.external_sources``).

    Attributes:
        root: Primary dataset folder or metadata CSV file (any ISIC layout).
        layout: Layout of the primary (``"isic2020"`` for the synthetic set, else ``data.layout``).
        image_dir: Explicit image folder or None (auto-detected by the layout reader).
        synthetic: Whether this is the built-in synthetic demo set.
        fingerprint: ``source_fingerprint`` of the primary, its image folder and every external source:
            changes when any metadata file or image listing changes.
    """

    root: Path
    layout: str
    image_dir: Path | None
    synthetic: bool
    fingerprint: str


@dataclass(frozen=True)
class PipelineResult:
    source: SourceInfo
    cleaning: CleaningResult
    folds: pd.DataFrame
    fold_results: dict[str, list[FoldResult]]
    reports: dict[str, EvaluationReport]
    leaderboard: Leaderboard
    promotion: PromotionOutcome
    gallery: Gallery
    step_seconds: dict[str, float]
    test_evaluation: TestEvaluation | None = None
    tabular_baseline: TabularBaseline | None = None


def validate_config(config: PipelineConfig) -> None:
    """Fail before any work on settings that would otherwise fail deep inside a later step.

    Checks that the artifact root is local, every backbone name against timm (imports timm, ~seconds),
    that ``data.source_dir`` (when set) is a folder or a metadata file, that every external source's and
    test source's path exists, and that no test source is a training source (all its rows would be
    excluded as training duplicates). ``n_folds >= 2`` and the other ranges are already enforced by the
    config.

    Raises:
        ValueError: remote artifact root, unknown backbone (with close matches), a missing data path or a
            test source that is also trained on.
    """
    from melanoma_ml.model import validate_backbone

    artifact_paths(config)
    for backbone in config.backbones:
        validate_backbone(backbone)
    trained_on: dict[Path, str] = {}
    for setting, path, _image_dir, hint in fingerprint.configured_sources(config.data):
        try:
            resolved = fingerprint.existing_source(setting, path, hint)
        except FileNotFoundError as exc:
            raise InputValueError(str(exc)) from exc
        if not setting.startswith(fingerprint.TEST_SETTING):
            trained_on[resolved] = setting
        elif resolved in trained_on:
            raise InputValueError(
                f"{setting}.path {resolved} is also {trained_on[resolved]}, which the models train on: a "
                f"test set must be data they never saw; point {setting}.path at another dataset or remove the "
                "entry (MELANOMA_DATA__TEST_SOURCES or data.test_sources)"
            )


def require_data_source(config: PipelineConfig) -> None:
    """Refuse a run that would fall back to synthetic data when ``data.allow_synthetic`` is off (``full``).

    Raises:
        InputValueError: ``data.source_dir`` is unset and ``data.allow_synthetic`` is false.
    """
    if config.data.source_dir is None and not config.data.allow_synthetic:
        raise InputValueError(
            "data.source_dir is not set and data.allow_synthetic is false (profile 'full' trains on real "
            "data only): pass --set data.source_dir=PATH or set MELANOMA_DATA__SOURCE_DIR=PATH (an ISIC-layout "
            "folder or metadata CSV); to train these settings on the built-in synthetic set on purpose, set "
            "data.allow_synthetic=true"
        )


def prepare_source(config: PipelineConfig) -> SourceInfo:
    """The configured primary dataset, or the synthetic demo set generated (once) under the artifact root.

    The fingerprint also covers ``data.image_dir`` and every external source (see ``source_fingerprint``).

    Raises:
        InputValueError: ``data.source_dir`` is unset while ``data.allow_synthetic`` is off (the ``full``
            profile): the message says how to name the dataset (``require_data_source``).
    """
    require_data_source(config)
    data = config.data
    if data.source_dir is None and data.synthetic.layout == "isic2024":
        from melanoma_ml.synthetic_isic2024 import generate_isic2024_dataset

        folder = artifact_paths(config).synthetic.with_name("synthetic-isic2024")
        made = generate_isic2024_dataset(folder, data.synthetic)
        root, layout, image_dir, synthetic = made.root, "isic2024", made.hdf5_path, True
    elif data.source_dir is None:
        from melanoma_ml.synthetic import generate_synthetic_dataset

        dataset = generate_synthetic_dataset(artifact_paths(config).synthetic, data.synthetic)
        root, layout, image_dir, synthetic = Path(dataset.root), "isic2020", Path(dataset.image_dir), True
    else:
        root = Path(data.source_dir).expanduser().resolve()
        image_dir = Path(data.image_dir).expanduser().resolve() if data.image_dir else None
        layout, synthetic = data.layout, False
    digest = fingerprint.source_fingerprint(data, default_source_dir=root)
    return SourceInfo(root, layout, image_dir, synthetic, digest)


def clean_source(config: PipelineConfig, source: SourceInfo) -> CleaningResult:
    """Read and clean the primary source and every external one (``metadata.sources.load_configured_data``).

    External rows keep ``is_external`` True (``make_folds`` gives them fold -1 or their group's fold, so
    they are trained on, never validated on). Writes ``tables/clean.parquet`` and ``tables/quarantine.parquet``.
    """
    from melanoma_ml.metadata.sources import load_configured_data

    default = source.root if source.synthetic else None
    result = load_configured_data(config.data, default_source_dir=default)
    tables = artifact_paths(config).tables
    atomic_write_bytes(tables / "clean.parquet", parquet_bytes(result.clean))
    atomic_write_bytes(tables / "quarantine.parquet", parquet_bytes(result.quarantine))
    return result


def make_folds(config: PipelineConfig, clean: pd.DataFrame) -> pd.DataFrame:
    """The locked test split (``data.test_fraction``, fold -2), then patient-grouped stratified folds of the
    rest; writes ``tables/folds.parquet``."""
    from melanoma_ml.folds import assign_folds

    data = config.data
    folds = assign_folds(clean, data.n_folds, data.fold_seed, test_fraction=data.test_fraction)
    atomic_write_bytes(artifact_paths(config).tables / "folds.parquet", parquet_bytes(folds))
    return folds


def build_cache(config: PipelineConfig, folds_table: pd.DataFrame) -> ImageCache:
    """Every image resized once to ``data.image_size`` (reused by all backbones and folds)."""
    from melanoma_ml.images.cache import build_image_cache

    size = config.data.image_size
    return build_image_cache(folds_table, artifact_paths(config).cache(size), size)


def train_one(
    config: PipelineConfig, backbone: str, fold: int, folds_table: pd.DataFrame, cache: ImageCache
) -> FoldResult:
    """Train ``backbone`` on every fold but ``fold``; writes ``checkpoints/<backbone>/fold<k>/``."""
    from melanoma_ml.training.train import train_fold

    if backbone not in config.backbones:
        raise ValueError(f"backbone {backbone!r} is not in the configured backbones {config.backbones}")
    if not 0 <= fold < config.data.n_folds:
        raise ValueError(
            f"fold {fold} is outside 0..{config.data.n_folds - 1} (data.n_folds={config.data.n_folds})"
        )
    out_dir = artifact_paths(config).checkpoint(backbone, fold)
    return train_fold(config, backbone, fold, folds_table, cache, out_dir)


def evaluate_backbone(
    config: PipelineConfig, backbone: str, fold_results: Sequence[FoldResult]
) -> EvaluationReport:
    """Out-of-fold report of one backbone from all its folds; writes ``reports/<backbone>/``."""
    from melanoma_ml.evaluation import evaluate_predictions
    from melanoma_ml.evaluation.ranking import backbone_oof

    oof = backbone_oof(backbone, fold_results, config.data.n_folds)
    paths = artifact_paths(config)
    atomic_write_bytes(paths.oof(backbone), parquet_bytes(oof))  # creates reports/<backbone>/
    return evaluate_predictions(oof, config.evaluation, out_dir=paths.report(backbone), name=backbone)


def evaluate_on_test(
    config: PipelineConfig,
    fold_results: Mapping[str, Sequence[FoldResult]],
    reports: Mapping[str, EvaluationReport],
    folds_table: pd.DataFrame,
    cache: ImageCache,
) -> TestEvaluation:
    """Each backbone's fold-model mean and its served fold model on the locked test split and on every
    ``data.test_sources`` set, at thresholds fixed out-of-fold (``evaluation.holdout``).

    Writes ``reports/test/<test set>/<backbone>/{folds,fold<k>,top_k}/`` and ``reports/test/test_evaluation.json``.
    Nothing downstream chooses with these numbers: ranking and the gate read out-of-fold ones.
    """
    from melanoma_ml.evaluation.holdout import evaluate_test_sets

    paths = artifact_paths(config)
    return evaluate_test_sets(
        config, fold_results, reports, folds_table, cache, paths.test_reports, paths.caches
    )


def train_tabular_baseline(config: PipelineConfig, folds_table: pd.DataFrame) -> TabularBaseline:
    """The GBDT on ``model.tabular_features`` alone, on the image models' folds; writes
    ``reports/gbdt_tabular/`` (``oof.parquet``, ``report.json``, figures). Off (nothing trained, a note
    saying how to turn it on) when ``model.tabular_features`` is empty."""
    from melanoma_ml.tabular.baseline import run_tabular_baseline

    return run_tabular_baseline(config, folds_table)


def rank_backbones(
    config: PipelineConfig,
    reports: Mapping[str, EvaluationReport],
    test_evaluation: TestEvaluation | None = None,
    tabular_baseline: TabularBaseline | None = None,
) -> Leaderboard:
    """Backbones ranked by out-of-fold AUC, each with its paired AUC difference to the best (the candidate).

    Reads each backbone's ``reports/<backbone>/oof.parquet`` (saved by ``evaluate_backbone``); writes
    ``reports/leaderboard/leaderboard.parquet`` and ``leaderboard.json``. ``test_evaluation`` adds the
    test AUC [CI], the optimism gap and each external set's AUC and gap beside each row; it never changes
    the order, and picks the candidate only under ``evaluation.select_on`` external or worst. An enabled
    ``tabular_baseline`` adds its row and the blend's (candidate + GBDT, report in ``reports/blend/``);
    the candidate is always an image backbone.
    """
    from melanoma_ml.evaluation.blend import BLEND_NAME
    from melanoma_ml.evaluation.ranking import Leaderboard, TabularRows, report_oof

    paths = artifact_paths(config)
    oofs = {b: report_oof(config, b) for b in reports}
    tabular, note = None, ""
    if tabular_baseline is not None:
        note = tabular_baseline.note
        if (gbdt := tabular_baseline.report) is not None:
            tabular = TabularRows(gbdt, report_oof(config, gbdt.name), paths.report(BLEND_NAME))
    board = Leaderboard.rank(reports, oofs, config.evaluation, test_evaluation, tabular, note)
    board.save(paths.leaderboard)
    return board


def promote_best(
    config: PipelineConfig,
    leaderboard: Leaderboard,
    reports: Mapping[str, EvaluationReport],
    fold_results: Mapping[str, Sequence[FoldResult]],
    *,
    data_version: str,
    folds_table: pd.DataFrame | None = None,
) -> PromotionOutcome:
    """Offer the leaderboard candidate's served model (``serving.ensemble``) to the gate against the champion.

    On promotion a new bundle is registered and ``current`` moves; a rejected candidate writes nothing
    (the policy: ``serving.champion.challenge_champion``). The gate reads out-of-fold numbers and, for the
    served model, the leaderboard's external test sets (``evaluation.max_external_gap``). With
    ``folds_table`` the bundle's test metrics are its own: the staged bundle scores the untouched test sets
    through ``predict``'s path (``batch.served_test_metrics``), not the test evaluation's fold models.
    """
    from melanoma_ml.monitoring.deployed import feedback_cases
    from melanoma_ml.serving.batch import served_test_metrics
    from melanoma_ml.serving.champion import challenge_champion, served_choice
    from melanoma_ml.serving.feedback_gate import feedback_check

    candidate = leaderboard.candidate
    if candidate not in reports:
        raise ValueError(f"leaderboard candidate {candidate!r} has no report among {sorted(reports)}")
    backbones = leaderboard.top_backbones(config.serving.ensemble_top_k)
    choice = served_choice(config, candidate, fold_results, backbones)
    measure = None
    if folds_table is not None:
        measure = partial(served_test_metrics, config, folds_table=folds_table, name=choice.name)
    return challenge_champion(
        config,
        choice,
        data_version=data_version,
        folds_table=folds_table,
        test_metrics=measure,
        external=leaderboard.external,
        selection=leaderboard.selection,
        staged_check=feedback_check(config, feedback_cases(config), folds_table),  # the gate's rule 4
    )


def explain_gallery(config: PipelineConfig, folds_table: pd.DataFrame, n_images: int = 6) -> Gallery:
    """CAM overlays of the served model on its own validation images; writes ``reports/gradcam/<version>/``."""
    from melanoma_ml.serving.gallery import render_gallery
    from melanoma_ml.serving.remote_registry import open_registry

    paths = artifact_paths(config)
    bundle = open_registry(config).load_current()
    seed = config.training.seed
    return render_gallery(bundle, folds_table, paths.gallery, config.serving, n_images=n_images, seed=seed)


# The run order: each step's calls, timed and checked as ``run_all`` runs them.
def _source(run: StepRun) -> SourceInfo:
    run.step("validate", validate_config, run.config)
    return run.step("source", prepare_source, run.config)


def _clean(run: StepRun, source_metadata: SourceInfo) -> CleaningResult:
    cleaning = run.step("clean", clean_source, run.config, source_metadata)
    run.check("clean_metadata_schema", checks.clean_table_problems, cleaning.clean)
    return cleaning


def _folds(run: StepRun, clean_metadata: CleaningResult) -> pd.DataFrame:
    from melanoma_ml.folds import fold_problems

    folds = run.step("folds", make_folds, run.config, clean_metadata.clean)
    tolerance = run.config.data.fold_prevalence_tolerance
    run.check("folds_leak_free_and_balanced", fold_problems, folds, tolerance)
    return folds


def _train(run: StepRun, patient_folds: pd.DataFrame, image_cache: ImageCache) -> dict[str, list[FoldResult]]:
    results: dict[str, list[FoldResult]] = {}
    for b in run.config.backbones:
        results[b] = []
        for k in range(run.config.data.n_folds):
            result = run.step(f"train {b}", train_one, run.config, b, k, patient_folds, image_cache)
            verify = (checks.checkpoint_problems, result, patient_folds, image_cache)
            run.check("checkpoint_loads", *verify, where=f"{b} fold {k}")
            results[b].append(result)
    return results


def _evaluate(run: StepRun, fold_model: dict[str, list[FoldResult]]) -> dict[str, EvaluationReport]:
    reports = {}
    for b in run.config.backbones:
        reports[b] = run.step(f"evaluate {b}", evaluate_backbone, run.config, b, fold_model[b])
        run.check("report_complete", reports[b].incomplete_metrics, where=b)
    return reports


def _test(run: StepRun, fold_model, evaluation, patient_folds, image_cache) -> TestEvaluation:
    from melanoma_ml.evaluation.holdout import untouched_problems

    reads = (run.config, fold_model, evaluation, patient_folds, image_cache)
    tested = run.step("test evaluation", evaluate_on_test, *reads)
    for note in tested.notes:
        run.progress(f"[test evaluation] {note}")
    run.check("test_split_untouched", untouched_problems, tested, fold_model, patient_folds)
    return tested


def _promote(
    run: StepRun, leaderboard, evaluation, fold_model, patient_folds, test_evaluation, image_cache
) -> PromotionOutcome:
    del test_evaluation  # read for the order only: promotion after the test split is checked untouched
    inputs = (run.config, leaderboard, evaluation, fold_model)
    version = fingerprint.table_fingerprint(patient_folds)
    promotion = run.step("promote", promote_best, *inputs, data_version=version, folds_table=patient_folds)
    run.progress(f"[promote] {promotion.decision.reason}")
    if (served := promotion.champion_after) is not None:
        verify = (checks.bundle_reproduction, run.config, served, patient_folds, image_cache)
        run.check("served_bundle_reproduces", *verify)
    return promotion


def _gallery(run: StepRun, serving_model: PromotionOutcome, patient_folds: pd.DataFrame) -> Gallery:
    del serving_model  # the gallery reads the registry the promotion wrote
    return run.step("gallery", explain_gallery, run.config, patient_folds)


TRAINING_DATA = ("patient_folds", "image_cache")
STEPS: tuple[Step, ...] = (
    Step("source_metadata", (), _source),
    Step(
        "clean_metadata", ("source_metadata",), _clean, {"clean_metadata_schema": ()}, ("quarantined_rows",)
    ),
    Step("patient_folds", ("clean_metadata",), _folds, {"folds_leak_free_and_balanced": ()}),
    Step("image_cache", ("patient_folds",), one_call("cache", build_cache)),
    Step("fold_model", TRAINING_DATA, _train, {"checkpoint_loads": TRAINING_DATA}),
    Step("evaluation", ("fold_model",), _evaluate, {"report_complete": ()}),
    Step(
        "test_evaluation",
        ("fold_model", "evaluation", *TRAINING_DATA),
        _test,
        {"test_split_untouched": ("fold_model", "patient_folds")},
    ),
    Step("tabular_baseline", ("patient_folds",), one_call("tabular baseline", train_tabular_baseline)),
    Step(
        "leaderboard",
        ("evaluation", "test_evaluation", "tabular_baseline"),
        one_call("leaderboard", rank_backbones),
    ),
    Step(
        "serving_model",
        ("leaderboard", "evaluation", "fold_model", "patient_folds", "test_evaluation"),
        _promote,
        {"served_bundle_reproduces": TRAINING_DATA},
    ),
    Step("gradcam_gallery", ("serving_model", "patient_folds"), _gallery),
)
"""The one run order: every step after the steps it reads (a topological order of the asset graph)."""


def run_all(config: PipelineConfig, progress: Callable[[str], Any] = print) -> PipelineResult:
    """Every step of ``STEPS`` in order, with the same blocking checks the Dagster asset checks run.

    Used by ``melanoma-ml demo`` and the overhead benchmark. Each check stops the run with
    ``PipelineCheckFailed`` (naming the problems) exactly where the blocking Dagster check would.
    """
    run = StepRun(config, progress)
    results: dict[str, Any] = {}
    for step in STEPS:
        results[step.name] = step.run(run, **{name: results[name] for name in step.reads})
    return PipelineResult(
        source=results["source_metadata"],
        cleaning=results["clean_metadata"],
        folds=results["patient_folds"],
        fold_results=results["fold_model"],
        reports=results["evaluation"],
        leaderboard=results["leaderboard"],
        promotion=results["serving_model"],
        gallery=results["gradcam_gallery"],
        step_seconds=run.seconds,
        test_evaluation=results["test_evaluation"],
        tabular_baseline=results["tabular_baseline"],
    )
