"""Code versions of the assets: bump a step's entry when its melanoma_ml logic changes (lineage marks the
downstream assets stale); the package version is part of every one."""

from melanoma_ml import __version__

STEP_VERSIONS = {
    "source_metadata": "1",
    "clean_metadata": "1",
    "patient_folds": "2",  # the locked test split (fold -2) is carved out first
    "image_cache": "1",
    "fold_model": "1",
    "evaluation": "1",
    "test_evaluation": "3",  # kinds in serving.ensemble's words (folds/best_fold/top_k), folds/ folder
    "tabular_baseline": "1",
    "leaderboard": "3",  # kind column; tabular-only and blend rows
    "serving_model": "5",  # + the bundle records serving.views (manifest views), its test numbers use them
    "gradcam_gallery": "3",  # probabilities with the bundle's recorded views, not serving.views
    "batch_scores": "2",  # scored with the bundle's recorded views, not serving.views
    "serving_monitor": "1",
    "deployed_performance": "1",
}


def code_version(step: str) -> str:
    return f"{__version__}-{STEP_VERSIONS[step]}"
