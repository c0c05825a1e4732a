"""A constructed served bundle and days of its prediction log, in distribution or shifted (no torch).

The generative model: a lesion's latent score ``z ~ N(0, 1)``; the served probability is
``expit(-2 + 1.8 z)`` and its label is drawn from that probability, so the probabilities are calibrated by
construction (about 20 % melanoma). The bundle's out-of-fold rows are such draws (identity temperature
calibrator), its threshold catches 90 % of their melanomas, its OOD detector flags 1 % (quantile 0.99).
A *shifted* day is another clinic: a new dermatoscope squeezes and lifts the scores (``expit(-1 + 0.9 z)``),
an older population seen more on the head and neck, and a fifth of the images flagged out of distribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import special

from melanoma_ml import schema
from melanoma_ml.config import ModelConfig
from melanoma_ml.evaluation.estimate import Estimate
from melanoma_ml.features import MetadataEncoder
from melanoma_ml.serving.manifest import BundleManifest, ValidationPredictions
from melanoma_ml.serving.monitor_reference import build_monitor_reference
from melanoma_ml.spec import ModelSpec

VERSION = "v0001"
SPEC = ModelSpec(
    ModelConfig(backbone="test_resnet", meta_hidden=[8], meta_dropout=0.1, head_dropout=0.0),
    32,
    [0.5] * 3,
    [0.25] * 3,
    MetadataEncoder(age_mean=50.0, age_std=15.0, sexes=schema.SEXES, sites=schema.SITES),
)
SITE_SHARES = (0.15, 0.20, 0.25, 0.30, 0.05, 0.05)
"""Reference anatomic-site mix, in ``schema.SITES`` order."""
SHIFTED_SITE_SHARES = (0.45, 0.15, 0.10, 0.20, 0.05, 0.05)


@dataclass(frozen=True)
class Population:
    """How a clinic's cases are drawn (module docstring)."""

    intercept: float = -2.0
    slope: float = 1.8
    age_mean: float = 50.0
    site_shares: tuple[float, ...] = SITE_SHARES
    ood_rate: float = 0.01


IN_DISTRIBUTION = Population()
SHIFTED = Population(intercept=-1.0, slope=0.9, age_mean=68.0, site_shares=SHIFTED_SITE_SHARES, ood_rate=0.2)


def draw(population: Population, n: int, rng: np.random.Generator) -> pd.DataFrame:
    """``n`` cases: probability, target (drawn from it), age, sex, site (a few missing), ood_flag."""
    prob = special.expit(population.intercept + population.slope * rng.normal(size=n))
    age = np.round(rng.normal(population.age_mean, 12.0, n) / 5) * 5
    return pd.DataFrame(
        {
            "probability": prob,
            "target": (rng.random(n) < prob).astype(int),
            "age": np.where(rng.random(n) < 0.05, np.nan, np.clip(age, 5, 85)),
            "sex": rng.choice(["female", "male", "unknown"], n, p=[0.48, 0.48, 0.04]),
            "anatom_site": rng.choice(schema.SITES, n, p=population.site_shares),
            "ood_flag": rng.random(n) < population.ood_rate,
        }
    )


def served_manifest(seed: int, n_rows: int = 2000, *, with_reference: bool = True) -> BundleManifest:
    """A bundle whose out-of-fold rows are ``n_rows`` in-distribution draws (module docstring)."""
    rng = np.random.default_rng(seed)
    rows = draw(IN_DISTRIBUTION, n_rows, rng)
    prob, target = rows["probability"].to_numpy(), rows["target"].to_numpy()
    threshold = float(np.quantile(prob[target == 1], 0.10))
    table = rows.rename(columns={"age": schema.AGE, "sex": schema.SEX, "anatom_site": schema.SITE})
    fields = {
        "version": VERSION,
        "threshold": threshold,
        "metrics": {"auc": Estimate(0.85, 0.8, 0.9, 0.95)},
        "data_version": "folds-1",
        "code_version": "melanoma_ml-test",
        "created_at": "2026-12-01T00:00:00+00:00",
        "ensemble": {
            "kind": "best_fold",
            "average": "probability",
            "members": [
                {
                    "weights": {"name": "weights.safetensors", "sha256": "a" * 64},
                    "model_spec": SPEC,
                    "fold": 0,
                }
            ],
        },
        "oof": ValidationPredictions(
            image_name=[f"ISIC_{i}" for i in range(n_rows)],
            group_id=[f"patient:P{i}" for i in range(n_rows)],
            fold=[0] * n_rows,
            target=target.tolist(),
            prob=prob.tolist(),
        ),
        "calibration": {
            "method": "temperature",
            "parameters": {"method": "temperature", "temperature": 1.0},
            "prevalence": float(target.mean()),
            "n_rows": n_rows,
        },
        "ood": {
            "file": {"name": "ood.safetensors", "sha256": "c" * 64},
            "method": "mahalanobis",
            "threshold": 10.0,
            "summary": {"quantile": 0.99},
        },
        "monitor_reference": build_monitor_reference(table, description=f"{n_rows} constructed rows")
        if with_reference
        else None,
    }
    return BundleManifest.model_validate(fields)


def register_served_bundle(
    artifacts: Path, seed: int, *, reason: str = "constructed test bundle"
) -> BundleManifest:
    """Register under ``artifacts`` and promote a random-weight ``SPEC`` network carrying ``served_manifest(seed,
    n_rows=1000)``'s threshold, metrics, out-of-fold rows, calibrator and monitor reference, with a Mahalanobis
    detector of threshold 10; returns the registry's manifest of it (the bundle the app would serve)."""
    from melanoma_ml.artifacts import ArtifactPaths
    from melanoma_ml.serving.ood import MahalanobisScorer
    from melanoma_ml.serving.registry import ModelRegistry

    reference = served_manifest(seed, n_rows=1000)
    registry = ModelRegistry(ArtifactPaths(artifacts).registry)
    version = registry.register_bundle(
        SPEC.build_network().eval(),
        SPEC,
        threshold=reference.threshold,
        metrics=reference.metrics,
        data_version="constructed",
        code_version="constructed",
        oof=reference.oof,
        calibration=reference.calibration.model_dump(),
        ood=MahalanobisScorer(np.zeros((1, 4)), np.eye(4), threshold=10.0, quantile=0.99, n_fit=100),
        monitor_reference=reference.monitor_reference,
    )
    registry.promote(version, reason=reason)
    return registry.manifest(version)


def day_of_log(
    manifest: BundleManifest, population: Population, n: int, seed: int, *, version: str | None = VERSION
) -> pd.DataFrame:
    """One day of prediction records (``read_predictions``' columns) of ``population`` served by ``manifest``."""
    rng = np.random.default_rng(seed)
    cases = draw(population, n, rng)
    start = datetime(2026, 12, 1, 8, tzinfo=UTC)
    positive = cases["probability"] >= manifest.threshold
    return pd.DataFrame(
        {
            "time": [start + timedelta(minutes=i) for i in range(n)],
            "model_version": version,
            "case_id": [f"C-20261201-{i:012x}" for i in range(n)],
            "image_sha256": [f"{i:064x}" for i in range(n)],
            "probability": cases["probability"],
            "decision": np.where(positive, "melanoma suspected", "no melanoma suspected"),
            "positive": positive,
            "threshold": manifest.threshold,
            "ood_score": np.where(cases["ood_flag"], 20.0, 5.0),
            "ood_flag": cases["ood_flag"],
            "age": cases["age"],
            "sex": cases["sex"].where(cases["sex"] != "unknown", None),
            "anatom_site": cases["anatom_site"],
            "latency_ms": 12.0,
            "source": "app",
            "image_path": None,
        }
    )


def append_day(log, rows: pd.DataFrame) -> list[str | None]:
    """Append every row of a :func:`day_of_log` table to ``log`` (a ``PredictionLog``) as the app would;
    the case id of each record, or None where the log lost it."""
    return [
        log.append(
            source="app",
            model_version=row.model_version,
            probability=row.probability,
            decision=row.decision,
            positive=row.positive,
            threshold=row.threshold,
            image_sha256=row.image_sha256,
            ood_score=row.ood_score,
            ood_flag=row.ood_flag,
            age=row.age,
            sex=row.sex,
            anatom_site=row.anatom_site,
            latency_ms=row.latency_ms,
        )
        for row in rows.itertuples(index=False)
    ]
