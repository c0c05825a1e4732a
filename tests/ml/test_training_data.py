"""MelanomaDataset and its loaders: item shapes, input checks, memmap pickling, batch-of-one guard."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from melanoma_ml.config import TrainingConfig
from melanoma_ml.images.transforms import eval_transform
from melanoma_ml.training.data import MelanomaDataset, make_loader

SIDE = 32
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _images(n: int = 10) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, SIDE, SIDE, 3), dtype=np.uint8)


def _dataset(images: np.ndarray, n: int = 6) -> MelanomaDataset:
    rows = np.arange(n)[::-1]  # any order of cache rows
    metadata = np.arange(n * 4, dtype=np.float32).reshape(n, 4)
    targets = np.array([i % 2 for i in range(n)])
    return MelanomaDataset(images, rows, metadata, targets, eval_transform(SIDE, MEAN, STD))


def test_items_are_image_metadata_target_tensors() -> None:
    images = _images()
    dataset = _dataset(images)
    image, metadata, target = dataset[1]
    assert image.dtype == torch.float32 and tuple(image.shape) == (3, SIDE, SIDE)
    expected = (images[4].astype(np.float32) / 255 - 0.5) / 0.25  # item 1 reads cache row 4
    torch.testing.assert_close(image, torch.from_numpy(expected.transpose(2, 0, 1).copy()))
    torch.testing.assert_close(metadata, torch.arange(4, 8, dtype=torch.float32))
    assert target.dtype == torch.float32 and target.item() == 1.0
    assert len(dataset) == 6


@pytest.mark.parametrize(
    "rows,targets,match",
    [
        (np.array([0, 1, 99]), np.array([0, 1, 0]), "rebuild"),
        (np.array([0, 1]), np.array([0, 1, 0]), "one entry per example"),
        (np.array([0, 1, 2]), np.array([0, 2, 1]), "0 or 1"),
        (np.array([0, 1, 2]), np.array([0, np.nan, 1]), "0 or 1"),
    ],
)
def test_inconsistent_inputs_are_refused(rows, targets, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MelanomaDataset(_images(), rows, np.zeros((3, 2)), targets, eval_transform(SIDE, MEAN, STD))


def test_images_must_be_uint8_rgb_stack() -> None:
    with pytest.raises(ValueError, match="uint8"):
        MelanomaDataset(
            _images().astype(np.float32), np.arange(2), np.zeros((2, 1)), np.zeros(2), lambda image: {}
        )


def test_a_memmap_is_pickled_by_file_name_not_by_content(tmp_path: Path) -> None:
    path = tmp_path / "images.npy"
    np.save(path, _images(40))
    images = np.load(path, mmap_mode="r")
    dataset = _dataset(images)
    payload = pickle.dumps(dataset)
    assert len(payload) < images.nbytes / 4
    restored = pickle.loads(payload)
    assert isinstance(restored.images, np.memmap)
    torch.testing.assert_close(restored[2][0], dataset[2][0])


@pytest.mark.parametrize(
    "n,batch_size,drop_last", [(7, 3, True), (6, 3, False), (8, 3, False), (5, 8, False)]
)
def test_training_loader_drops_only_a_lone_last_example(n: int, batch_size: int, drop_last: bool) -> None:
    dataset = _dataset(_images(n), n=n)
    loader = make_loader(dataset, TrainingConfig(batch_size=batch_size), shuffle=True)
    assert loader.drop_last is drop_last
    assert all(batch[0].shape[0] > 1 for batch in loader)


def test_loaders_shuffle_train_reproducibly_and_keep_validation_order() -> None:
    dataset = _dataset(_images(), n=8)
    config = TrainingConfig(batch_size=4, seed=3)
    train_a = make_loader(dataset, config, shuffle=True)
    train_b = make_loader(dataset, config, shuffle=True)
    val = make_loader(dataset, config, shuffle=False)
    order_a = torch.cat([b[1][:, 0] for b in train_a])
    order_b = torch.cat([b[1][:, 0] for b in train_b])
    torch.testing.assert_close(order_a, order_b)
    in_order = torch.arange(0, 32, 4, dtype=torch.float32)
    assert not torch.equal(order_a, in_order)  # the training loader does shuffle
    torch.testing.assert_close(torch.cat([b[1][:, 0] for b in val]), in_order)


def test_each_loader_worker_draws_its_own_augmentations() -> None:
    from melanoma_ml.config import AugmentationConfig
    from melanoma_ml.images.transforms import train_transform

    aug = AugmentationConfig(hflip=0, vflip=0, rotate90=0, affine=1, color_jitter=0, coarse_dropout=0)
    images = np.repeat(_images(1), 4, axis=0)  # four copies of one image
    dataset = MelanomaDataset(
        images, np.arange(4), np.zeros((4, 1)), np.zeros(4), train_transform(SIDE, aug, MEAN, STD, seed=0)
    )
    loader = make_loader(dataset, TrainingConfig(batch_size=1, num_workers=2), shuffle=False)
    first_of_worker_0, first_of_worker_1 = (batch[0] for batch, _ in zip(loader, range(2), strict=False))
    assert not torch.allclose(first_of_worker_0, first_of_worker_1)
