"""Score many images with one model version: batched decoding and TTA, one table of scores, one CSV.

``score_path(path, bundle)`` reads what is at ``path`` (``batch_inputs.read_scoring_input``: a folder of
images, a CSV, a dataset folder in any layout), decodes each image once with the training cache's decoder
(``images.cache.load_resized``, as the app does, so there is no train/serve skew), and calls
``inference.score`` once per batch of ``batch_size`` images (with TTA: ``8 x batch_size`` views in one
forward pass). The next batch is decoded on worker threads while the network runs on the current one.
Probabilities and threshold follow ``serving.deployment_prevalence`` as the app's do
(``serving.calibrated``): the prior shift changes the probabilities written, never the decisions.

A file that cannot be decoded does not stop the run: its row carries the reason in ``error`` and the other
images are still scored. Metadata is read by the app's own rules (``request_fields``): a value the app
refuses (an age of -5, 300 or "abc", sex "alien", site "moon", a category the model was not trained with)
is scored as missing, the way training's cleaning encodes such a value, and the app's message is in the
row's ``warning`` column, so nothing is silently dropped and the score exists for every decodable image. The table has the ISIC challenge submission columns (``image_name``, ``target`` =
the melanoma probability) plus the decision at the model's threshold and the model version, so a scores
file says which model produced it, and the out-of-distribution score and flag (``ood_flag`` true: the image
does not look like the training images, its probability is not reliable); both are empty when the bundle
ships no detector. ``melanoma-ml predict`` and the ``batch_scores`` Dagster asset are thin
layers over this module.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from melanoma_ml import schema
from melanoma_ml.artifacts import artifact_paths
from melanoma_ml.atomic import atomic_write_bytes
from melanoma_ml.errors import InputStateError, InputValueError
from melanoma_ml.features import metadata_dict
from melanoma_ml.images.cache import load_resized
from melanoma_ml.images.io import DEFAULT_MAX_PIXELS, ImageDecodeError
from melanoma_ml.serving.batch_inputs import ERROR, ScoringInput, read_scoring_input
from melanoma_ml.serving.request_fields import parse_metadata_leniently

if TYPE_CHECKING:
    from melanoma_ml.config import PipelineConfig
    from melanoma_ml.serving.bundle import Bundle
    from melanoma_ml.serving.registry import ModelRegistry

DEFAULT_BATCH_SIZE = 32
"""Images per forward pass (with TTA 256 views): large enough to amortize the per-call overhead on a CPU,
small enough that a 256 px batch of views stays well under 1 GB."""

PROBABILITY = "target"
"""The ISIC challenge submission calls the predicted melanoma probability ``target``."""

OOD_SCORE = "ood_score"
OOD_FLAG = "ood_flag"
WARNING = "warning"
"""Why some metadata of a scored row was read as missing (the app's message per refused field), or ""."""

SCORE_COLUMNS: tuple[str, ...] = (
    schema.IMAGE,
    PROBABILITY,
    "decision",
    "threshold",
    "model_version",
    OOD_SCORE,
    OOD_FLAG,
    ERROR,
    WARNING,
    schema.IMAGE_PATH,
)
"""Columns of a scores table, in order; ``error`` is empty for a scored row, ``target`` NaN for a failed one
(and ``ood_score``/``ood_flag`` missing for failed rows and for bundles without a detector); ``warning``
names the metadata values the app would refuse, which this row was scored without."""

Progress = Callable[[int, int], object]
"""Called as ``progress(done, total)`` after each batch (images decoded or failed so far, images to do)."""


@dataclass(frozen=True)
class BatchScores:
    """The scores of one input.

    Attributes:
        table: One row per input image (``SCORE_COLUMNS``): the scored ones in input order, then the ones
            set aside before decoding (cleaning, missing files).
        source: What was read (``kind``, ``description``).
        model_version: The registry version (or bundle folder name) that scored.
        threshold: The decision threshold the probabilities were compared with (the bundle's, moved with
            ``deployment_prevalence``).
        views: Dihedral views averaged per member (the bundle's own unless the caller asked for others; 1: none).
        seconds: Wall time of decoding and scoring (reading the input not included).
        deployment_prevalence: The prior the probabilities were shifted to, or None (training prevalence).
        metadata: Per table row, the metadata the model read (``{"age", "sex", "site"}``, refused values
            None), or None for a row set aside before decoding; what the prediction log records.
    """

    table: pd.DataFrame
    source: ScoringInput
    model_version: str
    threshold: float
    views: int
    seconds: float
    deployment_prevalence: float | None = None
    metadata: tuple[dict[str, Any] | None, ...] = ()

    @property
    def scored(self) -> pd.DataFrame:
        return self.table[self.table[ERROR] == ""]

    @property
    def failed(self) -> pd.DataFrame:
        return self.table[self.table[ERROR] != ""]

    @property
    def images_per_second(self) -> float:
        """Decoded and scored images per wall-clock second (failed files not counted)."""
        return len(self.scored) / self.seconds if self.seconds > 0 else float("nan")


def drop_folder(config: PipelineConfig) -> Path:
    """The batch-scoring drop folder: ``serving.drop_dir``, else ``<artifact_root>/incoming``."""
    if config.serving.drop_dir:
        return Path(config.serving.drop_dir).expanduser().resolve()
    return artifact_paths(config).incoming


def load_scoring_model(registry: ModelRegistry, version: str | None = None) -> Bundle:
    """Load (sha256-verified) ``version`` from ``registry``, or the served version when None.

    Raises:
        InputStateError: nothing promoted yet and no version named.
        RegistryError: an unknown version (the message lists the known ones).
        BundleError: the version's files are missing or do not verify.
    """
    from melanoma_ml.serving.bundle import load_bundle

    version = version or registry.current()
    if version is None:
        raise InputStateError(
            f"no model promoted in registry {registry.root} yet: run `melanoma-ml demo` or materialize "
            "`serving_model`, or name a version with --version"
        )
    return load_bundle(
        registry.version_path(version), manifest_sha256=registry.recorded_manifest_sha256(version)
    )


def score_path(path: str | Path, bundle: Bundle, **options: Any) -> BatchScores:
    """Score every image at ``path`` (``batch_inputs.read_scoring_input``) with ``bundle``.

    Args:
        path: Folder of images, CSV, or dataset folder / metadata CSV in a known layout.
        bundle: The loaded model (``load_scoring_model``).
        **options: ``score_inputs``'s keyword options (``views``, ``batch_size``, ``workers``, ``max_pixels``,
            ``progress``, ``deployment_prevalence``).

    Raises:
        InputValueError / InputFileNotFoundError: nothing usable at ``path`` (see ``read_scoring_input``),
            or ``batch_size`` below 1. An image that fails to decode is reported in its row instead.
    """
    return score_inputs(read_scoring_input(path), bundle, **options)


def score_inputs(
    inputs: ScoringInput,
    bundle: Bundle,
    *,
    views: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: Progress | None = None,
    deployment_prevalence: float | None = None,
    min_age: float = schema.MIN_VALID_AGE,
    max_age: float = schema.MAX_VALID_AGE,
) -> BatchScores:
    """Score an already read input (``read_scoring_input``) with ``bundle``, ``batch_size`` images a call.

    Each row's age, sex and site are read by ``request_fields.parse_metadata_leniently`` (the app's
    parser): a value the app would refuse is scored as missing and reported in the ``warning`` column.

    Args:
        views: Dihedral views averaged per member; None: the bundle's own (``BundleManifest.views``, recorded
            at promotion), what ``predict`` and batch scoring serve. 1 (``predict --no-tta``), 2, 4 or 8
            overrides it.
        batch_size: Images per ``inference.predict`` call.
        workers: Decoding threads (Pillow releases the GIL); default ``min(4, cpu count)``.
        max_pixels: Larger images (by their header) are refused, as uploads are.
        progress: ``progress(done, total)`` after each batch.
        deployment_prevalence: ``serving.deployment_prevalence``: probabilities and threshold are moved to
            this melanoma rate (None: the training prevalence, no shift).
        min_age, max_age: ``serving.min_age``/``serving.max_age``: the ages the app accepts.
    """
    from melanoma_ml.serving.calibrated import decision_threshold
    from melanoma_ml.serving.inference import bundle_views, score

    if batch_size < 1:
        raise InputValueError(f"batch size must be at least 1, got {batch_size}")
    workers = workers or min(4, os.cpu_count() or 1)
    table = inputs.table
    metadata, warnings = _read_metadata(inputs, bundle, min_age, max_age)
    paths = table[schema.IMAGE_PATH].astype(str).tolist()
    probabilities = np.full(len(table), np.nan)
    ood_scores = np.full(len(table), np.nan)
    ood_flags = pd.array([pd.NA] * len(table), dtype="boolean")
    errors = [""] * len(table)
    started = time.perf_counter()
    done = 0
    for rows, decoded in _decoded_batches(paths, bundle.spec.image_size, max_pixels, batch_size, workers):
        good: list[int] = []
        images: list[np.ndarray] = []
        for row, view in zip(rows, decoded, strict=True):
            if isinstance(view, ImageDecodeError):
                errors[row] = view.reason
            else:
                good.append(row)
                images.append(view)
        if good:
            scores = score(
                bundle,
                images,
                [metadata[row] for row in good],
                views=views,
                batch_size=len(good),
                deployment_prevalence=deployment_prevalence,
            )
            probabilities[good] = scores.prob
            if scores.ood_score is not None:
                ood_scores[good] = scores.ood_score
                ood_flags[good] = scores.ood_flag
        done += len(rows)
        if progress is not None:
            progress(done, len(table))
    seconds = time.perf_counter() - started
    scored = pd.DataFrame(
        {
            schema.IMAGE: table[schema.IMAGE].astype(str).to_numpy(),
            PROBABILITY: probabilities,
            OOD_SCORE: ood_scores,
            OOD_FLAG: ood_flags,
            ERROR: errors,
            WARNING: [warning if not error else "" for warning, error in zip(warnings, errors, strict=True)],
            schema.IMAGE_PATH: paths,
        }
    )
    rejected = inputs.rejected.assign(
        **{
            WARNING: "",
            PROBABILITY: np.nan,
            OOD_SCORE: np.nan,
            OOD_FLAG: pd.array([pd.NA] * len(inputs.rejected), dtype="boolean"),
        }
    )
    threshold = decision_threshold(bundle.manifest, deployment_prevalence)
    table = pd.concat([scored, rejected], ignore_index=True)
    return BatchScores(
        table=_with_decisions(table, threshold, bundle.version),
        source=inputs,
        model_version=bundle.version,
        threshold=threshold,
        views=bundle_views(bundle, views),
        seconds=seconds,
        deployment_prevalence=deployment_prevalence,
        metadata=(*metadata, *[None] * len(rejected)),
    )


def _read_metadata(
    inputs: ScoringInput, bundle: Bundle, min_age: float, max_age: float
) -> tuple[list[dict[str, Any]], list[str]]:
    """Each row's metadata as the app reads it (refused fields missing), and its ``warning`` text."""
    table = inputs.table
    vocabulary = {key: list(values) for key, values in bundle.spec.encoder.vocabulary.items()}
    tabular = [c for c in bundle.spec.encoder.tabular if c in table.columns]
    given = inputs.metadata_as_given()
    metadata: list[dict[str, Any]] = []
    warnings: list[str] = []
    for row, (age, sex, site) in zip(
        table.itertuples(index=False),
        given[list(schema.METADATA_FEATURES)].itertuples(index=False),
        strict=True,
    ):
        parsed, problems = parse_metadata_leniently(
            age, sex, site, vocabulary=vocabulary, min_age=min_age, max_age=max_age
        )
        if tabular:
            parsed["tabular"] = metadata_dict(row, tabular)["tabular"]
        metadata.append(parsed)
        warnings.append("; ".join(problems))
    return metadata, warnings


def served_test_metrics(
    config: PipelineConfig, bundle_dir: str | Path, *, folds_table: pd.DataFrame, name: str = "served model"
) -> dict[str, dict[str, Any]] | None:
    """The bundle at ``bundle_dir`` on every untouched test set (``holdout.untouched_test_sets``: the locked
    test split of ``folds_table`` and each ``data.test_sources`` set), scored exactly as ``melanoma-ml
    predict`` scores: the bundle loaded (sha256-verified) by ``load_bundle``, the test rows' image paths
    and metadata written as a CSV and read back by ``read_scoring_input``, then ``score_inputs`` (the
    bundle's networks, the views it records, its calibrator); metrics at the bundle's own threshold, fixed
    before.

    Probabilities are at the training prevalence (no ``serving.deployment_prevalence`` shift): a prior
    shift moves probabilities and threshold together, so AUC, pAUC, sensitivity and specificity are the
    same at any prevalence, while ECE and Brier are measured where the test rows' own prevalence makes them
    mean something (``docs/metrics.md``).

    Returns:
        Test set -> ``holdout.bundle_test_metrics`` (``manifest.TestMetrics`` fields), plus ``ood_flag_rate``
        (the share of the set's images ``predict`` flags) when the bundle has a detector; None when no test
        set can be scored (none exists, or each holds one class).
    """
    import tempfile

    from melanoma_ml.evaluation.holdout import bundle_test_metrics, unscorable_reason, untouched_test_sets
    from melanoma_ml.serving.bundle import load_bundle

    sets, _counts = untouched_test_sets(config, folds_table)
    sets = {test_set: rows for test_set, rows in sets.items() if not unscorable_reason(rows)}
    if not sets:
        return None
    bundle = load_bundle(bundle_dir)
    root = artifact_paths(config).root
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    with tempfile.TemporaryDirectory(prefix=".test-sets-", dir=root) as folder:
        for test_set, rows in sets.items():
            probs, scored = rows_scored_as_predict(config, bundle, rows, Path(folder) / f"{test_set}.csv")
            if unscorable_reason(scored):
                continue
            where = f"{name} on test set {test_set}"
            out[test_set] = bundle_test_metrics(
                scored, probs, bundle.manifest.threshold, config.evaluation, where
            )
            if bundle.manifest.ood is not None:  # the share of this clinic's images the detector flags
                out[test_set]["ood_flag_rate"] = float(scored[OOD_FLAG].astype("boolean").mean())
    return out or None


def rows_scored_as_predict(
    config: PipelineConfig, bundle: Bundle, rows: pd.DataFrame, csv: Path
) -> tuple[np.ndarray, pd.DataFrame]:
    """Test ``rows`` (``image_name``, ``image_path``, metadata, labels) scored by ``bundle`` on ``predict``'s
    path: written as a CSV ``predict`` accepts (``csv``; no labels), read back by ``read_scoring_input``,
    scored by ``score_inputs`` with the bundle's own views and the ``serving`` age range and pixel limit.

    Returns:
        The served probabilities (``predict``'s ``target`` column) of the rows scored, and those rows with
        their labels and ``predict``'s ``ood_flag``, in the same order (a file that fails to decode has no
        probability and is left out).
    """
    tabular = {c for scorer in bundle.scorers for c in scorer.spec.encoder.tabular if c in rows.columns}
    columns = [schema.IMAGE, schema.IMAGE_PATH, *schema.METADATA_FEATURES, *sorted(tabular)]
    atomic_write_bytes(csv, rows[columns].to_csv(index=False).encode("utf-8"))
    serving = config.serving
    scores = score_path(
        csv,
        bundle,
        max_pixels=serving.max_image_pixels,
        deployment_prevalence=None,
        min_age=serving.min_age,
        max_age=serving.max_age,
    ).scored
    by_name = rows.set_index(rows[schema.IMAGE].astype(str))
    scored = by_name.loc[scores[schema.IMAGE].astype(str)].reset_index(drop=True)
    scored[OOD_FLAG] = scores[OOD_FLAG].to_numpy()
    return scores[PROBABILITY].to_numpy(dtype=float), scored


def write_scores(scores: BatchScores, out: str | Path) -> Path:
    """Write ``scores.table`` as CSV at ``out`` atomically (a reader never sees half a file)."""
    out = Path(out).expanduser()
    if out.is_dir():
        raise InputValueError(
            f"--out {out} is a folder; name the CSV file to write, e.g. {out / 'scores.csv'}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(out, scores.table.to_csv(index=False).encode("utf-8"))


def _with_decisions(table: pd.DataFrame, threshold: float, version: str) -> pd.DataFrame:
    scored = table[ERROR] == ""
    positive = table[PROBABILITY] >= threshold
    table["decision"] = np.where(scored, np.where(positive, "positive", "negative"), "")
    table["threshold"] = float(threshold)
    table["model_version"] = version
    return table[list(SCORE_COLUMNS)]


def _decoded_batches(
    paths: Sequence[str], size: int, max_pixels: int, batch_size: int, workers: int
) -> Iterator[tuple[list[int], list[np.ndarray | ImageDecodeError]]]:
    """``(rows, views)`` per batch, in order: each view the model's square image or the decode error.

    The next batch is submitted to the pool before the current one is handed out, so decoding overlaps
    the caller's forward pass; at most two batches of decoded views are held at a time.
    """

    def decode(path: str) -> np.ndarray | ImageDecodeError:
        try:
            return load_resized(path, size, max_pixels=max_pixels)
        except ImageDecodeError as err:  # reported in the file's row; the other files are still scored
            return err

    batches = [
        list(range(start, min(start + batch_size, len(paths)))) for start in range(0, len(paths), batch_size)
    ]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="batch-decode") as pool:

        def submit(rows: list[int]) -> list[Future]:
            return [pool.submit(decode, paths[row]) for row in rows]

        pending = submit(batches[0]) if batches else []
        for index, rows in enumerate(batches):
            current = pending
            pending = submit(batches[index + 1]) if index + 1 < len(batches) else []
            yield rows, [future.result() for future in current]
