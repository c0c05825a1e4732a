"""benchmarks/runtime_parity.py end to end on a tiny artifact root: a trained fold, its cache and folds table."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from melanoma_ml import pipeline
from melanoma_ml.config import load_config

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "runtime_parity.py"
BACKBONE = "test_efficientnet"


@pytest.fixture(scope="module")
def benchmark() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("runtime_parity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


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
def test_it_scores_the_folds_validation_rows_with_every_runtime(benchmark, artifact_root, capsys):
    argv = ["--artifact-root", str(artifact_root), "--backbone", BACKBONE, "--threads", "1"]
    args = benchmark.parse_args(
        [*argv, "--n-bootstrap", "50", "--timing-repeats", "1", "--calibration-images", "8"]
    )
    frame = benchmark.run(args)
    out = capsys.readouterr().out
    reproduce = float(out.split("stored OOF probabilities: max |diff| ")[1].split()[0])
    assert reproduce < 1e-4  # eager fp32 on the plain view is the model that wrote the OOF table

    expected = ["torch fp32"] + [str(c) for c in benchmark.offered_choices()]
    assert frame["runtime"].tolist() == expected and (frame["note"] == "").all()
    reference = frame.iloc[0]
    assert reference["max_view_gap"] == 0 and reference["auc_diff"] == 0 and reference["default_ok"]
    fp32 = frame.set_index("runtime").loc["onnxruntime fp32"]
    assert fp32["max_view_gap"] < 1e-4 and abs(fp32["auc_diff"]) < 1e-3
    assert fp32["auc_eager"] == reference["auc"]  # one pooled eager AUC, compared with every runtime
    assert (frame["ms_per_image"] > 0).all() and frame["diff_lo"].le(frame["diff_hi"]).all()

    benchmark.print_table(frame, args)
    table = capsys.readouterr().out
    assert "default_ok: CI within +-0.002" in table and all(name in table for name in expected)


def test_an_artifact_root_without_a_run_is_refused_with_advice(benchmark, tmp_path):
    with pytest.raises(SystemExit, match="artifact root of a finished run"):
        benchmark.main(["--artifact-root", str(tmp_path)])
