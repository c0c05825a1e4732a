"""The model card the app shows: a served bundle's provenance and headline metrics with CIs, as markdown.

Pure text from the bundle manifest (no gradio, no torch): the app (``serving.app``) renders it, and tests
check it without starting a UI.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from melanoma_ml.evaluation.external import SELECTION_BIAS_NOTE, auc_gap
from melanoma_ml.serving.calibrated import decision_threshold
from melanoma_ml.serving.service import NO_MODEL_MESSAGE

if TYPE_CHECKING:
    from melanoma_ml.evaluation.estimate import Estimate
    from melanoma_ml.serving.manifest import BundleManifest
    from melanoma_ml.serving.service import ServedModel

HEADLINE_METRICS = (
    ("auc", "ROC AUC"),
    ("pauc", "Partial AUC (high-sensitivity region)"),
    ("sensitivity", "Sensitivity at the threshold"),
    ("specificity", "Specificity at the threshold"),
    ("brier", "Brier score (lower is better)"),
    ("ece", "Calibration error, ECE (lower is better)"),
)
"""Metrics the model card shows, in order, as ``(key in the manifest's metrics, label)``."""


TEST_SET_LABEL = {"internal": "locked test split"}
"""How the card names a test set (``holdout.INTERNAL_TEST``; others are external ``data.test_sources``)."""


def known_metric(metrics: Mapping[str, Estimate], key: str) -> Estimate | None:
    """``metrics[key]`` (a bundle's ``manifest.metrics``), or None when absent or without a point value."""
    estimate = metrics.get(key)
    return estimate if estimate is not None and math.isfinite(estimate.value) else None


def headline_metrics(metrics: Mapping[str, Estimate]) -> list[tuple[str, Estimate]]:
    """``(label, estimate)`` of the ``HEADLINE_METRICS`` the bundle has, in order (``estimate.text()`` shows
    it with its own CI level)."""
    lines = [(label, known_metric(metrics, key)) for key, label in HEADLINE_METRICS]
    return [(label, estimate) for label, estimate in lines if estimate is not None]


def readable_time(iso: str | None) -> str:
    """``2026-11-27T01:42:26.85+00:00`` -> ``2026-11-27 01:42 UTC`` (unparseable text is shown as is)."""
    if not iso:
        return "at an unknown time"
    try:
        moment = datetime.fromisoformat(iso)
    except ValueError:
        return iso
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


NOT_CALIBRATED = "not calibrated"
"""What the card says of a bundle without a calibrator (older bundles serve the network's raw output)."""

CALIBRATION_METRICS = (
    ("ece_before", "ECE before calibration"),
    ("ece_after", "ECE after calibration"),
    ("brier_before", "Brier score before calibration"),
    ("brier_after", "Brier score after calibration"),
)
"""Entries of ``manifest.calibration.report`` the card shows, as ``(key, label)``."""


def calibration_rows(manifest: BundleManifest, deployment_prevalence: float | None) -> list[tuple[str, str]]:
    """Card rows: how probabilities are calibrated, at which prevalence, and the threshold that goes with it."""
    calibration = manifest.calibration
    threshold = decision_threshold(manifest, deployment_prevalence)
    if calibration is None:
        why = manifest.uncalibrated_reason or "this bundle predates calibration"
        return [
            ("Probabilities", f"{NOT_CALIBRATED} (raw network output: {why})"),
            ("Deployment prevalence", "not applied (no calibrator to shift)"),
            ("Decision threshold", f"{threshold:.3f}"),
        ]
    trained = f"{calibration.prevalence:.1%}"
    rows = [
        (
            "Probabilities",
            f"calibrated ({calibration.method}, fitted on the model's {calibration.n_rows} out-of-fold rows "
            f"at {trained} melanoma)",
        ),
        (
            "Deployment prevalence",
            f"{trained} (the training prevalence: no prior shift)"
            if deployment_prevalence is None
            else f"{deployment_prevalence:.1%} (probabilities prior-shifted from {trained}; the threshold moves "
            "with them, so decisions do not change)",
        ),
        ("Decision threshold", f"{threshold:.3f}"),
    ]
    for key, label in CALIBRATION_METRICS:
        estimate = known_metric(calibration.report, key)
        if estimate is not None:
            rows.append((f"{label}, cross-fitted out-of-fold", estimate.text()))
    return rows


def oof_source(manifest: BundleManifest) -> str:
    """Where a bundle's out-of-fold numbers come from, in words."""
    if manifest.ensemble.kind == "best_fold":
        return "this model's own validation rows"
    return "every training image scored by the fold model(s) that did not train on it"


def runtime_text(manifest: BundleManifest) -> str:
    """``torch fp32`` or the exported runtime with its measured parity and, if any, why it was chosen."""
    runtime = manifest.runtime
    if runtime is None:
        return "torch fp32"
    text = f"{runtime.runtime} {runtime.precision}"
    gap = runtime.parity.get("max_abs_prob_diff")
    if gap is not None and runtime.runtime != "torch":
        text += f" (max probability difference to torch fp32 at promotion: {gap:.1e})"
    return f"{text}; {runtime.note}" if runtime.note else text


def pretrained_text(manifest: BundleManifest) -> str:
    """Where the backbone's first weights came from, with their sha256, or random initialisation."""
    lineages = manifest.pretrained_lineages()
    if not lineages:
        return "random initialisation (or not recorded: bundle older than weight lineage)"
    return "; ".join(lineage.text() for lineage in lineages)


def ood_text(manifest: BundleManifest) -> str:
    """What the out-of-distribution check is, or that there is none."""
    ood = manifest.ood
    if ood is None:
        return "none (this bundle flags no unfamiliar inputs)"
    return f"{ood.method} on the image embedding, flags scores above {ood.threshold:.4g}"


def beside_in_domain(manifest: BundleManifest) -> str:
    """A table of the AUC out-of-fold beside each test set's, the gap to out-of-fold and the share of
    images the out-of-distribution detector flags: how the model holds up on data it never saw.

    The gap is external (or test) minus out-of-fold AUC with the MOVER CI of two independent samples
    (``evaluation.external.auc_gap``), computed from the two CIs the card shows; "" without test metrics.
    """
    tested = manifest.test_metrics or {}
    oof = known_metric(manifest.metrics, "auc")
    if not tested or oof is None:
        return ""
    names = list(tested)
    header = ["Metric", "out-of-fold", *(TEST_SET_LABEL.get(n, f"external: {n}") for n in names)]
    aucs, gaps, flags = (
        ["ROC AUC", oof.text()],
        ["AUC gap to out-of-fold", "—"],
        ["Flagged out-of-distribution", "—"],
    )
    for name in names:
        auc = known_metric(tested[name].metrics, "auc")
        aucs.append(auc.text() if auc is not None else "n/a")
        gap = auc_gap(auc, oof) if auc is not None else None
        gaps.append(gap.text() if gap is not None else "n/a")
        rate = tested[name].ood_flag_rate
        flags.append(f"{rate:.1%}" if rate is not None else "no detector")
    lines = [header, ["---"] * len(header), aucs, gaps, flags]
    table = "\n".join("| " + " | ".join(line) + " |" for line in lines)
    return f"**In-domain vs untouched data**\n\n{table}"


def model_card_markdown(model: ServedModel | None, deployment_prevalence: float | None = None) -> str:
    """Backbone, version, promotion time, data version, calibration and headline metrics with CIs.

    Args:
        model: The served model, or None.
        deployment_prevalence: ``serving.deployment_prevalence`` (None: the training prevalence).
    """
    if model is None:
        return f"No model promoted yet. {NO_MODEL_MESSAGE}"
    manifest = model.manifest
    rows = [
        ("Backbone", f"`{model.backbone}` + metadata MLP (age, sex, site)"),
        ("Version", model.version),
        ("Promoted", readable_time(model.promoted_at)),
        ("Bundle created", readable_time(manifest.created_at)),
        ("Training data version", f"`{manifest.data_version}`"),
        ("Code version", f"`{manifest.code_version}`"),
        ("Backbone initialised from", pretrained_text(manifest)),
        ("Input size", f"{model.image_size} px"),
        ("Served model", f"{manifest.describe_model()}, {manifest.views} views per member"),
        ("Runtime", runtime_text(manifest)),
        ("Out-of-distribution check", ood_text(manifest)),
        *calibration_rows(manifest, deployment_prevalence),
    ]
    for test_set, tested in (manifest.test_metrics or {}).items():
        where = TEST_SET_LABEL.get(test_set, f"external test set {test_set}")
        if tested.used_in_selection:
            where += f"; {SELECTION_BIAS_NOTE}"
        rows.append((f"**Test** ({where})", f"{tested.n_images} images, {tested.n_melanoma} melanoma"))
        for label, estimate in headline_metrics(tested.metrics):
            rows.append((f"{label}, test", estimate.text()))
    for label, estimate in headline_metrics(manifest.metrics):
        rows.append((f"{label}, out-of-fold", estimate.text()))
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    if manifest.test_metrics:
        note = (
            "Test metrics are measured on patients nothing was trained, tuned or chosen on, at the threshold "
            f"fixed beforehand. Out-of-fold metrics come from {oof_source(manifest)}, which also chose "
            "its epoch and threshold (expect them to be optimistic). All CIs: patient-level bootstrap."
        )
        if chose := [name for name, tested in manifest.test_metrics.items() if tested.used_in_selection]:
            note += (
                f" Exception: {', '.join(chose)} chose or gated this model (evaluation.select_on / "
                "evaluation.max_external_gap), so its numbers are optimistic too (selection bias)."
            )
        note = f"{beside_in_domain(manifest)}\n\n{note}"
    else:
        note = (
            "No untouched test set exists for this model: every metric is out-of-fold, with patient-level "
            "bootstrap confidence intervals, and the threshold was tuned for a target sensitivity on the same "
            "out-of-fold predictions (expect them to be optimistic)."
        )
    return f"| Model | |\n|---|---|\n{table}\n\n{note}"
