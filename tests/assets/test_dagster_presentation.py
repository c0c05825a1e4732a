"""Metadata helpers: the training-curve PNG comes from the library plotter without touching pyplot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd

from melanoma_assets.presentation import history_png, png_md

HISTORY = {"epoch": [1, 2], "train/loss": [0.7, 0.5], "val/loss": [0.6, 0.55], "val/auroc": [0.6, 0.7]}


def test_history_png_is_the_library_plot_embedded_as_markdown() -> None:
    from melanoma_ml.evaluation.plots import plot_training_curves

    history = pd.DataFrame(HISTORY)
    png = history_png(history, "resnet18 fold 0")
    assert png == plot_training_curves(history, title="resnet18 fold 0")
    assert png_md(png, "training curve").startswith("**training curve**\n\n![training curve](data:image/png;")


def test_history_png_leaves_pyplot_and_the_matplotlib_backend_alone() -> None:
    """The Dagster process keeps the backend it was given (no ``matplotlib.use``) and no pyplot figure."""
    code = (
        "import json, sys, matplotlib, pandas as pd\n"
        "from melanoma_assets.presentation import history_png\n"
        f"png = history_png(pd.DataFrame({HISTORY!r}), 'x')\n"
        "pyplot = sys.modules.get('matplotlib.pyplot')  # sklearn may import it; we must not use it\n"
        "figures = pyplot.get_fignums() if pyplot else []\n"
        "print(json.dumps([png[:4] == b'\\x89PNG', figures, matplotlib.get_backend()]))\n"
    )
    env = {**os.environ, "MPLBACKEND": "svg"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [True, [], "svg"]


def test_drawing_a_training_curve_does_not_import_torch() -> None:
    """The Dagster presentation layer draws a DataFrame: loading torch/lightning for that costs seconds."""
    code = (
        "import json, sys, pandas as pd\n"
        "from melanoma_assets.presentation import history_png\n"
        f"history_png(pd.DataFrame({HISTORY!r}), 'x')\n"
        "print(json.dumps(sorted({'torch', 'lightning', 'timm'} & set(sys.modules))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
