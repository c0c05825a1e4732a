"""A dataset over the pre-resized image cache plus encoded metadata, and its data loaders."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from melanoma_ml.config import TrainingConfig

Transform = Callable[..., dict[str, Any]]
"""An albumentations-style callable: ``transform(image=array)["image"] -> tensor``."""


class MelanomaDataset(Dataset):
    """``(image tensor (3,S,S) float32, metadata (k,) float32, target float32 scalar)`` per row.

    Args:
        images: ``(N, S, S, 3)`` uint8 array, typically the cache's read-only memmap.
        rows: For each example, its row in ``images`` (``cache.rows_for(names)``).
        metadata: ``(n, k)`` encoded metadata, one row per example.
        targets: ``(n,)`` 0/1 labels.
        transform: ``train_transform`` or ``eval_transform``.
    """

    def __init__(
        self,
        images: np.ndarray,
        rows: np.ndarray,
        metadata: np.ndarray,
        targets: np.ndarray,
        transform: Transform,
    ) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        metadata = np.ascontiguousarray(metadata, dtype=np.float32)
        targets = np.asarray(targets, dtype=np.float32)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"images must be an (N, S, S, 3) uint8 array, got shape {images.shape} dtype {images.dtype}; "
                "pass ImageCache.array()"
            )
        if rows.ndim != 1 or metadata.ndim != 2 or targets.ndim != 1:
            raise ValueError(
                f"expected rows (n,), metadata (n, k), targets (n,); got {rows.shape}, {metadata.shape}, "
                f"{targets.shape}"
            )
        if not len(rows) == len(metadata) == len(targets):
            raise ValueError(
                f"rows ({len(rows)}), metadata ({len(metadata)}) and targets ({len(targets)}) must have "
                "one entry per example"
            )
        if len(rows) and (rows.min() < 0 or rows.max() >= len(images)):
            raise ValueError(
                f"image rows must lie in [0, {len(images)}); got {rows.min()}..{rows.max()}; "
                "the image cache does not match the table, rebuild it"
            )
        bad = ~np.isin(targets, (0.0, 1.0))
        if bad.any():
            raise ValueError(
                f"targets must be 0 or 1; example {int(np.flatnonzero(bad)[0])} has {targets[bad][0]}"
            )
        self.images = images
        self.rows = rows
        self.metadata = metadata
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image = np.array(self.images[self.rows[index]])  # copy: memmaps are read-only, cv2 wants owned data
        tensor = self.transform(image=image)["image"]
        return tensor, torch.from_numpy(self.metadata[index]), torch.tensor(self.targets[index])

    def __getstate__(self) -> dict[str, Any]:
        """Pickle a memmap as its file name, not its bytes (DataLoader workers under ``spawn``)."""
        state = self.__dict__.copy()
        images = self.images
        if isinstance(images, np.memmap) and images.filename is not None:
            state["images"] = {
                "memmap": images.filename,
                "offset": images.offset,
                "shape": images.shape,
                "dtype": images.dtype.str,
            }
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        images = state["images"]
        if isinstance(images, dict):
            state["images"] = np.memmap(
                images["memmap"],
                dtype=np.dtype(images["dtype"]),
                mode="r",
                offset=images["offset"],
                shape=tuple(images["shape"]),
            )
        self.__dict__.update(state)


def _reseed_worker_transform(worker_id: int) -> None:
    """Give each loader worker its own augmentation stream, derived from the loader's seed.

    Albumentations pipelines keep a private random state; without this every worker would replay the
    same augmentations.
    """
    info = get_worker_info()
    transform = getattr(info.dataset, "transform", None)
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(info.seed % 2**32)


def make_loader(dataset: MelanomaDataset, training: TrainingConfig, *, shuffle: bool) -> DataLoader:
    """A loader with ``training.batch_size`` / ``num_workers``; shuffling seeded by ``training.seed``.

    A training loader (``shuffle=True``) drops the last batch only when it would hold a single example:
    BatchNorm in the metadata MLP cannot train on a batch of one.
    """
    if shuffle and len(dataset) < 2:
        raise ValueError(f"need at least 2 training examples, got {len(dataset)}")
    workers = training.num_workers
    return DataLoader(
        dataset,
        batch_size=training.batch_size,
        shuffle=shuffle,
        drop_last=shuffle and len(dataset) % training.batch_size == 1,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=_reseed_worker_transform if workers > 0 else None,
        generator=torch.Generator().manual_seed(training.seed),
    )
