"""``melanoma-ml predict``: the scores CSV, ``--version``/``--no-tta``, listed broken files and exit codes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from app_helpers import register_tiny
from PIL import Image

from melanoma_ml.artifacts import ArtifactPaths
from melanoma_ml.cli import EXIT_BAD_INPUT, EXIT_OK, main
from melanoma_ml.serving.batch import SCORE_COLUMNS
from melanoma_ml.serving.registry import ModelRegistry


@pytest.fixture(scope="module")
def artifact_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("artifacts")
    registry = ModelRegistry(ArtifactPaths(root).registry)
    register_tiny(registry, seed=1, size=32)  # v0001, served
    register_tiny(registry, seed=2, size=32, promote=False)  # v0002
    return root


def images(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(folder / f"ISIC_{i}.jpg")
    return folder


def predict(artifact_root: Path, *args: str) -> int:
    return main(["predict", *args, "--artifact-root", str(artifact_root), "--profile", "tiny"])


def read(out: Path) -> pd.DataFrame:
    return pd.read_csv(out, keep_default_na=False, na_values=[""])


def test_scores_a_folder_lists_broken_files_and_exits_0(tmp_path: Path, artifact_root: Path, capsys) -> None:
    folder = images(tmp_path / "batch", 3)
    (folder / "broken.jpg").write_text("not a jpeg")
    (folder / "empty.jpg").write_bytes(b"")
    out = tmp_path / "predictions.csv"

    assert predict(artifact_root, str(folder), "--out", str(out), "--batch-size", "2") == EXIT_OK

    table = read(out)
    assert table.columns.tolist() == [*SCORE_COLUMNS, "case_id"]  # the prediction log's case ids
    scored = table[table["error"].isna()]
    assert sorted(scored["image_name"]) == ["ISIC_0", "ISIC_1", "ISIC_2"]
    assert (table["model_version"] == "v0001").all()
    assert set(table.loc[table["error"].notna(), "image_name"]) == {"broken", "empty"}
    captured = capsys.readouterr()
    assert "not scored: broken" in captured.err and "not scored: empty" in captured.err
    assert "scored 3 of 5 images with v0001" in captured.out


def test_version_picks_the_model_and_no_tta_changes_the_scores_only_slightly(
    tmp_path: Path, artifact_root: Path
) -> None:
    folder = images(tmp_path / "batch", 2)
    outs = {name: tmp_path / f"{name}.csv" for name in ("served", "v2", "no_tta")}

    assert predict(artifact_root, str(folder), "--out", str(outs["served"])) == EXIT_OK
    assert predict(artifact_root, str(folder), "--out", str(outs["v2"]), "--version", "v0002") == EXIT_OK
    assert predict(artifact_root, str(folder), "--out", str(outs["no_tta"]), "--no-tta") == EXIT_OK

    served, v2, no_tta = (read(outs[k]) for k in ("served", "v2", "no_tta"))
    assert set(v2["model_version"]) == {"v0002"}
    assert not np.allclose(served["target"], v2["target"], atol=1e-7)  # another network
    assert not np.allclose(served["target"], no_tta["target"], atol=1e-7)  # the flag takes effect
    assert np.allclose(served["target"], no_tta["target"], atol=0.1)  # same network, one view vs eight


@pytest.mark.parametrize(
    ("setup", "extra", "words"),
    [
        ("all_broken", [], "no image could be scored"),
        ("missing", [], "nothing to score"),
        ("ok", ["--version", "v0099"], "unknown model version"),
    ],
)
def test_input_errors_exit_2_with_one_line(
    tmp_path: Path, artifact_root: Path, capsys, setup: str, extra: list[str], words: str
) -> None:
    folder = tmp_path / "batch"
    if setup == "all_broken":
        folder.mkdir()
        (folder / "a.jpg").write_text("text")
    elif setup == "ok":
        images(folder, 1)
    out = tmp_path / "out.csv"

    assert predict(artifact_root, str(folder), "--out", str(out), *extra) == EXIT_BAD_INPUT

    assert words in capsys.readouterr().err
    if setup == "all_broken":  # the reasons are still written
        assert read(out)["error"].str.contains("not a recognised image").all()


def test_no_promoted_model_and_a_bad_batch_size_are_input_errors(tmp_path: Path, capsys) -> None:
    folder = images(tmp_path / "batch", 1)
    (tmp_path / "empty_root").mkdir()

    assert predict(tmp_path / "empty_root", str(folder), "--out", str(tmp_path / "o.csv")) == EXIT_BAD_INPUT
    assert "no model promoted" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(folder), "--out", str(tmp_path / "o.csv"), "--batch-size", "0"])
    assert exc.value.code == 2


def test_metadata_the_app_refuses_is_listed_and_in_the_warning_column(
    tmp_path: Path, artifact_root: Path, capsys
) -> None:
    folder = images(tmp_path / "batch", 2)
    (folder / "rows.csv").write_text("image_name,age_approx,sex\nISIC_0,-5,female\nISIC_1,50,female\n")
    (folder / "odd.gif").write_bytes(b"GIF89a")  # ignored: the CSV says what to score
    out = tmp_path / "predictions.csv"

    assert predict(artifact_root, str(folder / "rows.csv"), "--out", str(out)) == EXIT_OK

    table = read(out).set_index("image_name")
    assert "age '-5' is outside 0-120 years" in table.loc["ISIC_0", "warning"]
    assert pd.isna(table.loc["ISIC_1", "warning"]) and pd.notna(table.loc["ISIC_0", "target"])
    captured = capsys.readouterr()
    assert "scored with metadata missing: ISIC_0: age '-5' is outside" in captured.err
    assert "1 with metadata the app would refuse read as missing" in captured.out
