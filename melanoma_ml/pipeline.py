"""The whole pipeline as plain step functions, shared by the Dagster assets, the CLI and the benchmark.

Each step takes the ``PipelineConfig`` plus the previous steps' results, writes its artifacts under
``config.artifact_root`` (layout in docs/architecture.md) and returns a small result. No Dagster here;
heavy libraries (torch, timm, lightning) are imported inside the steps that need them.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pandas as pd

from melanoma_ml.atomic import atomic_write_bytes, atomic_write_json, parquet_bytes, sha256_file
from melanoma_ml.config import DataConfig, PipelineConfig

if TYPE_CHECKING:
    from melanoma_ml.evaluation import EvaluationReport
    from melanoma_ml.images.cache import ImageCache
    from melanoma_ml.metadata.result import CleaningResult
    from melanoma_ml.serving.promotion import GateDecision
    from melanoma_ml.training.train import FoldResult

T = TypeVar("T")

METADATA_SUFFIXES = (".csv", ".json", ".parquet")
PRIMARY_HINT = (
    "set data.source_dir (env MELANOMA_DATA__SOURCE_DIR) to an ISIC-layout folder or metadata CSV file, or "
    "leave it unset to use the built-in synthetic demo set"
)
EXTERNAL_HINT = "fix the path or remove the entry (MELANOMA_DATA__EXTERNAL_SOURCES or data.external_sources)"


@dataclass(frozen=True)
class ArtifactPaths:
    """Where each step writes, under the artifact root."""

    root: Path

    @property
    def synthetic(self) -> Path:
        return self.root / "data" / "synthetic"

    @property
    def tables(self) -> Path:
        return self.root / "tables"

    def cache(self, size: int) -> Path:
        return self.root / "cache" / f"{size}px"

    def checkpoint(self, backbone: str, fold: int) -> Path:
        return self.root / "checkpoints" / backbone / f"fold{fold}"

    def report(self, backbone: str) -> Path:
        return self.root / "reports" / backbone

    @property
    def leaderboard(self) -> Path:
        return self.root / "reports" / "leaderboard"

    @property
    def registry(self) -> Path:
        return self.root / "registry"

    @property
    def gallery(self) -> Path:
        return self.root / "reports" / "gradcam"


def artifact_paths(config: PipelineConfig) -> ArtifactPaths:
    """The artifact layout for ``config`` (remote URLs are rejected with advice)."""
    root = config.artifact_root
    if "://" in root and not root.startswith("file://"):
        scheme = root.split("://", 1)[0]
        raise ValueError(
            f"artifact_root {root!r} is a {scheme}:// URL, but the pipeline steps need a local folder (the "
            "image cache is memory-mapped, checkpoints and registry pointers are renamed atomically). "
            "Supported: a local path or a file:// URL; mount the bucket (s3fs, gcsfuse, blobfuse) and point "
            "artifact_root at the mount"
        )
    return ArtifactPaths(Path(root.removeprefix("file://")).expanduser().resolve())


def source_fingerprint(data: DataConfig, *, default_source_dir: str | Path | None = None) -> str:
    """Content hash of every dataset ``data`` reads: metadata file bytes plus image listings (names, sizes).

    Covers the primary source (``data.source_dir``, else ``default_source_dir``: the synthetic demo set;
    with neither it is left out), ``data.image_dir`` when it lies outside the primary folder, and every
    ``data.external_sources`` entry (its path and image_dir), so a change in any of them gives a new
    fingerprint. A source may be a folder or one metadata CSV file; for a file, the file, the metadata
    files beside it (duplicate lists, ground truth) and its image folder(s) are hashed. Images are listed
    and stat-ed, not read: cheap enough for a sensor on ISIC 2020 (33k images). Image suffixes are the
    loader's (``metadata.image_files.IMAGE_EXTENSIONS``).

    Raises:
        FileNotFoundError: a configured path does not exist (the message names the setting to fix).
    """
    primary = data.source_dir if data.source_dir is not None else default_source_dir
    sources: list[tuple[str, str | Path, str | None, str]] = []
    if primary is not None:
        sources.append(("data.source_dir", primary, data.image_dir, PRIMARY_HINT))
    for i, entry in enumerate(data.external_sources):
        sources.append((f"data.external_sources[{i}]", entry.path, entry.image_dir, EXTERNAL_HINT))
    digest = hashlib.sha256()
    for setting, path, image_dir, hint in sources:
        digest.update(f"source:{setting}\n".encode())
        _hash_source(digest, existing_source(setting, path, hint), image_dir, setting)
    return digest.hexdigest()


def existing_source(setting: str, path: str | Path, hint: str) -> Path:
    """``path`` resolved, when it is a folder or a file.

    Raises:
        FileNotFoundError: it does not exist (``setting`` and ``hint`` say what to change).
    """
    resolved = Path(path).expanduser().resolve()
    if not resolved.exists():
        what = "data folder" if setting == "data.source_dir" else f"{setting}.path"
        raise FileNotFoundError(f"{what} not found: {resolved}; {hint}")
    return resolved


def _hash_source(digest: Any, path: Path, image_dir: str | None, setting: str) -> None:
    """Add one source (folder or metadata file) and its image folder(s) to ``digest``."""
    from melanoma_ml.metadata.layouts import find_image_dirs

    folder = path.parent if path.is_file() else path
    if path.is_file():
        _hash_metadata(digest, path.parent, [p for p in path.parent.iterdir() if p.is_file()])
    else:
        metadata = [p for p in folder.rglob("*") if p.is_file() and len(p.relative_to(folder).parts) <= 2]
        _hash_metadata(digest, folder, metadata)
        _hash_images(digest, folder, folder.rglob("*"))
    if image_dir is not None:
        images = Path(image_dir).expanduser().resolve()
        if not images.is_dir():
            raise FileNotFoundError(
                f"{setting} image_dir not found: {images}; point it at the image folder, or unset it to find "
                "the images beside the metadata"
            )
        image_dirs = [] if images.is_relative_to(folder) and path.is_dir() else [images]
    else:
        image_dirs = find_image_dirs(folder) if path.is_file() else []
    for images in image_dirs:
        _hash_images(digest, images, images.iterdir())  # the loader reads only the files directly inside


def _hash_metadata(digest: Any, root: Path, files: Any) -> None:
    for path in sorted(p for p in files if p.suffix.lower() in METADATA_SUFFIXES):
        digest.update(f"meta:{path.relative_to(root).as_posix()}:".encode())
        digest.update(path.read_bytes())


def _hash_images(digest: Any, root: Path, paths: Any) -> None:
    from melanoma_ml.metadata.image_files import IMAGE_EXTENSIONS

    for path in sorted(p for p in paths if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
        digest.update(
            f"image:{root.name}/{path.relative_to(root).as_posix()}:{path.stat().st_size}\n".encode()
        )


# --------------------------------------------------------------------------------------------- results
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
class Leaderboard:
    """Backbones ranked by out-of-fold AUC, with paired AUC differences against the candidate.

    Attributes:
        table: ``melanoma_ml.evaluation.leaderboard``: one row per backbone, best first, with AUC/pAUC CIs and
            the paired AUC difference to the candidate (``auc_diff_vs_best``, ``diff_lo``, ``diff_hi``).
        candidate: The backbone with the highest AUC: the one offered to the promotion gate.
    """

    table: pd.DataFrame
    candidate: str


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


@dataclass(frozen=True)
class GalleryItem:
    image_name: str
    target: int
    prob: float
    path: Path


@dataclass(frozen=True)
class Gallery:
    """Grad-CAM overlays of the served model on a few of its validation images.

    ``version`` is None (and ``items`` empty) when no model has been promoted yet; ``note`` says why.
    """

    version: str | None
    method: str
    target_layer: str
    items: list[GalleryItem]
    note: str = ""


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


# --------------------------------------------------------------------------------------------- steps
def validate_config(config: PipelineConfig) -> None:
    """Fail before any work on settings that would otherwise fail deep inside a later step.

    Checks that the artifact root is local, every backbone name against timm (imports timm, ~seconds),
    that ``data.source_dir`` (when set) is a folder or a metadata file, and that every external source's
    path exists. ``n_folds >= 2`` and the other ranges are already enforced by the config.

    Raises:
        ValueError: remote artifact root, unknown backbone (with close matches) or a missing data path.
    """
    from melanoma_ml.model import validate_backbone

    artifact_paths(config)
    for backbone in config.backbones:
        validate_backbone(backbone)
    paths = [
        (f"data.external_sources[{i}]", e.path, EXTERNAL_HINT)
        for i, e in enumerate(config.data.external_sources)
    ]
    if config.data.source_dir is not None:
        paths.insert(0, ("data.source_dir", config.data.source_dir, PRIMARY_HINT))
    for setting, path, hint in paths:
        try:
            existing_source(setting, path, hint)
        except FileNotFoundError as exc:
            raise ValueError(str(exc)) from exc


def prepare_source(config: PipelineConfig) -> SourceInfo:
    """The configured primary dataset, or the synthetic demo set generated (once) under the artifact root.

    The fingerprint also covers ``data.image_dir`` and every external source (see ``source_fingerprint``).
    """
    data = config.data
    if data.source_dir is None:
        from melanoma_ml.synthetic import generate_synthetic_dataset

        dataset = generate_synthetic_dataset(artifact_paths(config).synthetic, data.synthetic)
        root, layout, image_dir, synthetic = Path(dataset.root), "isic2020", Path(dataset.image_dir), True
    else:
        root = Path(data.source_dir).expanduser().resolve()
        image_dir = Path(data.image_dir).expanduser().resolve() if data.image_dir else None
        layout, synthetic = data.layout, False
    fingerprint = source_fingerprint(data, default_source_dir=root)
    return SourceInfo(root, layout, image_dir, synthetic, fingerprint)


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
    """Patient-grouped stratified folds; writes ``tables/folds.parquet``."""
    from melanoma_ml.folds import assign_folds

    folds = assign_folds(clean, config.data.n_folds, config.data.fold_seed)
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

    oof = backbone_oof(backbone, fold_results, config.data.n_folds)
    out_dir = artifact_paths(config).report(backbone)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / "oof.parquet", parquet_bytes(oof))
    return evaluate_predictions(oof, config.evaluation, out_dir=out_dir, name=backbone)


def backbone_oof(backbone: str, fold_results: Sequence[FoldResult], n_folds: int) -> pd.DataFrame:
    """The out-of-fold predictions of all folds of ``backbone`` (every fold must be there, once).

    Raises:
        ValueError: a fold is missing or duplicated, or a result belongs to another backbone.
    """
    folds = sorted(r.fold for r in fold_results)
    others = sorted({r.backbone for r in fold_results} - {backbone})
    if others:
        raise ValueError(f"results of {others} were passed to the evaluation of {backbone!r}")
    if folds != list(range(n_folds)):
        raise ValueError(
            f"{backbone}: out-of-fold evaluation needs exactly folds 0..{n_folds - 1} once each, got {folds}; "
            "train the missing fold partitions first"
        )
    return pd.concat([r.oof for r in sorted(fold_results, key=lambda r: r.fold)], ignore_index=True)


def rank_backbones(config: PipelineConfig, reports: Mapping[str, EvaluationReport]) -> Leaderboard:
    """Backbones ranked by AUC, each with its paired AUC difference to the best (the candidate).

    Reads each backbone's ``reports/<backbone>/oof.parquet`` (saved by ``evaluate_backbone``); writes
    ``reports/leaderboard/leaderboard.parquet`` and ``leaderboard.json``.
    """
    from melanoma_ml.evaluation import leaderboard

    oofs = {backbone: report_oof(config, backbone) for backbone in reports}
    table = leaderboard(reports, oofs, config.evaluation)
    candidate = str(table.attrs["candidate"])
    out_dir = artifact_paths(config).leaderboard
    atomic_write_bytes(out_dir / "leaderboard.parquet", parquet_bytes(table))
    atomic_write_json(
        out_dir / "leaderboard.json", {"candidate": candidate, "rows": table.to_dict("records")}
    )
    return Leaderboard(table=table, candidate=candidate)


def promote_best(
    config: PipelineConfig,
    leaderboard: Leaderboard,
    reports: Mapping[str, EvaluationReport],
    fold_results: Mapping[str, Sequence[FoldResult]],
    *,
    data_version: str,
) -> PromotionOutcome:
    """Offer the leaderboard's candidate to the gate; on promotion register a new bundle and move ``current``.

    The leaderboard ranks backbones on their pooled out-of-fold predictions (``reports``), but one model is
    served: the candidate's best fold model (highest validation AUROC). Everything the gate and the bundle
    say is about that model: its metrics and tuned threshold come from its own validation rows
    (``served_model_report``) and its AUC lower bound is held against the floor. Against a champion, the
    candidate's out-of-fold predictions (each image predicted by a fold model that never trained on it) are
    compared with the champion's stored ones on the images both have (``paired_difference_with_champion``).
    The bundle stores the served fold's own out-of-fold rows (``extra["oof"]``) for the next comparison.
    A rejected candidate writes nothing.
    """
    from melanoma_ml.serving.promotion import GateDecision, decide_promotion
    from melanoma_ml.serving.registry import ModelRegistry

    candidate = leaderboard.candidate
    if candidate not in reports:
        raise ValueError(f"leaderboard candidate {candidate!r} has no report among {sorted(reports)}")
    best = max(fold_results[candidate], key=lambda r: r.best_val_auroc)
    registry = ModelRegistry(artifact_paths(config).registry)
    champion = registry.current()
    champion_metrics, paired, paired_note = None, None, ""
    if champion is not None:
        manifest = registry.manifest(champion)
        if (manifest.get("extra") or {}).get("checkpoint_sha256") == best.weights_sha256:
            already = GateDecision(
                False,
                f"candidate {candidate} fold {best.fold} is already served as {champion} (same weights)",
            )
            return PromotionOutcome(already, candidate, champion, champion, None, best.fold)
        champion_metrics = manifest["metrics"]
        paired, paired_note = paired_difference_with_champion(config, report_oof(config, candidate), manifest)
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
    version = register_fold_model(config, best, served, decision.reason, data_version=data_version)
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
    config: PipelineConfig, best: FoldResult, report: EvaluationReport, reason: str, *, data_version: str
) -> str:
    """Register ``best``'s checkpoint as a new registry version (not yet current) and return the version.

    Args:
        report: ``served_model_report(config, best)``: its threshold and metrics go into the manifest.
    """
    import melanoma_ml
    from melanoma_ml.serving.registry import ModelRegistry
    from melanoma_ml.training.checkpoint import load_checkpoint

    net, spec, _info = load_checkpoint(best.checkpoint_dir)
    oof = best.oof
    return ModelRegistry(artifact_paths(config).registry).register_bundle(
        net,
        spec,
        reason=reason,
        threshold=report.threshold.value,
        metrics=report.to_dict()["metrics"],
        data_version=data_version,
        code_version=f"melanoma_ml-{melanoma_ml.__version__}",
        extra={
            "backbone": best.backbone,
            "fold": best.fold,
            "checkpoint_sha256": best.weights_sha256,
            "oof": {c: oof[c].tolist() for c in OOF_KEEP},
        },
    )


OOF_KEEP = ("image_name", "group_id", "fold", "target", "prob")
"""Out-of-fold columns stored in a bundle's manifest (enough for a paired comparison later)."""


def report_oof(config: PipelineConfig, backbone: str) -> pd.DataFrame:
    """The out-of-fold predictions ``evaluate_backbone`` saved for ``backbone``."""
    path = artifact_paths(config).report(backbone) / "oof.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; evaluate backbone {backbone!r} first")
    return pd.read_parquet(path)


def paired_difference_with_champion(
    config: PipelineConfig, candidate_oof: pd.DataFrame, champion_manifest: Mapping[str, Any]
) -> tuple[dict[str, Any] | None, str]:
    """Candidate-minus-champion AUC difference on the images both were evaluated on.

    The champion's stored predictions (manifest ``extra.oof``) are paired with the candidate's rows by
    image name; labels and groups are the candidate's (the current folds table), so a label fixed since
    the champion was promoted counts as fixed for both.

    Returns:
        ``(difference, note)``: ``paired_auc_difference``'s dict and a note on the overlap, or ``(None,
        why)`` (the gate then refuses, quoting ``why``) when the champion stores no out-of-fold
        predictions or the shared images hold fewer than ``evaluation.subgroup_min_cases`` melanoma or
        benign cases.
    """
    from melanoma_ml.evaluation import paired_auc_difference

    stored = (champion_manifest.get("extra") or {}).get("oof")
    if not stored:
        return None, "the champion's manifest stores no out-of-fold predictions (extra.oof) to pair with"
    champion_prob = pd.DataFrame(stored)[["image_name", "prob"]]
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


def explain_gallery(config: PipelineConfig, folds_table: pd.DataFrame, n_images: int = 6) -> Gallery:
    """CAM overlays of the served model on its own validation images (most and least suspicious ones).

    The images are those of the bundle's stored out-of-fold predictions (``bundle_validation_rows``), so
    re-made folds never slip training images in. Writes ``reports/gradcam/<version>/<image_name>.png``.
    """
    from melanoma_ml.images.cache import load_resized
    from melanoma_ml.serving.explain import default_target_layer, explain
    from melanoma_ml.serving.inference import predict
    from melanoma_ml.serving.registry import ModelRegistry

    method = config.serving.cam_method
    bundle = ModelRegistry(artifact_paths(config).registry).load_current()
    if bundle is None:
        return Gallery(
            None, method, "", [], note="no model is promoted yet (the gate rejected every candidate)"
        )
    val, problem = bundle_validation_rows(bundle.manifest, folds_table)
    if problem:
        return Gallery(
            bundle.version, method, "", [], note=f"no gallery for bundle {bundle.version}: {problem}"
        )
    picked = pick_gallery_rows(val, n_images, seed=config.training.seed)
    images = [load_resized(p, bundle.spec.image_size) for p in picked["image_path"]]
    metadata = [metadata_dict(row) for row in picked.itertuples(index=False)]
    probs = predict(bundle, images, metadata, tta=config.serving.tta)
    out_dir = artifact_paths(config).gallery / bundle.version
    items, layer = [], ""
    min_side = config.serving.cam_min_map_side
    target_layer = default_target_layer(bundle.net, bundle.spec.image_size, min_side)
    for image, meta, prob, row in zip(images, metadata, probs, picked.itertuples(index=False), strict=True):
        explanation = explain(
            bundle, image, meta, method=method, target_layer=target_layer, min_side=min_side
        )
        layer = explanation.target_layer
        path = out_dir / f"{row.image_name}.png"
        atomic_write_bytes(path, png_bytes(explanation.overlay))
        items.append(GalleryItem(str(row.image_name), int(row.target), float(prob), path))
    return Gallery(bundle.version, method, layer, items)


def pick_gallery_rows(val: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """Up to ``n`` rows, half melanoma and half benign where possible, reproducibly."""
    melanoma = val[val["target"] == 1]
    benign = val[val["target"] == 0]
    n_mel = min(len(melanoma), max(1, n // 2))
    n_ben = min(len(benign), n - n_mel)
    return pd.concat(
        [melanoma.sample(n_mel, random_state=seed), benign.sample(n_ben, random_state=seed)],
        ignore_index=True,
    )


def metadata_dict(row: Any) -> dict[str, Any]:
    """``{"age", "sex", "site"}`` for one cleaned-table row (NaN stays missing)."""
    return {
        "age": None if pd.isna(row.age_approx) else float(row.age_approx),
        "sex": None if pd.isna(row.sex) else row.sex,
        "site": None if pd.isna(row.anatom_site_general_challenge) else row.anatom_site_general_challenge,
    }


# --------------------------------------------------------------------------------------------- verification
def clean_table_problems(clean: pd.DataFrame) -> list[str]:
    """Schema and vocabulary of the cleaned table: exact columns, known sexes/sites, 0/1 labels, unique images."""
    from melanoma_ml import schema

    if list(clean.columns) != list(schema.CLEAN_COLUMNS):
        return [
            f"columns {list(clean.columns)} differ from schema.CLEAN_COLUMNS {list(schema.CLEAN_COLUMNS)}"
        ]
    problems = []
    if clean.empty:
        problems.append("the cleaned table is empty: every row was quarantined (see quarantined_rows)")
    for column, vocabulary in ((schema.SEX, schema.SEXES), (schema.SITE, schema.SITES)):
        unknown = sorted(set(clean[column].dropna()) - set(vocabulary))
        if unknown:
            problems.append(f"{column} has values outside {list(vocabulary)}: {unknown[:5]}")
    labels = set(pd.to_numeric(clean[schema.TARGET], errors="coerce").dropna().astype(int))
    if not labels <= {0, 1} or clean[schema.TARGET].isna().any():
        problems.append(
            f"target must be 0/1 on every row, found {sorted(labels)} and {int(clean[schema.TARGET].isna().sum())} missing"
        )
    ages = pd.to_numeric(clean[schema.AGE], errors="coerce").dropna()
    if ((ages < 0) | (ages > schema.MAX_AGE)).any():
        problems.append(
            f"age_approx outside 0..{schema.MAX_AGE}: {sorted(ages[(ages < 0) | (ages > schema.MAX_AGE)].unique())[:5]}"
        )
    duplicated = clean[schema.IMAGE][clean[schema.IMAGE].duplicated()]
    if len(duplicated):
        problems.append(f"{len(duplicated)} duplicated image names, e.g. {duplicated.head(5).tolist()}")
    return problems


def checkpoint_problems(
    result: FoldResult, folds_table: pd.DataFrame, cache: ImageCache, n: int = 8
) -> tuple[list[str], dict[str, Any]]:
    """Does the saved checkpoint load, match its sha256 and give finite outputs on validation images?"""
    import torch

    from melanoma_ml.images.transforms import eval_transform
    from melanoma_ml.training.checkpoint import WEIGHTS_FILE, load_checkpoint

    problems: list[str] = []
    weights = Path(result.checkpoint_dir) / WEIGHTS_FILE
    digest = sha256_file(weights)
    if digest != result.weights_sha256:
        problems.append(
            f"{weights} sha256 {digest[:12]} differs from the recorded {result.weights_sha256[:12]}"
        )
    net, spec, _info = load_checkpoint(result.checkpoint_dir)
    rows = folds_table[folds_table["fold"] == result.fold].head(n)
    transform = eval_transform(spec.image_size, spec.mean, spec.std)
    pixels = cache.array()[cache.rows_for(rows["image_name"])]
    x = torch.stack([transform(image=img)["image"] for img in pixels])
    meta = torch.as_tensor(spec.encoder.transform(rows))
    with torch.inference_mode():
        logits = net(x, meta)
    finite = bool(torch.isfinite(logits).all())
    if not finite:
        problems.append(
            f"non-finite logits on {int((~torch.isfinite(logits)).sum())} of {len(rows)} validation images"
        )
    return problems, {"images_checked": len(rows), "finite": finite, "sha256": digest}


def bundle_reproduction(
    config: PipelineConfig,
    version: str,
    folds_table: pd.DataFrame,
    cache: ImageCache,
    n: int = 16,
    atol: float = 1e-3,
) -> tuple[list[str], dict[str, Any]]:
    """Does registry ``version`` load and reproduce its out-of-fold predictions on a sample of its fold?

    The bundle's network is the fold model that produced those predictions, so without TTA on the same
    cached pixels the probabilities must agree to ``atol``.
    """
    from melanoma_ml.serving.bundle import load_bundle
    from melanoma_ml.serving.inference import predict
    from melanoma_ml.serving.registry import ModelRegistry

    bundle = load_bundle(ModelRegistry(artifact_paths(config).registry).version_path(version))
    own_rows, problem = bundle_validation_rows(bundle.manifest, folds_table)
    if problem:
        return [f"bundle {version}: {problem}"], {}
    rows = own_rows.head(n)
    images = list(cache.array()[cache.rows_for(rows["image_name"])])
    got = predict(bundle, images, [metadata_dict(r) for r in rows.itertuples(index=False)], tta=False)
    gap = float(np.max(np.abs(got - rows["stored_prob"].to_numpy())))
    problems = (
        []
        if gap <= atol
        else [f"bundle {version} predictions differ from the report by up to {gap:.2e} (> {atol})"]
    )
    return problems, {"version": version, "images_checked": len(rows), "max_abs_difference": gap}


def bundle_validation_rows(
    manifest: Mapping[str, Any], folds_table: pd.DataFrame
) -> tuple[pd.DataFrame, str]:
    """The served model's own validation images, as rows of the current ``folds_table``.

    They are the images of the out-of-fold predictions stored in the bundle (manifest ``extra.oof``; only
    fold ``extra.fold`` when the manifest names one, as older bundles stored every fold's rows), not the
    table's current fold ``extra.fold``: folds re-made since the promotion may put training images there.

    Returns:
        ``(rows, "")``: the folds-table rows in stored order, plus ``stored_prob`` (the stored
        prediction); or an empty frame and why there are none.
    """
    extra = manifest.get("extra") or {}
    stored = pd.DataFrame(extra.get("oof") or {})
    if stored.empty:
        return (
            stored,
            "it stores no out-of-fold predictions (manifest extra.oof) to tell its validation images",
        )
    if extra.get("fold") is not None and "fold" in stored.columns:
        stored = stored[stored["fold"] == int(extra["fold"])]
    own = stored[["image_name", "prob"]].rename(columns={"prob": "stored_prob"})
    rows = own.merge(folds_table.drop(columns=["stored_prob"], errors="ignore"), on="image_name", how="inner")
    if rows.empty:
        return rows, (
            "none of its validation images are in the current folds table (the data changed since it was "
            "promoted); re-run training and promotion"
        )
    return rows, ""


# --------------------------------------------------------------------------------------------- the whole run
class PipelineCheckFailed(RuntimeError):
    """A quality check between two steps failed; later steps would build on bad input."""


def run_all(config: PipelineConfig, progress: Callable[[str], Any] = print) -> PipelineResult:
    """Every step in order, with the same blocking checks the Dagster asset checks run.

    Used by ``melanoma-ml demo`` and the overhead benchmark. Each check stops the run with
    ``PipelineCheckFailed`` (naming the problems) exactly where the blocking Dagster check would.
    """
    from melanoma_ml.folds import fold_problems

    seconds: dict[str, float] = {}

    def step(name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        progress(f"[{name}] ...")
        started = time.perf_counter()
        value = fn(*args, **kwargs)
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started
        progress(f"[{name}] done in {time.perf_counter() - started:.1f} s")
        return value

    def check(name: str, fn: Callable[..., Any], *args: Any) -> None:
        outcome = step(f"check {name}", fn, *args)
        problems = outcome[0] if isinstance(outcome, tuple) else outcome
        if problems:
            raise PipelineCheckFailed(f"check {name} failed: " + "; ".join(map(str, problems)))

    step("validate", validate_config, config)
    source = step("source", prepare_source, config)
    cleaning = step("clean", clean_source, config, source)
    check("clean_metadata_schema", clean_table_problems, cleaning.clean)
    folds = step("folds", make_folds, config, cleaning.clean)
    check("folds_leak_free_and_balanced", fold_problems, folds, config.data.fold_prevalence_tolerance)
    cache = step("cache", build_cache, config, folds)
    fold_results: dict[str, list[FoldResult]] = {}
    for backbone in config.backbones:
        fold_results[backbone] = []
        for k in range(config.data.n_folds):
            result = step(f"train {backbone}", train_one, config, backbone, k, folds, cache)
            check(f"checkpoint_loads {backbone} fold {k}", checkpoint_problems, result, folds, cache)
            fold_results[backbone].append(result)
    reports = {}
    for b in config.backbones:
        reports[b] = step(f"evaluate {b}", evaluate_backbone, config, b, fold_results[b])
        check(f"report_complete {b}", reports[b].incomplete_metrics)
    board = step("leaderboard", rank_backbones, config, reports)
    promotion = step(
        "promote", promote_best, config, board, reports, fold_results, data_version=table_fingerprint(folds)
    )
    progress(f"[promote] {promotion.decision.reason}")
    if promotion.champion_after is not None:
        check("served_bundle_reproduces", bundle_reproduction, config, promotion.champion_after, folds, cache)
    gallery = step("gallery", explain_gallery, config, folds)
    return PipelineResult(source, cleaning, folds, fold_results, reports, board, promotion, gallery, seconds)


# --------------------------------------------------------------------------------------------- helpers
def table_fingerprint(table: pd.DataFrame) -> str:
    """sha256 of a table's content (row order and column names included): a data version."""
    digest = hashlib.sha256(",".join(map(str, table.columns)).encode())
    digest.update(pd.util.hash_pandas_object(table, index=False).to_numpy().tobytes())
    return digest.hexdigest()


def png_bytes(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()
