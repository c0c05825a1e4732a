"""Model registry: immutable versions, atomic pointer, history, rollback, concurrent registration."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from melanoma_ml.atomic import sha256_file
from melanoma_ml.config import ModelConfig
from melanoma_ml.features import MetadataEncoder
from melanoma_ml.serving.bundle import BundleError, BundleIntegrityError, save_bundle
from melanoma_ml.serving.registry import ModelRegistry, RegistryError
from melanoma_ml.spec import ModelSpec

BUNDLE_KWARGS = {
    "threshold": 0.5,
    "metrics": {"auc": {"value": 0.8, "lo": 0.7, "hi": 0.9}},
    "data_version": "d1",
    "code_version": "c1",
}


def tiny_spec() -> ModelSpec:
    encoder = MetadataEncoder(age_mean=50.0, age_std=15.0, sexes=("female", "male"), sites=("torso",))
    network = ModelConfig(backbone="test_efficientnet", meta_hidden=[8], meta_dropout=0.1, head_dropout=0.1)
    return ModelSpec(network, 32, [0.5] * 3, [0.25] * 3, encoder)


@pytest.fixture(scope="module")
def spec_and_net():
    torch.manual_seed(0)
    spec = tiny_spec()
    return spec, spec.build_network().eval()


@pytest.fixture(scope="module")
def source_bundle(tmp_path_factory, spec_and_net) -> Path:
    spec, net = spec_and_net
    return save_bundle(tmp_path_factory.mktemp("export") / "bundle", net, spec, **BUNDLE_KWARGS)


def test_empty_registry_has_no_current(tmp_path):
    registry = ModelRegistry(tmp_path / "registry")
    assert registry.versions() == []
    assert registry.current() is None
    assert registry.current_path() is None
    assert registry.load_current() is None
    assert registry.pointer_stamp() is None
    assert registry.history() == []
    with pytest.raises(RegistryError, match="nothing is promoted"):
        registry.rollback()


def test_versions_increment_and_stay_immutable(tmp_path, source_bundle):
    registry = ModelRegistry(tmp_path)
    assert [registry.register(source_bundle, reason=f"r{i}") for i in range(3)] == ["v0001", "v0002", "v0003"]
    assert registry.versions() == ["v0001", "v0002", "v0003"]
    before = sha256_file(registry.version_path("v0001") / "manifest.json")
    assert registry.register(source_bundle) == "v0004"
    assert sha256_file(registry.version_path("v0001") / "manifest.json") == before
    events = registry.history()
    assert [(e["event"], e["version"]) for e in events] == [("registered", f"v000{i}") for i in range(1, 5)]
    assert events[0]["reason"] == "r0"
    assert events[0]["source"] == str(source_bundle)


def test_register_bundle_exports_a_loadable_version_that_knows_its_name(tmp_path, spec_and_net):
    spec, net = spec_and_net
    registry = ModelRegistry(tmp_path)
    version = registry.register_bundle(net, spec, fold=0, checkpoint_sha256="cd" * 32, **BUNDLE_KWARGS)
    registry.promote(version, reason="first model")
    bundle = registry.load_current()
    assert bundle.version == "v0001"
    manifest = registry.manifest("v0001")  # typed fields, validated on load
    assert bundle.manifest == manifest
    member = manifest.ensemble.members[0]
    assert (manifest.version, member.fold, member.checkpoint_sha256) == ("v0001", 0, "cd" * 32)
    assert manifest.threshold == 0.5 and manifest.backbone == spec.backbone and manifest.model_spec == spec


def test_a_copied_in_bundle_reports_its_new_version_not_the_source_registrys(tmp_path, spec_and_net):
    from melanoma_ml.serving.bundle import load_bundle

    spec, net = spec_and_net
    staging = ModelRegistry(tmp_path / "staging")
    for _ in range(3):
        staging.register_bundle(net, spec, fold=1, **BUNDLE_KWARGS)
    exported = staging.version_path("v0003")

    production = ModelRegistry(tmp_path / "production")
    assert production.register(exported) == "v0001"
    copied = production.version_path("v0001")
    assert load_bundle(copied).version == "v0001"
    manifest = production.manifest("v0001")
    assert (manifest.version, manifest.ensemble.members[0].fold) == ("v0001", 1)
    assert sha256_file(copied / "weights.safetensors") == sha256_file(exported / "weights.safetensors")
    assert load_bundle(exported).version == "v0003"  # the source is left as it was


def test_promote_moves_the_pointer_and_rollback_walks_back(tmp_path, source_bundle):
    registry = ModelRegistry(tmp_path)
    for _ in range(3):
        registry.register(source_bundle)
    registry.promote("v0001", reason="first")
    stamp = registry.pointer_stamp()
    registry.promote("v0003", reason="better AUC")
    assert registry.current() == "v0003"
    assert registry.current_path() == tmp_path / "versions" / "v0003"
    assert registry.pointer()["reason"] == "better AUC"
    assert registry.pointer_stamp() != stamp

    assert registry.rollback(reason="v0003 misbehaves") == "v0001"
    assert registry.current() == "v0001"
    with pytest.raises(RegistryError, match="no earlier served version"):
        registry.rollback()
    with pytest.raises(RegistryError, match=r"v0002 was never promoted .*rollback --to v0002 --adopt"):
        registry.rollback(to="v0002", reason="try v2")
    assert registry.current() == "v0001"
    assert registry.rollback(to="v0002", reason="try v2", adopt=True) == "v0002"
    assert registry.rollback() == "v0001"
    assert registry.rollback(to="v0002") == "v0002"  # served once: an ordinary rollback now

    moves = [
        (e["event"], e["version"], e.get("previous"))
        for e in registry.history()
        if e["event"] != "registered"
    ]
    assert moves == [
        ("promoted", "v0001", None),
        ("promoted", "v0003", None),
        ("rolled_back", "v0001", "v0003"),
        ("promoted", "v0002", "v0001"),
        ("rolled_back", "v0001", "v0002"),
        ("rolled_back", "v0002", "v0001"),
    ]
    assert all("time" in e for e in registry.history())
    adopted = [e for e in registry.history() if e.get("adopted")]
    assert [(e["version"], e["reason"]) for e in adopted] == [("v0002", "adopted: try v2")]


@pytest.mark.parametrize(
    ("action", "error", "message"),
    [
        (
            lambda r: r.promote("v0009"),
            RegistryError,
            r"unknown model version 'v0009'.*known versions: \['v0001'\]",
        ),
        (lambda r: r.promote("../x"), RegistryError, "unknown model version"),
        (lambda r: r.rollback(to="v0001"), RegistryError, "v0001 is already current"),
        (lambda r: r.register(r.root / "nowhere"), BundleError, "bundle folder not found"),
    ],
)
def test_bad_requests_are_refused_and_the_pointer_stays(tmp_path, source_bundle, action, error, message):
    registry = ModelRegistry(tmp_path)
    registry.register(source_bundle)
    registry.promote("v0001")
    with pytest.raises(error, match=message):
        action(registry)
    assert registry.current() == "v0001"


def test_a_tampered_version_is_never_promoted(tmp_path, source_bundle):
    registry = ModelRegistry(tmp_path)
    registry.register(source_bundle)
    registry.register(source_bundle)
    registry.promote("v0001")
    weights = registry.version_path("v0002") / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    with pytest.raises(BundleIntegrityError, match="sha256 mismatch"):
        registry.promote("v0002")
    assert registry.current() == "v0001"


def _register_in_child(args):
    root, source = args
    return ModelRegistry(root).register(source)


def test_concurrent_registrations_get_distinct_versions(tmp_path, source_bundle):
    root = tmp_path / "registry"
    with ThreadPoolExecutor(max_workers=6) as pool:
        from_threads = list(pool.map(lambda _: ModelRegistry(root).register(source_bundle), range(6)))
    # spawn, not fork: a fork of this multi-threaded test process (torch and ONNX Runtime thread pools of
    # earlier tests) can deadlock in the child on a lock another thread held; seen once in a CI run
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        from_processes = pool.map_async(_register_in_child, [(root, source_bundle)] * 8).get(timeout=300)
    everything = from_threads + from_processes
    assert len(set(everything)) == 14
    assert ModelRegistry(root).versions() == [f"v{i:04d}" for i in range(1, 15)]
    assert len(ModelRegistry(root).history()) == 14


def test_the_registry_and_gate_import_without_torch():
    """The app polls the pointer per request and Dagster imports the gate: both must stay cheap."""
    code = (
        "import sys, melanoma_ml.serving, melanoma_ml.serving.registry, melanoma_ml.serving.promotion; "
        "heavy = sorted({'torch', 'gradio', 'pytorch_grad_cam', 'dagster'} & set(sys.modules)); "
        "assert not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------- crashes, orphans, corruption, repair
def _killed_mid_write(root: Path, spec, net) -> None:
    """In a forked child: register a bundle and die (``os._exit``, no cleanup) while its manifest is written."""
    import melanoma_ml.serving.bundle as bundle_module

    def die(*_args, **_kwargs):
        os._exit(3)

    bundle_module.atomic_write_bytes = die  # only in the child's copy of the module
    ModelRegistry(root).register_bundle(net, spec, **BUNDLE_KWARGS)


def test_a_killed_bundle_write_consumes_no_version_number_and_its_temp_is_swept(tmp_path, spec_and_net):
    spec, net = spec_and_net
    root = tmp_path / "registry"
    # spawn, not fork: a fork of this multi-threaded test process can deadlock in the child on a held lock
    child = multiprocessing.get_context("spawn").Process(target=_killed_mid_write, args=(root, spec, net))
    child.start()
    child.join(120)
    if child.is_alive():
        child.kill()
        child.join(10)
    assert child.exitcode == 3
    registry = ModelRegistry(root)
    assert registry.versions() == []
    assert [p.name for p in root.rglob("*.tmp")], "the killed writer should have left its temp folder"
    assert registry.register_bundle(net, spec, **BUNDLE_KWARGS) == "v0001"
    assert list(root.rglob("*.tmp")) == []  # swept at the start of the next write
    assert registry.manifest("v0001").version == "v0001"


def test_a_failed_registration_consumes_no_number_and_leaves_no_folder(tmp_path, spec_and_net):
    spec, net = spec_and_net
    registry = ModelRegistry(tmp_path)
    with pytest.raises(ValueError, match="threshold"):
        registry.register_bundle(net, spec, **{**BUNDLE_KWARGS, "threshold": 2.0})
    assert registry.versions() == []
    assert [p.name for p in (tmp_path / "versions").iterdir()] == []
    assert registry.register_bundle(net, spec, **BUNDLE_KWARGS) == "v0001"


def test_a_number_another_writer_takes_before_our_rename_is_skipped(tmp_path, source_bundle, monkeypatch):
    registry = ModelRegistry(tmp_path)
    real_rename = os.rename
    rival = tmp_path / "versions" / "v0001"

    def rename_after_a_rival(src, dst):
        if Path(dst) == rival and not rival.exists():  # a rival's complete bundle lands on v0001 first
            rival.mkdir()
            (rival / "weights.safetensors").write_bytes(b"rival")
        return real_rename(src, dst)

    monkeypatch.setattr("melanoma_ml.serving.registry.os.rename", rename_after_a_rival)
    assert registry.register(source_bundle) == "v0002"
    assert (rival / "weights.safetensors").read_bytes() == b"rival"  # the rival's folder is untouched
    assert registry.manifest("v0002").version == "v0002"


def test_a_number_named_in_history_is_never_reused(tmp_path, source_bundle):
    registry = ModelRegistry(tmp_path)
    assert registry.register(source_bundle) == "v0001"
    shutil.rmtree(registry.version_path("v0001"))  # deleted by hand: history still names v0001
    assert registry.register(source_bundle) == "v0002"


def test_stale_temps_are_swept_only_when_no_writer_holds_the_registry_lock(tmp_path, source_bundle):
    import fcntl

    registry = ModelRegistry(tmp_path)
    registry.register(source_bundle)
    leftovers = [tmp_path / "versions" / ".v0009.abc.tmp", tmp_path / ".stage-x.tmp"]
    for folder in leftovers:
        folder.mkdir()
        (folder / "weights.safetensors").write_bytes(b"half")
    stray_file = tmp_path / ".current.json.zzz.tmp"
    stray_file.write_text("{")
    with open(tmp_path / ".write.lock", "a+b") as lock:  # another writer is mid-write
        fcntl.flock(lock.fileno(), fcntl.LOCK_SH)
        registry.register(source_bundle)
        assert all(p.exists() for p in [*leftovers, stray_file])  # may be that writer's: left alone
    registry.register(source_bundle)  # nobody else writing now: leftovers are dead writers'
    assert not any(p.exists() for p in [*leftovers, stray_file])
    assert registry.versions() == ["v0001", "v0002", "v0003"]


def test_orphans_say_why_they_were_never_promoted(tmp_path, source_bundle):
    registry = ModelRegistry(tmp_path)
    for _ in range(3):
        registry.register(source_bundle, reason="gate: promoted")
    registry.promote("v0001")
    weights = registry.version_path("v0003") / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    with pytest.raises(BundleIntegrityError):
        registry.promote("v0003", reason="try v3")
    orphans = registry.orphans()
    assert set(orphans) == {"v0002", "v0003"}
    assert "never promoted" in orphans["v0002"] and "crashed" in orphans["v0002"]
    assert "promotion refused" in orphans["v0003"] and "sha256 mismatch" in orphans["v0003"]


def test_check_names_a_corrupt_version(tmp_path, source_bundle):
    registry = ModelRegistry(tmp_path)
    registry.register(source_bundle)
    assert registry.check("v0001") is None
    weights = registry.version_path("v0001") / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    assert "sha256 mismatch" in registry.check("v0001")


@pytest.fixture()
def served_twice(tmp_path, source_bundle) -> ModelRegistry:
    """v0001 promoted, then v0002 promoted (current); v0003 registered only."""
    registry = ModelRegistry(tmp_path)
    for _ in range(3):
        registry.register(source_bundle)
    registry.promote("v0001", reason="first")
    registry.promote("v0002", reason="second")
    return registry


def test_rollback_to_works_with_a_corrupt_pointer(served_twice):
    served_twice.current_file.write_text("{not json")
    with pytest.raises(RegistryError, match="not valid JSON.*registry repair"):
        served_twice.rollback()
    assert served_twice.rollback(to="v0001") == "v0001"
    assert served_twice.current() == "v0001"
    assert served_twice.history()[-1]["previous"] is None


def test_repair_rebuilds_a_corrupt_pointer_from_history(served_twice):
    served_twice.current_file.write_text("{not json")
    report = served_twice.repair()
    assert (report.version, report.changed) == ("v0002", True)
    assert "not valid JSON" in report.text() and "v0002" in report.text()
    assert served_twice.current() == "v0002"
    assert served_twice.history()[-1]["event"] == "repaired"
    assert served_twice.repair().changed is False  # a sound pointer is left alone


def test_repair_skips_a_corrupt_version_and_a_torn_history_line(served_twice):
    weights = served_twice.version_path("v0002") / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    served_twice.current_file.unlink()
    with open(served_twice.history_file, "a", encoding="utf-8") as fh:
        fh.write('{"event": "promo')  # a writer killed mid-append
    report = served_twice.repair()
    assert (report.version, report.changed) == ("v0001", True)
    text = report.text()
    assert "v0002" in text and "sha256 mismatch" in text and "line 6" in text
    assert served_twice.current() == "v0001"


def test_repair_without_a_valid_served_version_says_what_to_do(tmp_path, source_bundle):
    registry = ModelRegistry(tmp_path)
    registry.register(source_bundle)
    registry.current_file.write_text("[]")
    with pytest.raises(RegistryError, match=r"no promoted version in .*history.*rollback --to"):
        registry.repair()


# ---------------------------------------------------------------------- every byte verified, orphans never served
def test_registration_records_the_manifest_sha256_and_every_file_is_verified(tmp_path, source_bundle):
    registry = ModelRegistry(tmp_path)
    registry.register(source_bundle)
    registry.promote("v0001")
    folder = registry.version_path("v0001")
    registered = next(e for e in registry.history() if e["event"] == "registered")
    assert registered["manifest_sha256"] == sha256_file(folder / "manifest.json")
    assert registry.integrity("v0001") == ("intact", "every file matches its sha256, the manifest included")
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files == ["manifest.json", "manifest.sha256", "weights.safetensors"]
    for name in files:
        file = folder / name
        original = file.read_bytes()
        for position in (0, len(original) // 2, len(original) - 1):
            data = bytearray(original)
            data[position] ^= 0x01
            file.write_bytes(bytes(data))
            state, detail = registry.integrity("v0001")
            assert state == "corrupt" and ("mismatch" in detail or "must hold exactly" in detail), (
                name,
                detail,
            )
            with pytest.raises(BundleIntegrityError):
                registry.promote("v0001", reason="again")
            with pytest.raises(BundleIntegrityError):
                registry.load_current()
            file.write_bytes(original)
    assert registry.integrity("v0001")[0] == "intact" and registry.load_current().version == "v0001"


def _make_legacy(registry: ModelRegistry, version: str) -> None:
    """Turn ``version`` into one registered before manifests were hashed: no digest file, none in history."""
    import json

    (registry.version_path(version) / "manifest.sha256").unlink()
    lines = registry.history_file.read_text().splitlines()
    events = [json.loads(line) for line in lines]
    for event in events:
        if event.get("version") == version:
            event.pop("manifest_sha256", None)
    registry.history_file.write_text("".join(json.dumps(e) + "\n" for e in events))


def test_a_legacy_version_still_serves_and_says_its_manifest_is_not_covered(tmp_path, source_bundle):
    registry = ModelRegistry(tmp_path)
    registry.register(source_bundle)
    registry.promote("v0001")
    _make_legacy(registry, "v0001")
    state, detail = registry.integrity("v0001")
    assert state == "legacy" and "manifest not covered" in detail
    assert registry.check("v0001") is None and registry.load_current().version == "v0001"
    registry.promote("v0001", reason="still promotable")
    weights = registry.version_path("v0001") / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    assert registry.integrity("v0001")[0] == "corrupt"  # what a legacy version lists is still verified


def test_a_removed_digest_file_is_refused_when_history_recorded_the_manifest(tmp_path, source_bundle):
    registry = ModelRegistry(tmp_path)
    registry.register(source_bundle)
    (registry.version_path("v0001") / "manifest.sha256").unlink()
    state, detail = registry.integrity("v0001")
    assert state == "corrupt" and "manifest.sha256 missing" in detail and "registry recorded" in detail
    with pytest.raises(BundleIntegrityError):
        registry.promote("v0001")
    assert registry.current() is None


def test_an_orphan_left_by_a_killed_writer_is_never_served_by_rollback(tmp_path, source_bundle):
    registry = ModelRegistry(tmp_path)
    registry.register(source_bundle)
    registry.promote("v0001")
    # A writer killed after the rename, before its history line: a complete version folder, no event.
    shutil.copytree(registry.version_path("v0001"), registry.versions_dir / "v0002")
    assert "not in history.jsonl" in registry.orphans()["v0002"]
    with pytest.raises(RegistryError) as refused:
        registry.rollback(to="v0002")
    message = str(refused.value)
    assert "v0002 was never promoted" in message and "not in history.jsonl" in message
    assert "melanoma-ml registry verify" in message and "--adopt" in message
    assert registry.current() == "v0001" and [e["event"] for e in registry.history()][-1] == "promoted"
    with pytest.raises(RegistryError, match="unknown model version 'v0009'"):
        registry.rollback(to="v0009")
