"""Train one backbone on one fold: fit, keep the best epoch, predict the validation rows, save it all.

``train_fold`` writes into ``out_dir`` (normally ``checkpoints/<backbone>/fold<k>/``)::

    weights.safetensors  spec.json  info.json   the best epoch's network (``checkpoint.load_checkpoint``)
    oof.parquet                                 out-of-fold probabilities of the validation rows
    history.csv                                 one row per epoch: epoch, lr, train/loss, val/loss, val/auroc, ...
    result.json                                 ``FoldResult.to_dict()``

All of them appear at once: the folder is built in a temp folder and renamed into place
(``checkpoint.save_checkpoint(..., extra_files=...)``), so a failed run leaves the previous fold intact.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import EarlyStopping
from torch import nn
from torch.utils.data import DataLoader

from melanoma_ml import schema
from melanoma_ml.atomic import parquet_bytes, to_json_text
from melanoma_ml.config import PipelineConfig
from melanoma_ml.features import MetadataEncoder
from melanoma_ml.folds import split_masks
from melanoma_ml.images.transforms import eval_transform, train_transform
from melanoma_ml.model import build_model, normalization_for
from melanoma_ml.spec import ModelSpec
from melanoma_ml.training.checkpoint import read_spec, save_checkpoint
from melanoma_ml.training.data import MelanomaDataset, make_loader
from melanoma_ml.training.module import MONITOR, MelanomaModule
from melanoma_ml.weights import weights_bytes

OOF_FILE = "oof.parquet"
HISTORY_FILE = "history.csv"
RESULT_FILE = "result.json"
PROB = "prob"
BACKBONE = "backbone"

REQUIRED_COLUMNS = (
    schema.IMAGE,
    schema.PATIENT,
    schema.GROUP,
    schema.FOLD,
    schema.TARGET,
    schema.SEX,
    schema.AGE,
    schema.SITE,
)
OOF_COLUMNS = (
    schema.IMAGE,
    schema.PATIENT,
    schema.GROUP,
    schema.FOLD,
    schema.TARGET,
    PROB,
    BACKBONE,
    schema.SEX,
    schema.AGE,
    schema.SITE,
)
"""Columns of ``oof.parquet``: the validation rows' identity, label, metadata and predicted probability."""


class ImageCacheLike(Protocol):
    """What ``train_fold`` needs from ``melanoma_ml.images.cache.ImageCache``."""

    @property
    def size(self) -> int: ...

    def array(self) -> np.ndarray: ...

    def rows_for(self, image_names: Any) -> np.ndarray: ...


@dataclass
class FoldResult:
    """What training one fold produced.

    Attributes:
        best_epoch: 1-based epoch whose weights were kept (highest ``val/auroc``).
        train_images_per_second: Training images processed / time spent in training epochs (loading,
            augmentation, forward and backward; validation excluded).
        wall_time_s: The ``train_fold`` call up to saving (training, prediction, serialization).
        oof: Out-of-fold predictions (``OOF_COLUMNS``), one row per validation image.
        history: One row per epoch (``epoch``, ``lr``, ``train/loss``, ``val/loss``, ``val/auroc``, ...).
    """

    backbone: str
    fold: int
    checkpoint_dir: Path
    weights_sha256: str
    best_epoch: int
    best_val_auroc: float
    epochs_run: int
    train_images_per_second: float
    wall_time_s: float
    n_train: int
    n_val: int
    oof: pd.DataFrame
    history: pd.DataFrame
    spec: ModelSpec

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (without the DataFrames)."""
        return {
            "backbone": self.backbone,
            "fold": self.fold,
            "checkpoint_dir": str(self.checkpoint_dir),
            "weights_sha256": self.weights_sha256,
            "best_epoch": self.best_epoch,
            "best_val_auroc": self.best_val_auroc,
            "epochs_run": self.epochs_run,
            "train_images_per_second": self.train_images_per_second,
            "wall_time_s": self.wall_time_s,
            "n_train": self.n_train,
            "n_val": self.n_val,
            "spec": self.spec.to_dict(),
        }

    @classmethod
    def load(cls, out_dir: str | Path) -> FoldResult:
        """Read a finished fold back from ``out_dir`` (``checkpoint_dir`` becomes ``out_dir``)."""
        out_dir = Path(out_dir)
        result_path = out_dir / RESULT_FILE
        if not result_path.is_file():
            raise FileNotFoundError(
                f"{result_path} not found: the fold in {out_dir} never finished training; run train_fold again"
            )
        data = json.loads(result_path.read_text())
        return cls(
            backbone=str(data["backbone"]),
            fold=int(data["fold"]),
            checkpoint_dir=out_dir,
            weights_sha256=str(data["weights_sha256"]),
            best_epoch=int(data["best_epoch"]),
            best_val_auroc=float(data["best_val_auroc"]),
            epochs_run=int(data["epochs_run"]),
            train_images_per_second=float(data["train_images_per_second"]),
            wall_time_s=float(data["wall_time_s"]),
            n_train=int(data["n_train"]),
            n_val=int(data["n_val"]),
            oof=pd.read_parquet(out_dir / OOF_FILE),
            history=pd.read_csv(out_dir / HISTORY_FILE),
            spec=read_spec(out_dir),
        )


def split_fold(table: pd.DataFrame, fold: int | str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(train rows, validation rows)`` by ``folds.split_masks``: validation is ``fold == fold`` minus
    external rows (train-only); an external row sharing a patient with the validation rows is in neither.

    Raises:
        ValueError: missing columns, rows without a fold, an unknown/empty fold, or a fold whose train or
            validation rows hold a single class (AUROC and early stopping would be meaningless).
    """
    try:
        fold = int(fold)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"fold must be an integer fold number, got {fold!r}") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(
            f"table is missing columns {missing}; pass the cleaned table after assign_folds "
            f"(columns {list(REQUIRED_COLUMNS)})"
        )
    is_train, is_val = split_masks(table, fold)
    train, val = table.loc[is_train], table.loc[is_val]
    for name, part in (("validation", val), ("training", train)):
        classes = set(pd.to_numeric(part[schema.TARGET], errors="coerce").dropna().astype(int))
        if classes != {0, 1}:
            lacking = "melanoma" if 1 not in classes else "benign lesions"
            raise ValueError(
                f"fold {fold} has no {lacking} in {name} ({len(part)} rows, classes {sorted(classes)}); "
                "use fewer folds (data.n_folds) or add data so every fold holds both classes"
            )
    return train, val


class _EpochRecorder(L.Callback):
    """Per-epoch history, the best epoch's weights (kept in memory) and the training throughput."""

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor
        self.rows: list[dict[str, float]] = []
        self.best_score = -math.inf
        self.best_epoch = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.train_seconds = 0.0
        self.train_images = 0
        self._started: float | None = None
        self._lr = math.nan

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._lr = float(trainer.optimizers[0].param_groups[0]["lr"])  # schedulers step before epoch end
        self._started = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.train_images += int(batch[0].shape[0])

    def _stop_clock(self, pl_module: L.LightningModule) -> None:
        if self._started is None:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self.train_seconds += time.perf_counter() - self._started
        self._started = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_clock(pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_clock(pl_module)
        epoch = trainer.current_epoch + 1
        row: dict[str, float] = {"epoch": epoch, "lr": self._lr}
        row.update({key: float(value) for key, value in trainer.callback_metrics.items()})
        self.rows.append(row)
        score = row.get(self.monitor, math.nan)
        if score > self.best_score:  # NaN never wins
            self.best_score = score
            self.best_epoch = epoch
            self.best_state = {k: v.detach().cpu().clone() for k, v in pl_module.net.state_dict().items()}

    def history(self) -> pd.DataFrame:
        frame = pd.DataFrame(self.rows)
        first = [c for c in ("epoch", "lr", "train/loss", "val/loss", MONITOR) if c in frame.columns]
        return frame[first + sorted(c for c in frame.columns if c not in first)]


@contextmanager
def _restoring_torch_determinism() -> Iterator[None]:
    """Undo the process-wide flags ``Trainer(deterministic=...)`` sets, once training is over."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence Lightning's per-Trainer info chatter ("GPU available", logger tips, "fit stopped") and a
    deprecation warning from its pytree utilities; our own progress lines and the history say it all."""
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = rank_zero.level
    rank_zero.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r".*LeafSpec.*is deprecated", category=DeprecationWarning
            )
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated")
            yield
    finally:
        rank_zero.setLevel(level)


def predict_probabilities(net: nn.Module, loader: DataLoader, device: torch.device) -> np.ndarray:
    """Melanoma probabilities for every example of ``loader``, in order (eval mode, no TTA)."""
    net.eval().to(device)
    out: list[np.ndarray] = []
    with torch.inference_mode():
        for image, metadata, _target in loader:
            logits = net(image.to(device), metadata.to(device))
            out.append(torch.sigmoid(logits.float()).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def train_fold(
    config: PipelineConfig,
    backbone: str,
    fold: int,
    table: pd.DataFrame,
    cache: ImageCacheLike,
    out_dir: str | Path,
    *,
    progress_bar: bool = False,
) -> FoldResult:
    """Train ``backbone`` with fold ``fold`` held out and save the best epoch into ``out_dir``.

    Args:
        config: The pipeline config (``model``, ``training`` and ``training.augmentation`` are used).
        backbone: timm model name (replaces ``config.model.backbone``).
        fold: The validation fold.
        table: Cleaned, folded table (``REQUIRED_COLUMNS``; ``is_external`` rows are train-only).
        cache: The image cache holding every image of ``table`` at the training size.
        out_dir: Output folder; replaced atomically, nothing is written outside it.
        progress_bar: Show Lightning's progress bar (off for logs and tests).

    Raises:
        ValueError: the fold cannot be trained (see ``split_fold``).
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    cfg = config.training
    train_rows, val_rows = split_fold(table, fold)
    fold = int(fold)
    encoder = MetadataEncoder.fit(train_rows)

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model_config = config.model_for(backbone)
    net = build_model(model_config, encoder.n_features)
    norm = normalization_for(net.backbone)
    spec = ModelSpec(
        backbone=backbone,
        meta_hidden=list(model_config.meta_hidden),
        meta_dropout=model_config.meta_dropout,
        head_dropout=model_config.head_dropout,
        image_size=int(cache.size),
        mean=norm["mean"],
        std=norm["std"],
        encoder=encoder,
    )

    images = cache.array()
    train_set = MelanomaDataset(
        images,
        cache.rows_for(train_rows[schema.IMAGE]),
        encoder.transform(train_rows),
        train_rows[schema.TARGET].to_numpy(),
        train_transform(spec.image_size, cfg.augmentation, spec.mean, spec.std, seed=cfg.seed),
    )
    val_set = MelanomaDataset(
        images,
        cache.rows_for(val_rows[schema.IMAGE]),
        encoder.transform(val_rows),
        val_rows[schema.TARGET].to_numpy(),
        eval_transform(spec.image_size, spec.mean, spec.std),
    )

    recorder = _EpochRecorder(MONITOR)
    with _restoring_torch_determinism(), _quiet_lightning():
        trainer = L.Trainer(
            max_epochs=cfg.epochs,
            accelerator=cfg.accelerator,
            devices=cfg.devices,
            precision=cfg.precision,
            callbacks=[
                recorder,
                EarlyStopping(monitor=MONITOR, mode="max", patience=cfg.early_stopping_patience),
            ],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=progress_bar,
            enable_model_summary=False,
            limit_train_batches=cfg.limit_train_batches,
            num_sanity_val_steps=0,
            deterministic="warn",
            default_root_dir=out_dir,
        )
        trainer.fit(
            MelanomaModule(net, cfg),
            train_dataloaders=make_loader(train_set, cfg, shuffle=True),
            val_dataloaders=make_loader(val_set, cfg, shuffle=False),
        )
    if recorder.best_state is None:
        raise RuntimeError(
            f"no epoch of {backbone} fold {fold} produced a finite {MONITOR}; check the validation labels "
            "and lower training.learning_rate"
        )
    net.load_state_dict(recorder.best_state)
    probs = predict_probabilities(net, make_loader(val_set, cfg, shuffle=False), trainer.strategy.root_device)
    net.cpu()

    oof = val_rows[[c for c in OOF_COLUMNS if c in val_rows.columns]].reset_index(drop=True).copy()
    oof[PROB] = probs.astype(np.float64)
    oof[BACKBONE] = backbone
    oof = oof[list(OOF_COLUMNS)]
    history = recorder.history()

    result = FoldResult(
        backbone=backbone,
        fold=int(fold),
        checkpoint_dir=out_dir,
        weights_sha256=hashlib.sha256(weights_bytes(net)).hexdigest(),  # the bytes save_checkpoint writes
        best_epoch=recorder.best_epoch,
        best_val_auroc=float(recorder.best_score),
        epochs_run=len(history),
        train_images_per_second=recorder.train_images / recorder.train_seconds
        if recorder.train_seconds > 0
        else 0.0,
        wall_time_s=time.perf_counter() - started,
        n_train=len(train_rows),
        n_val=len(val_rows),
        oof=oof,
        history=history,
        spec=spec,
    )
    save_checkpoint(  # one atomic folder: the previous fold stays intact until all of it is written
        out_dir,
        net,
        spec,
        {"backbone": backbone, "fold": fold, "best_epoch": recorder.best_epoch, MONITOR: recorder.best_score},
        extra_files={
            OOF_FILE: parquet_bytes(oof),
            HISTORY_FILE: history.to_csv(index=False).encode("utf-8"),
            RESULT_FILE: to_json_text(result.to_dict(), RESULT_FILE).encode("utf-8"),
        },
    )
    return result


def plot_training_curves(history: pd.DataFrame, title: str | None = None) -> bytes:
    """Loss and AUROC per epoch (train and validation) as PNG bytes.

    Drawn on matplotlib's object-oriented ``Figure`` with an Agg canvas: no pyplot, no global backend
    change, so it is safe inside a long-running process (Dagster, the app).

    Raises:
        ValueError: ``history`` has no ``epoch`` column or no rows.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if "epoch" not in history.columns or history.empty:
        raise ValueError(
            "history needs an 'epoch' column and at least one row (history.csv of a trained fold)"
        )
    figure = Figure(figsize=(9, 3.5), dpi=100)
    FigureCanvasAgg(figure)
    loss_ax, auc_ax = figure.subplots(1, 2)
    for ax, metric in ((loss_ax, "loss"), (auc_ax, "auroc")):
        for stage in ("train", "val"):
            column = f"{stage}/{metric}"
            if column in history.columns:
                ax.plot(history["epoch"], history[column], marker="o", label=column)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    auc_ax.set_ylim(0, 1)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
