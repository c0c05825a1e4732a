"""The feedback source: labelled cases with kept images exported as an ISIC 2020-layout folder
(``monitoring.feedback``), read as ``data.feedback_sources`` only when ``data.train_on_feedback`` is set, and
then training-only (fold -1, never validated on), grouped by patient where the outcome names one."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from outcome_helpers import log_cases, png_bytes

from melanoma_ml import schema
from melanoma_ml.cli import main
from melanoma_ml.config import DataConfig, SyntheticConfig
from melanoma_ml.errors import InputStateError, InputValueError
from melanoma_ml.folds import EXTERNAL_FOLD, assign_folds, split_masks
from melanoma_ml.metadata.fingerprint import source_fingerprint
from melanoma_ml.metadata.io import MetadataFileNotFound
from melanoma_ml.metadata.layouts import detect_layout
from melanoma_ml.metadata.sources import load_configured_data
from melanoma_ml.monitoring.feedback import LINEAGE_FILE, export_feedback
from melanoma_ml.monitoring.outcomes import record_outcome
from melanoma_ml.monitoring.prediction_log import PredictionLog, read_predictions
from melanoma_ml.synthetic import generate_synthetic_dataset


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    return tmp_path / "artifacts"


def labelled_root(root: Path, *, n: int = 6) -> list[str]:
    """``n`` kept cases; outcomes for all but the last: alternating melanoma/benign, cases 0 and 1 of
    patient P-1, case 2 in conflict."""
    cases = log_cases(root, n)
    for i, case in enumerate(cases[:-1]):
        record_outcome(
            root,
            case,
            "melanoma" if i % 2 else "benign",
            source="app",
            patient_id="P-1" if i < 2 else None,
        )
    record_outcome(root, cases[2], "melanoma", source="import")  # case 2 was benign: conflict
    return cases


def test_export_writes_an_isic2020_folder_owner_only_with_lineage(tmp_path, root) -> None:
    cases = labelled_root(root)
    out = tmp_path / "feedback"
    export = export_feedback(root, out)
    assert export.cases == 4 and export.melanoma == 2
    assert export.left_out["cases with conflicting outcomes"] == 1
    assert detect_layout(out).name == "isic2020"
    table = pd.read_csv(out / "metadata.csv")
    expected = sorted(cases[i] for i in (0, 1, 3, 4))
    assert list(table[schema.IMAGE]) == expected and list(table["case_id"]) == expected
    by_case = table.set_index("case_id")
    assert list(by_case.loc[[cases[0], cases[1]], schema.PATIENT]) == ["P-1", "P-1"]
    assert by_case.loc[cases[3], schema.PATIENT] == cases[3]  # no patient known: the case is its own group
    assert by_case.loc[cases[1], schema.TARGET] == 1 and by_case.loc[cases[0], schema.TARGET] == 0
    assert set(table[schema.SOURCE]) == {"feedback"} and set(table["model_version"]) == {"v0001"}
    assert by_case.loc[cases[0], schema.AGE] == 30.0 and by_case.loc[cases[0], schema.SEX] == "female"
    for name in expected:
        image = out / "images" / f"{name}.png"
        assert image.read_bytes() == png_bytes(cases.index(name))
        assert stat.S_IMODE(image.stat().st_mode) == 0o600
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert stat.S_IMODE((out / "metadata.csv").stat().st_mode) == 0o600
    lineage = json.loads((out / LINEAGE_FILE).read_text())
    assert lineage["cases"] == 4 and lineage["model_versions"] == {"v0001": 4}
    assert len(lineage["outcomes_sha256"]) == 64 and lineage["patients_known"] == 2


def test_cases_without_kept_images_are_counted_and_nothing_to_export_is_an_error(tmp_path, root) -> None:
    cases = log_cases(root, 2, keep_images=False)
    record_outcome(root, cases[0], "benign", source="app")
    with pytest.raises(InputStateError, match="serving.keep_images"):
        export_feedback(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    kept = log_cases(root, 1, seed=5)
    record_outcome(root, kept[0], "melanoma", source="app")
    export = export_feedback(root, tmp_path / "out")
    assert export.cases == 1
    assert export.left_out["labelled cases without a kept image (serving.keep_images was off)"] == 1


def test_a_kept_image_retention_deleted_is_counted(tmp_path, root) -> None:
    cases = labelled_root(root)
    scored = read_predictions(root).set_index("case_id")
    Path(scored.loc[cases[0], "image_path"]).unlink()
    export = export_feedback(root, tmp_path / "out")
    assert export.cases == 3
    assert export.left_out["kept images already deleted (serving.prediction_log_retention_days)"] == 1


def test_an_image_kept_under_an_unread_extension_is_exported_as_png(tmp_path, root) -> None:
    upload = tmp_path / "upload.xyz"
    upload.write_bytes(png_bytes(9))
    case = PredictionLog(root, keep_images=True).append(
        source="app",
        model_version="v1",
        probability=0.2,
        decision="negative",
        positive=False,
        threshold=0.5,
        image=upload,
    )
    record_outcome(root, case, "benign", source="app")
    export_feedback(root, tmp_path / "out")
    (image,) = (tmp_path / "out" / "images").iterdir()
    assert image.name == f"{case}.png"
    from PIL import Image

    with Image.open(image) as decoded, Image.open(upload) as original:
        assert np.array_equal(np.asarray(decoded.convert("RGB")), np.asarray(original.convert("RGB")))


def test_an_earlier_export_is_replaced_and_a_foreign_folder_is_refused(tmp_path, root) -> None:
    labelled_root(root)
    out = tmp_path / "out"
    export_feedback(root, out)
    more = log_cases(root, 1, seed=7)
    record_outcome(root, more[0], "melanoma", source="app")
    assert export_feedback(root, out).cases == 5
    assert len(list((out / "images").iterdir())) == 5
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(InputValueError, match="not an earlier feedback export"):
        export_feedback(root, foreign)
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_cli_export_prints_where_and_how_to_train_on_it(tmp_path, root, capsys) -> None:
    labelled_root(root)
    out = tmp_path / "fb"
    code = main(["outcomes", "export", "--out", str(out), "--artifact-root", str(root), "--profile", "tiny"])
    assert code == 0
    text = capsys.readouterr().out
    assert "exported 4 labelled cases (2 melanoma)" in text and "data.train_on_feedback: true" in text
    assert main(["outcomes", "status", "--artifact-root", str(root), "--profile", "tiny"]) == 0
    assert "1 in conflict" in capsys.readouterr().out


# ---------------------------------------------------------------------------------- as a data source
@pytest.fixture(scope="module")
def primary(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("primary") / "synthetic"
    config = SyntheticConfig(
        n_patients=16, images_per_patient=(1, 2), melanoma_rate=0.4, image_size=32, seed=3
    )
    return Path(generate_synthetic_dataset(folder, config).root)


def feedback_data(primary: Path, feedback: Path, train: bool) -> DataConfig:
    return DataConfig(
        source_dir=str(primary),
        feedback_sources=[{"path": str(feedback)}],
        train_on_feedback=train,
        test_fraction=0,
        n_folds=2,
    )


def test_feedback_is_left_out_of_data_folds_and_fingerprint_unless_trained_on(
    tmp_path, root, primary
) -> None:
    labelled_root(root)
    feedback = tmp_path / "feedback"
    export_feedback(root, feedback)
    data = feedback_data(primary, feedback, train=False)
    plain = DataConfig(source_dir=str(primary), test_fraction=0, n_folds=2)
    result = load_configured_data(data)
    assert "feedback" not in set(result.clean[schema.SOURCE])
    assert len(result.clean) == len(load_configured_data(plain).clean)
    folds = assign_folds(result.clean, 2, 0)
    assert "feedback" not in set(folds[schema.SOURCE])
    before = source_fingerprint(data)
    assert before == source_fingerprint(plain)
    more = log_cases(root, 1, seed=11)
    record_outcome(root, more[0], "benign", source="app")
    export_feedback(root, feedback)
    assert source_fingerprint(data) == before  # a new export does not look like new training data


def test_trained_on_feedback_is_cleaned_grouped_by_patient_and_never_validated_on(
    tmp_path, root, primary
) -> None:
    cases = labelled_root(root)
    feedback = tmp_path / "feedback"
    export_feedback(root, feedback)
    data = feedback_data(primary, feedback, train=True)
    result = load_configured_data(data)
    rows = result.clean[result.clean[schema.SOURCE] == "feedback"]
    assert sorted(rows[schema.IMAGE]) == sorted(cases[i] for i in (0, 1, 3, 4))
    assert rows[schema.IS_EXTERNAL].all()
    assert (rows[schema.IMAGE_SHA256].str.len() == 64).all()  # hashed like any source
    assert any(s["setting"] == "data.feedback_sources[0]" for s in result.summary["data_sources"])
    folds = assign_folds(result.clean, 2, 0).set_index(schema.IMAGE)
    assert folds.loc[cases[0], schema.GROUP] == folds.loc[cases[1], schema.GROUP] == "patient:P-1"
    assert folds.loc[cases[3], schema.GROUP] == f"patient:{cases[3]}"
    assert (folds.loc[rows[schema.IMAGE], schema.FOLD] == EXTERNAL_FOLD).all()
    table = folds.reset_index()
    is_feedback = (table[schema.SOURCE] == "feedback").to_numpy()
    for fold in (0, 1):
        train, valid = split_masks(table, fold)
        assert train[is_feedback].all() and not valid[is_feedback].any()
    before = source_fingerprint(data)
    more = log_cases(root, 1, seed=11)
    record_outcome(root, more[0], "melanoma", source="app")
    export_feedback(root, feedback)
    assert source_fingerprint(data) != before


def test_feedback_rows_go_through_the_same_cleaning_and_quarantine(tmp_path, root, primary) -> None:
    labelled_root(root)
    feedback = tmp_path / "feedback"
    export_feedback(root, feedback)
    table = pd.read_csv(feedback / "metadata.csv")
    table.loc[0, schema.TARGET] = 7  # a hand edit the cleaning must catch
    table.to_csv(feedback / "metadata.csv", index=False)
    (feedback / "images" / f"{table.loc[1, schema.IMAGE]}.png").unlink()
    result = load_configured_data(feedback_data(primary, feedback, train=True))
    quarantined = result.quarantine[result.quarantine["source"] == "feedback"].set_index(schema.IMAGE)
    assert quarantined.loc[table.loc[0, schema.IMAGE], "check"] == "invalid_target"
    assert quarantined.loc[table.loc[1, schema.IMAGE], "check"] == "image_missing"
    assert (result.clean[schema.SOURCE] == "feedback").sum() == 2


def test_a_missing_feedback_folder_names_the_setting_and_the_export_command(tmp_path, primary) -> None:
    data = feedback_data(primary, tmp_path / "nope", train=True)
    with pytest.raises(
        MetadataFileNotFound, match=r"data.feedback_sources\[0\].path does not exist.*outcomes export"
    ):
        load_configured_data(data)
    with pytest.raises(FileNotFoundError, match=r"data.feedback_sources\[0\]"):
        source_fingerprint(data)
    load_configured_data(feedback_data(primary, tmp_path / "nope", train=False))  # not read: no error


@pytest.mark.parametrize("train", [False, True])
def test_the_pipeline_steps_read_feedback_only_when_told_to(tmp_path, root, primary, train) -> None:
    from melanoma_ml import pipeline
    from melanoma_ml.config import load_config

    labelled_root(root)
    feedback = tmp_path / "feedback"
    export_feedback(root, feedback)
    config = load_config(
        "tiny",
        {
            "artifact_root": str(tmp_path / "run"),
            "data": {
                "source_dir": str(primary),
                "feedback_sources": [{"path": str(feedback)}],
                "train_on_feedback": train,
                "test_fraction": 0,
                "n_folds": 2,
            },
        },
    )
    pipeline.validate_config(config)
    source = pipeline.prepare_source(config)
    cleaning = pipeline.clean_source(config, source)
    folds = pipeline.make_folds(config, cleaning.clean)
    on_disk = pd.read_parquet(tmp_path / "run" / "tables" / "folds.parquet")
    feedback_rows = on_disk[on_disk[schema.SOURCE] == "feedback"]
    assert len(feedback_rows) == (4 if train else 0) == (folds[schema.SOURCE] == "feedback").sum()
    assert (feedback_rows[schema.FOLD] == EXTERNAL_FOLD).all()
