"""The model registry in an S3 bucket: the same versions, pointer, history and rollback as ``ModelRegistry``.

Object storage has no rename, no append and no lock, so the local registry's moves do not carry over.
Every manifest and event is written by *creating a new key* with ``If-None-Match: *`` (S3 conditional
writes, AWS since 2024; also MinIO; tested against moto's server, not real S3), so none is ever
overwritten; weights go to a key named by their sha256, where a second upload writes the same bytes.
Layout under ``s3://bucket/prefix``::

    blobs/<sha256>.safetensors       every file of ``BundleManifest.hashed_files`` (weights, exported
                                     models, detector), content-addressed; uploaded first, never trusted
                                     alone
    versions/v0001/manifest.json     the bundle's manifest, created last: its existence is the commit
    versions/v0001/manifest.sha256   the manifest's sha256, created right after it (also recorded in the
                                     version's ``registered`` event); a version without it is legacy
    events/0000000001.json           one history event per object, numbered; the pointer is the newest
                                     promoted / rolled_back / repaired event

Why this is safe with several writers (two CI runs promoting, a person rolling back):

* A version number is taken by creating its manifest. Two writers that pick ``v0005`` both try; S3 lets
  exactly one create succeed and answers the other 412, which re-lists and takes ``v0006``. The weights
  the manifest names are already complete under their own sha256, so a reader that finds a manifest finds
  its weights; a writer killed before the manifest leaves only an unreferenced blob.
* The pointer is a versioned log, not a rewritten ``current.json``: a move reads the log up to event N,
  decides (verify the version; for a rollback, which version was served before), then creates event N+1.
  If another writer created N+1 first, the create fails and the whole decision is taken again on the new
  log, so two rollbacks from v3 step back twice (v2, then v1) instead of both landing on v2: no lost
  update. Readers list the log and take the newest served event; each object is whole or absent (a PUT
  is atomic, LIST and GET are strongly consistent), so a reader never sees a torn pointer, and the
  pointer and the history can never disagree because they are the same objects.
* Rejected: a ``current.json`` replaced with ``If-Match: <etag>`` also stops lost updates, but S3 has no
  append for the history, so pointer and history would be two writes a crash can split. A versioned
  pointer named by list + max *without* a conditional create lets two writers both write N+1, and the
  second silently replaces the first.

A reader trusts a version only after download: ``version_path`` copies the manifest, its digest and its
weights into ``cache_dir/<sha256 of manifest + digest>/``, checks every file (the manifest against its digest,
the rest against the manifest) before the folder is renamed into place, and returns that local folder,
which ``load_bundle`` and the app use unchanged. A writer killed between the manifest and its digest
leaves a version that looks legacy and has no ``registered`` event: never promoted, so never served by
a rollback.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from melanoma_ml.atomic import atomic_directory
from melanoma_ml.errors import InputValueError
from melanoma_ml.serving.bundle import (
    MANIFEST_DIGEST_FILE,
    MANIFEST_FILE,
    BundleError,
    digest_file_bytes,
    manifest_bytes,
    read_manifest,
    verify_bundle,
)
from melanoma_ml.serving.registry import (
    SERVED_EVENTS,
    VERSION_PATTERN,
    ModelRegistry,
    RegistryError,
    RepairReport,
    _now,
    parse_events,
)

if TYPE_CHECKING:
    from melanoma_ml.config import PipelineConfig

T = TypeVar("T")
EVENT_NAME = re.compile(r"^(\d{10})\.json$")
MAX_ATTEMPTS = 50
"""Decisions retried after losing a race for the next event; only under absurd write contention."""
DEFAULT_STORAGE_OPTIONS: dict[str, Any] = {"use_listings_cache": False}
"""s3fs caches directory listings by default; a registry shared by writers must list afresh."""


class _LostRace(Exception):
    """Another writer created the event this decision was going to create (internal: retried)."""


class S3Registry(ModelRegistry):
    """A ``ModelRegistry`` whose root is ``s3://bucket/prefix`` (see the module docstring for the layout).

    Args:
        uri: ``s3://bucket/prefix``.
        cache_dir: Local folder for downloaded versions (one subfolder per manifest and digest).
        storage_options: s3fs options (``endpoint_url``, ``key``, ``secret``, ``client_kwargs``); by
            default credentials and endpoint come from the usual AWS environment variables.
    """

    def __init__(
        self, uri: str, cache_dir: str | Path, *, storage_options: dict[str, Any] | None = None
    ) -> None:
        from upath import UPath

        if not uri.startswith("s3://"):
            raise InputValueError(
                f"registry {uri!r} is not an s3:// URL: the remote registry needs S3 conditional writes "
                "(AWS S3, MinIO and other S3-compatible stores); use a local folder or an s3://bucket/prefix"
            )
        self.root = UPath(uri.rstrip("/"), **{**DEFAULT_STORAGE_OPTIONS, **(storage_options or {})})
        self.fs = self.root.fs
        self._base = self.root.path.rstrip("/")
        self.versions_dir = self.root / "versions"
        self.history_file = self.root / "events"
        self.current_file = self.history_file  # the pointer is the newest served event
        self.cache_dir = Path(cache_dir)
        self._raw_events: dict[str, bytes] = {}  # event objects are immutable: fetched once
        self._pinned = threading.local()  # the log one decision reads (``_decide``)

    def __repr__(self) -> str:
        return f"S3Registry({str(self.root)!r})"

    # ----------------------------------------------------------------- keys
    def _key(self, *parts: str) -> str:
        return "/".join((self._base, *parts))

    def _manifest_key(self, version: str) -> str:
        return self._key("versions", version, MANIFEST_FILE)

    def _digest_key(self, version: str) -> str:
        return self._key("versions", version, MANIFEST_DIGEST_FILE)

    def _blob_key(self, sha256: str) -> str:
        return self._key("blobs", f"{sha256}.safetensors")

    def _create(self, key: str, data: bytes) -> bool:
        """Create ``key`` with ``If-None-Match: *``; False if it already exists (nothing written)."""
        try:
            self.fs.pipe_file(key, data, mode="create")
        except FileExistsError:
            return False
        except OSError as exc:
            if _precondition_failed(exc):
                return False
            raise
        return True

    # ----------------------------------------------------------------- registering
    def _register_with(self, write: Callable[[Path], None], *, reason: str, **event: Any) -> str:
        """Write the bundle locally, upload its weights, then take the next number by creating its manifest."""
        with tempfile.TemporaryDirectory(prefix="melanoma-register-") as tmp:
            bundle = Path(tmp) / "bundle"
            write(bundle)
            manifest = verify_bundle(bundle)
            for entry in manifest.hashed_files():  # weights, exported models and the OOD detector as blobs
                blob = self._blob_key(entry.sha256)
                if not self.fs.exists(blob):  # content-addressed: a concurrent upload writes the same bytes
                    self.fs.put_file(str(bundle / entry.name), blob)
            for _ in range(MAX_ATTEMPTS):
                version = f"v{self._last_number() + 1:04d}"
                data = manifest_bytes(manifest.model_copy(update={"version": version}))
                if self._create(self._manifest_key(version), data):
                    break
            else:
                raise RegistryError(f"could not take a version number in {self.root} in {MAX_ATTEMPTS} tries")
        digest = hashlib.sha256(data).hexdigest()
        if not self._create(self._digest_key(version), digest_file_bytes(digest)):
            raise RegistryError(
                f"{self._digest_key(version)} already exists although this writer created {version}'s manifest; "
                f"the registry {self.root} was written by hand: check it with `melanoma-ml registry verify`"
            )
        self._append_history(
            {"event": "registered", "version": version, "reason": reason, "manifest_sha256": digest, **event}
        )
        return version

    def _last_number(self) -> int:
        named = self._version_names() + [str(e.get("version")) for e in self._read_history(strict=False)[0]]
        return max((int(m.group(1)) for name in named if (m := VERSION_PATTERN.match(name))), default=0)

    def _version_names(self) -> list[str]:
        prefix = self._key("versions") + "/"
        names = []
        for key in self.fs.find(prefix):
            rest = key[len(prefix) :].split("/")
            if len(rest) == 2 and rest[1] == MANIFEST_FILE and VERSION_PATTERN.match(rest[0]):
                names.append(rest[0])
        return names

    # ----------------------------------------------------------------- reading
    def versions(self) -> list[str]:
        return sorted(self._version_names(), key=lambda name: int(name[1:]))

    def version_path(self, version: str) -> Path:
        """Download ``version`` (if not cached) and return its local, verified folder.

        Raises:
            RegistryError: unknown version.
            BundleError / BundleIntegrityError: its weights are missing or do not match its manifest.
        """
        if not VERSION_PATTERN.match(version):
            raise RegistryError(f"unknown model version {version!r} in registry {self.root}")
        try:
            text = self.fs.cat_file(self._manifest_key(version))
        except FileNotFoundError:
            raise RegistryError(
                f"unknown model version {version!r} in registry {self.root}; known versions: {self.versions()}"
            ) from None
        try:
            digest = self.fs.cat_file(self._digest_key(version))
        except FileNotFoundError:
            digest = None  # a legacy version (or a writer killed before the digest): manifest not covered
        local = self.cache_dir / hashlib.sha256(text + (digest or b"")).hexdigest()
        if (local / MANIFEST_FILE).is_file():
            return local
        with atomic_directory(local) as folder:
            (folder / MANIFEST_FILE).write_bytes(text)
            if digest is not None:
                (folder / MANIFEST_DIGEST_FILE).write_bytes(digest)
            manifest = read_manifest(folder)
            for entry in manifest.hashed_files():
                (folder / entry.name).parent.mkdir(parents=True, exist_ok=True)
                try:
                    self.fs.get_file(self._blob_key(entry.sha256), str(folder / entry.name))
                except FileNotFoundError:
                    raise BundleError(
                        f"{entry.name} ({self._blob_key(entry.sha256)}) of {version} is missing in "
                        f"{self.root}; roll back to another version or register the model again"
                    ) from None
            # Every file, the manifest against its digest and history's: a failing folder is never cached.
            verify_bundle(folder, manifest_sha256=self.recorded_manifest_sha256(version))
        return local

    def _read_log(self) -> list[tuple[int, str, bytes]]:
        """Every event object as ``(number, key, bytes)``, oldest first (only new keys are downloaded)."""
        prefix = self._key("events") + "/"
        found = []
        for key in self.fs.find(prefix):
            match = EVENT_NAME.match(key[len(prefix) :])
            if match:
                found.append((int(match.group(1)), key))
        found.sort()
        missing = [key for _, key in found if key not in self._raw_events]
        if missing:
            self._raw_events.update(self.fs.cat(missing))
        return [(number, key, self._raw_events[key]) for number, key in found]

    def _log(self) -> list[tuple[int, str, bytes]]:
        pinned = getattr(self._pinned, "log", None)
        return self._read_log() if pinned is None else pinned

    def _read_history(self, *, strict: bool) -> tuple[list[dict[str, Any]], list[str]]:
        items = (
            (f"{self.root}/events/{key.rsplit('/', 1)[-1]}", raw.decode("utf-8", "replace"))
            for _, key, raw in self._log()
        )
        return parse_events(items, strict=strict, fix="delete that object (history events are immutable)")

    def _newest_served(self, log: list[tuple[int, str, bytes]]) -> tuple[int, dict[str, Any]] | None:
        for number, _key, raw in reversed(log):
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event") in SERVED_EVENTS and "version" in event:
                return number, event
        return None

    def pointer(self) -> dict[str, Any] | None:
        """The newest promoted / rolled_back / repaired event as a ``current.json``-shaped dict, or None."""
        newest = self._newest_served(self._log())
        if newest is None:
            return None
        event = newest[1]
        version = str(event["version"])
        return {
            "version": version,
            "path": f"{self.root}/versions/{version}",
            "promoted_at": event.get("time"),
            "reason": event.get("reason", ""),
        }

    def pointer_stamp(self) -> tuple[int, ...] | None:
        """The number of the newest served event: changes exactly when the pointer moves (one LIST)."""
        newest = self._newest_served(self._read_log())
        return None if newest is None else (newest[0],)

    # ----------------------------------------------------------------- moving the pointer
    def promote(self, version: str, reason: str = "") -> None:
        self._decide(lambda: ModelRegistry.promote(self, version, reason))

    def rollback(self, to: str | None = None, reason: str = "rollback", *, adopt: bool = False) -> str:
        return self._decide(lambda: ModelRegistry.rollback(self, to, reason, adopt=adopt))

    def repair(self, reason: str = "repair: pointer rebuilt from history") -> RepairReport:
        return self._decide(lambda: ModelRegistry.repair(self, reason))

    def _decide(self, decision: Callable[[], T]) -> T:
        """Run ``decision`` on one snapshot of the log; if another writer moved first, decide again."""
        for _ in range(MAX_ATTEMPTS):
            self._pinned.log = self._read_log()
            try:
                return decision()
            except _LostRace:
                continue
            finally:
                self._pinned.log = None
        raise RegistryError(f"gave up moving the pointer of {self.root}: {MAX_ATTEMPTS} concurrent moves won")

    def _move_pointer(self, version: str, reason: str, *, event: str, **details: Any) -> None:
        """Verify ``version`` and create the event after the snapshot's newest (``_LostRace`` if taken)."""
        try:
            self.verify(version)  # downloads first: a bad download is refused too
        except BundleError as exc:
            self._append_history(
                {"event": "refused", "action": event, "version": version, "reason": reason, "error": str(exc)}
            )
            raise
        snapshot = self._log()
        number = snapshot[-1][0] + 1 if snapshot else 1
        record = {"event": event, "version": version, "reason": reason, "time": _now(), **details}
        if not self._create(self._event_key(number), _event_bytes(record)):
            raise _LostRace

    def _append_history(self, event: dict[str, Any]) -> None:
        """Log an event that moves nothing (registered, refused) as the next free number."""
        data = _event_bytes({"time": _now(), **event})
        for _ in range(MAX_ATTEMPTS):
            log = self._read_log()
            if self._create(self._event_key(log[-1][0] + 1 if log else 1), data):
                return
        raise RegistryError(f"could not append to the history of {self.root} in {MAX_ATTEMPTS} tries")

    def _event_key(self, number: int) -> str:
        return self._key("events", f"{number:010d}.json")


def _precondition_failed(exc: OSError) -> bool:
    """A 412 to a conditional create from a server that omits ``<Condition>`` (SeaweedFS): s3fs then raises
    a plain ``OSError`` instead of ``FileExistsError``; the S3 error code underneath says the key exists."""
    response = getattr(exc.__cause__, "response", None) or {}
    return response.get("Error", {}).get("Code") == "PreconditionFailed"


def _event_bytes(event: dict[str, Any]) -> bytes:
    return json.dumps(event, sort_keys=True, default=str).encode("utf-8")


def open_registry(config: PipelineConfig) -> ModelRegistry:
    """The registry ``config`` names: ``serving.registry_uri`` (S3) or ``<artifact_root>/registry``."""
    from melanoma_ml.artifacts import artifact_paths

    paths = artifact_paths(config)
    uri = config.serving.registry_uri
    if uri:
        return S3Registry(uri, paths.registry_cache)
    return ModelRegistry(paths.registry)
