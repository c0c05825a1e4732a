"""Pure helpers of melanoma_ml.pipeline (no training): fingerprints, artifact layout, OOF assembly, table checks."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from melanoma_ml import pipeline, schema
from melanoma_ml.config import DataConfig, PipelineConfig, load_config


def dataset(folder: Path) -> Path:
    (folder / "jpeg" / "train").mkdir(parents=True)
    (folder / "train.csv").write_text("image_name,target\nISIC_1,0\nISIC_2,1\n")
    for name in ("ISIC_1", "ISIC_2"):
        (folder / "jpeg" / "train" / f"{name}.jpg").write_bytes(name.encode())
    return folder


@pytest.mark.parametrize(
    ("change", "changes_fingerprint"),
    [
        (lambda d: None, False),
        (lambda d: (d / "train.csv").write_text("image_name,target\nISIC_1,1\nISIC_2,1\n"), True),
        (lambda d: (d / "jpeg" / "train" / "ISIC_3.jpg").write_bytes(b"x"), True),
        (lambda d: (d / "jpeg" / "train" / "ISIC_2.jpg").unlink(), True),
        (lambda d: (d / "jpeg" / "train" / "ISIC_1.jpg").write_bytes(b"longer content"), True),
        (lambda d: (d / "notes.txt").write_text("ignored"), False),
        # the loader reads .jpg/.jpeg/.png only (metadata.image_files.IMAGE_EXTENSIONS): other files are not data
        (lambda d: (d / "jpeg" / "train" / "ISIC_3.bmp").write_bytes(b"x"), False),
        (lambda d: (d / "jpeg" / "train" / "ISIC_3.webp").write_bytes(b"x"), False),
        (lambda d: (d / "jpeg" / "train" / "ISIC_3.PNG").write_bytes(b"x"), True),
    ],
)
def test_fingerprint_follows_metadata_and_image_listing(
    tmp_path: Path, change, changes_fingerprint: bool
) -> None:
    folder = dataset(tmp_path / "isic")
    data = DataConfig(source_dir=str(folder))
    before = pipeline.source_fingerprint(data)
    change(folder)
    assert (pipeline.source_fingerprint(data) != before) is changes_fingerprint


def test_fingerprint_covers_external_sources_and_an_outside_image_dir(tmp_path: Path) -> None:
    primary = dataset(tmp_path / "isic")
    external = dataset(tmp_path / "isic2019")
    images = tmp_path / "elsewhere"
    images.mkdir()
    (images / "ISIC_1.jpg").write_bytes(b"a")
    data = DataConfig(
        source_dir=str(primary), image_dir=str(images), external_sources=[{"path": str(external)}]
    )
    before = pipeline.source_fingerprint(data)

    (external / "train.csv").write_text("image_name,target\nISIC_1,1\nISIC_2,1\n")
    relabelled = pipeline.source_fingerprint(data)
    assert relabelled != before
    (external / "jpeg" / "train" / "ISIC_9.jpg").write_bytes(b"new")
    new_external_image = pipeline.source_fingerprint(data)
    assert new_external_image != relabelled
    (images / "ISIC_2.jpg").write_bytes(b"b")
    assert pipeline.source_fingerprint(data) != new_external_image


@pytest.mark.parametrize(
    ("change", "changes_fingerprint"),
    [
        (lambda d: None, False),
        (lambda d: (d / "metadata.csv").write_text("image_name,target\nISIC_1,1\n"), True),
        (lambda d: (d / "images" / "ISIC_2.jpg").write_bytes(b"new"), True),
        (lambda d: (d / "ISIC_2020_Training_Duplicates.csv").write_text("image_name_1,image_name_2\n"), True),
        (lambda d: (d / "unrelated" / "ISIC_2.jpg").write_bytes(b"not an image folder"), False),
    ],
)
def test_fingerprint_of_a_metadata_file_covers_it_and_its_image_folder(
    tmp_path: Path, change, changes_fingerprint: bool
) -> None:
    folder = tmp_path / "export"
    (folder / "images").mkdir(parents=True)
    (folder / "unrelated").mkdir()
    (folder / "metadata.csv").write_text("image_name,target\nISIC_1,0\n")
    (folder / "images" / "ISIC_1.jpg").write_bytes(b"x")
    data = DataConfig(source_dir=str(folder / "metadata.csv"))
    before = pipeline.source_fingerprint(data)
    change(folder)
    assert (pipeline.source_fingerprint(data) != before) is changes_fingerprint


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (lambda t: DataConfig(source_dir=str(t / "nope")), "data folder not found.*data.source_dir"),
        (
            lambda t: DataConfig(source_dir=str(t / "isic"), external_sources=[{"path": str(t / "gone")}]),
            r"data.external_sources\[0\].path not found.*remove the entry",
        ),
        (
            lambda t: DataConfig(source_dir=str(t / "isic"), image_dir=str(t / "pics")),
            "data.source_dir image_dir not found",
        ),
    ],
)
def test_fingerprint_of_a_missing_path_names_the_setting(tmp_path: Path, data, message: str) -> None:
    dataset(tmp_path / "isic")
    with pytest.raises(FileNotFoundError, match=message):
        pipeline.source_fingerprint(data(tmp_path))


def test_validate_config_accepts_a_metadata_file_and_names_a_missing_external(tmp_path: Path) -> None:
    data = {"source_dir": str(dataset(tmp_path / "isic") / "train.csv")}
    pipeline.validate_config(load_config("tiny", {"artifact_root": str(tmp_path / "a"), "data": data}))
    data["external_sources"] = [{"path": str(tmp_path / "x")}]
    missing = load_config("tiny", {"artifact_root": str(tmp_path / "a"), "data": data})
    with pytest.raises(ValueError, match=r"data.external_sources\[0\].path not found"):
        pipeline.validate_config(missing)


def test_artifact_layout_matches_the_architecture_doc(tmp_path: Path) -> None:
    paths = pipeline.artifact_paths(load_config("tiny", {"artifact_root": f"file://{tmp_path}"}))
    assert paths.root == tmp_path.resolve()
    assert paths.cache(64) == tmp_path / "cache" / "64px"
    assert paths.checkpoint("resnet50", 2) == tmp_path / "checkpoints" / "resnet50" / "fold2"
    assert paths.report("resnet50") == tmp_path / "reports" / "resnet50"
    assert paths.registry == tmp_path / "registry"
    assert paths.synthetic == tmp_path / "data" / "synthetic"


def test_artifact_root_description_promises_what_the_pipeline_accepts(tmp_path: Path) -> None:
    description = PipelineConfig.model_fields["artifact_root"].description
    assert description.startswith("Local path or file:// URL") and "fsspec" not in description
    assert "not supported" in description and "mount" in description
    for accepted in (str(tmp_path), f"file://{tmp_path}"):
        assert (
            pipeline.artifact_paths(load_config("tiny", {"artifact_root": accepted})).root
            == tmp_path.resolve()
        )
    with pytest.raises(ValueError, match="mount the bucket"):
        pipeline.artifact_paths(load_config("tiny", {"artifact_root": "s3://bucket/artifacts"}))


def fold(backbone: str, k: int) -> SimpleNamespace:
    oof = pd.DataFrame({"image_name": [f"I{k}a", f"I{k}b"], "fold": k, "prob": [0.1, 0.9]})
    return SimpleNamespace(backbone=backbone, fold=k, oof=oof)


def test_backbone_oof_concatenates_every_fold_once() -> None:
    oof = pipeline.backbone_oof("b", [fold("b", 1), fold("b", 0)], n_folds=2)
    assert oof["image_name"].tolist() == ["I0a", "I0b", "I1a", "I1b"]


@pytest.mark.parametrize(
    ("results", "message"),
    [
        ([fold("b", 0)], r"exactly folds 0\.\.1"),
        ([fold("b", 0), fold("b", 0)], r"got \[0, 0\]"),
        ([fold("b", 0), fold("other", 1)], "results of \\['other'\\]"),
    ],
)
def test_backbone_oof_refuses_incomplete_or_mixed_results(results: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pipeline.backbone_oof("b", results, n_folds=2)


def clean_table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            schema.IMAGE: ["ISIC_1", "ISIC_2"],
            schema.PATIENT: ["P1", "P2"],
            schema.LESION: [None, None],
            schema.SEX: ["male", None],
            schema.AGE: [45.0, None],
            schema.SITE: ["torso", "head/neck"],
            schema.DIAGNOSIS: ["nevus", "melanoma"],
            schema.TARGET: [0, 1],
            schema.SOURCE: "ISIC2020",
            schema.IS_EXTERNAL: False,
            schema.IMAGE_PATH: ["/x/ISIC_1.jpg", "/x/ISIC_2.jpg"],
            schema.IMAGE_SHA256: ["a", "b"],
        }
    )


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t, None),
        (lambda t: t.drop(columns=[schema.SOURCE]), "differ from schema.CLEAN_COLUMNS"),
        (lambda t: t.assign(sex=["M", "female"]), "sex has values outside"),
        (lambda t: t.assign(anatom_site_general_challenge=["torso", "scalp"]), "outside"),
        (lambda t: t.assign(target=[0, 2]), "target must be 0/1"),
        (lambda t: t.assign(age_approx=[45.0, 120.0]), "age_approx outside"),
        (lambda t: t.assign(image_name=["ISIC_1", "ISIC_1"]), "duplicated image names"),
        (lambda t: t.iloc[0:0], "empty"),
    ],
)
def test_clean_table_problems(edit, message: str | None) -> None:
    problems = pipeline.clean_table_problems(edit(clean_table()))
    if message is None:
        assert problems == []
    else:
        assert any(message in p for p in problems), problems


def test_gallery_rows_mix_melanoma_and_benign_reproducibly() -> None:
    val = pd.DataFrame({"image_name": [f"I{i}" for i in range(10)], "target": [1, 1, 0, 0, 0, 0, 0, 0, 0, 1]})
    picked = pipeline.pick_gallery_rows(val, 4, seed=0)
    assert picked["target"].tolist() == [1, 1, 0, 0]
    assert picked.equals(pipeline.pick_gallery_rows(val, 4, seed=0))
    assert len(pipeline.pick_gallery_rows(val[val["target"] == 0], 4, seed=0)) == 4


def test_table_fingerprint_changes_with_content() -> None:
    table = clean_table()
    assert pipeline.table_fingerprint(table) == pipeline.table_fingerprint(table.copy())
    assert pipeline.table_fingerprint(table) != pipeline.table_fingerprint(table.assign(target=[1, 1]))


def test_run_all_stops_at_a_failing_check_like_the_blocking_asset_check(tmp_path, monkeypatch):
    """``run_all`` runs the asset checks' functions between steps and stops where Dagster would."""
    from melanoma_ml import pipeline
    from melanoma_ml.config import load_config

    monkeypatch.setattr(
        pipeline, "clean_table_problems", lambda clean: ["site 'moon' is not in the vocabulary"]
    )
    reached = []
    monkeypatch.setattr(pipeline, "make_folds", lambda *a, **k: reached.append("folds"))
    config = load_config("tiny", {"artifact_root": str(tmp_path / "artifacts")})
    with pytest.raises(pipeline.PipelineCheckFailed, match="clean_metadata_schema.*moon"):
        pipeline.run_all(config, progress=lambda _: None)
    assert reached == []
