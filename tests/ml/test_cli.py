"""The ``melanoma-ml`` command line: help, config, inspect, models/rollback, errors, and a tiny demo run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from melanoma_ml.artifacts import ArtifactPaths
from melanoma_ml.cli import main, overrides_dict, parse_override
from melanoma_ml.config import SyntheticConfig

REPO_ROOT = Path(__file__).resolve().parents[2]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def no_env_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Neither the caller's ``MELANOMA_*`` variables nor a ``.env`` in the repo may leak into these tests."""
    for key in list(os.environ):
        if key.startswith("MELANOMA_") and key != "MELANOMA_SHARED_DATA":
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


# --------------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    ("text", "path", "value"),
    [
        ("training.epochs=3", ["training", "epochs"], 3),
        ("training.learning_rate=1e-3", ["training", "learning_rate"], 1e-3),
        ("model.pretrained=false", ["model", "pretrained"], False),
        ("data.source_dir=/data/isic", ["data", "source_dir"], "/data/isic"),
        ('backbones=["test_resnet"]', ["backbones"], ["test_resnet"]),
        ("data.synthetic.images_per_patient=[2,3]", ["data", "synthetic", "images_per_patient"], [2, 3]),
    ],
)
def test_set_values_parse_as_json_or_text(text, path, value):
    assert parse_override(text) == (path, value)


def test_later_overrides_win_and_nest():
    pairs = [parse_override(t) for t in ("training.epochs=3", "training.batch_size=8", "training.epochs=4")]
    assert overrides_dict(pairs) == {"training": {"epochs": 4, "batch_size": 8}}


# --------------------------------------------------------------------------------------------- help
def test_help_lists_the_subcommands_without_loading_torch():
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "melanoma_ml", "--help"], capture_output=True, text=True, env=env, check=False
    )
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr
    for command in ("demo", "inspect", "models", "rollback", "registry", "config"):
        assert command in proc.stdout
    assert seconds < 60, (
        f"--help took {seconds:.1f} s"
    )  # pathological only; "no torch" is checked by the probe below
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, melanoma_ml.cli; print(sorted({'torch', 'timm', 'lightning', 'pandas'} & set(sys.modules)))",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert probe.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------- config
def test_config_prints_json_with_env_and_set_overrides(capsys, monkeypatch):
    monkeypatch.setenv("MELANOMA_TRAINING__EPOCHS", "3")
    monkeypatch.setenv("MELANOMA_EVALUATION__N_BOOTSTRAP", "77")
    code, out, err = run(capsys, "config", "--profile", "tiny", "--set", "evaluation.n_bootstrap=60")
    assert code == 0
    config = json.loads(out)
    assert config["training"]["epochs"] == 3  # env over the profile's 2
    assert config["evaluation"]["n_bootstrap"] == 60  # --set over env
    assert config["backbones"] == ["test_efficientnet"]  # the tiny profile
    assert "training.epochs='3'" in err


def test_config_without_env_says_so(capsys):
    code, out, err = run(capsys, "config")
    assert code == 0
    assert json.loads(out)["training"]["epochs"] == 8  # demo profile
    assert "no MELANOMA_* environment" in err


# --------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["config", "--set", "training.epochs=0"],
            "training.epochs: Input should be greater than or equal to 1",
        ),
        (["config", "--set", "training.nonsense=1"], "training.nonsense: Extra inputs are not permitted"),
        (["config", "--profile", "huge"], "unknown profile 'huge'"),
        (["inspect", "{tmp}/missing"], "data folder not found"),
        (["inspect", "{tmp}/empty"], "no known dataset layout"),
        (["models", "--artifact-root", "{tmp}/missing"], "artifact root not found"),
        (["rollback", "--artifact-root", "{tmp}/empty"], "nothing is promoted"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, tmp_path, argv, message):
    (tmp_path / "empty").mkdir()
    code, out, err = run(capsys, *(a.format(tmp=tmp_path) for a in argv))
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert "Traceback" not in err


def test_traceback_flag_raises_instead(tmp_path):
    with pytest.raises(ValueError, match="artifact root not found"):
        main(["--traceback", "models", "--artifact-root", str(tmp_path / "missing")])


# --------------------------------------------------------------------------------------------- inspect
@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory):
    from melanoma_ml.synthetic import generate_synthetic_dataset

    config = SyntheticConfig(n_patients=12, images_per_patient=(2, 3), image_size=64, seed=1)
    return generate_synthetic_dataset(tmp_path_factory.mktemp("cli") / "synthetic", config)


@pytest.mark.parametrize("extra", [[], ["--no-images"]])
def test_inspect_synthetic_folder(capsys, synthetic_dir, extra):
    code, out, err = run(capsys, "inspect", str(synthetic_dir.root), "--folds", "2", *extra)
    assert code == 0, err
    assert "layout:       isic2020" in out
    n = synthetic_dir.n_images
    assert f"rows:         {n} read, {n} clean, 0 quarantined" in out
    assert f"{synthetic_dir.n_melanoma} melanoma" in out
    assert "fold preview (2 patient-grouped stratified folds" in out
    assert ("not checked (--no-images)" in out) == bool(extra)


def test_inspect_reports_quarantined_rows(capsys, tmp_path, synthetic_dir):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(synthetic_dir.root, copy)
    victim = sorted((copy / "jpeg" / "train").glob("*.jpg"))[0]
    victim.unlink()
    code, out, _ = run(capsys, "inspect", str(copy), "--folds", "2")
    assert code == 0
    n = synthetic_dir.n_images
    assert f"{n} read, {n - 1} clean, 1 quarantined" in out
    assert "quarantine reasons: 1" in out
    assert victim.stem in out  # the first quarantined row names the image


@pytest.mark.real_data
def test_inspect_real_isic_sample(capsys, isic_sample_dir):
    code, out, err = run(capsys, "inspect", str(isic_sample_dir), "--no-hash")
    assert code == 0, err
    assert "layout:       isic2020" in out  # metadata.csv in 2020 naming
    assert "rows:         1391 read, 1391 clean, 0 quarantined" in out
    assert "330 melanoma" in out
    assert "fold preview (3 patient-grouped stratified folds" in out  # demo profile: 3 folds
    assert "problems: none" in out


# --------------------------------------------------------------------------------------------- registry
@pytest.fixture
def registry_root(tmp_path: Path) -> Path:
    """An artifact root whose registry has v0001 then v0002 promoted (random-weight tiny bundles)."""
    import torch

    from melanoma_ml.config import ModelConfig
    from melanoma_ml.features import MetadataEncoder
    from melanoma_ml.serving.registry import ModelRegistry
    from melanoma_ml.spec import ModelSpec

    torch.manual_seed(0)
    encoder = MetadataEncoder(age_mean=50.0, age_std=15.0, sexes=("female", "male"), sites=("torso",))
    network = ModelConfig(backbone="test_efficientnet", meta_hidden=[8], meta_dropout=0.1, head_dropout=0.1)
    spec = ModelSpec(network, 32, [0.5] * 3, [0.25] * 3, encoder)
    net = spec.build_network().eval()
    registry = ModelRegistry(ArtifactPaths(tmp_path / "artifacts").registry)
    for auc in (0.71, 0.83):
        version = registry.register_bundle(
            net,
            spec,
            threshold=0.4,
            metrics={"auc": {"value": auc, "lo": auc - 0.05, "hi": auc + 0.05}},
            data_version="d",
            code_version="c",
        )
        registry.promote(version, reason="test")
    return tmp_path / "artifacts"


def test_models_lists_versions_and_marks_current(capsys, registry_root):
    code, out, _ = run(capsys, "models", "--artifact-root", str(registry_root))
    assert code == 0
    lines = out.splitlines()
    v1 = next(line for line in lines if "v0001" in line)
    v2 = next(line for line in lines if "v0002" in line)
    assert "0.710" in v1 and "[0.660, 0.760]" in v1 and not v1.lstrip().startswith("*")
    assert v2.lstrip().startswith("*") and "0.830" in v2 and "test_efficientnet" in v2
    assert lines[-1] == "current: v0002"


def test_models_lists_a_version_of_an_older_manifest_schema_as_unreadable(capsys, registry_root):
    manifest_path = ArtifactPaths(registry_root).registry / "versions" / "v0001" / "manifest.json"
    old = json.loads(manifest_path.read_text())
    del old["schema_version"]
    manifest_path.write_text(json.dumps({**old, "format_version": 1, "extra": {"version": "v0001"}}))
    code, out, _ = run(capsys, "models", "--no-verify", "--artifact-root", str(registry_root))
    assert code == 0
    v1 = next(line for line in out.splitlines() if "v0001" in line)
    assert "unreadable: bundle" in v1 and "has manifest schema 1, this version of melanoma_ml reads" in v1
    assert "0.830 [0.780, 0.880] (95% CI)" in out  # v0002 is still listed


def test_rollback_moves_the_pointer_back_and_forth(capsys, registry_root):
    from melanoma_ml.serving.registry import ModelRegistry

    root = str(registry_root)
    code, out, _ = run(capsys, "rollback", "--artifact-root", root)
    assert code == 0 and "rolled back: v0002 -> v0001" in out
    assert ModelRegistry(ArtifactPaths(registry_root).registry).current() == "v0001"
    code, out, _ = run(capsys, "rollback", "--to", "v0002", "--artifact-root", root)
    assert code == 0 and "rolled back: v0001 -> v0002" in out
    code, _, err = run(capsys, "rollback", "--to", "v0009", "--artifact-root", root)
    assert code == 2 and "unknown model version 'v0009'" in err
    assert ModelRegistry(ArtifactPaths(registry_root).registry).current() == "v0002"


def _corrupt(weights: Path) -> None:
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")


def test_models_verifies_each_version_and_says_why_one_was_never_promoted(capsys, registry_root):
    from melanoma_ml.serving.registry import ModelRegistry

    registry = ModelRegistry(ArtifactPaths(registry_root).registry)
    orphan = registry.register(registry.version_path("v0001"), reason="copied in by hand")
    _corrupt(registry.version_path("v0002") / "weights.safetensors")
    code, out, _ = run(capsys, "models", "--artifact-root", str(registry_root))
    assert code == 0
    lines = out.splitlines()
    v2 = lines.index(next(line for line in lines if " v0002 " in line))
    assert lines[v2].lstrip().startswith("*")
    assert "CORRUPT: sha256 mismatch for" in lines[v2 + 1] and "weights.safetensors" in lines[v2 + 1]
    o = lines.index(next(line for line in lines if f" {orphan} " in line))
    assert "not promoted: registered" in lines[o + 1] and "copied in by hand" in lines[o + 1]
    assert "v0001" in out and "CORRUPT" not in lines[v2 - 1] + lines[v2 - 2]
    assert "current: v0002 (CORRUPT" in lines[-1]
    code, out, _ = run(capsys, "models", "--no-verify", "--artifact-root", str(registry_root))
    assert code == 0 and "CORRUPT" not in out and "not promoted" in out and "not verified" in out


def test_a_corrupt_pointer_is_listed_rolled_back_over_and_repaired(capsys, registry_root):
    from melanoma_ml.serving.registry import ModelRegistry

    registry = ModelRegistry(ArtifactPaths(registry_root).registry)
    root = str(registry_root)
    registry.current_file.write_text("{not json")
    code, out, _ = run(capsys, "models", "--artifact-root", root)
    assert code == 0 and "v0002" in out and "unreadable" in out.splitlines()[-1]
    assert "registry repair" in out.splitlines()[-1]
    code, out, err = run(capsys, "rollback", "--to", "v0001", "--artifact-root", root)
    assert code == 0, err
    assert "rolled back: (unreadable pointer) -> v0001" in out
    assert registry.current() == "v0001"

    registry.current_file.write_text("{not json")
    code, out, err = run(capsys, "registry", "repair", "--artifact-root", root)
    assert code == 0, err
    assert "not valid JSON" in out and "now names v0001" in out
    assert registry.current() == "v0001"
    code, out, _ = run(capsys, "registry", "repair", "--artifact-root", root)
    assert code == 0 and "nothing to repair" in out


def test_models_warns_when_the_pointer_names_a_version_that_does_not_exist(capsys, registry_root):
    pointer = ArtifactPaths(registry_root).registry / "current.json"
    pointer.write_text(json.dumps({**json.loads(pointer.read_text()), "version": "v0099"}))
    code, out, _ = run(capsys, "models", "--artifact-root", str(registry_root))
    assert code == 0
    last = out.splitlines()[-1]
    assert last.startswith("current: v0099 (WARNING") and "does not exist" in last
    assert "registry repair" in last
    code, out, _ = run(capsys, "registry", "verify", "--artifact-root", str(registry_root))
    assert code == 1 and "v0099 (WARNING" in out.splitlines()[-1]


def test_registry_verify_says_which_versions_are_intact_legacy_or_corrupt(capsys, registry_root):
    from melanoma_ml.serving.registry import ModelRegistry

    registry = ModelRegistry(ArtifactPaths(registry_root).registry)
    root = str(registry_root)
    code, out, _ = run(capsys, "registry", "verify", "--artifact-root", root)
    assert code == 0, out
    assert "2 versions: 2 intact, 0 legacy, 0 corrupt" in out
    assert out.splitlines()[-1] == "current: v0002 intact"
    # v0001 as an older melanoma_ml registered it: no manifest digest, none in history
    (registry.version_path("v0001") / "manifest.sha256").unlink()
    events = [json.loads(line) for line in registry.history_file.read_text().splitlines()]
    registry.history_file.write_text(
        "".join(json.dumps({k: v for k, v in e.items() if k != "manifest_sha256"}) + "\n" for e in events)
    )
    # v0002's threshold edited after promotion: valid JSON, a valid manifest, a changed answer
    manifest_path = registry.version_path("v0002") / "manifest.json"
    manifest_path.write_text(manifest_path.read_text().replace('"threshold": 0.4', '"threshold": 0.9'))
    code, out, _ = run(capsys, "registry", "verify", "--artifact-root", root)
    assert code == 1
    lines = out.splitlines()
    v1 = next(line for line in lines if " v0001 " in line)
    v2 = next(line for line in lines if " v0002 " in line)
    assert "legacy" in v1 and "manifest not covered" in v1
    assert v2.lstrip().startswith("*") and "CORRUPT" in v2 and "manifest.json" in v2
    assert "1 legacy, 1 corrupt" in out and lines[-1].startswith("current: v0002 CORRUPT")
    code, out, _ = run(capsys, "models", "--artifact-root", root)
    assert code == 0 and "manifest not covered" in out and "CORRUPT: sha256 mismatch for" in out
    code, out, _ = run(capsys, "rollback", "--artifact-root", root)
    assert code == 0 and "rolled back: v0002 -> v0001" in out  # a legacy version still serves
    code, out, _ = run(capsys, "registry", "verify", "--artifact-root", root)
    assert code == 0 and "current: v0001 legacy (manifest not covered" in out.splitlines()[-1]


def test_rollback_refuses_an_orphan_unless_adopted(capsys, registry_root):
    import shutil

    from melanoma_ml.serving.registry import ModelRegistry

    registry = ModelRegistry(ArtifactPaths(registry_root).registry)
    root = str(registry_root)
    # a writer killed after renaming its bundle into place, before logging it
    shutil.copytree(registry.version_path("v0001"), registry.versions_dir / "v0003")
    code, out, _ = run(capsys, "models", "--artifact-root", root)
    assert "not promoted: not in history.jsonl" in out
    code, _, err = run(capsys, "rollback", "--to", "v0003", "--artifact-root", root)
    assert code == 2 and "v0003 was never promoted" in err and "rollback --to v0003 --adopt" in err
    assert registry.current() == "v0002"
    code, _, err = run(capsys, "rollback", "--adopt", "--artifact-root", root)
    assert code == 2 and "--adopt needs --to VERSION" in err
    code, out, err = run(capsys, "rollback", "--to", "v0003", "--adopt", "--artifact-root", root)
    assert code == 0, err
    assert "adopted: v0002 -> v0003" in out and registry.current() == "v0003"
    assert registry.history()[-1]["event"] == "promoted" and registry.history()[-1]["adopted"] is True


def test_models_on_a_root_without_registry(capsys, tmp_path):
    code, out, _ = run(capsys, "models", "--artifact-root", str(tmp_path))
    assert code == 0
    assert "no versions registered yet" in out


# --------------------------------------------------------------------------------------------- demo
@pytest.mark.slow
def test_demo_on_the_tiny_profile(capsys, tmp_path):
    root = tmp_path / "artifacts"
    code, out, err = run(capsys, "demo", "--profile", "tiny", "--artifact-root", str(root))
    assert code == 0, err
    assert "[train test_efficientnet] done" in out
    assert "1. test_efficientnet" in out and "AUC" in out
    assert "served version: none -> v0001" in out
    assert "wall time:" in out
    code, out, _ = run(capsys, "models", "--artifact-root", str(root))
    assert code == 0 and "current: v0001" in out


def test_demo_on_the_full_profile_without_a_dataset_is_refused_with_the_fix(capsys, tmp_path):
    """``full`` trains on real data only: no ``data.source_dir`` is refused before any synthetic image is made."""
    root = tmp_path / "artifacts"
    code, out, err = run(capsys, "demo", "--profile", "full", "--artifact-root", str(root))
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "--set data.source_dir=PATH" in err and "MELANOMA_DATA__SOURCE_DIR" in err
    assert "data.allow_synthetic=true" in err
    assert not list(root.rglob("*.jpg")), "synthetic images were generated before the refusal"


def test_full_profile_settings_on_synthetic_data_need_the_explicit_opt_in(tmp_path):
    from melanoma_ml.config import load_config
    from melanoma_ml.pipeline import prepare_source

    tiny_synthetic = {"n_patients": 4, "images_per_patient": (1, 1), "image_size": 32}
    base = {"artifact_root": str(tmp_path / "a"), "data": {"synthetic": tiny_synthetic}}
    assert load_config("full").data.allow_synthetic is False
    assert load_config("demo").data.allow_synthetic is True
    with pytest.raises(ValueError, match="data.source_dir is not set"):
        prepare_source(load_config("full", base))
    opted_in = load_config("full", {**base, "data": {"synthetic": tiny_synthetic, "allow_synthetic": True}})
    source = prepare_source(opted_in)
    assert source.synthetic and len(list(source.root.rglob("*.jpg"))) == 4


def _numpy_reshape_bug(args) -> int:
    import numpy as np

    np.zeros(3).reshape(2, 2)
    return 0


def _torch_shape_bug(args) -> int:
    import torch

    torch.nn.functional.binary_cross_entropy_with_logits(torch.zeros(3), torch.zeros(4))
    return 0


@pytest.mark.parametrize("bug", [_numpy_reshape_bug, _torch_shape_bug], ids=["numpy", "torch"])
def test_a_value_error_from_inside_a_library_keeps_its_traceback(monkeypatch, capsys, bug):
    """A ValueError that numpy/torch raise deep inside a command is a bug, not bad input: it propagates."""
    import melanoma_ml.cli as cli
    from melanoma_ml.errors import is_input_error

    monkeypatch.setattr(cli, "cmd_config", bug)
    with pytest.raises(ValueError) as excinfo:
        cli.main(["config"])
    assert not is_input_error(excinfo.value)
    assert "error:" not in capsys.readouterr().err


def test_errors_are_input_errors_by_type_not_by_where_they_were_raised():
    import numpy as np

    from melanoma_ml.config import load_config
    from melanoma_ml.errors import is_input_error

    with pytest.raises(ValueError) as from_numpy:
        np.zeros(3).reshape(2, 2)
    assert not is_input_error(from_numpy.value)
    with pytest.raises(ValueError) as from_us:
        load_config("no-such-profile")
    assert is_input_error(from_us.value)
    assert not is_input_error(ValueError("a plain ValueError raised in melanoma_ml is a bug too"))


@pytest.mark.parametrize(
    ("module", "name", "builtin"),
    [
        ("melanoma_ml.metadata.io", "MetadataError", ValueError),
        ("melanoma_ml.metadata.io", "MetadataFileNotFound", FileNotFoundError),
        ("melanoma_ml.folds", "FoldError", ValueError),
        ("melanoma_ml.images.io", "ImageDecodeError", ValueError),
        ("melanoma_ml.serving.service", "InvalidRequest", ValueError),
        ("melanoma_ml.serving.service", "NoModelAvailable", RuntimeError),
        ("melanoma_ml.serving.registry", "RegistryError", ValueError),
        ("melanoma_ml.serving.bundle", "BundleError", ValueError),
        ("melanoma_ml.weights", "WeightsError", ValueError),
        ("melanoma_ml.model", "PretrainedWeightsUnavailable", RuntimeError),
        ("melanoma_ml.cli", "UsageError", ValueError),
        ("melanoma_ml.steps", "PipelineCheckFailed", RuntimeError),
    ],
)
def test_each_input_error_class_is_an_input_error_and_keeps_its_builtin(module, name, builtin):
    """Re-based on errors.py (``errors.is_input_error`` checks the type); ``except ValueError`` still works."""
    import importlib

    from melanoma_ml.errors import MelanomaInputError

    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, MelanomaInputError) and issubclass(cls, builtin)


def test_an_input_error_from_a_command_is_one_line(monkeypatch, capsys):
    import melanoma_ml.cli as cli
    from melanoma_ml.serving.registry import RegistryError

    def refuse(args) -> int:
        raise RegistryError("unknown model version 'v0042'; run melanoma-ml models")

    monkeypatch.setattr(cli, "cmd_config", refuse)
    assert cli.main(["config"]) == 2
    assert capsys.readouterr().err == "error: unknown model version 'v0042'; run melanoma-ml models\n"
