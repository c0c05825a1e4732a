"""Column names and vocabularies of the cleaned metadata table (SIIM-ISIC 2020 naming).

Every module reads and writes tables through these names; adapters for other layouts
(ISIC 2019, HAM10000, isic-cli) map onto them.
"""

from __future__ import annotations

IMAGE = "image_name"
PATIENT = "patient_id"
LESION = "lesion_id"
SEX = "sex"
AGE = "age_approx"
SITE = "anatom_site_general_challenge"
DIAGNOSIS = "diagnosis"
BENIGN_MALIGNANT = "benign_malignant"
TARGET = "target"
SOURCE = "source"
IMAGE_PATH = "image_path"
IMAGE_SHA256 = "image_sha256"
GROUP = "group_id"
FOLD = "fold"
IS_EXTERNAL = "is_external"

# Quarantine table columns.
Q_ROW = "row"
Q_REASON = "reason"

SEXES: tuple[str, ...] = ("female", "male")
SITES: tuple[str, ...] = (
    "head/neck",
    "upper extremity",
    "lower extremity",
    "torso",
    "palms/soles",
    "oral/genital",
)
MAX_AGE = 85  # ISIC caps published ages at 85
MIN_VALID_AGE, MAX_VALID_AGE = 0, 120
"""Ages (years) that can be a person's age; any other number is an error in the data, not an age. The app
refuses it, cleaning sets it missing or quarantines the row (``data.age_out_of_range``); see ``ages``."""

CLEAN_COLUMNS: tuple[str, ...] = (
    IMAGE,
    PATIENT,
    LESION,
    SEX,
    AGE,
    SITE,
    DIAGNOSIS,
    TARGET,
    SOURCE,
    IS_EXTERNAL,
    IMAGE_PATH,
    IMAGE_SHA256,
)
"""Columns every cleaned table starts with, in order (numeric ``extra_columns`` may follow). ``patient_id``/``lesion_id``/``sex``/``age_approx``/site may be
missing (NaN); ``image_path`` is absolute (or a URL); ``image_sha256`` may be empty when images were not
hashed (metadata-only cleaning)."""


def extra_columns(table) -> list[str]:  # noqa: ANN001 - schema stays free of a pandas import
    """Columns of a cleaned table after ``CLEAN_COLUMNS``: numeric per-image values a layout adds (ISIC 2024
    ``tbp_lv_*``, float64, NaN where a source has none), read by ``model.tabular_features``."""
    return [c for c in table.columns if c not in CLEAN_COLUMNS]


METADATA_FEATURES: tuple[str, ...] = (AGE, SEX, SITE)
