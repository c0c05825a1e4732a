"""``data.test_sources`` before any training: validated like the other sources, part of the data's
fingerprint, and never among the rows the models train on."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_pipeline_sources import write_isic2020

from melanoma_ml import pipeline
from melanoma_ml.config import load_config
from melanoma_ml.errors import MelanomaInputError


def _config(tmp_path: Path, **data):
    return load_config("tiny", {"artifact_root": str(tmp_path / "artifacts"), "data": data})


def test_test_sources_change_the_fingerprint_and_never_become_training_rows(tmp_path: Path) -> None:
    primary = write_isic2020(tmp_path / "primary", "ISIC", 8, seed=0, patients=4)
    held_out = write_isic2020(tmp_path / "other_clinic", "HAM", 6, seed=3)
    config = _config(
        tmp_path, source_dir=str(primary), test_sources=[{"path": str(held_out), "name": "clinic2"}]
    )
    pipeline.validate_config(config)
    source = pipeline.prepare_source(config)

    cleaning = pipeline.clean_source(config, source)
    assert len(cleaning.clean) == 8
    assert not cleaning.clean["image_name"].str.startswith("HAM").any()
    assert [s["setting"] for s in cleaning.summary["data_sources"]] == ["data.source_dir"]

    metadata = held_out / "metadata.csv"
    metadata.write_text(metadata.read_text().replace(",0\n", ",1\n", 1))  # one lesion relabelled
    assert pipeline.prepare_source(config).fingerprint != source.fingerprint


@pytest.mark.parametrize(
    ("test_source", "message"),
    [
        (
            lambda t: {"path": str(t / "gone")},
            r"data.test_sources\[0\].path not found: .*gone; fix the path or remove the entry "
            r"\(MELANOMA_DATA__TEST_SOURCES",
        ),
        (
            lambda t: {"path": str(t / "primary")},
            r"data.test_sources\[0\].path .*primary is also data.source_dir, which the models train on.*"
            r"point data.test_sources\[0\].path at another dataset",
        ),
        (
            lambda t: {"path": str(t / "extra")},
            r"is also data.external_sources\[0\]",
        ),
    ],
)
def test_validate_config_names_a_bad_test_source_and_the_fix(tmp_path: Path, test_source, message) -> None:
    primary = write_isic2020(tmp_path / "primary", "ISIC", 4, seed=0)
    extra = write_isic2020(tmp_path / "extra", "EXT", 4, seed=1)
    config = _config(
        tmp_path,
        source_dir=str(primary),
        external_sources=[{"path": str(extra)}],
        test_sources=[test_source(tmp_path)],
    )
    with pytest.raises(ValueError, match=message) as raised:
        pipeline.validate_config(config)
    assert isinstance(raised.value, MelanomaInputError)
