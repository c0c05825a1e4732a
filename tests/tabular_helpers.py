"""A small folds table with tabular columns, shared by the tabular baseline's library and asset tests."""

from __future__ import annotations

import numpy as np
import pandas as pd

from melanoma_ml import schema

TABULAR = ["tbp_lv_areaMM2", "tbp_lv_deltaLB"]


def folds_table(n_patients: int = 120, seed: int = 0) -> pd.DataFrame:
    """Three images per patient, ~15% melanoma, an informative tabular column; two folds."""
    rng = np.random.default_rng(seed)
    n = n_patients * 3
    patient = np.repeat(np.arange(n_patients), 3)
    target = (rng.random(n) < 0.15).astype("int64")
    return pd.DataFrame(
        {
            schema.IMAGE: [f"ISIC_{i:05d}" for i in range(n)],
            schema.PATIENT: [f"P{p}" for p in patient],
            schema.GROUP: [f"P{p}" for p in patient],
            schema.FOLD: patient % 2,
            schema.TARGET: target,
            schema.AGE: rng.integers(20, 85, n).astype(float),
            schema.SEX: rng.choice(["male", "female"], n),
            schema.SITE: rng.choice(["torso", "head/neck"], n),
            schema.IS_EXTERNAL: False,
            "tbp_lv_areaMM2": rng.normal(3 + 4 * target, 1.5),
            "tbp_lv_deltaLB": rng.normal(size=n),
        }
    )
