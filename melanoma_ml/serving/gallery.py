"""A Grad-CAM gallery of the served model on a few of its own validation images.

The images are those of the bundle's stored out-of-fold predictions (``manifest.bundle_validation_rows``),
so folds re-made since the promotion never slip training images in. Their probabilities are the ones the
app would show: the bundle's own views (``BundleManifest.views``), calibrated and moved to
``serving.deployment_prevalence``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from melanoma_ml.atomic import atomic_write_bytes
from melanoma_ml.config import ServingConfig
from melanoma_ml.features import metadata_dict
from melanoma_ml.serving.manifest import bundle_validation_rows

if TYPE_CHECKING:
    from melanoma_ml.serving.bundle import Bundle


@dataclass(frozen=True)
class GalleryItem:
    """One overlay: the image's label, its served probability and OOD flag (None: no detector), the PNG."""

    image_name: str
    target: int
    prob: float
    path: Path
    ood_flag: bool | None = None


@dataclass(frozen=True)
class Gallery:
    """Grad-CAM overlays of the served model on a few of its validation images.

    ``version`` is None (and ``items`` empty) when no model has been promoted yet; ``note`` says why.
    """

    version: str | None
    method: str
    target_layer: str
    items: list[GalleryItem]
    note: str = ""


def render_gallery(
    bundle: Bundle | None,
    folds_table: pd.DataFrame,
    out_root: Path,
    serving: ServingConfig,
    *,
    n_images: int,
    seed: int,
) -> Gallery:
    """CAM overlays of ``bundle`` (the served model) on its own validation images, half melanoma where possible.

    For an ensemble bundle the CAM is member 0's (the network Grad-CAM explains) and the images are that
    member's own validation images; the probability shown is the ensemble's.

    Writes ``<out_root>/<version>/<image_name>.png``. With no bundle, or none of its validation images in
    ``folds_table``, the gallery is empty and its ``note`` says why.
    """
    from melanoma_ml.images.cache import load_resized
    from melanoma_ml.serving.explain import default_target_layer, explain
    from melanoma_ml.serving.inference import score

    method = serving.cam_method
    if bundle is None:
        return Gallery(
            None, method, "", [], note="no model is promoted yet (the gate rejected every candidate)"
        )
    val, problem = bundle_validation_rows(bundle.manifest, folds_table)
    if problem:
        return Gallery(
            bundle.version, method, "", [], note=f"no gallery for bundle {bundle.version}: {problem}"
        )
    fold = bundle.manifest.ensemble.members[0].fold
    if fold is not None:  # Grad-CAM explains member 0: show images that network never trained on
        val = val[val["stored_fold"] == fold]
    picked = pick_gallery_rows(val, n_images, seed=seed)
    images = [load_resized(p, bundle.spec.image_size) for p in picked["image_path"]]
    metadata = [metadata_dict(row, bundle.spec.encoder.tabular) for row in picked.itertuples(index=False)]
    scores = score(bundle, images, metadata, deployment_prevalence=serving.deployment_prevalence)  # its views
    flags = [None] * len(images) if scores.ood_flag is None else [bool(f) for f in scores.ood_flag]
    out_dir = out_root / bundle.version
    items, layer = [], ""
    min_side = serving.cam_min_map_side
    target_layer = default_target_layer(bundle.net, bundle.spec.image_size, min_side)
    for image, meta, prob, flag, row in zip(
        images, metadata, scores.prob, flags, picked.itertuples(index=False), strict=True
    ):
        explanation = explain(
            bundle, image, meta, method=method, target_layer=target_layer, min_side=min_side
        )
        layer = explanation.target_layer
        path = out_dir / f"{row.image_name}.png"
        atomic_write_bytes(path, png_bytes(explanation.overlay))
        items.append(GalleryItem(str(row.image_name), int(row.target), float(prob), path, flag))
    return Gallery(bundle.version, method, layer, items)


def pick_gallery_rows(val: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """Up to ``n`` rows, half melanoma and half benign where possible, reproducibly."""
    melanoma = val[val["target"] == 1]
    benign = val[val["target"] == 0]
    n_mel = min(len(melanoma), max(1, n // 2))
    n_ben = min(len(benign), n - n_mel)
    return pd.concat(
        [melanoma.sample(n_mel, random_state=seed), benign.sample(n_ben, random_state=seed)],
        ignore_index=True,
    )


def png_bytes(rgb: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 RGB array as PNG file bytes, ready for ``atomic_write_bytes``."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()
