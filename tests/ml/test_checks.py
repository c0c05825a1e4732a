"""The verifications behind the asset checks, on tables built in memory."""

from __future__ import annotations

import pandas as pd
import pytest

from melanoma_ml import schema
from melanoma_ml.checks import clean_table_problems


def clean_table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            schema.IMAGE: ["ISIC_1", "ISIC_2"],
            schema.PATIENT: ["P1", "P2"],
            schema.LESION: [None, None],
            schema.SEX: ["male", None],
            schema.AGE: [45.0, None],
            schema.SITE: ["torso", "head/neck"],
            schema.DIAGNOSIS: ["nevus", "melanoma"],
            schema.TARGET: [0, 1],
            schema.SOURCE: "ISIC2020",
            schema.IS_EXTERNAL: False,
            schema.IMAGE_PATH: ["/x/ISIC_1.jpg", "/x/ISIC_2.jpg"],
            schema.IMAGE_SHA256: ["a", "b"],
        }
    )


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t, None),
        (lambda t: t.drop(columns=[schema.SOURCE]), "differ from schema.CLEAN_COLUMNS"),
        (lambda t: t.assign(sex=["M", "female"]), "sex has values outside"),
        (lambda t: t.assign(anatom_site_general_challenge=["torso", "scalp"]), "outside"),
        (lambda t: t.assign(target=[0, 2]), "target must be 0/1"),
        (lambda t: t.assign(age_approx=[45.0, 120.0]), "age_approx outside"),
        (lambda t: t.assign(image_name=["ISIC_1", "ISIC_1"]), "duplicated image names"),
        (lambda t: t.iloc[0:0], "empty"),
    ],
)
def test_clean_table_problems(edit, message: str | None) -> None:
    problems = clean_table_problems(edit(clean_table()))
    if message is None:
        assert problems == []
    else:
        assert any(message in p for p in problems), problems
