"""External test sets (``data.test_sources``): loaded like any source, scored in full, never trained on.

An image of a test set that training also holds would make its score a memory test, so before scoring
each test set loses its rows whose image id (compared as ``merge.py`` compares ids, without ISIC 2019's
``_downsampled`` suffix) or image content (sha256, as ``merge.py`` finds one image under two ids) is in
the training table. Those rows are counted and listed with the reason, never silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from melanoma_ml import schema
from melanoma_ml.config import DataConfig
from melanoma_ml.folds import group_ids
from melanoma_ml.metadata.adapters import strip_downsampled
from melanoma_ml.metadata.io import MetadataFileNotFound
from melanoma_ml.metadata.sources import _load, _plan, _require_distinct_names

TEST_ENV_HINT = "MELANOMA_DATA__TEST_SOURCES"
EXCLUDED_COLUMNS = (schema.IMAGE, "check", "reason")


@dataclass(frozen=True)
class TestSet:
    """One external test set, ready to score.

    Attributes:
        name: The source name (``data.test_sources[i].name`` or the layout's name).
        setting: Where it is configured (``data.test_sources[0]``).
        rows: Its clean rows not in training, with ``group_id`` (patient, else lesion, else image).
        excluded: Its rows also in training (``image_name``, ``check``: ``same_image_id`` or
            ``same_image_content``, ``reason``).
        rows_quarantined: Its rows the cleaning set aside (bad values, missing images).
    """

    __test__ = False  # not a pytest class

    name: str
    setting: str
    rows: pd.DataFrame
    excluded: pd.DataFrame
    rows_quarantined: int

    def counts(self) -> dict[str, int]:
        """Scored rows, melanoma among them, and the rows excluded as training duplicates (by reason)."""
        checks = self.excluded["check"].value_counts()
        return {
            "rows_scored": len(self.rows),
            "melanoma": int(pd.to_numeric(self.rows[schema.TARGET]).sum()) if len(self.rows) else 0,
            "excluded_in_training": len(self.excluded),
            "excluded_same_id": int(checks.get("same_image_id", 0)),
            "excluded_same_content": int(checks.get("same_image_content", 0)),
            "rows_quarantined": self.rows_quarantined,
        }


def load_test_sources(data: DataConfig, training: pd.DataFrame) -> list[TestSet]:
    """Every ``data.test_sources`` entry, cleaned, minus the images ``training`` holds.

    Args:
        data: The data settings (``test_sources``, ``age_out_of_range``).
        training: The rows a model may have trained on (the folds table without the locked test split).

    Raises:
        MetadataFileNotFound: a configured path does not exist.
        MetadataError: no layout matches, the table is unusable, or two test sets share a name.
    """
    plans = []
    for i, entry in enumerate(data.test_sources):
        setting = f"data.test_sources[{i}]"
        path = Path(entry.path).expanduser().resolve()
        if not path.exists():
            raise MetadataFileNotFound(
                f"{setting}.path does not exist: {path}; fix the path or remove the entry "
                f"({TEST_ENV_HINT} or data.test_sources in the run config)"
            )
        plans.append(_plan(setting, path, entry.layout, entry.image_dir, entry.name, False, True))
    _require_distinct_names(plans)
    sets = []
    for plan in plans:
        result = _load(plan, data.age_out_of_range)
        rows, excluded = drop_training_duplicates(result.clean, training)
        rows = rows.assign(**{schema.GROUP: group_ids(rows)}) if len(rows) else rows
        sets.append(TestSet(plan.name, plan.setting, rows, excluded, len(result.quarantine)))
    return sets


def drop_training_duplicates(test: pd.DataFrame, training: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(test rows not in training, the excluded rows with their reason)``.

    A row is in training when its image id (without ``_downsampled``) or its non-empty ``image_sha256``
    equals that of a training row.
    """
    train_ids = set(strip_downsampled(training[schema.IMAGE].astype("str")))
    ids = strip_downsampled(test[schema.IMAGE].astype("str"))
    same_id = ids.isin(train_ids).to_numpy()
    same_content = pd.Series(False, index=test.index).to_numpy()
    if schema.IMAGE_SHA256 in test.columns and schema.IMAGE_SHA256 in training.columns:
        train_sha = set(training[schema.IMAGE_SHA256].dropna().astype("str")) - {""}
        sha = test[schema.IMAGE_SHA256].astype("str")
        same_content = (test[schema.IMAGE_SHA256].notna() & sha.isin(train_sha)).to_numpy() & ~same_id
    excluded = pd.DataFrame(
        {
            schema.IMAGE: test[schema.IMAGE].to_numpy()[same_id | same_content],
            "check": [
                "same_image_id" if s else "same_image_content" for s in same_id[same_id | same_content]
            ],
        }
    )
    excluded["reason"] = [
        "the same image id is in the training data: scoring it would test memory, not generalisation"
        if check == "same_image_id"
        else "the same image content (sha256) is in the training data under another id"
        for check in excluded["check"]
    ]
    return test[~(same_id | same_content)].reset_index(drop=True), excluded[list(EXCLUDED_COLUMNS)]
