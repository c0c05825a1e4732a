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
    "test_evaluation": "2",  # calibrated ECE/Brier on test, ensemble in serving.ensemble_average space
    "tabular_baseline": "1",
    "leaderboard": "3",  # kind column; tabular-only and blend rows
    "serving_model": "4",  # + candidate vs champion on the clinic's labelled cases (feedback_gate)
    "gradcam_gallery": "2",  # ensemble bundles explain member 0 on its own validation images
    "batch_scores": "1",
    "serving_monitor": "1",
    "deployed_performance": "1",
}


def code_version(step: str) -> str:
    return f"{__version__}-{STEP_VERSIONS[step]}"
