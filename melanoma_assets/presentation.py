"""Turn step results into Dagster metadata: markdown tables and PNGs embedded in markdown."""

from __future__ import annotations

import base64
from pathlib import Path

import dagster as dg
import pandas as pd


def table_md(frame: pd.DataFrame, max_rows: int = 20, floatfmt: str = ".3f") -> dg.MetadataValue:
    """A markdown preview of the first ``max_rows`` rows (the row count is stated when truncated)."""
    shown = frame.head(max_rows)
    text = shown.to_markdown(index=False, floatfmt=floatfmt)
    if len(frame) > max_rows:
        text += f"\n\n_{max_rows} of {len(frame)} rows shown._"
    return dg.MetadataValue.md(text)


def png_md(png: bytes | Path, title: str) -> str:
    """Markdown embedding a PNG (bytes or file) as a data URI, so the UI shows it without a file server."""
    data = png.read_bytes() if isinstance(png, Path) else png
    return f"**{title}**\n\n![{title}](data:image/png;base64,{base64.b64encode(data).decode('ascii')})"


def figures_md(figures: dict[str, Path]) -> dg.MetadataValue:
    return dg.MetadataValue.md("\n\n".join(png_md(Path(p), name) for name, p in figures.items()))


def history_png(history: pd.DataFrame, title: str) -> bytes:
    """Loss and AUROC per epoch, one PNG: the library's ``plot_training_curves`` (no pyplot state touched)."""
    from melanoma_ml.evaluation.plots import plot_training_curves  # matplotlib: load only when used

    return plot_training_curves(history, title=title)
