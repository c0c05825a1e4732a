"""A dataset over the pre-resized image cache plus encoded metadata, and its data loaders.

With ``training.negative_ratio`` the training loader draws, each epoch, every positive and ``ratio`` times
as many negatives (``NegativeDownsampler``); validation loaders always read every row.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info

from melanoma_ml.config import TrainingConfig
from melanoma_ml.errors import InputValueError
from melanoma_ml.training.hardware import resolve_hardware

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
            raise InputValueError(
                f"image rows must lie in [0, {len(images)}); got {rows.min()}..{rows.max()}; "
                "the image cache does not match the table, rebuild it"
            )
        bad = ~np.isin(targets, (0.0, 1.0))
        if bad.any():
            raise InputValueError(
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


class NegativeDownsampler(Sampler[int]):
    """Per-epoch negative down-sampling: every positive plus ``ratio x positives`` negatives, shuffled.

    The negatives of successive epochs are successive slices of a stream of seeded permutations of all
    negatives, so consecutive epochs share no negative until every negative has been used once (then a
    new permutation starts). The sequence depends only on ``(seed, epoch)``; Lightning calls
    ``set_epoch`` at the start of every training epoch, as it does for a ``DistributedSampler``.

    Args:
        targets: ``(n,)`` 0/1 labels of the dataset.
        ratio: Negatives per positive per epoch (> 0); when that is at least the number of negatives,
            every negative is used every epoch.
        seed: Seeds the draws and the order.

    Raises:
        InputValueError: no positive example (nothing to balance against) or a ratio that is not > 0.
    """

    def __init__(self, targets: np.ndarray, ratio: float, seed: int) -> None:
        targets = np.asarray(targets)
        if not ratio > 0:
            raise InputValueError(f"training.negative_ratio must be > 0 (or None for off), got {ratio}")
        self.positives = np.flatnonzero(targets == 1)
        self.negatives = np.flatnonzero(targets != 1)
        if len(self.positives) == 0:
            raise InputValueError(
                "training.negative_ratio needs at least one melanoma among the training rows; "
                "set it to None for this data"
            )
        self.n_negatives = min(len(self.negatives), math.ceil(ratio * len(self.positives)))
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.positives) + self.n_negatives

    def epoch_negatives(self, epoch: int) -> np.ndarray:
        """The negatives (dataset indices) drawn for ``epoch``."""
        n_all, k = len(self.negatives), self.n_negatives
        if k == n_all:
            return self.negatives.copy()
        start = epoch * k
        picked: list[np.ndarray] = []
        while k > 0:
            cycle, offset = divmod(start, n_all)
            order = np.random.default_rng([self.seed, cycle]).permutation(n_all)
            take = order[offset : offset + k]
            picked.append(self.negatives[take])
            start += len(take)
            k -= len(take)
        return np.concatenate(picked)

    def __iter__(self) -> Iterator[int]:
        rows = np.concatenate([self.positives, self.epoch_negatives(self.epoch)])
        order = np.random.default_rng([self.seed, self.epoch, 1]).permutation(len(rows))
        return iter(rows[order].tolist())


def channels_last_collate(batch: list[Any]) -> list[torch.Tensor]:
    """``default_collate``, with the image batch in channels-last (NHWC) memory format.

    Pinning and ``.to(device)`` keep the layout, so the batch reaches a channels-last network without
    a conversion on the GPU.
    """
    image, *rest = default_collate(batch)
    return [image.contiguous(memory_format=torch.channels_last), *rest]


def make_loader(dataset: MelanomaDataset, training: TrainingConfig, *, shuffle: bool) -> DataLoader:
    """A loader with ``training.batch_size``; shuffling seeded by ``training.seed``.

    Workers, pinning, prefetching and the batch memory format come from
    ``melanoma_ml.training.hardware.resolve_hardware`` (``"auto"`` settings resolved for this machine).

    A training loader (``shuffle=True``) drops the last batch only when it would hold a single example:
    BatchNorm in the metadata MLP cannot train on a batch of one. With ``training.negative_ratio`` it
    samples through ``NegativeDownsampler`` (a different draw of negatives each epoch); evaluation
    loaders (``shuffle=False``) never down-sample.
    """
    if shuffle and len(dataset) < 2:
        raise InputValueError(f"need at least 2 training examples, got {len(dataset)}")
    sampler = (
        NegativeDownsampler(dataset.targets, training.negative_ratio, training.seed)
        if shuffle and training.negative_ratio is not None
        else None
    )
    n_drawn = len(dataset) if sampler is None else len(sampler)
    plan = resolve_hardware(training)
    return DataLoader(
        dataset,
        batch_size=training.batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        drop_last=shuffle and n_drawn % training.batch_size == 1,
        **plan.loader_kwargs(),
        collate_fn=channels_last_collate if plan.channels_last else None,
        worker_init_fn=_reseed_worker_transform if plan.num_workers > 0 else None,
        generator=torch.Generator().manual_seed(training.seed),
    )
