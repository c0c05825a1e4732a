"""A local artifact root kept in step with an S3 bucket: pull what others published, push what a step wrote.

The pipeline steps read and write a local folder (the image cache is memory-mapped, checkpoints are renamed
into place), so with no shared filesystem each worker keeps its own working root and this module carries
files between the workers through object storage. Layout under ``s3://bucket/prefix``::

    blobs/<sha256>                     a file's bytes, named by their sha256, created with If-None-Match: *
    commits/<unix ns>-<uuid>.json      one step's change set {"files": {relative path: sha256 or null}},
                                       created after every blob it names: its existence is the publish

Why a reader never sees half a step: a PUT is whole or absent, a blob is complete under its own name before
any commit names it, and a commit is one object. A worker killed mid-step uploaded at most some blobs that
no commit names, so no other worker ever sees its partial checkpoint. A pull applies commits in name order
(their clock time; later wins for the same path, ``null`` deletes) and downloads a blob only when the local
file is not already those bytes, so a worker downloads a fold's image cache once, whatever reads it later.
Every downloaded blob is checked against its sha256 before it is renamed into place.

Local bookkeeping lives in ``<root>/.objectstore/``: which commits are applied and, per file, the sha256 and
size/mtime it had when last pulled or pushed. Worker-local folders (device ``locks``, ``registry-cache``)
are never synced.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from melanoma_ml.errors import InputValueError

STATE_DIR = ".objectstore"
LOCAL_ONLY = (STATE_DIR, "locks", "registry-cache")
"""Top-level folders of the working root that stay on their worker."""
CHUNK = 1 << 20


class ObjectStoreError(RuntimeError):
    """The artifact store could not be read or written (the message names the object and the fix)."""


@dataclass(frozen=True)
class FileStat:
    """What a file looked like: enough to tell, without hashing, that it changed."""

    size: int
    mtime_ns: int


Snapshot = dict[str, FileStat]
"""Relative path (``/``-separated) -> its stat, for every synced file under the working root."""


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix without slashes at either end).

    Raises:
        InputValueError: not an ``s3://bucket[/prefix]`` URL.
    """
    if not uri.startswith("s3://") or not uri[5:].split("/", 1)[0]:
        raise InputValueError(
            f"artifact store {uri!r} is not an s3://bucket/prefix URL (AWS S3, MinIO, SeaweedFS or another "
            "S3-compatible store with conditional writes); e.g. MELANOMA_ARTIFACT_STORE=s3://melanoma/artifacts"
        )
    bucket, _, prefix = uri[5:].partition("/")
    return bucket, prefix.strip("/")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class ArtifactStore:
    """The working root ``local_root`` mirrored through ``uri`` (``s3://bucket/prefix``).

    Args:
        uri: Where the artifacts are published.
        local_root: This worker's working copy (``artifact_root``); created if missing.
        client: A boto3 S3 client; by default one from the usual AWS variables (``AWS_ENDPOINT_URL`` for a
            server other than AWS, credentials, region).
    """

    def __init__(self, uri: str, local_root: str | Path, client: Any = None) -> None:
        self.uri = uri.rstrip("/")
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.root = Path(local_root)
        if client is None:
            import boto3

            client = boto3.client("s3")
        self.client = client
        self._state_dir = self.root / STATE_DIR

    def __repr__(self) -> str:
        return f"ArtifactStore({self.uri!r}, {str(self.root)!r})"

    # ----------------------------------------------------------------- keys
    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def blob_key(self, sha256: str) -> str:
        return self._key("blobs", sha256)

    @property
    def commits_prefix(self) -> str:
        return self._key("commits") + "/"

    # ----------------------------------------------------------------- local state
    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """The local bookkeeping, under an exclusive lock (several step processes may share one root)."""
        self._state_dir.mkdir(parents=True, exist_ok=True)
        with (self._state_dir / "lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state_file = self._state_dir / "state.json"
            state = json.loads(state_file.read_text()) if state_file.exists() else {}
            state.setdefault("applied", [])
            state.setdefault("files", {})
            yield state
            tmp = state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(state, sort_keys=True))
            os.replace(tmp, state_file)

    def snapshot(self) -> Snapshot:
        """Every synced file under the working root with its size and mtime."""
        found: Snapshot = {}
        if not self.root.exists():
            return found
        for folder, dirs, files in os.walk(self.root):
            rel_folder = os.path.relpath(folder, self.root)
            if rel_folder == ".":
                dirs[:] = [d for d in dirs if d not in LOCAL_ONLY]
            for name in files:
                if name.startswith(".objectstore-partial-"):
                    continue
                path = os.path.join(folder, name)
                if os.path.islink(path):
                    continue
                st = os.stat(path)
                rel = name if rel_folder == "." else f"{rel_folder}/{name}".replace(os.sep, "/")
                found[rel] = FileStat(st.st_size, st.st_mtime_ns)
        return found

    @staticmethod
    def _matches(state: Mapping[str, Any], rel: str, stat: FileStat | None) -> bool:
        known = state["files"].get(rel)
        return stat is not None and known is not None and (known[1], known[2]) == (stat.size, stat.mtime_ns)

    # ----------------------------------------------------------------- S3 calls
    def _call(self, what: str, operation: str, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, operation)(Bucket=self.bucket, **kwargs)
        except ClientError:
            raise
        except BotoCoreError as exc:
            endpoint = getattr(self.client.meta, "endpoint_url", "?")
            raise ObjectStoreError(
                f"artifact store {self.uri} (endpoint {endpoint}) could not {what}: {exc}. Check that the S3 "
                "server is up and AWS_ENDPOINT_URL / credentials point at it; nothing of this step was "
                "published, so rerunning it once the store answers is safe"
            ) from exc

    def _create(self, key: str, body: bytes | Any, what: str) -> bool:
        """PUT ``key`` with ``If-None-Match: *``; False if it already existed."""
        from botocore.exceptions import ClientError

        try:
            self._call(what, "put_object", Key=key, Body=body, IfNoneMatch="*")
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise ObjectStoreError(f"artifact store {self.uri}: could not {what} ({exc})") from exc
        return True

    def _exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._call(f"look up {key}", "head_object", Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code", "") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise ObjectStoreError(f"artifact store {self.uri}: could not look up {key} ({exc})") from exc
        return True

    def _commit_keys(self) -> list[str]:
        keys: list[str] = []
        kwargs: dict[str, Any] = {"Prefix": self.commits_prefix}
        while True:
            page = self._call("list the published commits", "list_objects_v2", **kwargs)
            keys += [item["Key"] for item in page.get("Contents", []) if item["Key"].endswith(".json")]
            if not page.get("IsTruncated"):
                return sorted(keys)
            kwargs["ContinuationToken"] = page["NextContinuationToken"]

    def _read(self, key: str) -> bytes:
        return self._call(f"read {key}", "get_object", Key=key)["Body"].read()

    # ----------------------------------------------------------------- pull
    def pull(self) -> list[str]:
        """Apply every commit not applied here yet; returns the relative paths written or deleted."""
        with self._locked() as state:
            applied = set(state["applied"])
            new = [key for key in self._commit_keys() if key not in applied]
            target: dict[str, str | None] = {}
            for key in new:
                target.update(json.loads(self._read(key))["files"])
            have = self._local_blobs(state)
            touched = []
            for rel, sha in target.items():
                path = self.root / rel
                if sha is None:
                    path.unlink(missing_ok=True)
                    state["files"].pop(rel, None)
                    touched.append(rel)
                    continue
                stat = _stat(path)
                if self._matches(state, rel, stat) and state["files"][rel][0] == sha:
                    continue
                self._fetch(sha, path, have.get(sha))
                stat = _stat(path)
                state["files"][rel] = [sha, stat.size, stat.mtime_ns]
                have[sha] = path
                touched.append(rel)
            state["applied"] = sorted(applied | set(new))
            return touched

    def _local_blobs(self, state: Mapping[str, Any]) -> dict[str, Path]:
        """sha256 -> a local file that still holds those bytes (unchanged since it was recorded)."""
        have = {}
        for rel, (sha, size, mtime_ns) in state["files"].items():
            if _stat(self.root / rel) == FileStat(size, mtime_ns):
                have[sha] = self.root / rel
        return have

    def _fetch(self, sha: str, path: Path, local_copy: Path | None) -> None:
        """Put the bytes named ``sha`` at ``path`` (a local copy if there is one), checked, then renamed."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".objectstore-partial-", dir=path.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                if local_copy is not None:
                    with local_copy.open("rb") as source:
                        while chunk := source.read(CHUNK):
                            out.write(chunk)
                else:
                    body = self._call(f"download {self.blob_key(sha)}", "get_object", Key=self.blob_key(sha))
                    for chunk in body["Body"].iter_chunks(CHUNK):
                        out.write(chunk)
            got = sha256_file(tmp)
            if got != sha:
                raise ObjectStoreError(
                    f"artifact store {self.uri}: {self.blob_key(sha)} holds bytes with sha256 {got}, not its "
                    f"name; delete that object and rerun the step that wrote {path.relative_to(self.root)}"
                )
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    # ----------------------------------------------------------------- push
    def push(self, baseline: Snapshot, label: str) -> str | None:
        """Publish what changed under the root since ``baseline``: blobs first, then one commit.

        A file counts as changed when its stat differs from ``baseline`` and from what was last pulled or
        pushed; a file in ``baseline`` that is gone is published as deleted. Returns the commit's key, or
        None when nothing changed.
        """
        with self._locked() as state:
            now = self.snapshot()
            changed = [
                rel
                for rel, st in now.items()
                if st != baseline.get(rel) and not self._matches(state, rel, st)
            ]
            deleted = [rel for rel in baseline if rel not in now and rel in state["files"]]
            if not changed and not deleted:
                return None
            files: dict[str, str | None] = {}
            for rel in sorted(changed):
                path = self.root / rel
                sha = sha256_file(path)
                key = self.blob_key(sha)
                if not self._exists(key):  # content-addressed: an existing blob already holds these bytes
                    with path.open("rb") as body:
                        self._create(key, body, f"upload {rel} to {key}")
                files[rel] = sha
                state["files"][rel] = [sha, now[rel].size, now[rel].mtime_ns]
            for rel in deleted:
                files[rel] = None
                state["files"].pop(rel, None)
            key = f"{self.commits_prefix}{time.time_ns():020d}-{uuid.uuid4().hex}.json"
            data = json.dumps({"label": label, "files": files}, sort_keys=True).encode()
            if not self._create(key, data, f"publish {key}") and self._read(key) != data:
                raise ObjectStoreError(f"artifact store {self.uri}: commit {key} exists with other content")
            state["applied"].append(key)
            return key


def _stat(path: Path) -> FileStat | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return FileStat(st.st_size, st.st_mtime_ns)
