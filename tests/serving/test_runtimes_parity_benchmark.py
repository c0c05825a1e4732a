"""benchmarks/runtime_parity.py end to end on a tiny artifact root: a trained fold, its cache and folds table.

The benchmark runs through its command line, as a user runs it; the test reads the table it prints and the
CSV it writes (``--csv``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from melanoma_ml import pipeline
from melanoma_ml.config import RUNTIME_PRECISIONS, load_config
from melanoma_ml.serving.runtimes import REFERENCE, RuntimeChoice

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "runtime_parity.py"
BACKBONE = "test_efficientnet"


def run_benchmark(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=900, cwd=SCRIPT.parent
    )


def offered_runtimes() -> list[str]:
    """The rows the benchmark must print: the reference, then every offered pair (openvino if installed)."""
    try:
        import openvino  # noqa: F401

        with_openvino = True
    except ImportError:
        with_openvino = False
    offered = [
        str(RuntimeChoice(runtime, precision))
        for runtime, precisions in RUNTIME_PRECISIONS.items()
        if runtime != "openvino" or with_openvino
        for precision in precisions
        if RuntimeChoice(runtime, precision) != REFERENCE
    ]
    return ["torch fp32", *offered]


@pytest.fixture(scope="module")
def artifact_root(tmp_path_factory) -> Path:
    """What a finished tiny run leaves: synthetic data, folds table, image cache and fold 0's checkpoint."""
    root = tmp_path_factory.mktemp("artifacts")
    config = load_config("tiny", {"artifact_root": str(root), "training": {"epochs": 1}})
    clean = pipeline.clean_source(config, pipeline.prepare_source(config)).clean
    folds = pipeline.make_folds(config, clean)
    pipeline.train_one(config, BACKBONE, 0, folds, pipeline.build_cache(config, folds))
    return root


@pytest.mark.slow
def test_it_scores_the_folds_validation_rows_with_every_runtime(artifact_root, tmp_path):
    csv = tmp_path / "parity.csv"
    done = run_benchmark(
        *("--artifact-root", str(artifact_root), "--backbone", BACKBONE, "--threads", "1"),
        *("--n-bootstrap", "50", "--timing-repeats", "1", "--calibration-images", "8", "--csv", str(csv)),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    reproduce = float(out.split("stored OOF probabilities: max |diff| ")[1].split()[0])
    assert reproduce < 1e-4  # eager fp32 on the plain view is the model that wrote the OOF table
    assert "load average before:" in out and "load average after:" in out

    frame = pd.read_csv(csv, keep_default_na=False)
    expected = offered_runtimes()
    assert frame["runtime"].tolist() == expected and (frame["note"] == "").all()
    reference = frame.iloc[0]
    assert reference["max_view_gap"] == 0 and reference["auc_diff"] == 0 and reference["default_ok"]
    fp32 = frame.set_index("runtime").loc["onnxruntime fp32"]
    assert fp32["max_view_gap"] < 1e-4 and abs(fp32["auc_diff"]) < 1e-3
    assert fp32["auc_eager"] == reference["auc"]  # one pooled eager AUC, compared with every runtime
    assert (frame["ms_per_image"] > 0).all() and frame["diff_lo"].le(frame["diff_hi"]).all()
    assert "default_ok: CI within +-0.002" in out and all(name in out for name in expected)


def test_an_artifact_root_without_a_run_is_refused_with_advice(tmp_path):
    done = run_benchmark("--artifact-root", str(tmp_path))
    assert done.returncode != 0
    assert "artifact root of a finished run" in done.stderr
