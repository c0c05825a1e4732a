"""Evaluation figures: each is a valid PNG, written atomically, quickly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd
from PIL import Image

from melanoma_ml.config import EvaluationConfig
from melanoma_ml.evaluation import evaluate_predictions, plot_all
from melanoma_ml.evaluation.plots import FIGURE_NAMES

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def predictions(n: int = 240, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    return pd.DataFrame(
        {
            "image_name": [f"ISIC_{i:05d}" for i in range(n)],
            "group_id": [f"IP_{i // 2}" for i in range(n)],
            "target": y,
            "prob": 1 / (1 + np.exp(-(2 * y + rng.normal(size=n) - 1))),
        }
    )


def test_plot_all_writes_every_figure_as_a_valid_png(tmp_path, record_property):
    oof = predictions()
    report = evaluate_predictions(oof, EvaluationConfig(n_bootstrap=50), name="demo")
    plot_all(oof, report, tmp_path / "warmup")  # first call pays matplotlib's one-off font setup
    start = time.perf_counter()
    figures = plot_all(oof, report, tmp_path / "figures")
    per_figure = (time.perf_counter() - start) / len(figures)
    record_property("seconds_per_figure", round(per_figure, 3))
    print(f"\n{per_figure:.3f} s per figure")
    assert tuple(figures) == FIGURE_NAMES
    for name, path in figures.items():
        assert path == tmp_path / "figures" / f"{name}.png"
        assert path.read_bytes()[:8] == PNG_MAGIC
        with Image.open(path) as image:
            image.verify()
            assert min(image.size) >= 300
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == sorted(
        f"{n}.png" for n in FIGURE_NAMES
    )


def test_plots_leave_the_matplotlib_backend_and_pyplot_alone(tmp_path):
    """Importing and drawing keeps the backend the process chose (here ``svg``) and opens no pyplot figure."""
    code = (
        "import json, sys, matplotlib\n"
        "before = matplotlib.get_backend()\n"
        "import melanoma_ml.evaluation.plots as plots\n"
        "after_import = matplotlib.get_backend()\n"
        "import io, pandas as pd\n"
        "from melanoma_ml.config import EvaluationConfig\n"
        "from melanoma_ml.evaluation import evaluate_predictions\n"
        f"oof = pd.read_json(io.StringIO({predictions().to_json()!r}))\n"
        "plots.plot_all(oof, evaluate_predictions(oof, EvaluationConfig(n_bootstrap=50)), sys.argv[1])\n"
        "plots.plot_training_curves(pd.DataFrame({'epoch': [1, 2], 'train/loss': [0.7, 0.5]}))\n"
        "pyplot = sys.modules.get('matplotlib.pyplot')\n"
        "print(json.dumps([before, after_import, matplotlib.get_backend(), pyplot.get_fignums() if pyplot else []]))\n"
    )
    env = {**os.environ, "MPLBACKEND": "svg"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["svg", "svg", "svg", []]
