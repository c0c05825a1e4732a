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
"""Columns of the cleaned table, in order. ``patient_id``/``lesion_id``/``sex``/``age_approx``/site may be
missing (NaN); ``image_path`` is absolute (or a URL); ``image_sha256`` may be empty when images were not
hashed (metadata-only cleaning)."""

METADATA_FEATURES: tuple[str, ...] = (AGE, SEX, SITE)
