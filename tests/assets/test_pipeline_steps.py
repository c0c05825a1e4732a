"""Pure helpers of melanoma_ml.pipeline (no training): fingerprints, artifact layout, OOF assembly, table checks."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from melanoma_ml import pipeline, schema
from melanoma_ml.config import load_config


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
    ],
)
def test_fingerprint_follows_metadata_and_image_listing(
    tmp_path: Path, change, changes_fingerprint: bool
) -> None:
    folder = dataset(tmp_path / "isic")
    before = pipeline.source_fingerprint(folder)
    change(folder)
    assert (pipeline.source_fingerprint(folder) != before) is changes_fingerprint


def test_fingerprint_of_a_missing_folder_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data.source_dir"):
        pipeline.source_fingerprint(tmp_path / "nope")


def test_artifact_layout_matches_the_architecture_doc(tmp_path: Path) -> None:
    paths = pipeline.artifact_paths(load_config("tiny", {"artifact_root": f"file://{tmp_path}"}))
    assert paths.root == tmp_path.resolve()
    assert paths.cache(64) == tmp_path / "cache" / "64px"
    assert paths.checkpoint("resnet50", 2) == tmp_path / "checkpoints" / "resnet50" / "fold2"
    assert paths.report("resnet50") == tmp_path / "reports" / "resnet50"
    assert paths.registry == tmp_path / "registry"
    assert paths.synthetic == tmp_path / "data" / "synthetic"


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
