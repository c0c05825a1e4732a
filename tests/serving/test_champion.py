"""The champion/challenger pairing: a candidate is compared with the champion on the images both predicted.

The gate against a real registry (promote, keep, rollback) runs in tests/assets/test_pipeline_promotion.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from melanoma_ml.config import load_config
from melanoma_ml.serving.champion import OOF_KEEP, paired_difference_with_champion


def oof_table(n_patients: int = 60) -> pd.DataFrame:
    """Two images per patient, the folds split by patient, ~30% melanoma: the columns a bundle keeps."""
    rng = np.random.default_rng(0)
    patient = np.repeat(np.arange(n_patients), 2)
    names = [f"ISIC_{i:04d}" for i in range(patient.size)]
    target = (rng.random(patient.size) < 0.3).astype(int)
    groups = [f"patient:P{p}" for p in patient]
    return pd.DataFrame({"image_name": names, "group_id": groups, "fold": patient % 2, "target": target})


def champion_oof(oof: pd.DataFrame) -> pd.DataFrame:
    """The champion's stored rows as its manifest gives them (``BundleManifest.oof_frame()``)."""
    return oof[list(OOF_KEEP)].reset_index(drop=True)


def test_paired_difference_uses_the_candidates_current_labels(tmp_path: Path) -> None:
    config = load_config("tiny", {"artifact_root": str(tmp_path), "evaluation": {"n_bootstrap": 100}})
    table = oof_table()
    rng = np.random.default_rng(3)
    candidate = table.assign(prob=np.clip(0.6 * table["target"] + 0.4 * rng.random(len(table)), 0, 1))
    champion = table.assign(prob=rng.random(len(table)))
    champion = champion[champion["fold"] == 0].copy()
    champion.loc[champion.index[:3], "target"] = 1 - champion.loc[champion.index[:3], "target"]  # since fixed

    difference, note = paired_difference_with_champion(config, candidate, champion_oof(champion))
    assert difference is not None, note
    assert difference["n"] == len(champion)
    shared = candidate[candidate["fold"] == 0]
    assert "shared images" in note and f"{int(shared['target'].sum())} melanoma" in note


@pytest.mark.parametrize(
    ("stored", "message"),
    [
        (lambda oof: champion_oof(oof).iloc[:0], "stores no out-of-fold predictions"),
        (lambda oof: champion_oof(oof.head(8)), "a paired AUC needs at least 5 of each class"),
    ],
)
def test_paired_difference_is_refused_without_enough_shared_cases(tmp_path: Path, stored, message) -> None:
    config = load_config("tiny", {"artifact_root": str(tmp_path)})
    table = oof_table().assign(prob=0.5)
    difference, note = paired_difference_with_champion(config, table, stored(table))
    assert difference is None and message in note
