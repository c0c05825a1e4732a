"""train_fold end to end on a few dozen tiny images: OOF, files, reload, determinism, fold checks."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from melanoma_ml import schema
from melanoma_ml.atomic import sha256_file
from melanoma_ml.config import PipelineConfig, load_config
from melanoma_ml.evaluation.plots import plot_training_curves
from melanoma_ml.folds import EXTERNAL_FOLD
from melanoma_ml.training import checkpoint as checkpoint_module
from melanoma_ml.training.checkpoint import CHECKPOINT_FILES, load_checkpoint
from melanoma_ml.training.train import (
    HISTORY_FILE,
    LOGS_DIR,
    OOF_COLUMNS,
    OOF_FILE,
    RESULT_FILE,
    FoldResult,
    split_fold,
    train_fold,
)

SIZE = 32
N_PATIENTS = 24  # two images each: 48 images, 24 per fold
VAL_ONLY_SITE = "palms/soles"
FOLD = 0


def _table(image_dir: Path | None = None) -> pd.DataFrame:
    """A cleaned, folded table. Melanomas are dark squares; one patient's site exists only in fold 0.
    Two external melanomas, as ``assign_folds`` folds them: EXT_0000 (its own patient, fold -1) trains in
    every fold; EXT_0001 shares patient P000 (fold 0), so it carries fold 0 and is never validated on."""
    rng = np.random.default_rng(0)
    rows = []
    for p in range(N_PATIENTS):
        fold = p % 2
        for k in range(2):
            i = len(rows)
            target = int(p % 4 in (0, 1) and k == 0)
            site = VAL_ONLY_SITE if p == 0 else ("torso", "lower extremity")[k]
            rows.append(
                (f"ISIC_{i:04d}", f"P{p:03d}", target, fold, site, False, float(rng.integers(25, 80)))
            )
    rows.append(("EXT_0000", "X000", 1, EXTERNAL_FOLD, "torso", True, 60.0))
    rows.append(("EXT_0001", "P000", 1, FOLD, "torso", True, 55.0))
    table = pd.DataFrame(
        rows,
        columns=[
            schema.IMAGE,
            schema.PATIENT,
            schema.TARGET,
            schema.FOLD,
            schema.SITE,
            schema.IS_EXTERNAL,
            schema.AGE,
        ],
    )
    table[schema.SEX] = np.where(np.arange(len(table)) % 2 == 0, "female", "male")
    table[schema.LESION] = table[schema.IMAGE]
    table[schema.GROUP] = table[schema.PATIENT]
    table[schema.DIAGNOSIS] = np.where(table[schema.TARGET] == 1, "melanoma", "nevus")
    table[schema.SOURCE] = "test"
    if image_dir is not None:
        table[schema.IMAGE_PATH] = [str(image_dir / f"{name}.png") for name in table[schema.IMAGE]]
    return table


def _write_images(table: pd.DataFrame) -> None:
    rng = np.random.default_rng(1)
    for path, target in zip(table[schema.IMAGE_PATH], table[schema.TARGET], strict=True):
        pixels = rng.integers(150, 230, (48, 48, 3), dtype=np.uint8)
        if target:
            pixels[12:36, 12:36] = rng.integers(10, 60, (24, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
    table[schema.IMAGE_SHA256] = [sha256_file(p) for p in table[schema.IMAGE_PATH]]


def _config() -> PipelineConfig:
    return load_config(
        "tiny",
        {
            "data": {"image_size": SIZE},
            "training": {"epochs": 2, "batch_size": 16, "accelerator": "cpu", "devices": 1},
        },
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory):
    from melanoma_ml.images.cache import build_image_cache

    root = tmp_path_factory.mktemp("fold")
    image_dir = root / "images"
    image_dir.mkdir()
    table = _table(image_dir)
    _write_images(table)
    cache = build_image_cache(table, root / "cache", SIZE)
    return root, table, cache


@pytest.fixture(scope="module")
def trained(data) -> tuple[FoldResult, Path]:
    root, table, cache = data
    out_dir = root / "checkpoints" / "test_efficientnet" / f"fold{FOLD}"
    return train_fold(_config(), "test_efficientnet", FOLD, table, cache, out_dir), out_dir


def _validation_names(table: pd.DataFrame) -> set[str]:
    return set(table.loc[(table[schema.FOLD] == FOLD) & ~table[schema.IS_EXTERNAL], schema.IMAGE])


# ---- fold checks (no training) -------------------------------------------------------------------


def _training_names(table: pd.DataFrame) -> set[str]:
    """Every row outside fold 0: EXT_0001 (patient P000, validated in fold 0) stays out of training."""
    return set(table.loc[table[schema.FOLD] != FOLD, schema.IMAGE])


@pytest.mark.parametrize("fold", [FOLD, str(FOLD)])  # Dagster partition keys are strings
def test_split_trains_on_external_rows_but_not_beside_their_validated_patient(fold: int | str) -> None:
    table = _table()
    train, val = split_fold(table, fold)
    assert set(val[schema.IMAGE]) == _validation_names(table)
    assert set(train[schema.IMAGE]) == _training_names(table)
    assert "EXT_0000" in set(train[schema.IMAGE])
    assert "EXT_0001" not in set(train[schema.IMAGE]) | set(val[schema.IMAGE])
    assert set(train[schema.GROUP]).isdisjoint(val[schema.GROUP])  # no patient on both sides
    other_train, _ = split_fold(table, 1)
    assert {"EXT_0000", "EXT_0001"} <= set(other_train[schema.IMAGE])


@pytest.mark.parametrize(
    "change,match",
    [
        (
            lambda t: t.assign(**{schema.TARGET: np.where(t[schema.FOLD] == 1, 0, t[schema.TARGET])}),
            "fold 1 has no melanoma in validation.*fewer folds",
        ),
        (lambda t: t.drop(columns=[schema.FOLD]), "missing columns.*assign_folds"),
        (lambda t: t.assign(**{schema.FOLD: t[schema.FOLD].where(t.index != 3)}), "no fold.*ISIC_0003"),
    ],
)
def test_untrainable_folds_fail_before_training(tmp_path: Path, change, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        train_fold(_config(), "test_efficientnet", 1, change(_table()), cache=None, out_dir=tmp_path / "f")
    assert not (tmp_path / "f").exists()


def test_an_unknown_fold_lists_the_folds_present() -> None:
    for fold in (7, EXTERNAL_FOLD):
        with pytest.raises(ValueError, match=rf"fold {fold} not in the table \(folds present: \[0, 1\]\)"):
            split_fold(_table(), fold)


# ---- one real training run (module fixture) ---------------------------------------------------------


@pytest.mark.slow
def test_oof_covers_exactly_the_validation_rows(data, trained) -> None:
    _root, table, _cache = data
    result, _out = trained
    oof = result.oof
    assert list(oof.columns) == list(OOF_COLUMNS)
    assert set(oof[schema.IMAGE]) == _validation_names(table)
    assert len(oof) == result.n_val == len(_validation_names(table))
    assert result.n_train == len(_training_names(table))
    assert np.isfinite(oof["prob"]).all() and oof["prob"].between(0, 1).all()
    assert (oof[schema.FOLD] == FOLD).all() and (oof["backbone"] == "test_efficientnet").all()
    truth = table.set_index(schema.IMAGE).loc[oof[schema.IMAGE], schema.TARGET].to_numpy()
    np.testing.assert_array_equal(oof[schema.TARGET].to_numpy(), truth)


@pytest.mark.slow
def test_files_history_and_result_are_consistent(trained) -> None:
    result, out = trained
    assert {p.name for p in out.iterdir()} == {
        *CHECKPOINT_FILES,
        OOF_FILE,
        HISTORY_FILE,
        RESULT_FILE,
        LOGS_DIR,
    }
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temp folders or logs beside it
    history = pd.read_csv(out / HISTORY_FILE)
    assert len(history) == result.epochs_run == len(result.history)
    assert list(history["epoch"]) == list(range(1, result.epochs_run + 1))
    for column in ("lr", "train/loss", "val/loss", "val/auroc", "val/f1", "val/recall", "train/auroc"):
        assert column in history.columns
    assert result.best_val_auroc == pytest.approx(history["val/auroc"].max())
    assert history.loc[history["epoch"] == result.best_epoch, "val/auroc"].item() == pytest.approx(
        result.best_val_auroc
    )
    assert result.weights_sha256 == sha256_file(out / "weights.safetensors")
    assert result.train_images_per_second > 0 and result.wall_time_s > 0
    assert json.loads((out / RESULT_FILE).read_text()) == json.loads(json.dumps(result.to_dict()))
    assert not torch.are_deterministic_algorithms_enabled()  # Trainer(deterministic=...) flags undone


@pytest.mark.slow
def test_a_failed_save_leaves_the_previous_fold_intact_and_complete(
    data, trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _root, table, cache = data
    _result, trained_out = trained
    out = tmp_path / f"fold{FOLD}"
    shutil.copytree(trained_out, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real_write = checkpoint_module.atomic_write_bytes

    def fail_on_result(path, data):  # the fold's last file: everything else is already written
        if Path(path).name == RESULT_FILE:
            raise OSError("disk full")
        return real_write(path, data)

    monkeypatch.setattr(checkpoint_module, "atomic_write_bytes", fail_on_result)
    with pytest.raises(OSError, match="disk full"):
        train_fold(_config(), "test_efficientnet", FOLD, table, cache, out)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temp or half-written folder
    assert FoldResult.load(out).weights_sha256 == sha256_file(out / "weights.safetensors")


@pytest.mark.slow
def test_fold_result_loads_back(trained) -> None:
    result, out = trained
    loaded = FoldResult.load(out)
    assert loaded.to_dict() == result.to_dict()
    pd.testing.assert_frame_equal(loaded.oof, result.oof)
    assert loaded.spec == result.spec


@pytest.mark.slow
def test_encoder_is_fitted_on_training_rows_only(trained) -> None:
    result, _out = trained
    encoder = result.spec.encoder
    assert VAL_ONLY_SITE not in encoder.sites
    assert set(encoder.sites) == {"torso", "lower extremity"}
    assert result.spec.image_size == SIZE


@pytest.mark.slow
def test_loaded_checkpoint_reproduces_the_oof_probabilities(data, trained) -> None:
    from melanoma_ml.images.transforms import eval_transform

    _root, table, cache = data
    result, out = trained
    net, spec, info = load_checkpoint(out)
    assert info["best_epoch"] == result.best_epoch
    rows = table.set_index(schema.IMAGE).loc[result.oof[schema.IMAGE]].reset_index()
    transform = eval_transform(spec.image_size, spec.mean, spec.std)
    pixels = cache.array()[cache.rows_for(rows[schema.IMAGE])]
    images = torch.stack([transform(image=np.array(p))["image"] for p in pixels])
    metadata = torch.from_numpy(spec.encoder.transform(rows))
    with torch.inference_mode():
        probs = torch.sigmoid(net(images, metadata)).numpy()
    np.testing.assert_allclose(probs, result.oof["prob"].to_numpy(), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_same_seed_gives_identical_oof(data, trained, tmp_path: Path) -> None:
    _root, table, cache = data
    first, _out = trained
    again = train_fold(_config(), "test_efficientnet", FOLD, table, cache, tmp_path / "again")
    np.testing.assert_allclose(again.oof["prob"].to_numpy(), first.oof["prob"].to_numpy(), rtol=0, atol=1e-6)
    pd.testing.assert_frame_equal(again.history, first.history, check_exact=False, atol=1e-6)


@pytest.mark.slow
def test_training_curves_are_a_png(trained) -> None:
    result, _out = trained
    png = plot_training_curves(result.history, title="test_efficientnet fold 0")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(png)) as image:
        assert image.size[0] > 100


def test_training_curves_plot_a_history_with_or_without_validation_columns() -> None:
    history = pd.DataFrame({"epoch": [1, 2, 3], "train/loss": [0.7, 0.5, 0.4], "val/auroc": [0.6, 0.7, 0.8]})
    with_title = plot_training_curves(history, title="resnet18 fold 2")
    without = plot_training_curves(history[["epoch", "train/loss"]])
    for png in (with_title, without):
        with Image.open(io.BytesIO(png)) as image:
            assert image.format == "PNG" and image.size == (900, 350)
    assert with_title != without


def test_an_empty_history_cannot_be_plotted() -> None:
    with pytest.raises(ValueError, match="at least one row"):
        plot_training_curves(pd.DataFrame({"epoch": []}))


@pytest.mark.slow
def test_early_stopping_ends_training_and_keeps_the_best_epoch(data, tmp_path: Path) -> None:
    _root, table, cache = data
    config = _config().model_copy(deep=True)
    config.training.epochs = 4
    config.training.early_stopping_patience = 1
    config.training.learning_rate = 1e-9  # val/auroc barely moves, so patience 1 runs out early
    result = train_fold(config, "test_efficientnet", FOLD, table, cache, tmp_path / "early")
    assert result.epochs_run < 4
    assert len(result.history) == result.epochs_run
    assert result.best_val_auroc == pytest.approx(result.history["val/auroc"].max())
    # Stopping with patience 1 means the last epoch was no improvement: the kept weights are older ones,
    # and the OOF predictions come from them.
    assert result.best_epoch < result.epochs_run
    oof_auroc = roc_auc_score(result.oof[schema.TARGET], result.oof["prob"])
    assert oof_auroc == pytest.approx(result.best_val_auroc, abs=1e-5)
