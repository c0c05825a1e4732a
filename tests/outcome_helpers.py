"""Logged cases to record outcomes for: prediction-log records written through ``PredictionLog.append``.

Importable from any test as ``from outcome_helpers import ...`` (``tests/`` is on ``sys.path``).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from melanoma_ml.monitoring.prediction_log import PredictionLog


def png_bytes(seed: int, side: int = 24) -> bytes:
    """A small random RGB PNG (distinct per seed, so distinct sha256)."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def log_cases(
    root: Path,
    n: int,
    *,
    keep_images: bool = True,
    seed: int = 0,
    version: str = "v0001",
    sexes: tuple[str | None, ...] = ("female", "male", None),
) -> list[str]:
    """Score ``n`` distinct images into the prediction log under artifact ``root``; their case ids."""
    log = PredictionLog(root, keep_images=keep_images)
    ids = []
    for i in range(n):
        case = log.append(
            source="app",
            model_version=version,
            probability=0.1 + 0.8 * i / max(n - 1, 1),
            decision="positive" if i % 2 else "negative",
            positive=bool(i % 2),
            threshold=0.5,
            image=png_bytes(seed * 1000 + i),
            age=30.0 + i,
            sex=sexes[i % len(sexes)],
            anatom_site="torso",
            latency_ms=5.0,
        )
        assert case is not None, "the prediction log did not write a record"
        ids.append(case)
    return ids
