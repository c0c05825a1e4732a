"""The prediction log through the app's ``/predict`` handler and ``melanoma-ml predict``: each scored image is
one record whose case id the user sees (the answer and page, the CSV's ``case_id`` column), with the served
numbers; ``serving.prediction_log: false`` and ``predict --no-log`` write nothing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from app_helpers import register_tiny
from PIL import Image

from melanoma_ml.cli import EXIT_OK, main
from melanoma_ml.config import ServingConfig
from melanoma_ml.monitoring.prediction_log import CASE_ID_PATTERN, PredictionLog, read_predictions
from melanoma_ml.serving.app import run_prediction
from melanoma_ml.serving.registry import ModelRegistry
from melanoma_ml.serving.service import ModelService

SIZE = 32


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    root = tmp_path / "artifacts"
    register_tiny(ModelRegistry(root / "registry"), seed=1, size=SIZE)  # v0001, served
    return root


def images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = [folder / f"ISIC_{i}.jpg" for i in range(n)]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(path)
    return paths


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_app_records_each_answer_and_shows_its_case_id(root: Path, tmp_path: Path) -> None:
    service = ModelService(ModelRegistry(root / "registry"), ServingConfig(tta=False))
    upload = images(tmp_path / "uploads", 1)[0]
    log = PredictionLog(root)

    answer, _view, _overlay, page = run_prediction(
        service, str(upload), "45", "female", None, False, "none", None, prediction_log=log
    )

    assert CASE_ID_PATTERN.fullmatch(answer["case_id"]) and answer["case_id"] in page
    (row,) = read_predictions(root).itertuples(index=False)
    assert row.case_id == answer["case_id"] and row.source == "app"
    assert (row.model_version, row.decision) == ("v0001", answer["decision"])
    assert row.probability == answer["probability"] and row.threshold == answer["threshold"]
    assert (row.age, row.sex, row.anatom_site) == (45.0, "female", None)
    assert row.image_sha256 == sha256(upload) and row.image_path is None
    assert row.latency_ms > 0
    unlogged, *_, unlogged_page = run_prediction(service, str(upload), "", None, None, False, "none", None)
    assert unlogged["case_id"] is None and "Case id" not in unlogged_page
    assert len(read_predictions(root)) == 1


def test_predict_records_each_scored_row_and_writes_its_case_id(root: Path, tmp_path: Path, capsys) -> None:
    paths = images(tmp_path / "batch", 3)
    (tmp_path / "batch" / "broken.jpg").write_text("not a jpeg")
    out = tmp_path / "scores.csv"

    assert main(["predict", str(tmp_path / "batch"), "--out", str(out), "--artifact-root", str(root),
                 "--profile", "tiny"]) == EXIT_OK  # fmt: skip

    scores = pd.read_csv(out, keep_default_na=False).set_index("image_name")
    assert scores.loc["broken", "case_id"] == ""
    scored = scores.drop(index="broken")
    assert all(CASE_ID_PATTERN.fullmatch(c) for c in scored["case_id"])
    logged = read_predictions(root).set_index("case_id").loc[scored["case_id"]]
    assert (logged["source"] == "predict").all() and (logged["model_version"] == "v0001").all()
    assert np.allclose(logged["probability"], scored["target"].astype(float))
    assert logged["decision"].tolist() == scored["decision"].tolist()
    assert logged["image_sha256"].tolist() == [sha256(p) for p in paths]
    assert "prediction log: recorded 3 image(s)" in capsys.readouterr().err


@pytest.mark.parametrize("off", [["--set", "serving.prediction_log=false"], ["--no-log"]])
def test_predict_with_the_log_off_writes_no_record(root: Path, tmp_path: Path, off: list[str]) -> None:
    images(tmp_path / "batch", 2)
    out = tmp_path / "scores.csv"
    args = ["predict", str(tmp_path / "batch"), "--out", str(out), "--artifact-root", str(root)]

    assert main([*args, "--profile", "tiny", *off]) == EXIT_OK

    assert not (root / "monitoring").exists()
    assert (pd.read_csv(out, keep_default_na=False)["case_id"] == "").all()
