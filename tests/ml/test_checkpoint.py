"""Fold checkpoints: safetensors round trip, no pickle on load, clear errors, atomic replacement."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from melanoma_ml.config import ModelConfig
from melanoma_ml.features import MetadataEncoder
from melanoma_ml.spec import ModelSpec
from melanoma_ml.training import checkpoint as checkpoint_module
from melanoma_ml.training.checkpoint import (
    CHECKPOINT_FILES,
    INFO_FILE,
    SPEC_FILE,
    WEIGHTS_FILE,
    load_checkpoint,
    save_checkpoint,
)
from melanoma_ml.weights import weights_bytes


def _spec(backbone: str = "test_efficientnet", meta_hidden: list[int] | None = None) -> ModelSpec:
    encoder = MetadataEncoder(age_mean=50.0, age_std=12.0, sexes=("female", "male"), sites=("torso",))
    return ModelSpec(
        network=ModelConfig(
            backbone=backbone, meta_hidden=meta_hidden or [8], meta_dropout=0.1, head_dropout=0.1
        ),
        image_size=32,
        mean=[0.5, 0.5, 0.5],
        std=[0.25, 0.25, 0.25],
        encoder=encoder,
    )


def _inputs(spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(3, 3, spec.image_size, spec.image_size, generator=generator)
    metadata = torch.randn(3, spec.encoder.n_features, generator=generator)
    return image, metadata


@pytest.fixture()
def saved(tmp_path: Path) -> tuple[Path, torch.nn.Module, ModelSpec]:
    spec = _spec()
    torch.manual_seed(1)
    net = spec.build_network().eval()
    out = save_checkpoint(tmp_path / "fold0", net, spec, {"fold": 0, "val/auroc": 0.75})
    return out, net, spec


def test_files_are_written_and_weights_are_a_safetensors_file(saved) -> None:
    out, net, _spec_ = saved
    assert sorted(p.name for p in out.iterdir()) == sorted(CHECKPOINT_FILES)
    with safe_open(str(out / WEIGHTS_FILE), framework="pt") as weights:
        assert set(weights.keys()) == set(net.state_dict())
    assert json.loads((out / INFO_FILE).read_text()) == {"fold": 0, "val/auroc": 0.75}


def test_round_trip_reproduces_outputs_spec_and_info(saved) -> None:
    out, net, spec = saved
    loaded, loaded_spec, info = load_checkpoint(out)
    assert not loaded.training
    assert loaded_spec == spec
    assert info["fold"] == 0
    image, metadata = _inputs(spec)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(image, metadata), net(image, metadata), rtol=0, atol=1e-6)


def test_loading_never_unpickles(saved, monkeypatch: pytest.MonkeyPatch) -> None:
    out, _net, _spec_ = saved

    def refuse(*args, **kwargs):
        raise AssertionError("pickle-based loading was used")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    net, _spec2, _info = load_checkpoint(out)
    assert sum(p.numel() for p in net.parameters()) > 0


@pytest.mark.parametrize("missing", CHECKPOINT_FILES)
def test_a_missing_file_is_named(saved, missing: str) -> None:
    out, _net, _spec_ = saved
    (out / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")):
        load_checkpoint(out)


def test_a_missing_folder_says_to_train(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="train_fold"):
        load_checkpoint(tmp_path / "nowhere")


def test_weights_that_do_not_fit_the_spec_are_refused(saved) -> None:
    out, _net, spec = saved
    other = _spec(meta_hidden=[4])
    (out / SPEC_FILE).write_text(json.dumps(other.to_dict()))
    with pytest.raises(
        ValueError, match=r"(?s)does not fit the 'test_efficientnet' network.*re-run training"
    ):
        load_checkpoint(out)


def test_saving_again_replaces_the_folder_and_leaves_no_temp_files(saved) -> None:
    out, _net, spec = saved
    (out / "stale.txt").write_text("from an older run")
    torch.manual_seed(2)
    newer = spec.build_network().eval()
    save_checkpoint(out, newer, spec, {"fold": 0, "run": 2})
    assert sorted(p.name for p in out.iterdir()) == sorted(CHECKPOINT_FILES)
    assert [p.name for p in out.parent.iterdir()] == [out.name]
    loaded, _spec2, info = load_checkpoint(out)
    assert info["run"] == 2
    torch.testing.assert_close(loaded.state_dict(), newer.state_dict())


def test_extra_files_are_written_in_the_same_folder(tmp_path: Path) -> None:
    spec = _spec()
    net = spec.build_network().eval()
    extra = {"oof.parquet": b"PAR1", "result.json": b"{}\n"}
    out = save_checkpoint(tmp_path / "fold0", net, spec, {"fold": 0}, extra_files=extra)
    assert sorted(p.name for p in out.iterdir()) == sorted([*CHECKPOINT_FILES, *extra])
    assert {name: (out / name).read_bytes() for name in extra} == extra
    assert (out / WEIGHTS_FILE).read_bytes() == weights_bytes(net)


@pytest.mark.parametrize("name", [WEIGHTS_FILE, "../escape.txt", "sub/../../x.csv", "/abs/x.csv", ""])
def test_bad_extra_file_names_are_refused_before_writing(tmp_path: Path, name: str) -> None:
    spec = _spec()
    with pytest.raises(ValueError, match="must be a plain file name"):
        save_checkpoint(tmp_path / "fold0", spec.build_network(), spec, {}, extra_files={name: b"x"})
    assert list(tmp_path.iterdir()) == []


def test_extra_files_may_live_in_sub_folders(tmp_path: Path) -> None:
    spec = _spec()
    extra = {"logs/version_0/events.out": b"e", "logs/hparams.yaml": b"h", "result.json": b"{}"}
    out = save_checkpoint(tmp_path / "fold0", spec.build_network(), spec, {}, extra_files=extra)
    assert {name: (out / name).read_bytes() for name in extra} == extra


def test_a_failed_write_keeps_the_previous_folder_whole(saved, monkeypatch: pytest.MonkeyPatch) -> None:
    out, _net, spec = saved
    save_checkpoint(out, _net, spec, {"fold": 0, "run": 1}, extra_files={"result.json": b'{"run": 1}\n'})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_write = checkpoint_module.atomic_write_bytes

    def fail_on_result(path, data):
        if Path(path).name == "result.json":
            raise OSError("disk full")
        return real_write(path, data)

    monkeypatch.setattr(checkpoint_module, "atomic_write_bytes", fail_on_result)
    torch.manual_seed(3)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(
            out,
            spec.build_network(),
            spec,
            {"fold": 0, "run": 2},
            extra_files={"result.json": b'{"run": 2}\n'},
        )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_info_is_strict_json(tmp_path: Path) -> None:
    spec = _spec()
    out = save_checkpoint(tmp_path / "f", spec.build_network(), spec, {"val/auroc": float("nan")})
    assert "NaN" not in (out / INFO_FILE).read_text()
    assert json.loads((out / INFO_FILE).read_text()) == {"val/auroc": None}
    with pytest.raises(TypeError, match=r"info\.json\.when holds a set"):
        save_checkpoint(tmp_path / "g", spec.build_network(), spec, {"when": {1}})
    assert not (tmp_path / "g").exists()


# A training process killed (kill -9) while it writes a fold folder: it stops after the weights are in the
# temp folder, reports that it got there, and sleeps until killed.
KILLED_WHILE_SAVING = """
import sys, time
from pathlib import Path
import torch
from melanoma_ml.config import ModelConfig
from melanoma_ml.features import MetadataEncoder
from melanoma_ml.spec import ModelSpec
from melanoma_ml.training import checkpoint

out, report = Path(sys.argv[1]), Path(sys.argv[2])
encoder = MetadataEncoder(age_mean=50.0, age_std=12.0, sexes=("female", "male"), sites=("torso",))
network = ModelConfig(backbone="test_efficientnet", meta_hidden=[8], meta_dropout=0.1, head_dropout=0.1)
spec = ModelSpec(network=network, image_size=32, mean=[0.5] * 3, std=[0.25] * 3, encoder=encoder)
real_save = checkpoint.save_weights

def save_then_hang(path, net):
    real_save(path, net)
    report.write_text(str(path))
    time.sleep(300)

checkpoint.save_weights = save_then_hang
checkpoint.save_checkpoint(out, spec.build_network(), spec, {"fold": 0, "run": "killed"})
"""


def test_a_fold_write_killed_with_sigkill_is_swept_by_the_next_save(saved, tmp_path: Path) -> None:
    out, net, spec = saved
    report = tmp_path / "reached.txt"
    repo = Path(__file__).resolve().parents[2]
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_WHILE_SAVING, str(out), str(report)],
        env={**os.environ, "PYTHONPATH": str(repo)},
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (report.exists() and report.read_text()):
            assert process.poll() is None, f"the writer exited with {process.returncode} before saving"
            assert time.monotonic() < deadline, "the writer did not reach save_weights within 120 s"
            time.sleep(0.1)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    leftover = Path(report.read_text()).parent
    assert leftover.parent == out.parent and leftover.name.startswith(f".{out.name}.") and leftover.is_dir()
    assert load_checkpoint(out)[2] == {"fold": 0, "val/auroc": 0.75}  # the previous fold is whole

    save_checkpoint(out, net, spec, {"fold": 0, "run": 2})
    assert [p.name for p in out.parent.iterdir() if p != report] == [out.name]
    assert load_checkpoint(out)[2] == {"fold": 0, "run": 2}
