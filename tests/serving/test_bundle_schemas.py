"""Schema 3 in use: schema-2 versions of an existing registry still serve, and every hashed file is guarded.

``schema2/*.json`` are manifests written by ``save_bundle`` of commit ae64216 (the last schema-2 code):
a one-network ``best_fold`` bundle (fold, checkpoint sha256, calibrator, test metrics) and a two-member
``folds`` ensemble, both of random-weight ``test_efficientnet`` networks (``torch.manual_seed(0)`` and
``(1)``), no real data. The weights are rebuilt here and written with today's ``save_weights``; their sha256
replaces the one in the fixture's text (nothing else of the stored bytes changes), as a registry of that
time holds them: manifest, ``manifest.sha256``, a ``registered`` event with that sha256.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from melanoma_ml.atomic import sha256_file
from melanoma_ml.cli import main
from melanoma_ml.config import ServingConfig
from melanoma_ml.serving.batch import load_scoring_model
from melanoma_ml.serving.bundle import (
    BundleError,
    EnsembleToSave,
    MemberNet,
    ProbeImages,
    RuntimeRequest,
    bundle_file_names,
    digest_file_bytes,
    load_bundle,
    read_manifest,
    save_bundle,
)
from melanoma_ml.serving.inference import score
from melanoma_ml.serving.manifest import MANIFEST_SCHEMA_VERSION
from melanoma_ml.serving.registry import ModelRegistry
from melanoma_ml.serving.service import ModelService
from melanoma_ml.spec import ModelSpec
from melanoma_ml.weights import save_weights

FIXTURES = Path(__file__).parent / "schema2"
METRICS = {"auc": {"value": 0.8, "lo": 0.7, "hi": 0.9, "level": 0.95}}
RECORDS = [{"age": 40.0, "sex": "male", "site": "torso"}, {"age": None, "sex": "female", "site": None}] * 3


def _images(n: int = 6, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8) for _ in range(n)]


def _net(spec: ModelSpec, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return spec.build_network().eval()


def _spec(fixture: str) -> ModelSpec:
    return ModelSpec.from_dict(json.loads((FIXTURES / fixture).read_text())["model_spec"])


def _write_schema_2_version(registry: ModelRegistry, fixture: str) -> str:
    """Put ``fixture`` into ``registry`` as an older melanoma_ml registered it; return its version."""
    text = (FIXTURES / fixture).read_text()
    data = json.loads(text)
    version = data["version"]
    folder = registry.versions_dir / version
    folder.mkdir(parents=True)
    spec = ModelSpec.from_dict(data["model_spec"])
    files = [("weights.safetensors", data["weights_sha256"])]
    files += [
        (m["weights"]["name"], m["weights"]["sha256"])
        for m in (data["ensemble"] or {"members": []})["members"]
    ]
    for seed, (name, old) in enumerate(dict.fromkeys(files)):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        text = text.replace(old, sha256_file(save_weights(folder / name, _net(spec, seed))))
    assert json.loads(text)["schema_version"] == 2
    (folder / "manifest.json").write_text(text)
    digest = hashlib.sha256(text.encode()).hexdigest()
    (folder / "manifest.sha256").write_bytes(digest_file_bytes(digest))
    event = {"event": "registered", "version": version, "reason": "schema 2", "manifest_sha256": digest}
    with registry.history_file.open("a") as fh:
        fh.write(json.dumps({"time": "2026-11-01T00:00:00+00:00", **event}, sort_keys=True) + "\n")
    return version


@pytest.fixture
def schema_2_registry(tmp_path: Path) -> ModelRegistry:
    registry = ModelRegistry(tmp_path / "artifacts" / "registry")
    registry.versions_dir.mkdir(parents=True)
    for fixture in ("one_network.json", "folds_ensemble.json"):
        registry.promote(
            _write_schema_2_version(registry, fixture), reason="promoted by an older melanoma_ml"
        )
    return registry


def _stored_bytes(registry: ModelRegistry) -> dict[str, bytes]:
    return {
        str(p.relative_to(registry.root)): p.read_bytes()
        for p in registry.versions_dir.rglob("*")
        if p.is_file()
    }


def test_schema_2_versions_load_verify_and_serve_what_today_s_bundle_of_the_same_networks_serves(
    tmp_path, schema_2_registry
) -> None:
    registry = schema_2_registry
    before = _stored_bytes(registry)
    assert [registry.integrity(v)[0] for v in registry.versions()] == ["intact", "intact"]

    folds = load_scoring_model(registry)  # what `melanoma-ml predict` loads: the current version, v0002
    ensemble = folds.manifest.ensemble
    assert (folds.version, folds.manifest.schema_version, ensemble.kind, ensemble.average) == (
        "v0002", MANIFEST_SCHEMA_VERSION, "folds", "logit"
    )  # fmt: skip
    assert [(m.fold, m.checkpoint_sha256) for m in ensemble.members] == [(1, "ab" * 32), (0, "cd" * 32)]
    assert [f.name for f in folds.manifest.hashed_files()] == [
        "weights.safetensors",
        "members/member1.safetensors",
    ]
    assert registry.rollback() == "v0001"  # a rollback through schema-2 history
    one = load_scoring_model(registry)
    (member,) = one.manifest.ensemble.members
    assert (one.manifest.ensemble.kind, member.fold, member.checkpoint_sha256) == ("best_fold", 1, "ab" * 32)
    assert one.manifest.calibration.method == "platt" and one.manifest.test_metrics["internal"].n_images == 40

    # Today's bundle of the same networks and settings serves the same probabilities, calibrated or not.
    spec, images = _spec("one_network.json"), _images()
    nets = [_net(spec, 0), _net(spec, 1)]
    kept = {"threshold": 0.45, "metrics": METRICS, "data_version": "d", "code_version": "c"}
    today_one = load_bundle(
        save_bundle(
            tmp_path / "one", nets[0], spec, calibration=one.manifest.calibration.model_dump(), **kept
        )
    )
    members = [MemberNet(nets[0], spec, 1), MemberNet(nets[1], spec, 0)]
    today_folds = load_bundle(
        save_bundle(
            tmp_path / "folds", nets[0], spec, ensemble=EnsembleToSave("folds", "logit", members), **kept
        )
    )
    for old, new in ((one, today_one), (folds, today_folds)):
        got, expected = score(old, images, RECORDS), score(new, images, RECORDS)
        np.testing.assert_allclose(got.prob, expected.prob, rtol=0, atol=1e-6)
        np.testing.assert_allclose(got.raw, expected.raw, rtol=0, atol=1e-6)
    assert np.ptp(score(one, images, RECORDS).prob) > 1e-4  # the images get different answers: a real check

    # Nothing on disk was rewritten: the recorded sha256 still covers the stored schema-2 bytes.
    assert _stored_bytes(registry) == before
    assert json.loads((registry.version_path("v0001") / "manifest.json").read_text())["schema_version"] == 2


def test_a_schema_2_version_copied_into_a_registry_becomes_schema_3_and_the_source_stays(
    tmp_path, schema_2_registry
) -> None:
    source = schema_2_registry.version_path("v0002")
    before = _stored_bytes(schema_2_registry)
    target = ModelRegistry(tmp_path / "other")
    version = target.register(source, reason="copied from an older registry")
    written = json.loads((target.version_path(version) / "manifest.json").read_text())
    assert written["schema_version"] == MANIFEST_SCHEMA_VERSION and "weights_sha256" not in written
    assert target.integrity(version)[0] == "intact"
    assert read_manifest(target.version_path(version)).hashed_files() == read_manifest(source).hashed_files()
    assert _stored_bytes(schema_2_registry) == before


def test_a_schema_2_manifest_whose_member_0_is_not_its_weights_is_refused(
    tmp_path, schema_2_registry
) -> None:
    folder = tmp_path / "bad"
    shutil.copytree(schema_2_registry.version_path("v0002"), folder)
    data = json.loads((folder / "manifest.json").read_text())
    data["weights_sha256"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(data))
    (folder / "manifest.sha256").unlink()
    with pytest.raises(BundleError, match=r"\(schema 2\) is invalid: ensemble member 0 must be weights"):
        read_manifest(folder)


# ---------------------------------------------------------------------- every byte of hashed_files()
def _flip(file: Path, position: int) -> None:
    """Flip one bit at ``position`` in place (same inode); calling it twice restores the file."""
    data = bytearray(file.read_bytes())
    data[position] ^= 0x01
    with open(file, "r+b") as fh:
        fh.write(bytes(data))


def _registry_verify(capsys, registry: ModelRegistry) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["registry", "verify", "--artifact-root", str(registry.root.parent)])
    return code, capsys.readouterr().out


def _many_file_version(registry: ModelRegistry) -> str:
    """A schema-3 version with every kind of hashed file: two members, their ONNX exports, a detector."""
    from melanoma_ml.serving.network_inputs import preprocess
    from melanoma_ml.serving.ood import MahalanobisScorer, backbone_features

    spec = _spec("one_network.json")
    members = [MemberNet(_net(spec, 0), spec, 0, "ab" * 32), MemberNet(_net(spec, 1), spec, 1, "cd" * 32)]
    features = backbone_features(members[0].net, preprocess(_images(30, seed=1), spec))
    probe = ProbeImages(_images(2), RECORDS[:2])
    return registry.register_bundle(
        members[0].net,
        spec,
        threshold=0.4,
        metrics=METRICS,
        data_version="d",
        code_version="c",
        ensemble=EnsembleToSave("folds", "probability", members),
        runtime=RuntimeRequest("onnxruntime", "fp32", 1e-3, probe),
        ood=MahalanobisScorer.fit(features, quantile=0.99),
    )


@pytest.mark.parametrize("schema", [2, 3])
def test_flipping_any_byte_of_any_bundle_file_is_refused_by_predict_the_app_and_registry_verify(
    tmp_path, capsys, schema
) -> None:
    registry = ModelRegistry(tmp_path / "artifacts" / "registry")
    registry.versions_dir.mkdir(parents=True)
    previous = _write_schema_2_version(registry, "one_network.json")
    registry.promote(previous)
    if schema == 2:
        target = _write_schema_2_version(registry, "folds_ensemble.json")
    else:
        target = _many_file_version(registry)
    registry.promote(target)
    folder = registry.version_path(target)
    names = bundle_file_names(read_manifest(folder))
    assert sorted(names) == sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    if schema == 3:
        exported = {"members/member1.safetensors", "members.onnx", "ood.safetensors"}  # one merged graph
        assert exported <= set(names)
    assert _registry_verify(capsys, registry)[0] == 0
    config = ServingConfig(tta=False, fallback_to_last_valid=True)
    for name in names:
        size = (folder / name).stat().st_size
        for position in sorted({0, size // 2, size - 1}):
            _flip(folder / name, position)
            where = f"{name} byte {position}"
            with pytest.raises(BundleError, match="mismatch|must hold exactly"):  # predict's loader
                load_scoring_model(registry)
            status = ModelService(registry, config).status()  # the app: refused, the previous one serves
            assert status.model is not None and status.model.version == previous, where
            assert f"{target} was refused" in status.reload_error, where
            assert "mismatch" in status.reload_error or "must hold exactly" in status.reload_error, where
            code, out = _registry_verify(capsys, registry)
            assert code == 1 and f"current: {target} CORRUPT" in out, (where, out)
            assert registry.integrity(previous)[0] == "intact", where
            _flip(folder / name, position)
    assert registry.integrity(target)[0] == "intact" and load_scoring_model(registry).version == target
