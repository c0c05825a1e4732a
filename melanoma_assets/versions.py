"""Code versions of the assets: bump a step's entry when its melanoma_ml logic changes (lineage marks the
downstream assets stale); the package version is part of every one."""

from melanoma_ml import __version__

STEP_VERSIONS = {
    "source_metadata": "1",
    "clean_metadata": "1",
    "patient_folds": "1",
    "image_cache": "1",
    "fold_model": "1",
    "evaluation": "1",
    "leaderboard": "1",
    "serving_model": "1",
    "gradcam_gallery": "1",
}


def code_version(step: str) -> str:
    return f"{__version__}-{STEP_VERSIONS[step]}"
