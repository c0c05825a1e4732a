"""The monitor reference a bundle ships: known shares, missing values as a category, a JSON round trip."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from monitor_helpers import served_manifest
from pydantic import ValidationError

from melanoma_ml import schema
from melanoma_ml.errors import InputValueError
from melanoma_ml.serving.manifest import BundleManifest
from melanoma_ml.serving.monitor_reference import (
    MISSING,
    MonitorReference,
    build_monitor_reference,
    reference_for_bundle,
)


def table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            schema.IMAGE: ["a", "b", "c", "d", "e"],
            schema.AGE: [25.0, 40.0, 65.0, np.nan, 80.0],
            schema.SEX: ["female", " Male ", "unknown", "female", None],
            schema.SITE: ["torso", "torso", "head/neck", None, "torso"],
        }
    )


def test_shares_per_field_with_missing_as_its_own_category() -> None:
    reference = build_monitor_reference(table(), description="5 rows")
    assert reference.n_rows == 5
    assert reference.mix["sex"] == pytest.approx({"female": 0.4, "male": 0.2, MISSING: 0.4})
    assert reference.mix["site"] == pytest.approx({"torso": 0.6, "head/neck": 0.2, MISSING: 0.2})
    assert reference.mix["age_band"] == pytest.approx(
        {"<30": 0.2, "30-44": 0.2, "60-74": 0.2, "75+": 0.2, MISSING: 0.2}
    )
    assert reference.age_quantiles["q50"] == pytest.approx(52.5)


def test_the_reference_covers_only_the_bundles_out_of_fold_rows() -> None:
    oof = pd.DataFrame({schema.IMAGE: ["a", "b"]})
    reference = reference_for_bundle(oof, table())
    assert reference.n_rows == 2 and reference.mix["sex"] == {"female": 0.5, "male": 0.5}
    assert reference_for_bundle(oof, None) is None  # registered without the folds table: none shipped


def test_a_manifest_with_a_reference_round_trips_and_older_ones_stay_valid() -> None:
    manifest = served_manifest(0, n_rows=200)
    again = BundleManifest.model_validate(json.loads(json.dumps(manifest.to_json(), allow_nan=False)))
    assert again.monitor_reference == manifest.monitor_reference
    older = {k: v for k, v in manifest.to_json().items() if k != "monitor_reference"}
    assert BundleManifest.model_validate(older).monitor_reference is None


def test_invalid_references_are_refused() -> None:
    with pytest.raises(ValidationError, match="sum to"):
        MonitorReference(rows="x", n_rows=3, mix={"sex": {"female": 0.5}})
    with pytest.raises(InputValueError, match="lack"):
        build_monitor_reference(table().drop(columns=[schema.AGE]), description="x")
    with pytest.raises(InputValueError, match="no reference rows"):
        build_monitor_reference(table().iloc[:0], description="x")
