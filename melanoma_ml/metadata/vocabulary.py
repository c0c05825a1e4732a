"""Value vocabularies of the ISIC-family datasets and their mapping onto ``schema`` values.

Every map is keyed by the lower-cased, stripped raw value. The melanoma rule (which diagnoses give
``target = 1``) lives here so that every layout labels the same way.

Melanoma rule (decided for this project, matching SIIM-ISIC 2020 where ``target`` is 1 for every
``diagnosis == "melanoma"``, in situ and invasive alike):

* target 1: any diagnosis containing the word "melanoma" ("melanoma", "melanoma in situ",
  "Melanoma Invasive", "Melanoma, NOS", "melanoma metastasis", the isic-cli level-2 class
  "Malignant melanocytic proliferations (Melanoma)"), the ISIC 2019 / HAM10000 codes ``MEL``/``mel``,
  and "lentigo maligna" (melanoma in situ by definition). A metastasis is still a melanoma lesion.
* target 0: every other stated diagnosis, including "atypical melanocytic proliferation" and
  isic-cli's "Indeterminate melanocytic proliferations" (not a melanoma diagnosis), "lentigo NOS",
  nevi, keratoses, carcinomas.
* no label: diagnosis missing or "unknown" and no ``target`` / ``benign_malignant`` to decide.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from melanoma_ml import schema
from melanoma_ml.missing import MISSING_TOKENS as MISSING_TOKENS  # re-exported for identifier cleaning
from melanoma_ml.missing import text_keys

SEX_MAP: dict[str, str] = {
    "male": "male",
    "m": "male",
    "man": "male",
    "female": "female",
    "f": "female",
    "woman": "female",
}

SITE_MAP: dict[str, str] = {
    # SIIM-ISIC 2020 general sites map to themselves.
    **{site: site for site in schema.SITES},
    # ISIC 2019 / isic-cli general sites.
    "anterior torso": "torso",
    "posterior torso": "torso",
    "lateral torso": "torso",
    "head and neck": "head/neck",
    "oral genital": "oral/genital",
    "palms soles": "palms/soles",
    # HAM10000 ``localization`` (fine vocabulary), following ISIC's own mapping of these images in 2019.
    "back": "torso",
    "trunk": "torso",
    "abdomen": "torso",
    "chest": "torso",
    "face": "head/neck",
    "ear": "head/neck",
    "neck": "head/neck",
    "scalp": "head/neck",
    "hand": "upper extremity",
    "foot": "lower extremity",
    "acral": "palms/soles",
    "genital": "oral/genital",
}

HAM10000_DX: dict[str, str] = {
    "mel": "melanoma",
    "nv": "nevus",
    "bkl": "benign keratosis",
    "bcc": "basal cell carcinoma",
    "akiec": "actinic keratosis or intraepithelial carcinoma",
    "df": "dermatofibroma",
    "vasc": "vascular lesion",
}
"""HAM10000 ``dx`` codes spelled out (as in the isic_sample ``metadata.csv``)."""

ISIC2019_CLASSES: dict[str, str] = {
    "MEL": "melanoma",
    "NV": "nevus",
    "BCC": "basal cell carcinoma",
    "AK": "actinic keratosis",
    "BKL": "benign keratosis",
    "DF": "dermatofibroma",
    "VASC": "vascular lesion",
    "SCC": "squamous cell carcinoma",
    "UNK": "unknown",
}
"""One-hot columns of ``ISIC_2019_Training_GroundTruth.csv`` and the diagnosis each one means."""

_MELANOMA = re.compile(r"\bmelanoma\b|^mel$|^lentigo maligna$")


def normalized(values: pd.Series) -> pd.Series:
    """Lower-cased, stripped strings; NaN where ``melanoma_ml.missing`` says the value is missing."""
    return text_keys(values)


def melanoma_flags(diagnosis: pd.Series) -> pd.Series:
    """Per row: 1.0 melanoma, 0.0 a stated non-melanoma diagnosis, NaN when the diagnosis is missing/unknown."""
    text = normalized(diagnosis)
    flags = text.str.contains(_MELANOMA, regex=True, na=False).astype("float64")
    return flags.where(text.notna(), np.nan)


BENIGN_DIAGNOSES: frozenset[str] = frozenset(
    {
        "nevus",
        "seborrheic keratosis",
        "lentigo nos",
        "lentigo simplex",
        "lichenoid keratosis",
        "solar lentigo",
        "cafe-au-lait macule",
        "dermatofibroma",
        "vascular lesion",
        "benign keratosis",
        "angioma",
        "angiokeratoma",
    }
)
"""Stated diagnoses that are benign (ISIC 2020, ISIC 2019 / HAM10000 spelled out, isic-cli level 3)."""

_BENIGN = re.compile(r"^benign\b|\bnevus\b")
_MALIGNANT = re.compile(r"^malignant\b|\b(?:basal|squamous) cell carcinoma\b")


def diagnosis_malignancy(diagnosis: pd.Series) -> pd.Series:
    """Per row: "malignant", "benign", or NaN when the diagnosis does not decide.

    Malignant: a melanoma (``melanoma_flags``), a basal or squamous cell carcinoma, or an isic-cli class
    starting with "Malignant". Benign: ``BENIGN_DIAGNOSES``, any nevus that is not a melanoma, or an isic-cli
    class starting with "Benign". Undecided: missing/unknown, and diagnoses that are neither or both in
    practice ("atypical melanocytic proliferation", "Indeterminate ...", "actinic keratosis or
    intraepithelial carcinoma"). Cleaning quarantines a row whose ``benign_malignant`` contradicts this.
    """
    text = normalized(diagnosis)
    melanoma = melanoma_flags(diagnosis) == 1
    malignant = melanoma | text.str.contains(_MALIGNANT, regex=True, na=False)
    benign = ~malignant & (text.isin(BENIGN_DIAGNOSES) | text.str.contains(_BENIGN, regex=True, na=False))
    out = pd.Series(np.nan, index=diagnosis.index, dtype="object")
    out[benign.to_numpy()] = "benign"
    out[malignant.to_numpy()] = "malignant"
    return out
