"""Train one backbone on one fold: fit, keep the best epoch, predict the validation rows, save it all.

``train_fold`` writes into ``out_dir`` (normally ``checkpoints/<backbone>/fold<k>/``)::

    weights.safetensors  spec.json  info.json   the best epoch's network (``checkpoint.load_checkpoint``)
    oof.parquet                                 out-of-fold probabilities of the validation rows
    history.csv                                 one row per epoch: epoch, lr, train/loss, val/loss, val/auroc, ...
    result.json                                 ``FoldResult.to_dict()``
    logs/                                       TensorBoard event files of the fit (``tensorboard --logdir``)

All of them appear at once: the folder is built in a temp folder and renamed into place
(``checkpoint.save_checkpoint(..., extra_files=...)``), so a failed run leaves the previous fold intact, and
the temp folder of a run killed mid-write (``kill -9``, out of memory) is swept by the next write of that fold.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader

from melanoma_ml import schema
from melanoma_ml.artifacts import artifact_paths
from melanoma_ml.atomic import parquet_bytes, to_json_text
from melanoma_ml.config import PipelineConfig, TrainingConfig
from melanoma_ml.devices import training_placement
from melanoma_ml.errors import InputFileNotFoundError, InputStateError, InputValueError
from melanoma_ml.features import MetadataEncoder
from melanoma_ml.folds import split_masks
from melanoma_ml.images.transforms import eval_transform, train_transform
from melanoma_ml.model import build_model, normalization_for
from melanoma_ml.spec import ModelSpec
from melanoma_ml.training.checkpoint import read_spec, save_checkpoint
from melanoma_ml.training.data import MelanomaDataset, make_loader
from melanoma_ml.training.hardware import resolve_hardware
from melanoma_ml.training.module import MONITOR, MelanomaModule
from melanoma_ml.training.recipe import resolve_recipe
from melanoma_ml.weights import weights_bytes
from melanoma_ml.weights_import import pretrained_lineage

OOF_FILE = "oof.parquet"
HISTORY_FILE = "history.csv"
RESULT_FILE = "result.json"
LOGS_DIR = "logs"
"""Sub-folder of a fold's checkpoint folder holding its TensorBoard event files (one run per fit)."""
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
        devices: Where it trained: the leased ``training.device_pool`` names (``cuda:1``), else the torch
            devices Lightning used (``cpu``); one entry per rank of a data-parallel fit.
        recipe: The optimisation recipe it used (``melanoma_ml.training.recipe.Recipe.to_dict()``: kind,
            rates, epochs, warmup, frozen epochs, BatchNorm mode); empty for folds trained before recipes.
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
    devices: list[str] = field(default_factory=list)
    recipe: dict[str, Any] = field(default_factory=dict)

    @property
    def logs_dir(self) -> Path:
        """The fold's TensorBoard event files (``tensorboard --logdir`` it, or the checkpoints folder)."""
        return self.checkpoint_dir / LOGS_DIR

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
            "devices": list(self.devices),
            "recipe": dict(self.recipe),
        }

    @classmethod
    def load(cls, out_dir: str | Path) -> FoldResult:
        """Read a finished fold back from ``out_dir`` (``checkpoint_dir`` becomes ``out_dir``)."""
        out_dir = Path(out_dir)
        result_path = out_dir / RESULT_FILE
        if not result_path.is_file():
            raise InputFileNotFoundError(
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
            devices=[str(d) for d in data.get("devices", [])],  # absent in folds trained before leases
            recipe=dict(data.get("recipe", {})),  # absent in folds trained before recipes
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
        raise InputValueError(f"fold must be an integer fold number, got {fold!r}") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise InputValueError(
            f"table is missing columns {missing}; pass the cleaned table after assign_folds "
            f"(columns {list(REQUIRED_COLUMNS)})"
        )
    is_train, is_val = split_masks(table, fold)
    train, val = table.loc[is_train], table.loc[is_val]
    for name, part in (("validation", val), ("training", train)):
        classes = set(pd.to_numeric(part[schema.TARGET], errors="coerce").dropna().astype(int))
        if classes != {0, 1}:
            lacking = "melanoma" if 1 not in classes else "benign lesions"
            raise InputValueError(
                f"fold {fold} has no {lacking} in {name} ({len(part)} rows, classes {sorted(classes)}); "
                "use fewer folds (data.n_folds) or add data so every fold holds both classes"
            )
    return train, val


class _EpochRecorder(L.Callback):
    """Per-epoch history, the best epoch's weights (kept in memory) and the training throughput.

    Under ``ddp_spawn``/``ddp_fork`` the fit runs in child processes and Lightning hands back only the
    last weights and metrics, not callbacks: rank 0 then saves this recorder's state to ``handoff`` at
    the end of the fit and the parent reads it back with ``adopt``.
    """

    def __init__(self, monitor: str, handoff: Path | None = None) -> None:
        self.monitor = monitor
        self.handoff = handoff
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
        # Every rank trains an equal share (the distributed sampler pads), so rank 0's count x world size.
        self.train_images += int(batch[0].shape[0]) * trainer.world_size

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

    _HANDED_OVER = ("rows", "best_score", "best_epoch", "best_state", "train_seconds", "train_images")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.handoff is not None and trainer.is_global_zero:
            torch.save({name: getattr(self, name) for name in self._HANDED_OVER}, self.handoff)

    def adopt(self, path: Path) -> None:
        """Take over the state rank 0 saved at ``path`` (the parent of a spawned fit)."""
        if not path.is_file():
            raise InputStateError(
                f"the data-parallel fit ended without rank 0's training record {path}; see the rank logs"
            )
        for name, value in torch.load(path, weights_only=False).items():
            setattr(self, name, value)

    def history(self) -> pd.DataFrame:
        frame = pd.DataFrame(self.rows)
        first = [c for c in ("epoch", "lr", "train/loss", "val/loss", MONITOR) if c in frame.columns]
        return frame[first + sorted(c for c in frame.columns if c not in first)]


class _FoldData(L.LightningDataModule):
    """The fold's loaders, built where the fit runs.

    A data-parallel fit (``ddp_spawn``) pickles what ``fit`` receives into each rank. A ready
    ``DataLoader`` carries a ``torch.Generator`` whose pickled state is a temporary tensor: shared with
    the child through a file descriptor that is closed again before the child starts ("bad value(s) in
    fds_to_keep"). Datasets pickle cleanly (the image cache as its file name), so the ranks get those and
    build the same seeded loaders themselves.
    """

    def __init__(
        self, train_set: MelanomaDataset, val_set: MelanomaDataset, training: TrainingConfig
    ) -> None:
        super().__init__()
        self.train_set, self.val_set, self.training = train_set, val_set, training

    def train_dataloader(self) -> DataLoader:
        return make_loader(self.train_set, self.training, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return make_loader(self.val_set, self.training, shuffle=False)


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


def _torch_devices(trainer: L.Trainer) -> list[str]:
    """The devices Lightning trained on, one per rank (``["cpu"]``, ``["cuda:0", "cuda:1"]``)."""
    parallel = getattr(trainer.strategy, "parallel_devices", None)
    return [str(d) for d in parallel] if parallel else [str(trainer.strategy.root_device)]


def _folder_files(folder: Path, prefix: str) -> dict[str, bytes]:
    """Every file under ``folder`` as ``{"<prefix>/<relative POSIX path>": bytes}`` (none if it is absent)."""
    if not folder.is_dir():
        return {}
    return {
        f"{prefix}/{path.relative_to(folder).as_posix()}": path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


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
        out_dir: Output folder; replaced atomically. Nothing else is written but, with a device pool
            (``training.device_pool``), the lease's lock file under ``<artifact_root>/locks/``.
        progress_bar: Show Lightning's progress bar (off for logs and tests).

    The fit holds its devices' leases (``melanoma_ml.devices``) from the first epoch to the last
    validation prediction; with ``training.devices`` above 1 it runs data-parallel (``ddp_spawn``).

    Raises:
        ValueError: the fold cannot be trained (see ``split_fold``).
        DeviceLeaseTimeout: no free device within ``training.device_wait_s``.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    cfg = config.training
    train_rows, val_rows = split_fold(table, fold)
    fold = int(fold)
    encoder = MetadataEncoder.fit(train_rows, tabular=config.model.tabular_features)

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model_config = config.model_for(backbone)
    recipe = resolve_recipe(model_config, cfg)
    net = build_model(model_config, encoder.n_features)
    norm = normalization_for(net.backbone)
    spec = ModelSpec(
        network=model_config,
        image_size=int(cache.size),
        mean=norm["mean"],
        std=norm["std"],
        encoder=encoder,
        color_constancy=config.data.color_constancy,
        pretrained=pretrained_lineage(model_config.pretrained, backbone),
    )

    images = cache.array()
    train_set = MelanomaDataset(
        images,
        cache.rows_for(train_rows[schema.IMAGE]),
        encoder.transform(train_rows),
        train_rows[schema.TARGET].to_numpy(),
        train_transform(
            spec.image_size,
            cfg.augmentation,
            spec.mean,
            spec.std,
            seed=cfg.seed,
            color_constancy=spec.color_constancy,
        ),
    )
    val_set = MelanomaDataset(
        images,
        cache.rows_for(val_rows[schema.IMAGE]),
        encoder.transform(val_rows),
        val_rows[schema.TARGET].to_numpy(),
        eval_transform(spec.image_size, spec.mean, spec.std, spec.color_constancy),
    )

    holder = f"{backbone} fold {fold} (pid {os.getpid()})"
    with (
        training_placement(cfg, artifact_paths(config).locks, holder=holder) as placement,
        tempfile.TemporaryDirectory(prefix="melanoma-fit-") as scratch,
    ):
        recorder = _EpochRecorder(MONITOR)
        hardware = resolve_hardware(cfg, placement.accelerator)
        if hardware.channels_last:  # the loaders hand over channels-last batches too (make_loader)
            net = net.to(memory_format=torch.channels_last)
        with _restoring_torch_determinism(), _quiet_lightning():
            trainer = L.Trainer(
                max_epochs=recipe.epochs,
                accelerator=placement.accelerator,
                devices=placement.devices,
                strategy=placement.strategy,
                precision=hardware.precision,
                callbacks=[
                    recorder,
                    EarlyStopping(monitor=MONITOR, mode="max", patience=cfg.early_stopping_patience),
                ],
                # Epoch-level scalars only (the module logs on_epoch); written to scratch, stored with the fold.
                logger=TensorBoardLogger(scratch, name=LOGS_DIR, version="", default_hp_metric=False),
                log_every_n_steps=1,
                enable_checkpointing=False,
                enable_progress_bar=progress_bar,
                enable_model_summary=False,
                limit_train_batches=cfg.limit_train_batches,
                num_sanity_val_steps=0,
                deterministic="warn",
                default_root_dir=out_dir,
            )
            if trainer.world_size > 1:
                recorder.handoff = Path(scratch) / "recorder.pt"
            trainer.fit(MelanomaModule(net, cfg, recipe), datamodule=_FoldData(train_set, val_set, cfg))
        if recorder.handoff is not None:
            recorder.adopt(recorder.handoff)
        if recorder.best_state is None:
            raise InputStateError(
                f"no epoch of {backbone} fold {fold} produced a finite {MONITOR}; check the validation labels "
                "and lower training.learning_rate"
            )
        net.load_state_dict(recorder.best_state)
        # Validation predictions come from this one process over the whole validation set, after the fit,
        # also for a data-parallel fit: its distributed sampler pads and shards the rows, so gathering them
        # from the ranks would need de-duplication and re-ordering for the same numbers (one cheap pass).
        # Only this process writes the checkpoint below: spawned ranks have exited by now.
        probs = predict_probabilities(
            net, make_loader(val_set, cfg, shuffle=False), trainer.strategy.root_device
        )
        net.cpu()
        devices = list(placement.leased) or _torch_devices(trainer)
        logs = _folder_files(Path(scratch) / LOGS_DIR, LOGS_DIR)

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
        devices=devices,
        recipe=recipe.to_dict(),
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
            **logs,
        },
    )
    return result
