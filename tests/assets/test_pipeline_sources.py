"""The data steps of melanoma_ml.pipeline with more than one source: external datasets are cleaned in with
``is_external`` True and fold -1 (never validated on), and a primary given as one CSV file works."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from melanoma_ml import pipeline
from melanoma_ml.config import load_config

N_EXTERNAL = 8


def write_isic2020(folder: Path, prefix: str, n: int, seed: int, *, patients: int | None = None) -> Path:
    """An ISIC 2020-layout set: ``metadata.csv`` + ``images/<name>.jpg`` (distinct noise images)."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    lines = ["image_name,patient_id,sex,age_approx,anatom_site_general_challenge,target"]
    for i in range(n):
        name = f"{prefix}_{i:04d}"
        patient = f"{prefix}P{i % (patients or n)}"
        lines.append(
            f"{name},{patient},{'male' if i % 2 else 'female'},{40 + i % 5 * 5},torso,{int(i % 4 == 0)}"
        )
        pixels = rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "images" / f"{name}.jpg", quality=95)
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_external_rows_are_cleaned_in_for_training_and_never_validated_on(tmp_path: Path) -> None:
    external = write_isic2020(tmp_path / "external", "EXT", N_EXTERNAL, seed=1)
    config = load_config(
        "tiny",
        {
            "artifact_root": str(tmp_path / "artifacts"),
            "data": {"external_sources": [{"path": str(external), "name": "extra"}]},
        },
    )
    pipeline.validate_config(config)
    source = pipeline.prepare_source(config)
    assert source.synthetic

    cleaning = pipeline.clean_source(config, source)
    clean = cleaning.clean
    from_external = clean[clean["source"] == "extra"]
    assert sorted(from_external["image_name"]) == [f"EXT_{i:04d}" for i in range(N_EXTERNAL)]
    assert from_external["is_external"].all()
    assert not clean.loc[clean["source"] != "extra", "is_external"].any()
    assert [s["setting"] for s in cleaning.summary["data_sources"]] == [
        "data.source_dir",
        "data.external_sources[0]",
    ]

    folds = pipeline.make_folds(config, clean)
    assert (folds.loc[folds["is_external"], "fold"] == -1).all()
    for k in range(config.data.n_folds):
        validation = folds[folds["fold"] == k]
        assert len(validation) and not validation["is_external"].any()
    assert len(folds[folds["is_external"]]) == N_EXTERNAL


def test_fingerprint_of_the_run_changes_when_an_external_source_changes(tmp_path: Path) -> None:
    primary = write_isic2020(tmp_path / "primary", "ISIC", 4, seed=0)
    external = write_isic2020(tmp_path / "external", "EXT", 4, seed=1)
    config = load_config(
        "tiny",
        {
            "artifact_root": str(tmp_path / "artifacts"),
            "data": {"source_dir": str(primary), "external_sources": [{"path": str(external)}]},
        },
    )
    before = pipeline.prepare_source(config).fingerprint
    (external / "metadata.csv").write_text((external / "metadata.csv").read_text().replace(",0\n", ",1\n", 1))
    assert pipeline.prepare_source(config).fingerprint != before


def test_a_primary_given_as_one_csv_file_is_read_with_its_image_folder(tmp_path: Path) -> None:
    folder = write_isic2020(tmp_path / "export", "ISIC", 12, seed=2, patients=6)
    config = load_config(
        "tiny",
        {"artifact_root": str(tmp_path / "artifacts"), "data": {"source_dir": str(folder / "metadata.csv")}},
    )
    pipeline.validate_config(config)
    source = pipeline.prepare_source(config)
    assert source.root == (folder / "metadata.csv").resolve() and not source.synthetic

    clean = pipeline.clean_source(config, source).clean
    assert len(clean) == 12
    assert all(Path(p).parent == (folder / "images").resolve() for p in clean["image_path"])
