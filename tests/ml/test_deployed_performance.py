"""deployed_performance: each served version on the cases whose outcomes came back, beside its card."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from monitor_helpers import served_manifest
from outcome_helpers import png_bytes

from melanoma_ml.config import load_config
from melanoma_ml.evaluation.estimate import Estimate
from melanoma_ml.monitoring.deployed import (
    calibration_in_the_large,
    deployed_performance,
    feedback_cases,
    version_performance,
)
from melanoma_ml.monitoring.outcomes import labelled_cases, record_outcome
from melanoma_ml.monitoring.prediction_log import PredictionLog


@pytest.fixture
def config(tmp_path: Path):
    return load_config("tiny", {"artifact_root": str(tmp_path), "evaluation": {"n_bootstrap": 200}})


def serve(root: Path, probs, targets, *, version="v0001", threshold=0.5, keep_images=False, patients=None):
    """Log one case per probability and record its outcome; the case ids."""
    log = PredictionLog(root, keep_images=keep_images)
    ids = []
    for i, (p, t) in enumerate(zip(probs, targets, strict=True)):
        case = log.append(
            source="predict",
            model_version=version,
            probability=float(p),
            decision="positive" if p >= threshold else "negative",
            positive=bool(p >= threshold),
            threshold=threshold,
            image=png_bytes(hash((version, i)) % 10**6),
            age=50.0,
            sex="female",
            anatom_site="torso",
            latency_ms=1.0,
        )
        assert case is not None
        patient = None if patients is None else patients[i]
        record_outcome(root, case, "melanoma" if t else "benign", source="cli", patient_id=patient)
        ids.append(case)
    return ids


def test_no_labelled_case_says_so(config, tmp_path: Path) -> None:
    result = deployed_performance(config)
    assert result.versions == () and result.n_labelled == 0
    assert "no labelled case" in result.notes[0]
    assert result.table().empty


def test_too_few_cases_or_one_class_is_reported_without_a_number(config, tmp_path: Path) -> None:
    serve(tmp_path, [0.9, 0.8, 0.2, 0.1, 0.3, 0.4, 0.6], [1, 1, 0, 0, 0, 0, 0])  # 2 melanoma < 5
    serve(tmp_path, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0] * 6, version="v0002")  # one class
    result = deployed_performance(config)
    assert [v.model_version for v in result.versions] == ["v0002", "v0001"]
    for version, melanoma in (("v0001", 2), ("v0002", 0)):
        v = result.find(version)
        assert not v.measured and v.metrics == {} and v.gap == {}
        assert v.n_melanoma == melanoma
        assert "too few labelled cases" in v.notes[0] and f"{melanoma} melanoma" in v.notes[0]
    assert "not measured" in result.markdown()


def test_known_answers_at_the_served_threshold(config, tmp_path: Path) -> None:
    # 6 melanoma, 10 benign; threshold 0.5: 5 of 6 melanomas flagged, 2 of 10 benign flagged
    probs = [0.9, 0.8, 0.7, 0.6, 0.55, 0.3] + [0.6, 0.52, 0.45, 0.4, 0.3, 0.2, 0.2, 0.1, 0.1, 0.05]
    targets = [1] * 6 + [0] * 10
    serve(tmp_path, probs, targets)
    v = deployed_performance(config).find("v0001")
    assert v.measured and v.threshold == 0.5 and (v.n_cases, v.n_melanoma, v.n_patients) == (16, 6, 16)
    assert v.metrics["sensitivity"]["value"] == pytest.approx(5 / 6)
    assert v.metrics["specificity"]["value"] == pytest.approx(8 / 10)
    pos = np.array(probs)[:6]
    neg = np.array(probs)[6:]
    pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert v.metrics["auc"]["value"] == pytest.approx(pairs / 60)
    citl = v.metrics["calibration_in_the_large"]
    assert citl["value"] == pytest.approx(np.mean(probs) - 6 / 16)
    for name, entry in v.metrics.items():
        assert entry["lo"] <= entry["value"] <= entry["hi"], name
    assert v.card_set is None and any("not in the registry" in n for n in v.notes)


def test_patients_group_the_bootstrap(config) -> None:
    """Cases of one patient move together: the CI of a table whose cases come in identical pairs of one
    patient is wider than when each case is its own patient (the effective sample halves)."""
    rng = np.random.default_rng(0)
    y = rng.random(60) < 0.3
    p = np.clip(0.3 + 0.3 * y + rng.normal(0, 0.2, 60), 0.01, 0.99)
    rows = pd.DataFrame({"target": np.repeat(y, 2).astype(int), "prob": np.repeat(p, 2)})
    alone = rows.assign(group_id=[f"c{i}" for i in range(120)])
    paired = rows.assign(group_id=[f"p{i // 2}" for i in range(120)])
    wide = calibration_in_the_large(paired, config)
    narrow = calibration_in_the_large(alone, config)
    assert wide.value == pytest.approx(narrow.value)
    assert (wide.hi - wide.lo) > 1.2 * (narrow.hi - narrow.lo)


def test_card_numbers_and_the_gap(config, tmp_path: Path) -> None:
    probs = [0.9, 0.8, 0.7, 0.6, 0.55, 0.3] + [0.6, 0.52, 0.45, 0.4, 0.3, 0.2, 0.2, 0.1, 0.1, 0.05]
    targets = [1] * 6 + [0] * 10
    serve(tmp_path, probs, targets, patients=[f"P{i % 8}" for i in range(16)])
    card = {
        m: Estimate(value, value - 0.05, value + 0.05, 0.95).to_dict()
        for m, value in {
            "auc": 0.95,
            "sensitivity": 0.9,
            "specificity": 0.7,
            "brier": 0.1,
            "ece": 0.05,
        }.items()
    }
    tested = {"internal": {"metrics": card, "n_images": 100, "n_melanoma": 20}}
    manifest = served_manifest(0, 200).model_copy(update={"test_metrics": None})
    manifest = type(manifest).model_validate({**manifest.to_json(), "test_metrics": tested})
    rows = labelled_cases(tmp_path)
    v = version_performance(config, rows, manifest, "v0001")
    assert v.card_set == "internal" and v.n_patients == 8
    assert v.gap["sensitivity"] == pytest.approx(5 / 6 - 0.9)
    assert v.gap["specificity"] == pytest.approx(0.8 - 0.7)
    assert v.gap["auc"] == pytest.approx(v.metrics["auc"]["value"] - 0.95)
    table = pd.DataFrame([v.to_dict()])
    assert table.loc[0, "card_set"] == "internal"


def test_feedback_cases_are_the_labelled_kept_images(config, tmp_path: Path) -> None:
    kept = serve(tmp_path, [0.9, 0.2, 0.7], [1, 0, 1], keep_images=True, patients=["P1", None, "P1"])
    serve(tmp_path, [0.4, 0.6], [0, 1], version="v0002")  # no kept image: not trainable, not scorable
    cases = feedback_cases(config)
    assert sorted(cases["image_name"]) == sorted(kept)
    assert cases["image_path"].map(lambda p: Path(p).is_file()).all()
    by_case = cases.set_index("case_id")
    assert by_case.loc[kept[0], "group_id"] == by_case.loc[kept[2], "group_id"] == "patient:P1"
    assert by_case.loc[kept[1], "group_id"] == f"case:{kept[1]}"
    assert by_case.loc[kept[0], "target"] == 1 and by_case.loc[kept[1], "target"] == 0
    Path(by_case.loc[kept[1], "image_path"]).unlink()  # retention deleted it
    assert kept[1] not in set(feedback_cases(config)["case_id"])


def test_as_of_counts_only_the_outcomes_recorded_by_that_days_end(
    config, tmp_path: Path, monkeypatch
) -> None:
    from melanoma_ml.monitoring import outcomes

    probs = [0.9, 0.8, 0.7, 0.6, 0.55] + [0.4, 0.3, 0.2, 0.1, 0.05]
    monkeypatch.setattr(outcomes, "utc_now", lambda: "2026-12-05T23:59:59Z")
    serve(tmp_path, probs, [1] * 5 + [0] * 5)
    monkeypatch.setattr(outcomes, "utc_now", lambda: "2026-12-06T00:00:00Z")
    serve(tmp_path, probs, [1] * 5 + [0] * 5, version="v0002")
    assert deployed_performance(config, as_of="2026-12-04").n_labelled == 0
    day_one = deployed_performance(config, as_of="2026-12-05")
    assert day_one.n_labelled == 10 and [v.model_version for v in day_one.versions] == ["v0001"]
    assert day_one.find("v0001").metrics["auc"]["value"] == 1.0
    assert deployed_performance(config, as_of="2026-12-06").n_labelled == 20
    assert deployed_performance(config).n_labelled == 20
