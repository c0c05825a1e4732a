"""evaluate_predictions and EvaluationReport: metrics with CIs, JSON round trip, Markdown, saving."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from melanoma_ml import schema
from melanoma_ml.config import EvaluationConfig
from melanoma_ml.evaluation import REQUIRED_METRICS, EvaluationReport, evaluate_predictions
from melanoma_ml.evaluation.metrics import THRESHOLD_METRICS, roc_auc

CONFIG = EvaluationConfig(n_bootstrap=100, bootstrap_seed=1)


def predictions(n_patients: int = 100, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_patients), 3)
    n = groups.size
    y = (rng.random(n) < 0.25).astype(int)
    return pd.DataFrame(
        {
            "image_name": [f"ISIC_{i:05d}" for i in range(n)],
            "group_id": [f"IP_{g}" for g in groups],
            "target": y,
            "prob": 1 / (1 + np.exp(-(1.5 * y + rng.normal(size=n) - 1))),
            "fold": groups % 3,
            schema.SEX: rng.choice(["female", "male"], n),
            schema.AGE: rng.choice([30.0, 50.0, 70.0], n),
            schema.SITE: rng.choice(["torso", "head/neck"], n),
            "backbone": "test_resnet",
        }
    )


@pytest.fixture(scope="module")
def report() -> EvaluationReport:
    return evaluate_predictions(predictions(), CONFIG)


def test_every_required_metric_has_a_value_inside_its_ci(report):
    assert list(report.metrics["metric"]) == list(REQUIRED_METRICS)
    assert report.incomplete_metrics() == []
    for name in REQUIRED_METRICS:
        estimate = report.metric(name)
        assert estimate.lo <= estimate.value <= estimate.hi, name
        assert estimate.level == CONFIG.ci_level
    assert report.metric("auc").value == pytest.approx(
        roc_auc(*(predictions()[c].to_numpy() for c in ("target", "prob")))
    )


def test_threshold_reaches_the_target_and_has_a_ci(report):
    t = report.threshold
    assert t.target_sensitivity == CONFIG.target_sensitivity
    assert t.lo <= t.value <= t.hi and t.lo < t.hi
    assert report.metric("sensitivity").value >= CONFIG.target_sensitivity


def test_operating_points_table_matches_the_headline_metrics(report):
    table = report.metrics_at_threshold
    assert sorted(set(table["operating_point"])) == ["fixed", "tuned"]
    assert set(table.loc[table["operating_point"] == "fixed", "threshold"]) == {CONFIG.fixed_threshold}
    tuned = table[table["operating_point"] == "tuned"].set_index("metric")
    for name in THRESHOLD_METRICS:
        estimate = report.metric(name)
        assert tuned.loc[name, ["value", "lo", "hi"]].tolist() == pytest.approx(
            [estimate.value, estimate.lo, estimate.hi]
        )


def test_sizes_name_and_subgroups(report):
    oof = predictions()
    assert (report.n_images, report.n_groups, report.n_melanoma) == (len(oof), 100, int(oof["target"].sum()))
    assert report.n_bootstrap == 100 and report.name == "test_resnet"
    assert set(report.subgroups["variable"]) == {"sex", "age", "site"}
    assert report.roc_band.shape[0] == 101
    assert (report.roc_band["tpr_lo"] <= report.roc_band["tpr_hi"]).all()


def test_same_seed_same_report_and_another_seed_other_cis():
    a = evaluate_predictions(predictions(), CONFIG)
    b = evaluate_predictions(predictions(), CONFIG)
    c = evaluate_predictions(predictions(), CONFIG.model_copy(update={"bootstrap_seed": 2}))
    assert a.to_dict() == b.to_dict()
    assert a.metric("auc").value == c.metric("auc").value and a.metric("auc").lo != c.metric("auc").lo


def test_row_order_does_not_change_the_report(report):
    shuffled = predictions().sample(frac=1, random_state=5)
    again = evaluate_predictions(shuffled, CONFIG)
    assert again.flat_metrics() == pytest.approx(report.flat_metrics(), rel=1e-12)  # summation order only
    pd.testing.assert_frame_equal(again.subgroups, report.subgroups)


def test_json_round_trip_is_strict_json_and_lossless(report):
    data = report.to_dict()
    text = json.dumps(data, allow_nan=False)  # NaN would make invalid JSON
    again = EvaluationReport.from_dict(json.loads(text))
    assert again.to_dict() == data
    pd.testing.assert_frame_equal(again.metrics, report.metrics)
    pd.testing.assert_frame_equal(again.subgroups, report.subgroups, check_dtype=False)
    pd.testing.assert_frame_equal(again.metrics_at_threshold, report.metrics_at_threshold, check_dtype=False)
    assert again.threshold == report.threshold
    assert data["metrics"]["auc"].keys() == {"value", "lo", "hi", "level"}
    assert data["metrics"]["auc"]["level"] == data["threshold"]["level"] == CONFIG.ci_level


def test_a_report_stored_before_levels_were_stored_reads_the_reports_level(report):
    data = report.to_dict()
    for entry in [*data["metrics"].values(), data["threshold"]]:
        del entry["level"]
    again = EvaluationReport.from_dict({**data, "ci_level": 0.9})
    assert again.metric("auc").level == again.threshold.level == 0.9
    assert again.metric("auc").value == report.metric("auc").value


def test_nan_values_survive_the_round_trip_as_null():
    oof = predictions()
    oof[schema.SEX] = "female"  # male: n=0, NaN everywhere
    report = evaluate_predictions(oof, CONFIG)
    data = report.to_dict()
    male = next(r for r in data["subgroups"] if r["level"] == "male")
    assert male["auc"] is None
    again = EvaluationReport.from_dict(json.loads(json.dumps(data, allow_nan=False)))
    assert math.isnan(again.subgroups.query("level == 'male'")["auc"].iloc[0])


def test_from_dict_rejects_something_else():
    with pytest.raises(ValueError, match="not an evaluation report"):
        EvaluationReport.from_dict({"format": "other"})


def test_incomplete_metrics_flags_a_missing_ci(report):
    broken = EvaluationReport.from_dict(report.to_dict())
    broken.metrics.loc[broken.metrics["metric"] == "pauc", "lo"] = np.nan
    assert broken.incomplete_metrics() == ["pauc"]


def test_flat_metrics_for_manifests(report):
    flat = report.flat_metrics()
    assert {"auc", "auc_lo", "auc_hi", "threshold", "threshold_lo", "threshold_hi"} <= flat.keys()
    assert len(flat) == 3 * len(REQUIRED_METRICS) + 3


def test_markdown_lists_metrics_and_subgroups(report):
    text = report.to_markdown()
    assert "| AUC |" in text and "| pAUC (TPR >= 80%) |" in text
    assert "#### Subgroups" in text and "| sex | female |" in text
    assert "data:image" not in text
    auc = report.metric("auc")
    assert f"| AUC | {auc.value:.3f} [{auc.lo:.3f}, {auc.hi:.3f}] |" in text
    assert "95% CI" in text


def test_markdown_names_the_reports_own_ci_level():
    text = evaluate_predictions(predictions(), CONFIG.model_copy(update={"ci_level": 0.9})).to_markdown()
    assert "90% CI" in text and "95%" not in text


def test_out_dir_writes_figures_and_report_json_that_loads_back(tmp_path):
    report = evaluate_predictions(predictions(), CONFIG, tmp_path / "reports" / "test_resnet")
    folder = tmp_path / "reports" / "test_resnet"
    assert (folder / "report.json").is_file()
    assert sorted(report.figures) == ["calibration", "confusion_matrix", "precision_recall", "roc"]
    assert all((folder / "figures" / f"{name}.png").is_file() for name in report.figures)
    assert EvaluationReport.load(folder).to_dict() == report.to_dict()
    embedded = report.to_markdown(embed_figures=True)
    assert embedded.count("](data:image/png;base64,") == 4
    assert not [p for p in folder.rglob("*") if p.name.startswith(".")]  # no temp files left behind


def test_load_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="report.json"):
        EvaluationReport.load(tmp_path)


def test_single_class_predictions_fail_clearly():
    oof = predictions()
    oof["target"] = 0
    with pytest.raises(ValueError, match=r"AUC needs both melanoma and benign cases .*got only 300 benign"):
        evaluate_predictions(oof, CONFIG)
