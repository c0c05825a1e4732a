"""Batch scoring (``serving.batch`` + ``serving.batch_inputs``): what is read from a folder, a CSV or a dataset
layout; broken files reported in their row while the rest is scored; one ``score`` call per batch; TTA;
out-of-distribution columns; the prior shift."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from app_helpers import register_tiny
from ood_helpers import TRAINING_PREVALENCE, register_with_ood, smooth_images
from PIL import Image

from melanoma_ml import schema
from melanoma_ml.errors import InputFileNotFoundError, InputStateError, InputValueError
from melanoma_ml.evaluation.calibration import shift_prior
from melanoma_ml.images.cache import load_resized
from melanoma_ml.serving import inference
from melanoma_ml.serving.batch import (
    SCORE_COLUMNS,
    load_scoring_model,
    score_inputs,
    score_path,
    write_scores,
)
from melanoma_ml.serving.batch_inputs import read_scoring_input
from melanoma_ml.serving.registry import ModelRegistry

SIZE = 32


def write_image(path: Path, seed: int, size: tuple[int, int] = (48, 40)) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def write_broken(folder: Path) -> dict[str, str]:
    """A truncated JPEG, text named .jpg and an empty file; name -> words of the reason each must get."""
    good = folder / "good_source.jpg"
    write_image(good, 99, (200, 160))
    (folder / "truncated.jpg").write_bytes(good.read_bytes()[:600])
    good.unlink()
    (folder / "text.jpg").write_text("not an image at all\n")
    (folder / "empty.jpg").write_bytes(b"")
    return {"truncated": "truncated", "text": "not a recognised image", "empty": "empty"}


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> ModelRegistry:
    registry = ModelRegistry(tmp_path_factory.mktemp("artifacts") / "registry")
    register_tiny(registry, seed=1, size=SIZE)  # v0001, served
    register_tiny(registry, seed=2, size=SIZE, promote=False)  # v0002, registered only
    return registry


@pytest.fixture(scope="module")
def bundle(registry):
    return load_scoring_model(registry)


# ------------------------------------------------------------------------------------------- inputs
def test_a_folder_of_images_is_scored_without_metadata_and_other_files_are_named(tmp_path: Path) -> None:
    for i, name in enumerate(["b.jpg", "a.PNG", "c.webp"]):
        write_image(tmp_path / name, i)
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / ".DS_Store").write_bytes(b"\0")

    found = read_scoring_input(tmp_path)

    assert found.kind == "folder"
    assert found.table[schema.IMAGE].tolist() == ["a", "b", "c"]  # sorted by file name
    assert found.table[list(schema.METADATA_FEATURES)].isna().all().all()
    assert "1 other file(s) not scored" in found.description and ".DS_Store" not in found.description
    [reason] = found.rejected[
        "error"
    ]  # every file not scored gets a row; hidden files are not files to score
    assert "found notes.txt, which is not an accepted extension" in reason


def test_two_files_with_one_image_name_score_the_first_and_report_the_second(tmp_path: Path) -> None:
    write_image(tmp_path / "x.jpg", 1)
    write_image(tmp_path / "x.png", 2)

    found = read_scoring_input(tmp_path)

    assert found.table[schema.IMAGE].tolist() == ["x"]
    [reason] = found.rejected["error"]
    assert "x.jpg" in reason and "rename" in reason


def test_a_csv_with_relative_paths_and_alias_metadata_is_harmonized_as_in_training(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    write_image(tmp_path / "imgs" / "one.jpg", 1)
    write_image(tmp_path / "imgs" / "two.jpg", 2)
    csv = tmp_path / "batch.csv"
    csv.write_text("image_path,age,gender,localization\nimgs/one.jpg,45,M,back\nimgs/two.jpg,0,female,\n")

    found = read_scoring_input(csv)

    assert found.kind == "csv"
    table = found.table.set_index(schema.IMAGE)
    assert table.loc["one", schema.IMAGE_PATH] == str((tmp_path / "imgs" / "one.jpg").resolve())
    assert table.loc["one", schema.SEX] == "male" and table.loc["one", schema.SITE] == "torso"
    assert table.loc["one", schema.AGE] == 45
    assert pd.isna(table.loc["two", schema.AGE])  # 0 is ISIC's code for unknown, as in cleaning
    assert pd.isna(table.loc["two", schema.SITE])


def test_a_folder_with_one_csv_naming_its_images_uses_the_csv_and_reports_unfound_names(
    tmp_path: Path,
) -> None:
    write_image(tmp_path / "ISIC_1.jpg", 1)
    (tmp_path / "metadata.csv").write_text(
        "image_name,age_approx,sex,anatom_site_general_challenge\nISIC_1,60,female,torso\nISIC_404,50,male,\n"
    )

    found = read_scoring_input(tmp_path)

    assert found.kind == "csv"
    assert found.table[schema.IMAGE].tolist() == ["ISIC_1"]
    assert found.table[schema.AGE].tolist() == [60]
    [reason] = found.rejected.loc[found.rejected[schema.IMAGE] == "ISIC_404", "error"]
    assert "no image file named ISIC_404" in reason


def test_a_dataset_layout_is_detected_and_its_cleaned_table_used(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    for i in (1, 2):
        write_image(tmp_path / "images" / f"ISIC_{i}.jpg", i)
    (tmp_path / "HAM10000_metadata.csv").write_text(
        "lesion_id,image_id,dx,age,sex,localization\n"
        "HAM_1,ISIC_1,nv,40.0,male,back\nHAM_2,ISIC_2,mel,70.0,female,face\nHAM_3,ISIC_3,nv,30.0,male,chest\n"
    )

    found = read_scoring_input(tmp_path)

    assert found.kind == "ham10000"
    assert found.table[schema.IMAGE].tolist() == ["ISIC_1", "ISIC_2"]
    assert found.table[schema.SITE].tolist() == ["torso", "head/neck"]
    assert schema.TARGET not in found.table.columns  # the scores' target is the probability
    [reason] = found.rejected.loc[found.rejected[schema.IMAGE] == "ISIC_3", "error"]
    assert "ISIC_3" in reason or "not found" in reason or "missing" in reason


@pytest.mark.parametrize(
    ("make", "error", "words"),
    [
        (lambda p: p / "nowhere", InputFileNotFoundError, "nothing to score"),
        (
            lambda p: (p / "x.csv", (p / "x.csv").write_text("foo,bar\n1,2\n"))[0],
            InputValueError,
            "image_path",
        ),
        (lambda p: (p / "x.txt", (p / "x.txt").write_text("x"))[0], InputValueError, "not a CSV"),
        (lambda p: p, InputValueError, "nothing to score"),  # an empty folder
    ],
    ids=["missing", "csv-without-image-column", "not-a-csv", "empty-folder"],
)
def test_unusable_inputs_say_what_to_pass(tmp_path: Path, make, error, words) -> None:
    with pytest.raises(error, match=words):
        read_scoring_input(make(tmp_path))


# ------------------------------------------------------------------------------------------- scoring
def test_broken_files_are_reported_in_their_rows_and_the_rest_is_scored(tmp_path: Path, bundle) -> None:
    for i in range(5):
        write_image(tmp_path / f"img{i}.jpg", i)
    reasons = write_broken(tmp_path)

    scores = score_path(tmp_path, bundle, batch_size=3)

    assert list(scores.table.columns) == list(SCORE_COLUMNS)
    assert sorted(scores.scored[schema.IMAGE]) == [f"img{i}" for i in range(5)]
    assert scores.scored["target"].between(0, 1).all()
    assert (scores.scored["error"] == "").all()
    assert set(scores.scored["decision"]) <= {"positive", "negative"}
    failed = scores.failed.set_index(schema.IMAGE)
    assert set(failed.index) == set(reasons)
    for name, words in reasons.items():
        assert words in failed.loc[name, "error"], failed.loc[name, "error"]
    assert failed["target"].isna().all() and (failed["decision"] == "").all()
    assert (scores.table["model_version"] == "v0001").all()


def test_one_score_call_per_batch(tmp_path: Path, bundle, monkeypatch) -> None:
    for i in range(7):
        write_image(tmp_path / f"img{i}.png", i)
    (tmp_path / "broken.jpg").write_text("text")
    sizes: list[int] = []
    real = inference.score

    def counting(bundle, images, metadata, **kwargs):
        sizes.append(len(images))
        return real(bundle, images, metadata, **kwargs)

    monkeypatch.setattr(inference, "score", counting)
    progress: list[tuple[int, int]] = []

    scores = score_path(
        tmp_path, bundle, batch_size=3, progress=lambda done, total: progress.append((done, total))
    )

    assert sizes == [2, 3, 2]  # 8 files in batches of 3; broken.jpg (sorted first) left out of the first
    assert progress == [(3, 8), (6, 8), (8, 8)]
    assert len(scores.scored) == 7


def test_batched_scores_equal_one_image_at_a_time_through_the_serving_decoder(tmp_path: Path, bundle) -> None:
    paths = [write_image(tmp_path / f"img{i}.jpg", i, (90, 60)) for i in range(4)]

    scores = score_path(tmp_path, bundle, batch_size=4).table.set_index(schema.IMAGE)

    for path in paths:
        alone = inference.predict(bundle, [load_resized(path, SIZE)], [{}], views=8)[0]
        assert scores.loc[path.stem, "target"] == pytest.approx(alone, abs=1e-5)


def test_no_tta_equals_tta_on_a_symmetric_image_and_differs_on_an_asymmetric_one(
    tmp_path: Path, bundle
) -> None:
    i, j = np.indices((SIZE, SIZE))
    a, b = np.minimum(i, SIZE - 1 - i), np.minimum(j, SIZE - 1 - j)
    symmetric = (np.minimum(a, b) * 7 + np.maximum(a, b) * 3) % 256  # unchanged by every turn and flip
    Image.fromarray(np.stack([symmetric] * 3, axis=-1).astype(np.uint8)).save(tmp_path / "sym.png")
    write_image(tmp_path / "noise.png", 5, (SIZE, SIZE))

    with_tta = score_path(tmp_path, bundle, views=8).table.set_index(schema.IMAGE)["target"]
    without = score_path(tmp_path, bundle, views=1).table.set_index(schema.IMAGE)["target"]

    assert with_tta["sym"] == pytest.approx(without["sym"], abs=1e-5)
    assert with_tta["noise"] != pytest.approx(without["noise"], abs=1e-7)


def test_metadata_from_a_csv_reaches_the_model(tmp_path: Path, bundle) -> None:
    write_image(tmp_path / "img.jpg", 3)
    (tmp_path / "a.csv").write_text("image_path,age_approx,sex\nimg.jpg,80,male\n")
    (tmp_path / "b.csv").write_text("image_path,age_approx,sex\nimg.jpg,20,female\n")

    old = score_path(tmp_path / "a.csv", bundle).table["target"].iloc[0]
    young = score_path(tmp_path / "b.csv", bundle).table["target"].iloc[0]

    assert old != pytest.approx(young, abs=1e-7)


def test_a_named_version_is_loaded_and_no_promotion_is_an_input_error(tmp_path: Path, registry) -> None:
    assert load_scoring_model(registry, "v0002").version == "v0002"
    with pytest.raises(InputStateError, match="no model promoted"):
        load_scoring_model(ModelRegistry(tmp_path / "empty"))


def test_scores_are_written_as_one_csv_and_a_bad_batch_size_is_refused(tmp_path: Path, bundle) -> None:
    write_image(tmp_path / "img.jpg", 1)
    scores = score_path(tmp_path, bundle)

    out = write_scores(scores, tmp_path / "out" / "scores.csv")

    back = pd.read_csv(out, keep_default_na=False)
    assert back.columns.tolist() == list(SCORE_COLUMNS) and len(back) == 1
    assert [p.name for p in out.parent.iterdir()] == ["scores.csv"]  # no temp file left behind
    with pytest.raises(InputValueError, match="batch size"):
        score_inputs(read_scoring_input(tmp_path), bundle, batch_size=0)


# ------------------------------------------------------------------- out of distribution, prior shift
@pytest.fixture(scope="module")
def ood_bundle(tmp_path_factory):
    registry = ModelRegistry(tmp_path_factory.mktemp("ood") / "registry")
    return load_scoring_model(registry, register_with_ood(registry, seed=3, size=SIZE))


def test_a_bundle_with_a_detector_fills_the_ood_columns_and_flags_noise(tmp_path: Path, ood_bundle) -> None:
    for i, image in enumerate(smooth_images(3, 48, seed=11)):
        Image.fromarray(image).save(tmp_path / f"skin{i}.png")
    for i in range(3):
        write_image(tmp_path / f"noise{i}.png", i, (SIZE, SIZE))
    (tmp_path / "broken.jpg").write_text("text")

    scores = score_path(tmp_path, ood_bundle, batch_size=4)
    out = pd.read_csv(write_scores(scores, tmp_path / "out" / "scores.csv"), keep_default_na=False)

    table = scores.table.set_index(schema.IMAGE)
    scored = table.drop(index="broken")
    assert out.columns.tolist() == list(SCORE_COLUMNS)
    assert np.isfinite(scored["ood_score"]).all()
    np.testing.assert_array_equal(scored["ood_flag"], scored["ood_score"] > ood_bundle.ood.threshold)
    noise, skin = scored.loc[[f"noise{i}" for i in range(3)]], scored.loc[[f"skin{i}" for i in range(3)]]
    assert noise["ood_flag"].all() and noise["ood_score"].min() > skin["ood_score"].max()
    assert pd.isna(table.loc["broken", "ood_score"]) and pd.isna(table.loc["broken", "ood_flag"])
    written = out.set_index(schema.IMAGE)
    assert written.loc["noise0", "ood_flag"] == "True" and written.loc["broken", "ood_flag"] == ""


def test_a_bundle_without_a_detector_leaves_the_ood_columns_empty(tmp_path: Path, bundle) -> None:
    write_image(tmp_path / "img.jpg", 1)

    scores = score_path(tmp_path, bundle)
    out = pd.read_csv(write_scores(scores, tmp_path / "scores.csv"), keep_default_na=False)

    assert bundle.ood is None
    assert scores.table["ood_score"].isna().all() and scores.table["ood_flag"].isna().all()
    assert out.loc[0, "ood_score"] == "" and out.loc[0, "ood_flag"] == ""


def test_the_prior_shift_moves_probabilities_and_threshold_but_not_decisions(
    tmp_path: Path, ood_bundle
) -> None:
    for i in range(6):
        write_image(tmp_path / f"img{i}.jpg", i, (60, 50))

    base = score_path(tmp_path, ood_bundle, views=1)
    shifted = score_path(tmp_path, ood_bundle, views=1, deployment_prevalence=0.02)

    assert base.threshold == ood_bundle.threshold and base.deployment_prevalence is None
    assert shifted.threshold < base.threshold and shifted.deployment_prevalence == 0.02
    assert (shifted.table["target"] < base.table["target"]).all()  # 2% is below the 25% it was fitted at
    np.testing.assert_allclose(
        shifted.table["target"], shift_prior(base.table["target"], TRAINING_PREVALENCE, 0.02), atol=1e-12
    )
    assert (shifted.table["threshold"] == shifted.threshold).all()
    assert shifted.table["decision"].tolist() == base.table["decision"].tolist()
    np.testing.assert_array_equal(shifted.table["ood_score"], base.table["ood_score"])


# ------------------------------------------------------------------------------------------- one request path
def test_every_file_of_a_folder_that_is_not_scored_gets_a_row_with_its_reason(tmp_path: Path, bundle) -> None:
    import os

    write_image(tmp_path / "a.jpg", 1)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "b.gif")
    os.mkfifo(tmp_path / "pipe.jpg")  # would block a reader forever; its size is 0 but it is not empty
    (tmp_path / "subfolder").mkdir()  # not a file: nothing to report

    table = score_path(tmp_path, bundle).table.set_index(schema.IMAGE)

    assert sorted(table.index) == ["a", "b", "pipe"]
    assert table.loc["a", "error"] == "" and table.loc["a", "decision"] in ("positive", "negative")
    assert "found b.gif, which is not an accepted extension" in table.loc["b", "error"]
    assert "b.png" in table.loc["b", "error"]  # the fix: convert it
    assert "not a regular file" in table.loc["pipe", "error"] and "empty" not in table.loc["pipe", "error"]


def test_a_row_naming_a_fifo_or_a_device_is_not_a_regular_file_rather_than_empty(
    tmp_path: Path, bundle
) -> None:
    import os

    os.mkfifo(tmp_path / "pipe.jpg")
    write_image(tmp_path / "ok.jpg", 2)
    rows = [str(tmp_path / "pipe.jpg"), str(tmp_path / "ok.jpg")]
    if Path("/dev/zero").exists():
        rows.append("/dev/zero")
    (tmp_path / "list.csv").write_text("image_path\n" + "\n".join(rows) + "\n")

    table = score_path(tmp_path / "list.csv", bundle).table.set_index(schema.IMAGE)

    assert table.loc["ok", "error"] == ""
    for name in ["pipe", "zero"][: len(rows) - 1]:
        assert "not a regular file" in table.loc[name, "error"], table.loc[name, "error"]
        assert "empty" not in table.loc[name, "error"]


APP_REFUSES = [("age_approx", "-5"), ("age_approx", "300"), ("age_approx", "abc"), ("sex", "alien"),
               ("anatom_site_general_challenge", "moon"), ("anatom_site_general_challenge", "palms/soles")]  # fmt: skip
"""Values the app refuses for a model whose sites are ``app_helpers.SITES`` (palms/soles is a known site,
but not one this model was trained with)."""


def test_metadata_the_app_refuses_is_scored_as_missing_with_the_apps_message(tmp_path: Path, bundle) -> None:
    from melanoma_ml.serving.request_fields import InvalidRequest, parse_metadata

    write_image(tmp_path / "img.jpg", 5)
    good = {"age_approx": "55", "sex": "female", "anatom_site_general_challenge": "torso"}
    columns = list(good)
    rows = [("good", good)]
    for column, value in APP_REFUSES:
        rows.append((f"bad_{len(rows)}", {**good, column: value}))
        rows.append((f"missing_{len(rows) - 1}", {**good, column: ""}))
    lines = [",".join(["image_name", "image_path", *columns])]
    lines += [",".join([name, "img.jpg", *(row[c] for c in columns)]) for name, row in rows]
    (tmp_path / "rows.csv").write_text("\n".join(lines) + "\n")
    vocabulary = {k: list(v) for k, v in bundle.spec.encoder.vocabulary.items()}

    table = score_path(tmp_path / "rows.csv", bundle, views=1).table.set_index(schema.IMAGE)

    assert table.loc["good", "warning"] == "" and table.loc["good", "error"] == ""
    for index, (column, value) in enumerate(APP_REFUSES):
        bad, missing = f"bad_{2 * index + 1}", f"missing_{2 * index + 1}"
        given = {**good, column: value}
        with pytest.raises(InvalidRequest) as refused:  # the app's parser refuses this row ...
            parse_metadata(
                given["age_approx"], given["sex"], given["anatom_site_general_challenge"],
                vocabulary=vocabulary, min_age=0, max_age=120,
            )  # fmt: skip
        field = {"age_approx": "age", "sex": "sex", "anatom_site_general_challenge": "site"}[column]
        # ... and predict scores it with that field missing, saying so with the app's message
        assert table.loc[bad, "warning"] == f"{refused.value}; scored with {field} missing", value
        assert table.loc[bad, "error"] == "" and table.loc[missing, "warning"] == ""
        assert table.loc[bad, "target"] == table.loc[missing, "target"], value
    assert table.loc["bad_1", "target"] != pytest.approx(table.loc["good", "target"], abs=1e-9)


def test_a_dataset_layout_keeps_the_values_cleaning_could_not_read_for_the_apps_rules(
    tmp_path: Path, bundle
) -> None:
    (tmp_path / "images").mkdir()
    for i in (1, 2):
        write_image(tmp_path / "images" / f"ISIC_{i}.jpg", 1)  # one picture twice: only metadata differs
    (tmp_path / "HAM10000_metadata.csv").write_text(
        "lesion_id,image_id,dx,age,sex,localization\nHAM_1,ISIC_1,nv,40.0,alien,moon\nHAM_2,ISIC_2,nv,40.0,,\n"
    )

    found = read_scoring_input(tmp_path)
    table = score_path(tmp_path, bundle, views=1).table.set_index(schema.IMAGE)

    assert found.kind == "ham10000"
    assert found.given.set_index(found.table[schema.IMAGE]).loc["ISIC_1", schema.SEX] == "alien"
    warning = table.loc["ISIC_1", "warning"]
    assert "unknown sex 'alien'" in warning and "unknown anatomic site 'moon'" in warning
    assert table.loc["ISIC_2", "warning"] == ""
    assert table.loc["ISIC_1", "target"] == table.loc["ISIC_2", "target"]  # both scored as missing
