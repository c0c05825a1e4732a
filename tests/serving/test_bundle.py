"""Serving bundle: atomic export, sha256-verified loading, clear errors, no pickles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from melanoma_ml.config import ModelConfig
from melanoma_ml.errors import MelanomaInputError
from melanoma_ml.evaluation.estimate import Estimate
from melanoma_ml.features import MetadataEncoder
from melanoma_ml.serving import bundle as bundle_module
from melanoma_ml.serving.bundle import (
    BundleError,
    BundleIntegrityError,
    ManifestSchemaError,
    load_bundle,
    read_manifest,
    save_bundle,
    verify_bundle,
)
from melanoma_ml.serving.manifest import MANIFEST_SCHEMA_VERSION, BundleManifest
from melanoma_ml.spec import ModelSpec
from melanoma_ml.training.checkpoint import save_checkpoint
from melanoma_ml.weights import WEIGHTS_FILE

METRICS = {"auc": {"value": 0.81, "lo": 0.74, "hi": 0.88, "level": 0.9}}
OOF = {
    "image_name": ["ISIC_1", "ISIC_2"],
    "group_id": ["patient:P1", "patient:P2"],
    "fold": [1, 1],
    "target": [0, 1],
    "prob": [0.2, 0.7],
}


def tiny_spec(backbone: str = "test_efficientnet", size: int = 32) -> ModelSpec:
    encoder = MetadataEncoder(
        age_mean=50.0, age_std=15.0, sexes=("female", "male"), sites=("head/neck", "torso")
    )
    network = ModelConfig(backbone=backbone, meta_hidden=[8], meta_dropout=0.1, head_dropout=0.1)
    return ModelSpec(network, size, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], encoder)


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
    path = export(
        tmp_path / "b",
        spec_and_net,
        version="v0007",
        fold=1,
        checkpoint_sha256="ab" * 32,
        oof={**OOF, "prob": np.array(OOF["prob"], dtype=np.float32).tolist()},
    )
    manifest = read_manifest(path)
    assert isinstance(manifest, BundleManifest)
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest.json",
        "manifest.sha256",
        "weights.safetensors",
    ]
    assert manifest.schema_version == MANIFEST_SCHEMA_VERSION
    assert manifest.backbone == "test_efficientnet" and manifest.model_spec == spec
    assert manifest.threshold == 0.3
    assert manifest.metrics == {"auc": Estimate(0.81, 0.74, 0.88, 0.9)}
    assert (manifest.data_version, manifest.code_version) == ("folds-abc123", "0.1.0+test")
    assert manifest.created_at.endswith("+00:00")
    assert manifest.weights_sha256 == bundle_module.sha256_file(path / "weights.safetensors")
    (member,) = manifest.ensemble.members  # one network: a one-member ensemble, its provenance on member 0
    assert (manifest.version, member.fold, member.checkpoint_sha256) == ("v0007", 1, "ab" * 32)
    assert (manifest.ensemble.kind, member.weights.name, member.runtime) == ("best_fold", WEIGHTS_FILE, None)
    assert manifest.oof_frame()["image_name"].tolist() == OOF["image_name"]
    on_disk = json.loads((path / "manifest.json").read_text())  # plain, readable JSON
    assert on_disk["schema_version"] == MANIFEST_SCHEMA_VERSION
    stored_spec = on_disk["ensemble"]["members"][0]["model_spec"]
    assert stored_spec["backbone"] == "test_efficientnet" and stored_spec["image_size"] == 32
    assert not {"model_spec", "weights_sha256", "fold", "checkpoint_sha256"} & set(on_disk)  # one shape
    assert on_disk["metrics"] == METRICS
    assert on_disk["oof"]["prob"] == pytest.approx(OOF["prob"])


def test_a_bundle_without_provenance_leaves_it_empty(tmp_path, spec_and_net):
    manifest = read_manifest(export(tmp_path / "b", spec_and_net))
    member = manifest.ensemble.members[0]
    assert (manifest.version, member.fold, member.checkpoint_sha256, manifest.oof) == (
        None,
        None,
        None,
        None,
    )
    assert manifest.oof_frame().empty and list(manifest.oof_frame().columns) == list(OOF)


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
    assert loaded.version == "exported"  # no manifest version: the folder name
    assert loaded.spec == spec
    assert loaded.metrics == {"auc": Estimate(0.81, 0.74, 0.88, 0.9)}


def test_tampered_weights_are_refused_before_loading(tmp_path, spec_and_net):
    path = export(tmp_path / "b", spec_and_net)
    weights = path / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match=r"sha256 mismatch for .*weights\.safetensors.*roll back"):
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
        bundle_module, "atomic_write_bytes", lambda *a, **k: (_ for _ in ()).throw(OSError("boom"))
    )
    with pytest.raises(OSError, match="boom"):
        export(tmp_path / "b", spec_and_net, threshold=0.9)
    assert verify_bundle(path).threshold == 0.4
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"threshold": 1.5}, BundleError, r"threshold: Input should be less than or equal to 1"),
        ({"threshold": float("nan")}, BundleError, "threshold: Input should be a finite number"),
        ({"metrics": {"auc": object()}}, BundleError, r"metrics\.auc: .*must be a dict"),
        ({"metrics": {"n_rows": 40}}, BundleError, r"metrics\.n_rows: .*must be a dict"),
        ({"oof": {**OOF, "prob": [0.2]}}, BundleError, "oof: .*columns differ in length"),
        (
            {"fold": 0, "oof": OOF},
            BundleError,
            r"oof holds rows of folds \[1\], but the bundle serves fold 0",
        ),
        ({"checkpoint_sha256": "abc"}, BundleError, "checkpoint_sha256: String should match pattern"),
    ],
    ids=["threshold", "nan-threshold", "metric-object", "metric-number", "oof-lengths", "oof-fold", "sha"],
)
def test_bad_export_arguments_are_refused_before_writing(tmp_path, spec_and_net, overrides, error, message):
    with pytest.raises(error, match=message):
        export(tmp_path / "b", spec_and_net, **overrides)
    assert not (tmp_path / "b").exists()


def _remove(name):
    return lambda path: (path / name).unlink()


def _write_manifest_text(path: Path, text: str) -> None:
    """Replace the manifest *and* its digest: a bundle written that way, not one edited afterwards."""
    (path / "manifest.json").write_text(text)
    digest = bundle_module.sha256_file(path / "manifest.json")
    (path / "manifest.sha256").write_text(f"{digest}  manifest.json\n")


def _edit_manifest(change):
    def damage(path: Path) -> None:
        manifest = json.loads((path / "manifest.json").read_text())
        change(manifest)
        _write_manifest_text(path, json.dumps(manifest))

    return damage


def _schema_1(manifest: dict) -> dict:
    """A manifest as melanoma_ml wrote it before ``schema_version`` (provenance in ``extra``)."""
    old = {key: value for key, value in manifest.items() if key not in ("schema_version", "version")}
    return {**old, "format_version": 1, "backbone": "test_efficientnet", "extra": {"version": "v0003"}}


@pytest.mark.parametrize(
    ("change", "found"),
    [
        (_schema_1, "has manifest schema 1"),
        (lambda m: {**m, "schema_version": 99}, "has manifest schema 99"),
        (lambda m: {k: v for k, v in m.items() if k != "schema_version"}, "has no manifest schema_version"),
    ],
    ids=["old", "newer", "none"],
)
def test_a_manifest_of_another_schema_is_refused_with_what_to_do(tmp_path, spec_and_net, change, found):
    path = export(tmp_path / "v0003", spec_and_net)
    manifest = json.loads((path / "manifest.json").read_text())
    _write_manifest_text(path, json.dumps(change(manifest)))
    with pytest.raises(ManifestSchemaError) as refused:
        load_bundle(path)
    message = str(refused.value)
    assert f"bundle {path} {found}, this version of melanoma_ml reads schema 2 and 3" in message
    assert "melanoma-ml rollback --to VERSION" in message and "serving_model" in message
    assert isinstance(refused.value, BundleError) and isinstance(refused.value, MelanomaInputError)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda path: shutil.rmtree(path), "bundle folder not found"),
        (_remove("manifest.json"), "manifest.json missing in bundle"),
        (_remove("weights.safetensors"), "weights.safetensors missing in bundle"),
        (lambda path: _write_manifest_text(path, "{not json"), "is not valid JSON"),
        (lambda path: _write_manifest_text(path, "[1, 2]"), "must hold a JSON object"),
        (
            _edit_manifest(lambda m: m.pop("threshold")),
            r"manifest.json is invalid: threshold: Field required",
        ),
        (_edit_manifest(lambda m: m.update(color="red")), "color: Extra inputs are not permitted"),
        (_edit_manifest(lambda m: m["metrics"].update(auc=0.8)), r"metrics\.auc: .*must be a dict"),
    ],
    ids=[
        "no-folder",
        "no-manifest",
        "no-weights",
        "bad-json",
        "not-object",
        "missing-field",
        "unknown-field",
        "metric",
    ],
)
def test_broken_bundles_give_clear_errors(tmp_path, spec_and_net, damage, message):
    path = export(tmp_path / "b", spec_and_net)
    damage(path)
    with pytest.raises(BundleError, match=message):
        load_bundle(path)


def test_weights_that_do_not_fit_the_spec_are_refused(tmp_path, spec_and_net):
    path = export(tmp_path / "b", spec_and_net)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["ensemble"]["members"][0]["model_spec"]["meta_hidden"] = [16]
    _write_manifest_text(path, json.dumps(manifest))
    with pytest.raises(BundleError, match=r"(?s)does not fit the 'test_efficientnet' network.*re-export"):
        load_bundle(path)


def test_unreadable_weights_with_a_matching_sha256_are_refused(tmp_path, spec_and_net):
    path = export(tmp_path / "b", spec_and_net)
    (path / WEIGHTS_FILE).write_bytes(b"not a safetensors file")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["ensemble"]["members"][0]["weights"]["sha256"] = bundle_module.sha256_file(path / WEIGHTS_FILE)
    _write_manifest_text(path, json.dumps(manifest))
    with pytest.raises(BundleError, match=r"cannot read .*weights\.safetensors.*re-export"):
        load_bundle(path)


def test_bundle_and_checkpoint_write_the_same_weights_file(tmp_path, spec_and_net):
    spec, net = spec_and_net
    bundle_dir = export(tmp_path / "b", spec_and_net)
    checkpoint_dir = save_checkpoint(tmp_path / "fold0", net, spec, {"fold": 0})
    assert (bundle_dir / WEIGHTS_FILE).read_bytes() == (checkpoint_dir / WEIGHTS_FILE).read_bytes()
    assert bundle_module.WEIGHTS_FILE == WEIGHTS_FILE  # the registry imports the name from the bundle


def test_nan_metrics_are_stored_as_null(tmp_path, spec_and_net):
    nan = float("nan")
    path = export(tmp_path / "b", spec_and_net, metrics={"auc": Estimate(0.7, nan, nan, 0.95)})

    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    manifest = json.loads((path / "manifest.json").read_text(), parse_constant=refuse)
    assert manifest["metrics"] == {"auc": {"value": 0.7, "lo": None, "hi": None, "level": 0.95}}
    assert read_manifest(path).metrics["auc"].text() == "0.700 (no CI)"


# ---------------------------------------------------------------------- every byte verified, the manifest too
def _flip(file: Path, position: int) -> None:
    data = bytearray(file.read_bytes())
    data[position] ^= 0x01
    file.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def two_member_bundle(tmp_path_factory, spec_and_net) -> Path:
    """An ensemble bundle: weights, a member file, the manifest and its digest."""
    from melanoma_ml.serving.bundle import EnsembleToSave, MemberNet

    spec, net = spec_and_net
    torch.manual_seed(1)
    other = spec.build_network().eval()
    members = [MemberNet(net, spec, 0, "0" * 64), MemberNet(other, spec, 1, "1" * 64)]
    path = tmp_path_factory.mktemp("bundle") / "b"
    return export(path, spec_and_net, ensemble=EnsembleToSave("folds", "probability", members))


def test_the_manifest_digest_is_the_sha256_of_the_manifest_in_sha256sum_format(two_member_bundle):
    import hashlib

    digest = hashlib.sha256((two_member_bundle / "manifest.json").read_bytes()).hexdigest()
    assert (two_member_bundle / "manifest.sha256").read_text() == f"{digest}  manifest.json\n"
    names = bundle_module.bundle_file_names(verify_bundle(two_member_bundle))
    assert sorted(names) == sorted(
        str(p.relative_to(two_member_bundle)) for p in two_member_bundle.rglob("*.*")
    )
    assert bundle_module.manifest_covered(two_member_bundle)


def test_flipping_any_byte_of_any_file_is_refused(tmp_path, two_member_bundle):
    manifest = verify_bundle(two_member_bundle)
    names = bundle_module.bundle_file_names(manifest)
    assert {"manifest.json", "manifest.sha256", "weights.safetensors", "members/member1.safetensors"} <= set(
        names
    )
    for name in names:
        size = (two_member_bundle / name).stat().st_size
        for position in sorted({0, 1, size // 3, size // 2, size - 2, size - 1}):
            copy = tmp_path / f"{name.replace('/', '_')}-{position}"
            shutil.copytree(two_member_bundle, copy)
            _flip(copy / name, position)
            with pytest.raises(BundleError) as refused:
                verify_bundle(copy)
            message = str(refused.value)
            assert name.rsplit("/", 1)[-1] in message or "manifest.json" in message, (name, position, message)
            with pytest.raises(BundleError):
                load_bundle(copy)
            shutil.rmtree(copy)


def test_an_edited_threshold_is_refused_with_the_fix(tmp_path, spec_and_net):
    path = export(tmp_path / "v0004", spec_and_net, threshold=0.3)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["threshold"] = 0.9  # valid JSON, a valid manifest: only the digest can tell
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleIntegrityError) as refused:
        load_bundle(path)
    message = str(refused.value)
    assert f"sha256 mismatch for {path / 'manifest.json'}" in message and "manifest.sha256" in message
    assert "melanoma-ml rollback --to VERSION" in message and "melanoma-ml registry repair" in message


def test_a_legacy_bundle_without_a_digest_still_loads_unless_a_digest_was_recorded(tmp_path, spec_and_net):
    path = export(tmp_path / "b", spec_and_net)
    digest = (path / "manifest.sha256").read_text().split()[0]
    (path / "manifest.sha256").unlink()  # as bundles were written before manifests were hashed
    assert not bundle_module.manifest_covered(path)
    assert load_bundle(path).threshold == 0.3
    with pytest.raises(BundleIntegrityError, match=r"manifest\.sha256 missing in bundle .*registry recorded"):
        verify_bundle(path, manifest_sha256=digest)  # a recorded digest makes a removed digest file an error


def test_a_recorded_digest_that_differs_is_refused(tmp_path, spec_and_net):
    path = export(tmp_path / "b", spec_and_net)
    digest = (path / "manifest.sha256").read_text().split()[0]
    assert verify_bundle(path, manifest_sha256=digest).threshold == 0.3
    with pytest.raises(BundleIntegrityError, match="the registry history records 0+, got"):
        verify_bundle(path, manifest_sha256="0" * 64)


def test_an_ensemble_gives_provenance_per_member_and_member_0_is_the_bundle_s_own(tmp_path, spec_and_net):
    from melanoma_ml.serving.bundle import EnsembleToSave, MemberNet

    spec, net = spec_and_net
    members = [MemberNet(net, spec, 0), MemberNet(net, spec, 1)]
    ensemble = EnsembleToSave("folds", "probability", members)
    with pytest.raises(BundleError, match="fold and checkpoint_sha256 describe a one-network bundle"):
        export(tmp_path / "a", spec_and_net, ensemble=ensemble, fold=0)
    other = tiny_spec(size=40)
    with pytest.raises(BundleError, match="member 0 must have the bundle's own spec"):
        save_bundle(tmp_path / "b", net, other, threshold=0.3, metrics=METRICS, data_version="d",
                    code_version="c", ensemble=ensemble)  # fmt: skip
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
