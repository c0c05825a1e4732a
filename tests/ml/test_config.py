"""The config home: profiles, env overrides, validation messages."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from melanoma_ml.config import PROFILES, ModelConfig, PipelineConfig, deep_merge, load_config


def test_defaults_match_the_seed_project():
    config = PipelineConfig()
    assert config.model.backbone == "efficientnet_b0"
    assert config.model.meta_hidden == [128, 64]
    assert config.training.loss == "focal"
    assert config.training.learning_rate == pytest.approx(1e-4)
    assert config.training.batch_size == 32
    assert config.training.epochs == 20
    assert config.data.image_size == 256


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_profile_builds(profile):
    config = load_config(profile)
    assert config.backbones
    assert config.data.n_folds >= 2


def test_demo_profile_is_small_enough_for_a_laptop():
    config = load_config("demo")
    assert config.data.image_size <= 64
    assert all(name.startswith("test_") for name in config.backbones)
    assert config.model.pretrained is False


def test_overrides_win_over_env_which_wins_over_profile(monkeypatch):
    monkeypatch.setenv("MELANOMA_TRAINING__EPOCHS", "3")
    monkeypatch.setenv("MELANOMA_DATA__N_FOLDS", "4")
    config = load_config("demo", {"training": {"epochs": 5}})
    assert config.training.epochs == 5
    assert config.data.n_folds == 4
    assert config.training.batch_size == PROFILES["demo"]["training"]["batch_size"]


def test_dotenv_file_is_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("MELANOMA_TRAINING__BATCH_SIZE=7\n")
    assert load_config("demo").training.batch_size == 7


def test_unknown_profile_names_the_choices():
    with pytest.raises(ValueError, match="choose one of"):
        load_config("nope")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"data": {"n_folds": 1}}, "n_folds"),
        ({"training": {"epochs": 0}}, "epochs"),
        ({"model": {"meta_hidden": []}}, "meta_hidden"),
        ({"training": {"loss": "hinge"}}, "loss"),
        ({"backbones": []}, "backbones"),
        ({"training": {"epochz": 3}}, "epochz"),
    ],
)
def test_bad_values_are_rejected_with_the_field_name(overrides, field):
    with pytest.raises(ValidationError, match=field):
        load_config("demo", overrides)


def test_model_for_swaps_only_the_backbone():
    config = load_config("demo")
    swapped = config.model_for("test_resnet")
    assert swapped.backbone == "test_resnet"
    assert swapped.meta_hidden == config.model.meta_hidden


def test_deep_merge_keeps_siblings():
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("false", False), ("False", False), (" NO ", False), ("0", False), ("true", True), ("TRUE", True),
     ("yes", True), ("1", True), (False, False), (True, True)],
)  # fmt: skip
def test_pretrained_flag_words_become_booleans(raw, expected):
    assert ModelConfig(pretrained=raw).pretrained is expected
    assert load_config("full", {"model": {"pretrained": raw}}).model.pretrained is expected


@pytest.mark.parametrize("raw", ["false", "FALSE", "no", "0"])
def test_pretrained_false_from_the_environment_means_random_init(tmp_path, monkeypatch, raw):
    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.setenv("MELANOMA_MODEL__PRETRAINED", raw)
    assert load_config("full").model.pretrained is False
    monkeypatch.setenv("MELANOMA_MODEL__PRETRAINED", "true")
    assert load_config("demo").model.pretrained is True


def test_pretrained_other_strings_stay_weights_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MELANOMA_MODEL__PRETRAINED", "/weights/falsehood.safetensors")
    assert load_config("demo").model.pretrained == "/weights/falsehood.safetensors"
    assert ModelConfig(pretrained="weights/no.pth").pretrained == "weights/no.pth"


def test_dotenv_lines_that_are_not_config_fields_are_left_alone(tmp_path, monkeypatch):
    """A ``.env`` is read like the environment: other tools' lines and the project's non-config variables
    (the test suite's seed, the app's password) do not stop a run; a misspelt nested field still does."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MELANOMA_TEST_SEED", "3")
    (tmp_path / ".env").write_text(
        "MELANOMA_TEST_SEED=2\nMELANOMA_APP_PASSWORD=secret\nDAGSTER_HOME=/tmp/dagster\n"
        "MELANOMA_TRAINING__BATCH_SIZE=7\n"
    )
    assert load_config("tiny").training.batch_size == 7
    assert PipelineConfig().training.batch_size == 7
    (tmp_path / ".env").write_text("MELANOMA_TRAINING__EPOCS=3\n")
    with pytest.raises(ValidationError, match="epocs"):
        load_config("tiny")
