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

from melanoma_ml.atomic import atomic_write_bytes, atomic_write_json, sha256_file
from melanoma_ml.config import PipelineConfig

if TYPE_CHECKING:
    from melanoma_ml.evaluation import EvaluationReport
    from melanoma_ml.images.cache import ImageCache
    from melanoma_ml.metadata.result import CleaningResult
    from melanoma_ml.serving.promotion import GateDecision
    from melanoma_ml.training.train import FoldResult

T = TypeVar("T")

METADATA_SUFFIXES = (".csv", ".json", ".parquet")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".dcm")


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


def source_fingerprint(folder: str | Path) -> str:
    """Content hash of a dataset folder: metadata file bytes plus the image listing (names and sizes).

    Cheap enough for a sensor on ISIC 2020 (33k images): images are listed and stat-ed, not read.

    Raises:
        FileNotFoundError: ``folder`` does not exist (the message says which setting to fix).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"data folder not found: {folder}; set data.source_dir (env MELANOMA_DATA__SOURCE_DIR) to an "
            "ISIC-layout folder, or leave it unset to use the built-in synthetic demo set"
        )
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        suffix = path.suffix.lower()
        if suffix in METADATA_SUFFIXES and len(path.relative_to(folder).parts) <= 2:
            digest.update(f"meta:{rel}:".encode())
            digest.update(path.read_bytes())
        elif suffix in IMAGE_SUFFIXES:
            digest.update(f"image:{rel}:{path.stat().st_size}\n".encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class SourceInfo:
    """The dataset folder a run reads.

    Attributes:
        root: Dataset folder (ISIC layout).
        layout: Layout passed to ``metadata.load_dataset`` (``"isic2020"`` for the synthetic set).
        image_dir: Explicit image folder or None (auto-detected by the layout reader).
        synthetic: Whether this is the built-in synthetic demo set.
        fingerprint: ``source_fingerprint(root)``: changes when metadata or the image listing change.
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

    Checks that the artifact root is local, every backbone name against timm (imports timm, ~seconds)
    and that ``data.source_dir`` (when set) is a folder. ``n_folds >= 2`` and the other ranges are
    already enforced by the config.

    Raises:
        ValueError: remote artifact root, unknown backbone (with close matches) or missing data folder.
    """
    from melanoma_ml.model import validate_backbone

    artifact_paths(config)
    for backbone in config.backbones:
        validate_backbone(backbone)
    if config.data.source_dir is not None and not Path(config.data.source_dir).expanduser().is_dir():
        raise ValueError(
            f"data folder not found: {config.data.source_dir}; set data.source_dir (env "
            "MELANOMA_DATA__SOURCE_DIR) to an ISIC-layout folder, or leave it unset for the synthetic demo set"
        )


def prepare_source(config: PipelineConfig) -> SourceInfo:
    """The configured dataset folder, or the synthetic demo set generated (once) under the artifact root."""
    data = config.data
    if data.source_dir is None:
        from melanoma_ml.synthetic import generate_synthetic_dataset

        dataset = generate_synthetic_dataset(artifact_paths(config).synthetic, data.synthetic)
        root, layout, image_dir, synthetic = Path(dataset.root), "isic2020", Path(dataset.image_dir), True
    else:
        root = Path(data.source_dir).expanduser().resolve()
        image_dir = Path(data.image_dir).expanduser().resolve() if data.image_dir else None
        layout, synthetic = data.layout, False
    return SourceInfo(root, layout, image_dir, synthetic, source_fingerprint(root))


def clean_source(config: PipelineConfig, source: SourceInfo) -> CleaningResult:
    """Read and clean the source; writes ``tables/clean.parquet`` and ``tables/quarantine.parquet``."""
    from melanoma_ml.metadata import load_dataset

    result = load_dataset(source.root, layout=source.layout, image_dir=source.image_dir)
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

    The bundle holds the candidate's best fold model (highest validation AUROC), the report's tuned
    threshold and metrics, and the candidate's out-of-fold predictions (``extra["oof"]``) so a later
    candidate can be compared with it on the same rows. A rejected candidate writes nothing.
    """
    from melanoma_ml.serving.promotion import GateDecision, decide_promotion
    from melanoma_ml.serving.registry import ModelRegistry

    candidate = leaderboard.candidate
    report = reports[candidate]
    best = max(fold_results[candidate], key=lambda r: r.best_val_auroc)
    registry = ModelRegistry(artifact_paths(config).registry)
    champion = registry.current()
    champion_metrics, paired = None, None
    if champion is not None:
        manifest = registry.manifest(champion)
        if (manifest.get("extra") or {}).get("checkpoint_sha256") == best.weights_sha256:
            already = GateDecision(
                False,
                f"candidate {candidate} fold {best.fold} is already served as {champion} (same weights)",
            )
            return PromotionOutcome(already, candidate, champion, champion, None, best.fold)
        champion_metrics = manifest["metrics"]
        paired = paired_difference_with_champion(config, report_oof(config, candidate), manifest)
    decision = decide_promotion(
        report.to_dict()["metrics"],
        champion_metrics,
        paired,
        auc_floor=config.evaluation.promotion_auc_floor,
        candidate_name=candidate,
        champion_name=champion or "none",
    )
    if not decision.promote:
        return PromotionOutcome(decision, candidate, champion, champion, None, best.fold)
    version = register_fold_model(config, best, report, decision.reason, data_version=data_version)
    registry.promote(version, reason=decision.reason)
    return PromotionOutcome(decision, candidate, champion, version, version, best.fold)


def register_fold_model(
    config: PipelineConfig, best: FoldResult, report: EvaluationReport, reason: str, *, data_version: str
) -> str:
    """Register ``best``'s checkpoint as a new registry version (not yet current) and return the version."""
    import melanoma_ml
    from melanoma_ml.serving.registry import ModelRegistry
    from melanoma_ml.training.checkpoint import load_checkpoint

    net, spec, _info = load_checkpoint(best.checkpoint_dir)
    oof = report_oof(config, best.backbone)
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
) -> dict[str, Any] | None:
    """Candidate-minus-champion AUC difference on the images both were evaluated on, or None.

    None (the gate then refuses) when the champion's manifest holds no out-of-fold predictions or the
    two share no images with both classes.
    """
    from melanoma_ml.evaluation import paired_auc_difference

    stored = (champion_manifest.get("extra") or {}).get("oof")
    if not stored:
        return None
    champion_oof = pd.DataFrame(stored)
    shared = set(candidate_oof["image_name"]) & set(champion_oof["image_name"])
    cand = candidate_oof[candidate_oof["image_name"].isin(shared)].sort_values("image_name")
    champ = champion_oof[champion_oof["image_name"].isin(shared)].sort_values("image_name")
    if cand["target"].nunique() < 2:
        return None
    return paired_auc_difference(cand, champ, config.evaluation, names=("candidate", "champion"))


def explain_gallery(config: PipelineConfig, folds_table: pd.DataFrame, n_images: int = 6) -> Gallery:
    """CAM overlays of the served model on its own validation images (most and least suspicious ones).

    Writes ``reports/gradcam/<version>/<image_name>.png``.
    """
    from melanoma_ml.images.cache import load_resized
    from melanoma_ml.serving.explain import explain
    from melanoma_ml.serving.inference import predict
    from melanoma_ml.serving.registry import ModelRegistry

    method = config.serving.cam_method
    bundle = ModelRegistry(artifact_paths(config).registry).load_current()
    if bundle is None:
        return Gallery(
            None, method, "", [], note="no model is promoted yet (the gate rejected every candidate)"
        )
    fold = int(bundle.manifest["extra"]["fold"])
    val = folds_table[folds_table["fold"] == fold]
    picked = pick_gallery_rows(val, n_images, seed=config.training.seed)
    images = [load_resized(p, bundle.spec.image_size) for p in picked["image_path"]]
    metadata = [metadata_dict(row) for row in picked.itertuples(index=False)]
    probs = predict(bundle, images, metadata, tta=config.serving.tta)
    out_dir = artifact_paths(config).gallery / bundle.version
    items, layer = [], ""
    target_layer = cam_layer(bundle.net, bundle.spec.image_size)
    for image, meta, prob, row in zip(images, metadata, probs, picked.itertuples(index=False), strict=True):
        explanation = explain(bundle, image, meta, method=method, target_layer=target_layer)
        layer = explanation.target_layer
        path = out_dir / f"{row.image_name}.png"
        atomic_write_bytes(path, png_bytes(explanation.overlay))
        items.append(GalleryItem(str(row.image_name), int(row.target), float(prob), path))
    return Gallery(bundle.version, method, layer, items)


def cam_layer(net: Any, image_size: int, min_side: int = 4) -> str:
    """The preferred CAM layer (``explain.target_layer_names``) whose map is at least ``min_side`` px at
    ``image_size``; else the last module with such a map. Small inputs (32-64 px) shrink the usual
    last-stage maps to 1x1 or 2x2, which cannot show where the network looked (a 4x4 map can).
    """
    import torch

    from melanoma_ml.serving.explain import target_layer_names

    names = {module: name for name, module in net.named_modules() if name}
    sides: dict[str, int] = {}
    order: list[str] = []

    def record(module: Any, _inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.ndim == 4:
            sides[names[module]] = min(output.shape[-2:])
            order.append(names[module])

    handles = [module.register_forward_hook(record) for module in names]
    try:
        with torch.inference_mode():
            net(torch.zeros(1, 3, image_size, image_size), torch.zeros(1, net.n_meta_features))
    finally:
        for handle in handles:
            handle.remove()
    preferred = [n for n in target_layer_names(net) if sides.get(n, 0) >= min_side]
    fallback = [n for n in order if sides[n] >= min_side]
    if not preferred and not fallback:
        raise ValueError(
            f"no layer of {net.backbone.__class__.__name__} keeps a {min_side}x{min_side} map at {image_size} px"
        )
    return preferred[0] if preferred else fallback[-1]


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
    extra = bundle.manifest.get("extra") or {}
    oof = pd.DataFrame(extra.get("oof") or {})
    if oof.empty:
        return [f"bundle {version} stores no out-of-fold predictions (manifest extra.oof)"], {}
    own_fold = oof[(oof["fold"] == int(extra["fold"])) & oof["image_name"].isin(folds_table["image_name"])]
    if own_fold.empty:
        return [
            f"none of bundle {version}'s validation images are in the current folds table; re-run training"
        ], {}
    sample = own_fold.head(n)
    rows = folds_table.set_index("image_name").loc[sample["image_name"]].reset_index()
    images = list(cache.array()[cache.rows_for(rows["image_name"])])
    got = predict(bundle, images, [metadata_dict(r) for r in rows.itertuples(index=False)], tta=False)
    gap = float(np.max(np.abs(got - sample["prob"].to_numpy()))) if len(sample) else float("nan")
    problems = (
        []
        if gap <= atol
        else [f"bundle {version} predictions differ from the report by up to {gap:.2e} (> {atol})"]
    )
    return problems, {"version": version, "images_checked": len(sample), "max_abs_difference": gap}


# --------------------------------------------------------------------------------------------- the whole run
def run_all(config: PipelineConfig, progress: Callable[[str], Any] = print) -> PipelineResult:
    """Every step in order, as the Dagster graph runs them (``melanoma-ml demo``, the overhead benchmark)."""
    seconds: dict[str, float] = {}

    def step(name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        progress(f"[{name}] ...")
        started = time.perf_counter()
        value = fn(*args, **kwargs)
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started
        progress(f"[{name}] done in {time.perf_counter() - started:.1f} s")
        return value

    step("validate", validate_config, config)
    source = step("source", prepare_source, config)
    cleaning = step("clean", clean_source, config, source)
    folds = step("folds", make_folds, config, cleaning.clean)
    cache = step("cache", build_cache, config, folds)
    fold_results: dict[str, list[FoldResult]] = {}
    for backbone in config.backbones:
        fold_results[backbone] = [
            step(f"train {backbone}", train_one, config, backbone, k, folds, cache)
            for k in range(config.data.n_folds)
        ]
    reports = {
        b: step(f"evaluate {b}", evaluate_backbone, config, b, fold_results[b]) for b in config.backbones
    }
    board = step("leaderboard", rank_backbones, config, reports)
    promotion = step(
        "promote", promote_best, config, board, reports, fold_results, data_version=table_fingerprint(folds)
    )
    progress(f"[promote] {promotion.decision.reason}")
    gallery = step("gallery", explain_gallery, config, folds)
    return PipelineResult(source, cleaning, folds, fold_results, reports, board, promotion, gallery, seconds)


# --------------------------------------------------------------------------------------------- helpers
def table_fingerprint(table: pd.DataFrame) -> str:
    """sha256 of a table's content (row order and column names included): a data version."""
    digest = hashlib.sha256(",".join(map(str, table.columns)).encode())
    digest.update(pd.util.hash_pandas_object(table, index=False).to_numpy().tobytes())
    return digest.hexdigest()


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def png_bytes(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()
