"""Score rows with a saved fold model: its checkpoint, cached pixels, the eval transform, no TTA.

Used for the locked test split and external test sets (``melanoma_ml.evaluation.holdout``): the same
inference path that produced the fold's out-of-fold predictions, applied to rows it never saw.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from melanoma_ml import schema
from melanoma_ml.config import TrainingConfig
from melanoma_ml.images.transforms import eval_transform
from melanoma_ml.training.checkpoint import load_checkpoint
from melanoma_ml.training.data import MelanomaDataset, make_loader
from melanoma_ml.training.train import predict_probabilities

if TYPE_CHECKING:
    from melanoma_ml.training.train import FoldResult, ImageCacheLike


def predict_rows(
    result: FoldResult, rows: pd.DataFrame, cache: ImageCacheLike, training: TrainingConfig
) -> np.ndarray:
    """Melanoma probabilities of ``result``'s saved model for ``rows`` (in order; float64).

    Args:
        result: A finished fold (its ``checkpoint_dir`` holds the weights and spec).
        rows: Cleaned rows (metadata columns the fold's encoder reads); every image must be in ``cache``.
        cache: Image cache at the fold's training size.
        training: ``batch_size``/``num_workers`` of the loader.
    """
    if rows.empty:
        return np.zeros(0, dtype=np.float64)
    net, spec, _info = load_checkpoint(result.checkpoint_dir)
    dataset = MelanomaDataset(
        cache.array(),
        cache.rows_for(rows[schema.IMAGE]),
        spec.encoder.transform(rows),
        pd.to_numeric(rows[schema.TARGET], errors="coerce").fillna(0).to_numpy(),
        eval_transform(spec.image_size, spec.mean, spec.std, spec.color_constancy),
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    probs = predict_probabilities(net, make_loader(dataset, training, shuffle=False), device)
    return probs.astype(np.float64)
