"""Serving bundle: atomic export, sha256-verified loading, clear errors, no pickles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from melanoma_ml.features import MetadataEncoder
from melanoma_ml.serving import bundle as bundle_module
from melanoma_ml.serving.bundle import (
    BundleError,
    BundleIntegrityError,
    load_bundle,
    read_manifest,
    save_bundle,
    verify_bundle,
)
from melanoma_ml.spec import ModelSpec
from melanoma_ml.training.checkpoint import save_checkpoint
from melanoma_ml.weights import WEIGHTS_FILE

METRICS = {"auc": {"value": 0.81, "lo": 0.74, "hi": 0.88}, "n_rows": 40}


def tiny_spec(backbone: str = "test_efficientnet", size: int = 32) -> ModelSpec:
    encoder = MetadataEncoder(
        age_mean=50.0, age_std=15.0, sexes=("female", "male"), sites=("head/neck", "torso")
    )
    return ModelSpec(backbone, [8], 0.1, 0.1, size, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], encoder)


@pytest.fixture(scope="module")
def spec_and_net():
    torch.manual_seed(0)
    spec = tiny_spec()
    return spec, spec.build_network().eval()


def export(out: Path, spec_and_net, **overrides) -> Path:
    spec, net = spec_and_net
    kwargs = {
        "threshold": 0.3,
        "metrics": METRICS,
        "data_version": "folds-abc123",
        "code_version": "0.1.0+test",
        **overrides,
    }
    return save_bundle(out, net, spec, **kwargs)


def test_manifest_records_everything_needed_to_rebuild_and_trust(tmp_path, spec_and_net):
    spec, _ = spec_and_net
    path = export(tmp_path / "b", spec_and_net, extra={"version": "v0007", "note": np.float32(0.5)})
    manifest = read_manifest(path)
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "weights.safetensors"]
    assert manifest["backbone"] == "test_efficientnet"
    assert manifest["image_size"] == 32
    assert manifest["normalization"] == {"mean": spec.mean, "std": spec.std}
    assert manifest["metadata_encoder"] == spec.encoder.to_dict()
    assert ModelSpec.from_dict(manifest["model_spec"]) == spec
    assert manifest["threshold"] == 0.3
    assert manifest["metrics"] == METRICS
    assert (manifest["data_version"], manifest["code_version"]) == ("folds-abc123", "0.1.0+test")
    assert manifest["created_at"].endswith("+00:00")
    assert manifest["weights_sha256"] == bundle_module.sha256_file(path / "weights.safetensors")
    assert manifest["extra"] == {"version": "v0007", "note": 0.5}


def test_round_trip_gives_identical_predictions_without_unpickling(tmp_path, spec_and_net, monkeypatch):
    spec, net = spec_and_net
    path = export(tmp_path / "exported", spec_and_net)

    def no_pickles(*args, **kwargs):
        raise AssertionError("load_bundle must not call torch.load")

    monkeypatch.setattr(torch, "load", no_pickles)
    loaded = load_bundle(path, channels_last=False)
    x = torch.randn(4, 3, 32, 32)
    meta = torch.from_numpy(np.stack([spec.encoder.encode_one(40, "male", "torso")] * 4))
    with torch.inference_mode():
        assert torch.equal(loaded.net(x, meta), net(x, meta))
        fast = load_bundle(path).net(x.contiguous(memory_format=torch.channels_last), meta)
        torch.testing.assert_close(fast, net(x, meta), rtol=1e-5, atol=1e-5)
    assert not loaded.net.training
    assert not any(p.requires_grad for p in loaded.net.parameters())
    assert loaded.threshold == 0.3
    assert loaded.version == "exported"  # no extra["version"]: the folder name
    assert loaded.spec == spec
    assert loaded.metrics == METRICS


def test_tampered_weights_are_refused_before_loading(tmp_path, spec_and_net):
    path = export(tmp_path / "b", spec_and_net)
    weights = path / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match=r"weights sha256 mismatch in .*re-export it or roll back"):
        load_bundle(path)


def test_failed_save_leaves_no_folder_and_no_temp_files(tmp_path, spec_and_net, monkeypatch):
    def crash(path):
        raise OSError("disk full")

    monkeypatch.setattr(bundle_module, "sha256_file", crash)
    with pytest.raises(OSError, match="disk full"):
        export(tmp_path / "b", spec_and_net)
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_the_previous_bundle(tmp_path, spec_and_net, monkeypatch):
    path = export(tmp_path / "b", spec_and_net, threshold=0.4)
    monkeypatch.setattr(
        bundle_module, "atomic_write_json", lambda *a, **k: (_ for _ in ()).throw(OSError("boom"))
    )
    with pytest.raises(OSError, match="boom"):
        export(tmp_path / "b", spec_and_net, threshold=0.9)
    assert verify_bundle(path)["threshold"] == 0.4
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"threshold": 1.5}, ValueError, r"threshold must be a probability in \[0, 1\]"),
        ({"threshold": float("nan")}, ValueError, "threshold must be a probability"),
        ({"metrics": {"auc": object()}}, TypeError, r"metrics.auc holds a object"),
        ({"extra": {"when": {1, 2}}}, TypeError, r"extra.when holds a set"),
    ],
)
def test_bad_export_arguments_are_refused_before_writing(tmp_path, spec_and_net, overrides, error, message):
    with pytest.raises(error, match=message):
        export(tmp_path / "b", spec_and_net, **overrides)
    assert not (tmp_path / "b").exists()


def _remove(name):
    return lambda path: (path / name).unlink()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda path: shutil.rmtree(path), "bundle folder not found"),
        (_remove("manifest.json"), "manifest.json missing in bundle"),
        (_remove("weights.safetensors"), "weights.safetensors missing in bundle"),
        (lambda path: (path / "manifest.json").write_text("{not json"), "is not valid JSON"),
        (lambda path: (path / "manifest.json").write_text("[1, 2]"), "must hold a JSON object"),
        (lambda path: (path / "manifest.json").write_text('{"format_version": 1}'), "lacks fields"),
        (
            lambda path: (path / "manifest.json").write_text(
                json.dumps({**json.loads((path / "manifest.json").read_text()), "format_version": 99})
            ),
            "has format_version 99",
        ),
    ],
    ids=["no-folder", "no-manifest", "no-weights", "bad-json", "not-object", "missing-fields", "format"],
)
def test_broken_bundles_give_clear_errors(tmp_path, spec_and_net, damage, message):
    path = export(tmp_path / "b", spec_and_net)
    damage(path)
    with pytest.raises(BundleError, match=message):
        load_bundle(path)


def test_weights_that_do_not_fit_the_spec_are_refused(tmp_path, spec_and_net):
    path = export(tmp_path / "b", spec_and_net)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["model_spec"]["meta_hidden"] = [16]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"(?s)does not fit the 'test_efficientnet' network.*re-export"):
        load_bundle(path)


def test_unreadable_weights_with_a_matching_sha256_are_refused(tmp_path, spec_and_net):
    path = export(tmp_path / "b", spec_and_net)
    (path / WEIGHTS_FILE).write_bytes(b"not a safetensors file")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["weights_sha256"] = bundle_module.sha256_file(path / WEIGHTS_FILE)
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"cannot read .*weights\.safetensors.*re-export"):
        load_bundle(path)


def test_bundle_and_checkpoint_write_the_same_weights_file(tmp_path, spec_and_net):
    spec, net = spec_and_net
    bundle_dir = export(tmp_path / "b", spec_and_net)
    checkpoint_dir = save_checkpoint(tmp_path / "fold0", net, spec, {"fold": 0})
    assert (bundle_dir / WEIGHTS_FILE).read_bytes() == (checkpoint_dir / WEIGHTS_FILE).read_bytes()
    assert bundle_module.WEIGHTS_FILE == WEIGHTS_FILE  # the registry imports the name from the bundle


def test_nan_metrics_are_stored_as_null(tmp_path, spec_and_net):
    path = export(tmp_path / "b", spec_and_net, metrics={"auc": {"value": float("nan")}, "n": np.int64(3)})

    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    manifest = json.loads((path / "manifest.json").read_text(), parse_constant=refuse)
    assert manifest["metrics"] == {"auc": {"value": None}, "n": 3}
