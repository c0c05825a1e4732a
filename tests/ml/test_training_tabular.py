"""A tiny train_fold with tabular features and negative down-sampling: the fold's encoder holds the
columns, the network's metadata input is that wide, and the checkpoint and a bundle-style request
(``metadata_dict`` with the tabular values) reproduce the out-of-fold probabilities."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from melanoma_ml import schema
from melanoma_ml.atomic import sha256_file
from melanoma_ml.config import load_config
from melanoma_ml.features import metadata_dict
from melanoma_ml.serving.inference import encode_metadata
from melanoma_ml.training.checkpoint import load_checkpoint
from melanoma_ml.training.train import FoldResult, train_fold

SIZE = 32
TABULAR = ["tbp_lv_areaMM2", "tbp_lv_deltaLB"]

pytestmark = pytest.mark.slow


def _table(image_dir: Path) -> pd.DataFrame:
    """36 patients, 2 images each, two folds, 1 in 6 images melanoma; tbp_lv_areaMM2 is larger for a
    melanoma and missing for every fifth image, tbp_lv_deltaLB is noise."""
    rng = np.random.default_rng(0)
    rows = []
    for p in range(36):
        for _k in range(2):
            i = len(rows)
            target = int(i % 6 == 0)
            area = np.nan if i % 5 == 4 else float(rng.normal(8.0 if target else 3.0, 1.0))
            rows.append((f"ISIC_{i:04d}", f"P{p:03d}", target, p % 2, area, float(rng.normal())))
    table = pd.DataFrame(rows, columns=[schema.IMAGE, schema.PATIENT, schema.TARGET, schema.FOLD, *TABULAR])
    table[schema.SITE] = np.where(np.arange(len(table)) % 3 == 0, "torso", "lower extremity")
    table[schema.AGE] = 30.0 + (np.arange(len(table)) % 40)
    table[schema.SEX] = np.where(np.arange(len(table)) % 2 == 0, "female", "male")
    table[schema.IS_EXTERNAL] = False
    table[schema.LESION] = table[schema.IMAGE]
    table[schema.GROUP] = table[schema.PATIENT]
    table[schema.DIAGNOSIS] = np.where(table[schema.TARGET] == 1, "melanoma", "nevus")
    table[schema.SOURCE] = "test"
    table[schema.IMAGE_PATH] = [str(image_dir / f"{name}.png") for name in table[schema.IMAGE]]
    for path in table[schema.IMAGE_PATH]:
        Image.fromarray(rng.integers(100, 230, (40, 40, 3), dtype=np.uint8)).save(path)
    table[schema.IMAGE_SHA256] = [sha256_file(p) for p in table[schema.IMAGE_PATH]]
    return table


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[FoldResult, pd.DataFrame]:
    from melanoma_ml.images.cache import build_image_cache

    root = tmp_path_factory.mktemp("tabular")
    (root / "images").mkdir()
    table = _table(root / "images")
    cache = build_image_cache(table, root / "cache", SIZE)
    config = load_config(
        "tiny",
        {
            "data": {"image_size": SIZE},
            "model": {"tabular_features": TABULAR},
            "training": {
                "epochs": 2,
                "batch_size": 8,
                "accelerator": "cpu",
                "devices": 1,
                "negative_ratio": 2,
            },
        },
    )
    return train_fold(config, "test_efficientnet", 0, table, cache, root / "fold0"), table


def test_the_fold_encoder_and_network_carry_the_tabular_columns(trained):
    result, table = trained
    encoder = result.spec.encoder
    train_rows = table[table[schema.FOLD] == 1]
    assert encoder.tabular == tuple(TABULAR)
    assert encoder.tabular_median[0] == pytest.approx(np.nanmedian(train_rows["tbp_lv_areaMM2"]))
    net, spec, _info = load_checkpoint(result.checkpoint_dir)
    assert spec == result.spec and spec.network.tabular_features == TABULAR
    assert net.meta.net[0].in_features == encoder.n_features == 8 + 2 * len(TABULAR)
    assert len(result.oof) == (table[schema.FOLD] == 0).sum()  # evaluation on every validation row


def test_a_request_with_the_tabular_values_reproduces_the_oof_probabilities(trained):
    result, table = trained
    net, spec, _info = load_checkpoint(result.checkpoint_dir)
    val = table[table[schema.FOLD] == 0].reset_index(drop=True)
    from melanoma_ml.images.cache import load_resized
    from melanoma_ml.serving.inference import preprocess

    records = [metadata_dict(row, spec.encoder.tabular) for row in val.itertuples(index=False)]
    meta = encode_metadata(records, spec, len(records))
    np.testing.assert_array_equal(meta.numpy(), spec.encoder.transform(val))
    x = preprocess([load_resized(p, SIZE) for p in val[schema.IMAGE_PATH]], spec)
    with torch.inference_mode():
        probs = torch.sigmoid(net.eval()(x, meta)).numpy()
    np.testing.assert_allclose(probs, result.oof["prob"].to_numpy(), atol=1e-5)
