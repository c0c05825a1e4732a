"""Load the data sources named in ``DataConfig``: one primary dataset plus optional external ones.

The primary dataset (``data.source_dir``, or a default folder such as the synthetic demo set) is the
one validated on. Each ``data.external_sources`` entry is loaded with ``is_external=True``: its rows
are training data only (``folds`` gives them fold -1 or their primary group's fold and never validates
on them), as the SIIM-ISIC 2020 winners used ISIC 2019 images. With externals, ``merge_sources``
removes images listed twice (same id, or same file content) and records where the sources disagree.

``data.feedback_sources`` (the clinic's labelled cases, ``melanoma-ml outcomes export``) are read the same
way, as external sources, but only when ``data.train_on_feedback`` is true; otherwise they are not read at
all, so they are in no fold and a new export does not change the data a run trains on.

Every layout is detected (or taken from the config) by ``load_dataset``; the detected layout and the
reason are logged and kept in ``summary["data_sources"]``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from melanoma_ml.config import DataConfig, ExternalSource
from melanoma_ml.metadata.io import MetadataError, MetadataFileNotFound
from melanoma_ml.metadata.layouts import (
    SOURCE_NAMES,
    LayoutMatch,
    detect_layout,
    layout_files,
    load_dataset,
)
from melanoma_ml.metadata.merge import merge_sources
from melanoma_ml.metadata.result import CleaningResult

log = logging.getLogger(__name__)

PRIMARY_SETTING = "data.source_dir"
ENV_HINT = "MELANOMA_DATA__SOURCE_DIR"
EXTERNAL_ENV_HINT = "MELANOMA_DATA__EXTERNAL_SOURCES"
FEEDBACK_SETTING = "data.feedback_sources"
FEEDBACK_ENV_HINT = "MELANOMA_DATA__FEEDBACK_SOURCES"
FEEDBACK_NAME = "feedback"
"""Default source name of the first ``data.feedback_sources`` entry (``monitoring.feedback`` exports)."""


def load_configured_data(data: DataConfig, *, default_source_dir: Path | None = None) -> CleaningResult:
    """Read, clean and (with external sources) merge every dataset ``data`` names.

    Args:
        data: The data settings: ``source_dir``/``layout``/``image_dir`` for the primary dataset and
            ``external_sources`` for the training-only ones.
        default_source_dir: Primary folder used when ``data.source_dir`` is None (the pipeline passes
            the synthetic demo set).

    Returns:
        The primary source's ``CleaningResult`` alone, or the merge of all sources (``is_external``
        True on every external row, ``conflicts`` filled). ``summary["data_sources"]`` lists, per
        source, its setting, path, layout, why that layout was chosen, and its row counts.

    Raises:
        MetadataFileNotFound: the primary folder or an external path does not exist.
        MetadataError: no layout matches a source (the message lists the files found and what each
            layout needs), a table is unusable, or two sources have the same name.
    """
    primary_path = _primary_path(data, default_source_dir)
    plans = [_plan(PRIMARY_SETTING, primary_path, data.layout, data.image_dir, None, False, True)]
    for i, entry in enumerate(data.external_sources):
        setting = f"data.external_sources[{i}]"
        plans.append(
            _plan(
                setting,
                _external_path(i, entry),
                entry.layout,
                entry.image_dir,
                entry.name,
                True,
                entry.require_labels,
            )
        )
    plans += _feedback_plans(data)
    _require_distinct_names(plans)
    results = [_load(plan, data.age_out_of_range) for plan in plans]
    described = [_describe(plan, result) for plan, result in zip(plans, results, strict=True)]
    if len(results) == 1:
        results[0].summary["data_sources"] = described
        return results[0]
    merged = merge_sources(results, primary=plans[0].name)
    merged.summary["data_sources"] = described
    log.info(
        "merged %d sources: %d primary rows, %d external rows, %d quarantined, conflicts %s",
        len(results),
        merged.summary["rows_primary"],
        merged.summary["rows_external"],
        merged.summary["rows_quarantined"],
        merged.summary["conflicts"] or "none",
    )
    return merged


@dataclass(frozen=True)
class _Plan:
    """One source to load: where it comes from in the config and how it will be read."""

    setting: str
    path: Path
    layout: str
    match: LayoutMatch
    image_dir: Path | None
    name: str
    is_external: bool
    require_labels: bool


def _primary_path(data: DataConfig, default_source_dir: Path | None) -> Path:
    if data.source_dir is None:
        if default_source_dir is None:
            raise MetadataError(
                f"{PRIMARY_SETTING} is not set and no default dataset folder was given; set {ENV_HINT} "
                "(or data.source_dir in the run config) to an ISIC-layout folder"
            )
        return Path(default_source_dir).expanduser().resolve()
    path = Path(data.source_dir).expanduser().resolve()
    if not path.exists():
        raise MetadataFileNotFound(
            f"{PRIMARY_SETTING} does not exist: {path}; set {ENV_HINT} (or data.source_dir in the run config) "
            "to the dataset folder, or leave it unset to use the built-in synthetic demo set"
        )
    return path


def _external_path(index: int, entry: ExternalSource) -> Path:
    path = Path(entry.path).expanduser().resolve()
    if not path.exists():
        raise MetadataFileNotFound(
            f"data.external_sources[{index}].path does not exist: {path}; fix the path or remove the entry "
            f"({EXTERNAL_ENV_HINT} or data.external_sources in the run config)"
        )
    return path


def feedback_source_name(index: int, entry: ExternalSource) -> str:
    """``data.feedback_sources[index]``'s source name: its ``name``, else ``feedback``, ``feedback-2``, ..."""
    return entry.name or (FEEDBACK_NAME if index == 0 else f"{FEEDBACK_NAME}-{index + 1}")


def _feedback_plans(data: DataConfig) -> list[_Plan]:
    """The ``data.feedback_sources`` to read: all of them with ``data.train_on_feedback``, else none.

    Read like external sources (training only, never validated on). Left unread when not trained on, so
    they change neither the training table, the folds nor the data fingerprint.
    """
    if not data.train_on_feedback:
        if data.feedback_sources:
            log.info(
                "data.feedback_sources: %d source(s) not read (data.train_on_feedback is false)",
                len(data.feedback_sources),
            )
        return []
    plans = []
    for i, entry in enumerate(data.feedback_sources):
        setting = f"{FEEDBACK_SETTING}[{i}]"
        path = Path(entry.path).expanduser().resolve()
        if not path.exists():
            raise MetadataFileNotFound(
                f"{setting}.path does not exist: {path}; write it with `melanoma-ml outcomes export --out "
                f"{path}`, fix the path, or remove the entry ({FEEDBACK_ENV_HINT} or data.feedback_sources)"
            )
        name = feedback_source_name(i, entry)
        plans.append(_plan(setting, path, entry.layout, entry.image_dir, name, True, entry.require_labels))
    return plans


def _plan(
    setting: str,
    path: Path,
    layout: str,
    image_dir: str | None,
    name: str | None,
    is_external: bool,
    require_labels: bool | Literal["auto"],
) -> _Plan:
    """Detect (or check) the layout of one source before any image is read."""
    with _named(setting, path):
        match = detect_layout(path) if layout == "auto" else layout_files(path, layout)
    if require_labels == "auto":
        # ISIC 2019 metadata without its ground truth only adds values to images another source labels.
        require_labels = not (match.name == "isic2019" and "ground_truth" not in match.files)
    return _Plan(
        setting=setting,
        path=path,
        layout=layout,
        match=match,
        image_dir=Path(image_dir).expanduser().resolve() if image_dir else None,
        name=name or SOURCE_NAMES[match.name],
        is_external=is_external,
        require_labels=bool(require_labels),
    )


def _load(plan: _Plan, age_out_of_range: str) -> CleaningResult:
    """``load_dataset`` with the config entry named in any error, and the detected layout logged."""
    with _named(plan.setting, plan.path):
        result = load_dataset(
            plan.path,
            layout=plan.layout,
            image_dir=plan.image_dir,
            source=plan.name,
            is_external=plan.is_external,
            require_labels=plan.require_labels,
            age_out_of_range=age_out_of_range,
        )
    log.info(
        "%s %s: layout %s (%s); %d clean rows, %d quarantined",
        plan.setting,
        plan.path,
        result.summary["layout"],
        result.summary["layout_reason"],
        result.summary["rows_clean"],
        result.summary["rows_quarantined"],
    )
    return result


@contextmanager
def _named(setting: str, path: Path) -> Iterator[None]:
    """Re-raise metadata errors with the config entry they come from in front of the message."""
    try:
        yield
    except MetadataFileNotFound as err:
        raise MetadataFileNotFound(f"{setting} ({path}): {err}") from err
    except MetadataError as err:
        raise MetadataError(f"{setting} ({path}): {err}") from err


def _describe(plan: _Plan, result: CleaningResult) -> dict[str, Any]:
    summary = result.summary
    return {
        "setting": plan.setting,
        "source": plan.name,
        "path": str(plan.path),
        "external": plan.is_external,
        "layout": summary["layout"],
        "layout_reason": summary["layout_reason"],
        "labels_required": plan.require_labels,
        "image_dirs": summary["image_dirs"],
        "rows_in": summary["rows_in"],
        "rows_clean": summary["rows_clean"],
        "rows_quarantined": summary["rows_quarantined"],
        "melanoma": summary["melanoma"],
    }


def _require_distinct_names(plans: Sequence[_Plan]) -> None:
    seen: dict[str, str] = {}
    for plan in plans:
        if plan.name in seen:
            raise MetadataError(
                f"{seen[plan.name]} and {plan.setting} are both named {plan.name!r} (the source column must "
                f"tell them apart); set {plan.setting}.name to another name, e.g. {plan.name + '-2'!r}"
            )
        seen[plan.name] = plan.setting


__all__ = ["feedback_source_name", "load_configured_data"]
