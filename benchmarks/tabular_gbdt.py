"""HistGradientBoosting (the project's tabular baseline) vs LightGBM on a synthetic ISIC-2024-like table.

    pip install -e '.[gbdt]'                                      # LightGBM (else HGB alone is measured)
    python benchmarks/tabular_gbdt.py --rows 50000 --folds 2
    python benchmarks/tabular_gbdt.py --lgbm-subsample 0.8 --lgbm-colsample 0.8   # LightGBM bagging on

The table: ``--rows`` images of 1,000 patients, ``--prevalence`` melanoma (0.5%), 34 features (six shifted
for melanoma, one interaction, a per-patient offset, 5% missing), patient-grouped folds. Both models get
the same rounds, learning rate, leaves, leaf size and L2 (``TabularBaselineConfig``'s defaults), one thread
each (``OMP_NUM_THREADS=1`` is set here), and are fitted on the same folds in one process; AUC and pAUC
(TPR >= 0.8, ISIC 2024) are on the validation rows of the folds run. By default neither subsamples;
``--lgbm-subsample`` / ``--lgbm-colsample`` turn on LightGBM's per-tree row / column subsampling (scikit-learn's
HistGradientBoosting has no per-tree row subsampling). Every model's settings are printed with its numbers.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from _common import machine_load  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from melanoma_ml.config import TabularBaselineConfig  # noqa: E402
from melanoma_ml.evaluation.metrics import partial_auc  # noqa: E402
from melanoma_ml.tabular.gbdt import gbdt_model  # noqa: E402


def synthetic_table(rows: int, prevalence: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(X, y, patients)``: see the module docstring."""
    rng = np.random.default_rng(seed)
    k = 34
    patients = rng.integers(0, 1000, rows)
    y = (rng.random(rows) < prevalence).astype(int)
    x = rng.normal(size=(rows, k))
    x[:, :6] += y[:, None] * np.array([1.0, 0.8, 0.6, 0.5, 0.4, 0.3])
    x[:, 6] = x[:, 0] * x[:, 1] + rng.normal(size=rows) * 0.5 + y
    x += rng.normal(size=(1000, k))[patients] * 0.3
    x[rng.random((rows, k)) < 0.05] = np.nan
    return x, y, patients


def models(params: TabularBaselineConfig, subsample: float = 1.0, colsample: float = 1.0) -> dict:
    """``{name: (settings text, factory)}`` of the models compared (LightGBM only when it is installed)."""
    shared = (
        f"{params.max_iter} rounds, learning rate {params.learning_rate}, {params.max_leaf_nodes} leaves, "
        f"min leaf {params.min_samples_leaf}, L2 {params.l2_regularization}, 1 thread"
    )
    out = {
        "HistGradientBoosting": (
            shared + ", no subsampling, no early stopping",
            lambda: gbdt_model(params),  # the pipeline's own tabular baseline model
        )
    }
    try:
        import lightgbm as lgb
    except ImportError:
        print("lightgbm is not installed (pip install -e '.[gbdt]'): measuring HistGradientBoosting only")
        return out
    sampled = f", rows subsampled {subsample:g} per tree, columns {colsample:g} per tree"
    out[f"LightGBM {lgb.__version__}"] = (
        shared + sampled,
        lambda: lgb.LGBMClassifier(
            n_estimators=params.max_iter,
            learning_rate=params.learning_rate,
            num_leaves=params.max_leaf_nodes,
            min_child_samples=params.min_samples_leaf,
            reg_lambda=params.l2_regularization,
            random_state=params.seed,
            subsample=subsample,
            subsample_freq=1 if subsample < 1 else 0,  # LightGBM bags rows only with a frequency > 0
            colsample_bytree=colsample,
            n_jobs=1,
            verbose=-1,
        ),
    )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--prevalence", type=float, default=0.005)
    parser.add_argument("--folds", type=int, default=2, help="folds run, of 5")
    parser.add_argument("--lgbm-subsample", type=float, default=1.0, help="LightGBM rows per tree (1: all)")
    parser.add_argument(
        "--lgbm-colsample", type=float, default=1.0, help="LightGBM columns per tree (1: all)"
    )
    args = parser.parse_args(argv)
    for name in ("lgbm_subsample", "lgbm_colsample"):
        if not 0 < getattr(args, name) <= 1:
            parser.error(f"--{name.replace('_', '-')} must be in (0, 1]")
    print(f"{args.rows} rows, prevalence {args.prevalence}, {args.folds} of 5 patient-grouped folds")
    x, y, patients = synthetic_table(args.rows, args.prevalence)
    fold = patients % 5
    done = fold < args.folds
    compared = models(TabularBaselineConfig(), args.lgbm_subsample, args.lgbm_colsample)
    for name, (settings, make) in compared.items():
        oof, seconds = np.zeros(len(y)), 0.0
        for f in range(args.folds):
            train, val = fold != f, fold == f
            model = make()
            started = time.perf_counter()
            model.fit(x[train], y[train])
            seconds += time.perf_counter() - started
            oof[val] = model.predict_proba(x[val])[:, 1]
        auc = roc_auc_score(y[done], oof[done])
        pauc = partial_auc(y[done], oof[done], 0.8)
        print(
            f"{name}: AUC {auc:.4f}  pAUC(TPR>=0.8) {pauc:.4f}  fit {seconds:.1f} s over {args.folds} folds"
            f"  [{settings}]",
            flush=True,
        )


if __name__ == "__main__":
    with machine_load():
        main()
