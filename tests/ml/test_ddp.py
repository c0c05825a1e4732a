"""One fold trained data-parallel on two CPU processes (ddp_spawn, gloo) against the same fold on one.

The two-process fit must write its checkpoint folder once (from the parent, after the ranks exit),
predict every validation row exactly once in the same order as the one-process fit, and reach an AUC
within ``AUC_TOLERANCE`` of it. They are not equal: each rank sees half the batches per step (the
effective batch doubles) and the distributed sampler shuffles differently, so the optimisation path
differs. On this tiny synthetic fold (~30 validation images, 2 epochs) one AUC step is ~0.03; 0.15 is
five such steps, wide enough for a different path, narrow enough to catch predictions misaligned with
their rows (which drive the AUC toward 0.5 or below). Measured |difference| over MELANOMA_TEST_SEED 0-5
(AMD EPYC, 2 cores): 0.006-0.100 (one-process AUC 0.54-0.72).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pytest
from conftest import TEST_SEED
from sklearn.metrics import roc_auc_score

from melanoma_ml import pipeline, schema
from melanoma_ml.config import PipelineConfig, load_config
from melanoma_ml.devices import host_lock_dir, lease_devices
from melanoma_ml.training.checkpoint import CHECKPOINT_FILES
from melanoma_ml.training.train import OOF_FILE, RESULT_FILE, FoldResult, train_fold

pytestmark = pytest.mark.slow

AUC_TOLERANCE = 0.15
FOLD = 0
BACKBONE = "test_efficientnet"


def _config(root: Path, **training) -> PipelineConfig:
    return load_config(
        "tiny",
        {
            "artifact_root": str(root),
            "data": {"synthetic": {"seed": TEST_SEED}},
            "training": {"accelerator": "cpu", "epochs": 2, "seed": 42 + TEST_SEED, **training},
        },
    )


@pytest.fixture(scope="module")
def fold_data(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("ddp")
    config = _config(root)
    cleaned = pipeline.clean_source(config, pipeline.prepare_source(config))
    folds = pipeline.make_folds(config, cleaned.clean)
    return root, folds, pipeline.build_cache(config, folds)


@pytest.fixture(scope="module")
def one_process(fold_data) -> FoldResult:
    root, folds, cache = fold_data
    return train_fold(_config(root), BACKBONE, FOLD, folds, cache, root / "one" / f"fold{FOLD}")


@pytest.fixture(scope="module")
def two_processes(fold_data) -> FoldResult:
    root, folds, cache = fold_data
    config = _config(root, devices=2, strategy="ddp_spawn")
    return train_fold(config, BACKBONE, FOLD, folds, cache, root / "ddp" / f"fold{FOLD}")


def test_ddp_predicts_every_validation_row_once_like_one_process(one_process, two_processes) -> None:
    assert len(two_processes.oof) == len(one_process.oof) == two_processes.n_val
    pd.testing.assert_series_equal(two_processes.oof[schema.IMAGE], one_process.oof[schema.IMAGE])
    assert two_processes.devices == ["cpu", "cpu"] and one_process.devices == ["cpu"]
    one_auc = roc_auc_score(one_process.oof[schema.TARGET], one_process.oof["prob"])
    ddp_auc = roc_auc_score(two_processes.oof[schema.TARGET], two_processes.oof["prob"])
    assert abs(ddp_auc - one_auc) <= AUC_TOLERANCE, (one_auc, ddp_auc)


def test_ddp_hands_rank_zeros_training_record_back(two_processes) -> None:
    """The best epoch, history and throughput come from rank 0's callback, not a blank parent copy."""
    assert two_processes.epochs_run == len(two_processes.history) == 2
    assert 1 <= two_processes.best_epoch <= 2
    assert two_processes.best_val_auroc == pytest.approx(two_processes.history["val/auroc"].max())
    assert two_processes.train_images_per_second > 0


def test_ddp_writes_one_complete_checkpoint_folder(two_processes) -> None:
    out_dir = two_processes.checkpoint_dir
    assert sorted(p.name for p in out_dir.parent.iterdir()) == [out_dir.name]  # no rank's temp folder
    assert {*CHECKPOINT_FILES, OOF_FILE, RESULT_FILE} <= {p.name for p in out_dir.iterdir()}
    weights = (out_dir / "weights.safetensors").read_bytes()
    assert hashlib.sha256(weights).hexdigest() == two_processes.weights_sha256
    reloaded = FoldResult.load(out_dir)
    assert reloaded.devices == ["cpu", "cpu"] and len(reloaded.oof) == two_processes.n_val


def test_a_fit_trains_on_the_device_it_leased(fold_data) -> None:
    root, folds, cache = fold_data
    pool = ["cpu:0", "cpu:1"]
    config = _config(root, device_pool=pool, device_wait_s=0)
    with lease_devices(pool, 1, host_lock_dir(root / "locks"), holder="another training", wait_s=0):
        result = train_fold(config, BACKBONE, FOLD, folds, cache, root / "leased" / f"fold{FOLD}")
    assert result.devices == ["cpu:1"]
    assert FoldResult.load(result.checkpoint_dir).devices == ["cpu:1"]
