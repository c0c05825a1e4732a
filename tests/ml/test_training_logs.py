"""TensorBoard curves of a fold: event files stored inside the fold's atomic checkpoint folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from melanoma_ml import schema
from melanoma_ml.config import load_config
from melanoma_ml.images.cache import ImageCache, build_image_cache
from melanoma_ml.training.train import LOGS_DIR, FoldResult, train_fold

SIZE = 32
N_PATIENTS = 16


def _config(epochs: int):
    return load_config(
        "tiny",
        {
            "data": {"image_size": SIZE},
            "training": {"epochs": epochs, "batch_size": 8, "accelerator": "cpu", "devices": 1},
        },
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame, ImageCache]:
    """Two folds of 16 patients, two images each; melanomas are dark squares."""
    root = tmp_path_factory.mktemp("logs")
    rng = np.random.default_rng(0)
    rows = []
    for p in range(N_PATIENTS):
        for k in range(2):
            name, target = f"ISIC_{len(rows):04d}", int(p % 4 < 2 and k == 0)
            pixels = rng.integers(150, 230, (40, 40, 3), dtype=np.uint8)
            if target:
                pixels[10:30, 10:30] = rng.integers(10, 60, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"{name}.png")
            rows.append((name, f"P{p:03d}", target, p % 2, ("torso", "head/neck")[k], 40.0 + p))
    table = pd.DataFrame(
        rows, columns=[schema.IMAGE, schema.PATIENT, schema.TARGET, schema.FOLD, schema.SITE, schema.AGE]
    )
    table[schema.SEX] = np.where(np.arange(len(table)) % 2 == 0, "female", "male")
    table[schema.GROUP] = table[schema.PATIENT]
    table[schema.IMAGE_PATH] = [str(root / f"{name}.png") for name in table[schema.IMAGE]]
    return root, table, build_image_cache(table, root / "cache", SIZE)


def _scalars(logs_dir: Path, tag: str) -> list[float]:
    events = EventAccumulator(str(logs_dir))
    events.Reload()
    assert tag in events.Tags()["scalars"], events.Tags()["scalars"]
    return [event.value for event in events.Scalars(tag)]


def test_a_trained_fold_holds_its_tensorboard_curves(data) -> None:
    root, table, cache = data
    out_dir = root / "checkpoints" / "test_efficientnet" / "fold0"
    result = train_fold(_config(epochs=2), "test_efficientnet", 0, table, cache, out_dir)

    assert result.logs_dir == out_dir / LOGS_DIR
    assert list(result.logs_dir.glob("events.out.tfevents.*"))
    assert _scalars(result.logs_dir, "val/auroc") == pytest.approx(result.history["val/auroc"].tolist())
    assert _scalars(result.logs_dir, "train/loss") == pytest.approx(result.history["train/loss"].tolist())
    assert FoldResult.load(out_dir).logs_dir == result.logs_dir
    assert [p.name for p in out_dir.parent.iterdir()] == [out_dir.name]  # no scratch or temp logs beside it


def test_retraining_a_fold_replaces_its_curves(data) -> None:
    root, table, cache = data
    out_dir = root / "retrain" / "fold1"
    train_fold(_config(epochs=2), "test_efficientnet", 1, table, cache, out_dir)
    result = train_fold(_config(epochs=1), "test_efficientnet", 1, table, cache, out_dir)

    assert len(list(result.logs_dir.glob("events.out.tfevents.*"))) == 1
    assert len(_scalars(result.logs_dir, "val/auroc")) == 1  # the earlier run's two epochs are gone
