"""The artifact layout: where every step writes under ``config.artifact_root`` (docs/architecture.md).

The one definition of those paths, read by the pipeline steps, the checks, the CLI and the serving app.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from melanoma_ml.config import PipelineConfig
from melanoma_ml.errors import InputValueError


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

    @property
    def clean_table(self) -> Path:
        """The cleaned metadata table (``pipeline.clean_source``)."""
        return self.tables / "clean.parquet"

    @property
    def quarantine_table(self) -> Path:
        """The rows cleaning set aside, each with its reason (``pipeline.clean_source``)."""
        return self.tables / "quarantine.parquet"

    @property
    def folds_table(self) -> Path:
        """The clean table with each row's fold (``pipeline.make_folds``)."""
        return self.tables / "folds.parquet"

    @property
    def caches(self) -> Path:
        """The image caches: ``<size>px`` of the training table, ``test-<name>/<size>px`` of each test source."""
        return self.root / "cache"

    def cache(self, size: int) -> Path:
        return self.caches / f"{size}px"

    @property
    def checkpoints(self) -> Path:
        """One folder per trained backbone, holding its ``fold<k>`` checkpoint folders."""
        return self.root / "checkpoints"

    def checkpoint(self, backbone: str, fold: int) -> Path:
        return self.checkpoints / backbone / f"fold{fold}"

    @property
    def locks(self) -> Path:
        """Device lease lock files, one folder per host (``melanoma_ml.devices``)."""
        return self.root / "locks"

    @property
    def reports(self) -> Path:
        """Evaluation reports: one folder per backbone, the leaderboard, the test sets, the gallery."""
        return self.root / "reports"

    def report(self, backbone: str) -> Path:
        return self.reports / backbone

    @property
    def test_reports(self) -> Path:
        """The test evaluation: ``<test set>/<backbone>/...`` and ``test_evaluation.json``."""
        return self.reports / "test"

    def oof(self, backbone: str) -> Path:
        """The out-of-fold predictions of ``backbone``'s evaluation (read by the leaderboard and the gate)."""
        return self.report(backbone) / "oof.parquet"

    @property
    def leaderboard(self) -> Path:
        return self.reports / "leaderboard"

    @property
    def registry(self) -> Path:
        return self.root / "registry"

    @property
    def registry_cache(self) -> Path:
        """Local copies of versions downloaded from a remote registry (``serving.registry_uri``)."""
        return self.root / "registry-cache"

    @property
    def gallery(self) -> Path:
        return self.reports / "gradcam"

    @property
    def incoming(self) -> Path:
        """The default drop folder of batch scoring (``serving.drop_dir`` unset): one sub-folder per batch."""
        return self.root / "incoming"

    def scores(self, batch: str) -> Path:
        """The scores CSV the ``batch_scores`` asset writes for the drop-folder batch ``batch``."""
        return self.root / "scores" / f"{batch}.csv"

    @property
    def monitoring(self) -> Path:
        """What serving records after promotion (health data: owner-only, ``monitoring.prediction_log``)."""
        return self.root / "monitoring"

    @property
    def predictions(self) -> Path:
        """The prediction log: one ``YYYY-MM-DD.jsonl`` per UTC day, one JSON object per scored image."""
        return self.monitoring / "predictions"

    def predictions_day(self, day: str) -> Path:
        """The prediction log file of the UTC day ``day`` (``YYYY-MM-DD``)."""
        return self.predictions / f"{day}.jsonl"

    @property
    def monitoring_images(self) -> Path:
        """Kept copies of scored images, ``<sha256>.<ext>`` (only with ``serving.keep_images``)."""
        return self.monitoring / "images"

    @property
    def outcomes(self) -> Path:
        """Clinician outcomes of logged cases (``outcomes.jsonl``, append-only)."""
        return self.monitoring / "outcomes"

    @property
    def outcomes_log(self) -> Path:
        return self.outcomes / "outcomes.jsonl"

    @property
    def outcomes_quarantine(self) -> Path:
        """Rejected rows of outcome imports, each with its row number and reason."""
        return self.outcomes / "quarantine"

    @property
    def feedback_export(self) -> Path:
        """The feedback dataset the ``labelled_cases_arrived`` sensor exports for a retraining run
        (``monitoring.feedback.export_feedback``; owner-only: health data)."""
        return self.monitoring / "feedback"


def artifact_paths(config: PipelineConfig) -> ArtifactPaths:
    """The artifact layout for ``config`` (remote URLs are rejected with advice)."""
    root = config.artifact_root
    if "://" in root and not root.startswith("file://"):
        scheme = root.split("://", 1)[0]
        raise InputValueError(
            f"artifact_root {root!r} is a {scheme}:// URL, but the pipeline steps need a local folder (the "
            "image cache is memory-mapped, checkpoints and registry pointers are renamed atomically). "
            "Supported: a local path or a file:// URL. To keep artifacts in S3 with a local working copy per "
            "worker, set MELANOMA_ARTIFACT_STORE=s3://bucket/prefix in the Dagster deployment "
            "(docs/scale-out.md), or mount the bucket (s3fs, gcsfuse, blobfuse) and point artifact_root at the "
            "mount. The model registry alone can live in S3: set serving.registry_uri "
            "(MELANOMA_SERVING__REGISTRY_URI=s3://bucket/prefix)"
        )
    return ArtifactPaths(Path(root.removeprefix("file://")).expanduser().resolve())
