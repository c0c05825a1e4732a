"""Labelled cases whose images were kept, exported as a dataset: what ``data.feedback_sources`` reads.

``melanoma-ml outcomes export --out DIR`` writes, in one atomic rename (``atomic.atomic_directory``), a folder
in the ISIC 2020 layout that ``metadata.layouts`` detects like any other:

* ``metadata.csv``: one row per case with a consistent outcome (``outcomes.labelled_cases``) whose image
  ``serving.keep_images`` kept: ``image_name`` (the case id), ``target`` (1 melanoma, 0 benign), ``age_approx``,
  ``sex``, ``anatom_site_general_challenge`` (as the model read them), ``patient_id`` (the outcome's
  pseudonymous patient id, else the case id: each case its own group), ``source`` (``feedback``), and for
  lineage ``case_id``, ``model_version``, ``probability``, ``scored_at``, ``outcome_recorded_at``,
  ``outcome_source`` and ``image_sha256``. A case scored more than once is exported once, from its last
  scored record with a kept image.
* ``images/<case id>.<ext>``: the kept bytes, copied (an extension the loaders do not read is decoded and
  written as PNG).
* ``feedback_lineage.json``: when and from which artifact root it was made, the sha256 of the outcomes file,
  the days and model versions the cases come from, and what was left out (conflicts, no kept image, a kept
  image retention had already deleted).

The folder holds health data: it is created owner-only (0o700, files 0o600). An existing ``DIR`` is replaced
only when it is an earlier export (it has ``feedback_lineage.json``); any other existing folder is refused.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from melanoma_ml import schema
from melanoma_ml.atomic import atomic_directory, atomic_write_json, sha256_file
from melanoma_ml.errors import InputStateError, InputValueError
from melanoma_ml.images.io import load_rgb
from melanoma_ml.metadata.image_files import IMAGE_EXTENSIONS
from melanoma_ml.monitoring.outcomes import (
    CONFLICT,
    case_status,
    labelled_cases,
    outcomes_file,
    read_outcomes,
    spreadsheet_safe,
    utc_now,
)

FEEDBACK_SOURCE = "feedback"
METADATA_FILE = "metadata.csv"
IMAGE_FOLDER = "images"
LINEAGE_FILE = "feedback_lineage.json"

COLUMNS: tuple[str, ...] = (
    schema.IMAGE,
    schema.TARGET,
    schema.AGE,
    schema.SEX,
    schema.SITE,
    schema.PATIENT,
    schema.SOURCE,
    "case_id",
    "model_version",
    "probability",
    "scored_at",
    "outcome_recorded_at",
    "image_sha256",
)
"""Columns of the exported ``metadata.csv``: the ISIC 2020 ones the cleaning reads, then lineage."""


@dataclass(frozen=True)
class FeedbackExport:
    """What ``export_feedback`` wrote: ``cases`` rows (``melanoma`` of them melanoma) and what it left out."""

    folder: Path
    cases: int
    melanoma: int
    left_out: dict[str, int]

    def text(self) -> str:
        left = ", ".join(f"{n} {why}" for why, n in self.left_out.items() if n) or "none"
        return (
            f"exported {self.cases} labelled cases ({self.melanoma} melanoma) to {self.folder}; left out: "
            f"{left}. Train on it with data.feedback_sources: [{{path: {self.folder}}}] and "
            "data.train_on_feedback: true"
        )


def export_feedback(root: str | Path, out: str | Path) -> FeedbackExport:
    """Write the feedback dataset of artifact root ``root`` to folder ``out`` (module docstring).

    Raises:
        InputStateError: no labelled case has a kept image (nothing to export).
        InputValueError: ``out`` exists and is not an earlier export.
    """
    root, out = Path(root).expanduser().resolve(), Path(out).expanduser().resolve()
    _refuse_foreign(out)
    labelled = labelled_cases(root)
    status = case_status(read_outcomes(root))
    left_out = {
        "cases with conflicting outcomes": int((status["state"] == CONFLICT).sum()),
        "labelled cases without a kept image (serving.keep_images was off)": 0,
        "kept images already deleted (serving.prediction_log_retention_days)": 0,
    }
    rows = _latest_with_image(labelled, left_out)
    if rows.empty:
        raise InputStateError(
            f"no labelled case under {root} has a kept image, so there is nothing to export "
            f"({len(labelled)} labelled scored record(s)); images are kept only while serving.keep_images is "
            "true when a case is scored, and outcomes must be recorded for those cases"
        )
    with atomic_directory(out) as folder:
        os.chmod(folder, 0o700)
        images = folder / IMAGE_FOLDER
        images.mkdir(mode=0o700)
        table = pd.DataFrame([_row(record, images) for record in rows.itertuples(index=False)])
        _write_csv(folder / METADATA_FILE, table[list(COLUMNS)])
        atomic_write_json(folder / LINEAGE_FILE, _lineage(root, rows, left_out))
    return FeedbackExport(out, len(rows), int(rows["target"].sum()), left_out)


def _refuse_foreign(out: Path) -> None:
    if out.is_file():
        raise InputValueError(f"--out {out} is a file: give a folder to write the feedback dataset to")
    if out.is_dir() and any(out.iterdir()) and not (out / LINEAGE_FILE).is_file():
        raise InputValueError(
            f"--out {out} exists and is not an earlier feedback export (no {LINEAGE_FILE} in it), so it is not "
            "replaced: give a new folder, or the folder of an earlier export to refresh it"
        )


def _latest_with_image(labelled: pd.DataFrame, left_out: dict[str, int]) -> pd.DataFrame:
    """One row per case: its last scored record whose kept image still exists."""
    cases = labelled["case_id"].nunique()
    kept = labelled[labelled["image_path"].notna() & (labelled["image_path"].astype(str) != "")]
    exists = kept["image_path"].map(lambda p: Path(p).is_file()).astype(bool)
    with_file = kept[exists]
    latest = with_file.sort_values("time", kind="stable").groupby("case_id", sort=False).tail(1)
    latest = latest.sort_values("case_id").reset_index(drop=True)
    gone = set(kept.loc[~exists, "case_id"]) - set(latest["case_id"])
    left_out["kept images already deleted (serving.prediction_log_retention_days)"] = len(gone)
    left_out["labelled cases without a kept image (serving.keep_images was off)"] = (
        cases - len(latest) - len(gone)
    )
    return latest


def _row(record: Any, images: Path) -> dict[str, Any]:
    """The metadata row of one case, after copying its image into ``images``."""
    source = Path(record.image_path)
    suffix = source.suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        target = images / f"{record.case_id}{suffix}"
        shutil.copyfile(source, target)
    else:  # e.g. "bin": decode (as serving did) and store as PNG, which every loader reads
        target = images / f"{record.case_id}.png"
        Image.fromarray(np.asarray(load_rgb(source))).save(target, format="PNG")
    os.chmod(target, 0o600)
    patient = record.patient_id if isinstance(record.patient_id, str) and record.patient_id else None
    return {
        schema.IMAGE: record.case_id,
        schema.TARGET: int(record.target),
        schema.AGE: "" if pd.isna(record.age) else record.age,
        schema.SEX: record.sex or "",
        schema.SITE: record.anatom_site or "",
        schema.PATIENT: patient or record.case_id,
        schema.SOURCE: FEEDBACK_SOURCE,
        "case_id": record.case_id,
        "model_version": record.model_version or "",
        "probability": record.probability,
        "scored_at": record.time.isoformat().replace("+00:00", "Z"),
        "outcome_recorded_at": record.outcome_recorded_at,
        "image_sha256": record.image_sha256 or "",
    }


def _write_csv(path: Path, table: pd.DataFrame) -> None:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(table.columns)
    for values in table.itertuples(index=False):
        writer.writerow([spreadsheet_safe(v) if isinstance(v, str) else v for v in values])
    path.write_text(buffer.getvalue(), encoding="utf-8")
    os.chmod(path, 0o600)


def _lineage(root: Path, rows: pd.DataFrame, left_out: dict[str, int]) -> dict[str, Any]:
    outcomes = outcomes_file(root)
    days = rows["time"].dt.strftime("%Y-%m-%d")
    return {
        "exported_at": utc_now(),
        "artifact_root": str(root),
        "source": FEEDBACK_SOURCE,
        "cases": len(rows),
        "melanoma": int(rows["target"].sum()),
        "benign": int((rows["target"] == 0).sum()),
        "outcomes_file": str(outcomes),
        "outcomes_sha256": sha256_file(outcomes),
        "scored_days": {"first": days.min(), "last": days.max()},
        "model_versions": {
            str(k): int(v) for k, v in rows["model_version"].fillna("none").value_counts().items()
        },
        "patients_known": int(rows["patient_id"].notna().sum()),
        "left_out": left_out,
    }


__all__ = ["FEEDBACK_SOURCE", "FeedbackExport", "export_feedback"]
