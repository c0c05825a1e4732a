"""The verifications behind the asset checks: each returns the problems it found (empty: passed).

The Dagster checks (``melanoma_assets.checks``) and ``pipeline.run_all`` run the same functions, so a
plain run stops exactly where a blocking check would. Heavy libraries load inside the checks that need them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from melanoma_ml import schema
from melanoma_ml.atomic import sha256_file
from melanoma_ml.config import PipelineConfig
from melanoma_ml.features import metadata_dict

if TYPE_CHECKING:
    from melanoma_ml.images.cache import ImageCache
    from melanoma_ml.training.train import FoldResult


def clean_table_problems(clean: pd.DataFrame) -> list[str]:
    """Schema and vocabulary of the cleaned table: exact columns, known sexes/sites, 0/1 labels, unique images."""
    if list(clean.columns)[: len(schema.CLEAN_COLUMNS)] != list(schema.CLEAN_COLUMNS):
        return [
            f"columns {list(clean.columns)} differ from schema.CLEAN_COLUMNS {list(schema.CLEAN_COLUMNS)}"
        ]
    problems = []
    not_numeric = [c for c in schema.extra_columns(clean) if not pd.api.types.is_float_dtype(clean[c])]
    if not_numeric:
        problems.append(f"extra columns after schema.CLEAN_COLUMNS must be float, not {not_numeric}")
    if clean.empty:
        problems.append("the cleaned table is empty: every row was quarantined (see quarantined_rows)")
    for column, vocabulary in ((schema.SEX, schema.SEXES), (schema.SITE, schema.SITES)):
        unknown = sorted(set(clean[column].dropna()) - set(vocabulary))
        if unknown:
            problems.append(f"{column} has values outside {list(vocabulary)}: {unknown[:5]}")
    labels = set(pd.to_numeric(clean[schema.TARGET], errors="coerce").dropna().astype(int))
    if not labels <= {0, 1} or clean[schema.TARGET].isna().any():
        problems.append(
            f"target must be 0/1 on every row, found {sorted(labels)} and {int(clean[schema.TARGET].isna().sum())} missing"
        )
    ages = pd.to_numeric(clean[schema.AGE], errors="coerce").dropna()
    if ((ages < 0) | (ages > schema.MAX_AGE)).any():
        problems.append(
            f"age_approx outside 0..{schema.MAX_AGE}: {sorted(ages[(ages < 0) | (ages > schema.MAX_AGE)].unique())[:5]}"
        )
    duplicated = clean[schema.IMAGE][clean[schema.IMAGE].duplicated()]
    if len(duplicated):
        problems.append(f"{len(duplicated)} duplicated image names, e.g. {duplicated.head(5).tolist()}")
    return problems


def checkpoint_problems(
    result: FoldResult, folds_table: pd.DataFrame, cache: ImageCache, n: int = 8
) -> tuple[list[str], dict[str, Any]]:
    """Does the saved checkpoint load, match its sha256 and give finite outputs on validation images?"""
    import torch

    from melanoma_ml.images.transforms import eval_transform
    from melanoma_ml.training.checkpoint import WEIGHTS_FILE, load_checkpoint

    problems: list[str] = []
    weights = Path(result.checkpoint_dir) / WEIGHTS_FILE
    digest = sha256_file(weights)
    if digest != result.weights_sha256:
        problems.append(
            f"{weights} sha256 {digest[:12]} differs from the recorded {result.weights_sha256[:12]}"
        )
    net, spec, _info = load_checkpoint(result.checkpoint_dir)
    rows = folds_table[folds_table["fold"] == result.fold].head(n)
    transform = eval_transform(spec.image_size, spec.mean, spec.std, spec.color_constancy)
    pixels = cache.array()[cache.rows_for(rows["image_name"])]
    x = torch.stack([transform(image=img)["image"] for img in pixels])
    meta = torch.as_tensor(spec.encoder.transform(rows))
    with torch.inference_mode():
        logits = net(x, meta)
    finite = bool(torch.isfinite(logits).all())
    if not finite:
        problems.append(
            f"non-finite logits on {int((~torch.isfinite(logits)).sum())} of {len(rows)} validation images"
        )
    return problems, {"images_checked": len(rows), "finite": finite, "sha256": digest}


def bundle_reproduction(
    config: PipelineConfig,
    version: str,
    folds_table: pd.DataFrame,
    cache: ImageCache,
    n: int = 16,
    atol: float = 1e-3,
) -> tuple[list[str], dict[str, Any]]:
    """Does registry ``version`` load and reproduce its out-of-fold predictions on a sample of its fold?

    The bundle's network (for an ensemble: the member that did not train on each image) is the fold
    model that produced those predictions, so without TTA on the same cached pixels the probabilities
    must agree to ``atol``.
    """
    from melanoma_ml.serving.bundle import load_bundle
    from melanoma_ml.serving.inference import score_out_of_fold
    from melanoma_ml.serving.manifest import bundle_validation_rows
    from melanoma_ml.serving.remote_registry import open_registry

    bundle = load_bundle(open_registry(config).version_path(version))
    own_rows, problem = bundle_validation_rows(bundle.manifest, folds_table)
    if problem:
        return [f"bundle {version}: {problem}"], {}
    rows = own_rows.head(n)
    images = list(cache.array()[cache.rows_for(rows["image_name"])])
    tabular = bundle.spec.encoder.tabular
    records = [metadata_dict(r, tabular) for r in rows.itertuples(index=False)]
    # the stored OOF probabilities are raw, each from the member(s) that did not train on the image
    got = score_out_of_fold(bundle, images, records, rows["stored_fold"].tolist())
    gap = float(np.max(np.abs(got - rows["stored_prob"].to_numpy())))
    problems = (
        []
        if gap <= atol
        else [f"bundle {version} predictions differ from the report by up to {gap:.2e} (> {atol})"]
    )
    return problems, {"version": version, "images_checked": len(rows), "max_abs_difference": gap}
