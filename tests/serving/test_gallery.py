"""Which validation images the Grad-CAM gallery shows, and the probabilities it shows for them (the
prior-shifted ones the app serves); the Dagster rendering is tested in tests/assets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from ood_helpers import TRAINING_PREVALENCE, register_with_ood, smooth_images
from PIL import Image

from melanoma_ml import schema
from melanoma_ml.config import ServingConfig
from melanoma_ml.evaluation.calibration import shift_prior
from melanoma_ml.serving.bundle import load_bundle
from melanoma_ml.serving.gallery import pick_gallery_rows, render_gallery
from melanoma_ml.serving.registry import ModelRegistry

SIZE = 32


def test_gallery_rows_mix_melanoma_and_benign_reproducibly() -> None:
    val = pd.DataFrame({"image_name": [f"I{i}" for i in range(10)], "target": [1, 1, 0, 0, 0, 0, 0, 0, 0, 1]})
    picked = pick_gallery_rows(val, 4, seed=0)
    assert picked["target"].tolist() == [1, 1, 0, 0]
    assert picked.equals(pick_gallery_rows(val, 4, seed=0))
    assert len(pick_gallery_rows(val[val["target"] == 0], 4, seed=0)) == 4


def test_gallery_probabilities_follow_the_deployment_prevalence_and_carry_ood_flags(tmp_path: Path) -> None:
    names = [f"ISIC_{i}" for i in range(4)]
    paths = []
    for name, image in zip(names, smooth_images(4, 48, seed=5), strict=True):
        paths.append(tmp_path / f"{name}.png")
        Image.fromarray(image).save(paths[-1])
    targets = [1, 1, 0, 0]
    oof = {"image_name": names, "group_id": names, "fold": [0] * 4, "target": targets, "prob": [0.5] * 4}
    registry = ModelRegistry(tmp_path / "registry")
    bundle = load_bundle(registry.version_path(register_with_ood(registry, seed=3, size=SIZE, oof=oof)))
    folds = pd.DataFrame(
        {"image_name": names, "image_path": [str(p) for p in paths], "target": targets, "fold": 0,
         schema.AGE: np.nan, schema.SEX: None, schema.SITE: None}
    )  # fmt: skip

    def probs(prevalence: float | None) -> dict[str, float]:
        serving = ServingConfig(tta=False, deployment_prevalence=prevalence)
        gallery = render_gallery(
            bundle, folds, tmp_path / f"gallery{prevalence}", serving, n_images=4, seed=0
        )
        assert len(gallery.items) == 4 and all(item.ood_flag is not None for item in gallery.items)
        return {item.image_name: item.prob for item in gallery.items}

    base, shifted = probs(None), probs(0.02)
    for name in names:
        expected = shift_prior(np.array([base[name]]), TRAINING_PREVALENCE, 0.02)[0]
        assert shifted[name] == pytest.approx(expected, abs=1e-9) and shifted[name] < base[name]
