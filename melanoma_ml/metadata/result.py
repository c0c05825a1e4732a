"""The outcome of cleaning one or several metadata sources."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from melanoma_ml import schema

Q_SOURCE = "source"
Q_IMAGE = schema.IMAGE
Q_CHECK = "check"
QUARANTINE_COLUMNS: tuple[str, ...] = (Q_SOURCE, schema.Q_ROW, Q_IMAGE, Q_CHECK, schema.Q_REASON)
"""``row`` is the 0-based data row of the source table (the CSV line number is ``row + 2``: one header
line, 1-based lines). ``check`` is a short code (e.g. ``duplicate_image_name``) for counting; ``reason``
is the full sentence naming the file and the fix."""

WARNING_COLUMNS: tuple[str, ...] = (Q_SOURCE, schema.Q_ROW, Q_IMAGE, "column", "value", "action")
CONFLICT_COLUMNS: tuple[str, ...] = (Q_IMAGE, "column", "chosen", "chosen_from")
ROW_NUMBERING = "row = 0-based data row of the source table; CSV line = row + 2"


def empty_frame(columns: tuple[str, ...]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="object") for c in columns})


@dataclass
class CleaningResult:
    """Cleaned table plus everything that was set aside or changed on the way.

    Attributes:
        clean: One row per usable image, exactly ``schema.CLEAN_COLUMNS`` in order.
        quarantine: Rows set aside (``QUARANTINE_COLUMNS``), each with its reason.
        warnings: Values fixed or set missing (``WARNING_COLUMNS``): row, column, raw value, action.
        summary: Counts (``rows_in``, ``rows_clean``, ``rows_quarantined``, ``quarantine_reasons``,
            ``melanoma``, ``prevalence``, ``patients``, ``lesions``, ``warnings``, ...).
        conflicts: Per image and column, disagreeing values between merged sources
            (``image_name``, ``column``, one column per source with its value, ``chosen``,
            ``chosen_from``); empty for a single source.
        source_rows: For each row of ``clean``, its row in the source table (same numbering as
            ``quarantine.row``), so a clean row can be traced back to its CSV line.
    """

    clean: pd.DataFrame
    quarantine: pd.DataFrame
    warnings: pd.DataFrame
    summary: dict[str, Any]
    conflicts: pd.DataFrame = field(default_factory=lambda: empty_frame(CONFLICT_COLUMNS))
    source_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def summarize(
    clean: pd.DataFrame, quarantine: pd.DataFrame, warnings: pd.DataFrame, rows_in: int
) -> dict[str, Any]:
    """Counts for a cleaning result (plain Python types, JSON-serializable)."""
    labels = pd.to_numeric(clean[schema.TARGET], errors="coerce")
    melanoma = int((labels == 1).sum())
    labelled = int(labels.notna().sum())
    return {
        "rows_in": int(rows_in),
        "rows_clean": len(clean),
        "rows_quarantined": len(quarantine),
        "quarantine_reasons": {str(k): int(v) for k, v in quarantine[Q_CHECK].value_counts().items()},
        "melanoma": melanoma,
        "prevalence": melanoma / labelled if labelled else float("nan"),
        "patients": int(clean[schema.PATIENT].nunique()),
        "lesions": int(clean[schema.LESION].nunique()),
        "warnings": {str(k): int(v) for k, v in warnings["column"].value_counts().items()},
        "row_numbering": ROW_NUMBERING,
    }
