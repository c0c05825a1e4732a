"""Packaging: the served model chosen at promotion, written as a verified bundle into the registry.

``champion`` decides what is served and whether it replaces the champion; this module turns that decision
(a ``champion.ServedChoice`` and its ``EvaluationReport``) into bytes: the members' networks, the calibrator
and threshold fitted on the served model's own out-of-fold rows, the ``serving.views`` it serves with, the
exported runtime (checked on the explained member's validation images, ``_probe``; ``bundle.save_bundle``
chooses it per member), the out-of-distribution detector fitted on every image that member trained on
(``ood_fit_rows``) and the serving monitor's reference. With a ``test_metrics`` measure the bundle is written
complete to a staging folder first (``staging_folder``), measured there as ``predict`` scores it, and only
then registered.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

import melanoma_ml
from melanoma_ml.artifacts import artifact_paths
from melanoma_ml.config import PipelineConfig
from melanoma_ml.evaluation.calibration import fit_served_calibration
from melanoma_ml.features import metadata_dict
from melanoma_ml.folds import split_masks
from melanoma_ml.images.cache import ImageCache
from melanoma_ml.serving.bundle import (
    EnsembleToSave,
    MemberNet,
    ProbeImages,
    RuntimeRequest,
    read_manifest,
    save_bundle,
    write_manifest,
)
from melanoma_ml.serving.manifest import BundleManifest, ValidationPredictions
from melanoma_ml.serving.monitor_reference import reference_for_bundle
from melanoma_ml.serving.remote_registry import open_registry

if TYPE_CHECKING:
    from melanoma_ml.evaluation import EvaluationReport
    from melanoma_ml.serving.champion import ServedChoice

TestMetricsOf = Callable[[Path], "Mapping[str, Any] | None"]
"""Measures a complete bundle folder on the untouched test sets: test set -> ``manifest.TestMetrics`` fields
(``batch.served_test_metrics``), or None when there is no scorable test set."""


def register_served_model(
    config: PipelineConfig,
    choice: ServedChoice,
    report: EvaluationReport,
    reason: str,
    *,
    data_version: str,
    folds_table: pd.DataFrame | None = None,
    test_metrics: TestMetricsOf | None = None,
) -> str:
    """Register ``choice`` as a new registry version (not yet current) and return the version.

    The bundle records ``serving.views``, the dihedral views it serves per member: the app, ``predict``,
    batch scoring, the gallery and ``test_metrics`` read them from the bundle, never from their own config.

    With ``test_metrics`` the bundle is first written complete to a staging folder under the artifact
    root; ``test_metrics(folder)`` measures that very bundle (``batch.served_test_metrics`` loads it as
    ``predict`` loads a version and scores the untouched test sets through ``predict``'s path), the numbers
    go into its manifest (``test_metrics``: what the model card shows), and the verified folder is
    registered. The card's test numbers are therefore the served model's: the same networks, views,
    calibrator and threshold as the app and ``predict``.

    Args:
        report: ``champion.served_model_report(config, choice)``: its metrics go into the manifest; its
            threshold is re-tuned on the calibrated probabilities (``fit_served_calibration``), the served
            scale.
        folds_table: The folds table; with it (and the image cache under the artifact root) the bundle gets
            the ``serving.runtime`` export, checked on the explained member's own validation images, and the
            out-of-distribution detector (``serving.ood_detection``), fitted on that member's training
            images, and the serving monitor's reference (``monitor_reference``: the out-of-fold rows'
            metadata mix). Without it the bundle serves torch fp32, flags nothing and ships no reference.
        test_metrics: Bundle folder -> its ``manifest.TestMetrics`` per test set (or None: no test set).
    """
    from melanoma_ml.training.checkpoint import load_checkpoint

    calibration, threshold, uncalibrated_reason = fit_served_calibration(
        config, choice.oof, report.threshold.value
    )
    members = []
    for member in choice.members:
        net, spec, _info = load_checkpoint(member.checkpoint_dir)
        net.eval()
        members.append(MemberNet(net, spec, member.fold, member.weights_sha256))
    ensemble = None
    if len(members) > 1:
        ensemble = EnsembleToSave(choice.kind, choice.average, members)
    extras = served_extras(config, choice, members[0], folds_table)
    one = choice.kind == "best_fold"
    bundle = dict(
        threshold=threshold,
        metrics=report.to_dict()["metrics"],
        data_version=data_version,
        code_version=f"melanoma_ml-{melanoma_ml.__version__}",
        fold=choice.explained.fold if one else None,
        checkpoint_sha256=choice.explained.weights_sha256 if one else None,
        oof=ValidationPredictions.from_frame(choice.oof),
        calibration=calibration,
        uncalibrated_reason=uncalibrated_reason,
        monitor_reference=reference_for_bundle(choice.oof, folds_table),
        ensemble=ensemble,
        views=config.serving.views,
        **extras,
    )
    registry = open_registry(config)
    if test_metrics is None:
        return registry.register_bundle(members[0].net, members[0].spec, reason=reason, **bundle)
    with staging_folder(config) as folder:
        stage = folder / "bundle"
        save_bundle(stage, members[0].net, members[0].spec, **bundle)
        if tested := test_metrics(stage):
            manifest = read_manifest(stage)
            write_manifest(
                stage, BundleManifest.model_validate({**manifest.to_json(), "test_metrics": tested})
            )
        return registry.register(stage, reason=reason)


@contextmanager
def staging_folder(config: PipelineConfig) -> Iterator[Path]:
    """A fresh folder under the artifact root (so tests and runs write nowhere else), removed afterwards."""
    root = artifact_paths(config).root
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".served-stage-", dir=root) as folder:
        yield Path(folder)


def served_extras(
    config: PipelineConfig, choice: ServedChoice, explained: Any, folds_table: pd.DataFrame | None
) -> dict[str, Any]:
    """``save_bundle``'s ``runtime`` and ``ood`` arguments for ``choice`` (both None without a folds table).

    The runtime probe is the explained member's first validation images (all 8 dihedral views each, whatever
    ``serving.views`` serves, made for each member with its own preprocessing and metadata encoder);
    the detector is fitted on every image that member trained on (``ood_fit_rows``).
    """
    serving = config.serving
    if folds_table is None:
        return {"runtime": None, "ood": None}
    cache_dir = artifact_paths(config).cache(config.data.image_size)
    cache = ImageCache.open(cache_dir)
    spec = explained.spec
    training = ood_fit_rows(folds_table, choice.explained.fold)
    runtime = None
    if serving.runtime != "torch" or serving.precision != "fp32":
        n = serving.runtime_probe_images
        tabular = spec.encoder.tabular
        probe = _probe(choice.explained.oof["image_name"], folds_table, cache, tabular, n)
        calibration = None
        if serving.precision == "int8":
            calibration = _probe(
                training["image_name"].sample(frac=1.0, random_state=0), folds_table, cache, tabular, 4 * n
            )
        runtime = RuntimeRequest(
            serving.runtime, serving.precision, serving.runtime_parity_tolerance, probe, calibration
        )
    ood = None
    if serving.ood_detection:
        from melanoma_ml.serving.ood import fit_bundle_ood

        ood = fit_bundle_ood(
            explained.net,
            spec,
            training,
            cache,
            seed=config.training.seed,
            quantile=serving.ood_quantile,
            max_images=serving.ood_max_fit_images,
        )
    return {"runtime": runtime, "ood": ood}


def ood_fit_rows(folds_table: pd.DataFrame, fold: int) -> pd.DataFrame:
    """The rows the model validated on ``fold`` trained on: what its out-of-distribution detector is fitted on.

    ``folds.split_masks``' training rows: every fold but ``fold``, external training images included
    (``data.external_sources``: ``fold`` -1, or the fold of a primary group they share), so a clinic added
    for training is in distribution; never the locked test split, nor ``fold``'s own rows.
    """
    train, _ = split_masks(folds_table, fold)
    return folds_table[train].reset_index(drop=True)


def _probe(
    names: pd.Series, folds_table: pd.DataFrame, cache: Any, tabular: Sequence[str], n: int
) -> ProbeImages:
    """The first ``n`` of ``names`` (cached pixels and metadata records): what an exported runtime is
    checked (validation images) or int8-calibrated (training images) on, each member with its own encoding
    (``ProbeImages.inputs``)."""
    rows = folds_table[folds_table["image_name"].isin(names.head(n))]
    images = list(cache.array()[cache.rows_for(rows["image_name"])])
    return ProbeImages(images, [metadata_dict(r, tabular) for r in rows.itertuples(index=False)])
