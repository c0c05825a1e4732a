"""A file-system model registry: immutable bundle versions and an atomically moved ``current`` pointer.

Layout under ``root``::

    versions/v0001/          an immutable bundle (weights.safetensors + manifest.json + manifest.sha256)
    versions/v0002/
    current.json             {"version", "path", "promoted_at", "reason"}; replaced atomically
    history.jsonl            append-only events: registered (with the manifest's sha256) / promoted /
                             rolled_back / refused / repaired

Every byte of a version is verified before the pointer moves to it: the manifest against its
``manifest.sha256`` and the sha256 its ``registered`` event recorded, every other file against the
manifest. A version from before manifests were hashed (no digest file, no recorded sha256) is *legacy*:
what its manifest lists is verified, the manifest itself is not covered (``integrity`` says so).
    .write.lock              every writer holds a shared flock on it while it writes (see ``_writing``)

A bundle is written complete into a temp folder (``versions/.stage-*.tmp``) and only then given a number:
the next one after every version folder and every version history names, taken by renaming the temp
folder to ``versions/vNNNN``. ``rename`` onto an existing version fails (a version folder is never empty),
so a concurrent writer that took the number first makes us retry with the next; a crash or error
part-way consumes no number. Nothing is ever overwritten.

Stale temps of killed writers (``.*.tmp`` in the registry and in ``versions/``) are swept at the start of
a write, but only by a writer that gets the lock *exclusively*: since every live writer holds it shared
for its whole write, an exclusive lock proves that no temp there belongs to a live writer, on any host
that shares the folder with working ``flock`` (local disks; NFS v4 emulates it with POSIX locks). The
kernel drops a killed process's lock, so its leftovers go at the next write nobody else overlaps.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from melanoma_ml.atomic import atomic_directory, atomic_write_json
from melanoma_ml.errors import InputValueError
from melanoma_ml.serving.bundle import (
    MANIFEST_DIGEST_FILE,
    MANIFEST_FILE,
    BundleError,
    bundle_file_names,
    manifest_covered,
    save_bundle,
    verify_bundle,
    write_manifest,
)

if TYPE_CHECKING:
    from torch import nn

    from melanoma_ml.serving.bundle import Bundle
    from melanoma_ml.serving.manifest import BundleManifest
    from melanoma_ml.spec import ModelSpec

log = logging.getLogger(__name__)

VERSION_PATTERN = re.compile(r"^v(\d{4,})$")
CURRENT_FILE = "current.json"
HISTORY_FILE = "history.jsonl"
WRITE_LOCK_FILE = ".write.lock"
SERVED_EVENTS = ("promoted", "rolled_back", "repaired")
"""History events that point ``current.json`` at a version."""


class RegistryError(InputValueError):
    """A registry operation cannot proceed (unknown version, nothing to roll back to, bad files)."""


class ModelRegistry:
    """Versioned serving bundles with a ``current`` pointer, a history log and rollback.

    Args:
        root: Registry folder (created on first write).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / "versions"
        self.current_file = self.root / CURRENT_FILE
        self.history_file = self.root / HISTORY_FILE

    # ----------------------------------------------------------------- registering
    def register_bundle(
        self, net: nn.Module, spec: ModelSpec, *, reason: str = "", **bundle_kwargs: Any
    ) -> str:
        """Export ``net`` as the next version (``save_bundle`` keywords: threshold, metrics, fold, ...).

        The manifest's ``version`` is set to the new version name so the loaded bundle knows it.
        """

        def write(folder: Path) -> None:
            save_bundle(folder, net, spec, **bundle_kwargs)

        return self._register_with(write, reason=reason)

    def register(self, bundle_dir: str | Path, *, reason: str = "") -> str:
        """Copy an existing, verified bundle folder in as the next version.

        The weights are copied unchanged (so the manifest's sha256 still holds); the manifest is rewritten
        with its ``version`` set to the new version, replacing any version the source carried (e.g.
        a bundle copied out of another registry), so the loaded bundle reports its name here.

        Raises:
            BundleError / BundleIntegrityError: ``bundle_dir`` is not a complete, untampered bundle.
        """
        source = Path(bundle_dir)
        manifest = verify_bundle(source)

        def write(folder: Path) -> None:
            with atomic_directory(folder) as tmp:
                for name in bundle_file_names(manifest):
                    if name == MANIFEST_DIGEST_FILE:
                        continue  # written afresh with the renamed manifest (``_number``)
                    (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(source / name, tmp / name)

        return self._register_with(write, reason=reason, source=str(source))

    def _register_with(self, write: Callable[[Path], None], *, reason: str, **event: Any) -> str:
        """Write the bundle complete in a temp folder, then number it (see the module docstring)."""
        with self._writing():
            stage = Path(tempfile.mkdtemp(prefix=".stage-", suffix=".tmp", dir=self.versions_dir))
            try:
                bundle = stage / "bundle"
                write(bundle)
                version, digest = self._number(bundle)
            finally:
                shutil.rmtree(stage, ignore_errors=True)
            self._append_history(
                {
                    "event": "registered",
                    "version": version,
                    "reason": reason,
                    "manifest_sha256": digest,
                    **event,
                }
            )
        return version

    def _number(self, bundle: Path) -> tuple[str, str]:
        """Verify the complete ``bundle`` and rename it to the next free version; return it and the sha256
        of its manifest (written with that version in it, with its ``manifest.sha256``)."""
        manifest = verify_bundle(bundle)
        while True:
            version = f"v{self._last_number() + 1:04d}"
            renamed = manifest.model_copy(update={"version": version})
            digest = write_manifest(bundle, renamed)
            try:
                os.rename(bundle, self.versions_dir / version)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                    raise
                continue  # another writer took this number since we looked: take the next
            _fsync_dir(self.versions_dir)
            return version, digest

    def _last_number(self) -> int:
        """Highest number any version folder (complete or not) or any history event names; 0 if none."""
        named = [p.name for p in self.versions_dir.iterdir()] if self.versions_dir.is_dir() else []
        named += [str(entry.get("version")) for entry in self._read_history(strict=False)[0]]
        return max((int(m.group(1)) for name in named if (m := VERSION_PATTERN.match(name))), default=0)

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the registry's write lock shared for a write; sweep stale temps first if nobody else writes.

        The sweep runs only under an exclusive lock, which no writer can get while another holds it shared,
        so it never removes a live writer's temp; a killed writer's lock is released by the kernel.
        """
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / WRITE_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.debug("another writer is writing to %s; stale temps are swept next time", self.root)
            else:
                self._sweep_stale_temps()
            fcntl.flock(fd, fcntl.LOCK_SH)  # converts our exclusive lock, or waits for another's sweep
            yield
        finally:
            os.close(fd)

    def _sweep_stale_temps(self) -> None:
        """Remove ``.*.tmp`` files and folders in the registry and ``versions/`` (under the exclusive lock)."""
        for folder in (self.root, self.versions_dir):
            for path in folder.iterdir():
                if not (path.name.startswith(".") and path.name.endswith(".tmp")):
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                log.warning("removed %s, left in the registry by a writer that was killed", path)

    # ----------------------------------------------------------------- reading
    def versions(self) -> list[str]:
        """Complete versions (a manifest is present), oldest first."""
        if not self.versions_dir.is_dir():
            return []
        done = [
            p.name
            for p in self.versions_dir.iterdir()
            if VERSION_PATTERN.match(p.name) and (p / MANIFEST_FILE).is_file()
        ]
        return sorted(done, key=lambda name: int(name[1:]))

    def version_path(self, version: str) -> Path:
        """Folder of ``version``.

        Raises:
            RegistryError: unknown version (the message lists the known ones).
        """
        path = self.versions_dir / version
        if not VERSION_PATTERN.match(version) or not (path / MANIFEST_FILE).is_file():
            raise RegistryError(
                f"unknown model version {version!r} in registry {self.root}; known versions: {self.versions()}"
            )
        return path

    def manifest(self, version: str) -> BundleManifest:
        """The verified manifest of ``version`` (``verify``: every file's sha256 checked)."""
        return self.verify(version)

    def verify(self, version: str) -> BundleManifest:
        """Check every byte of ``version``, the manifest against the sha256 history recorded; its manifest.

        Raises:
            RegistryError: unknown version.
            BundleError / BundleIntegrityError: a file is missing or differs from its recorded sha256.
        """
        return verify_bundle(
            self.version_path(version), manifest_sha256=self.recorded_manifest_sha256(version)
        )

    def recorded_manifest_sha256(self, version: str) -> str | None:
        """The manifest sha256 the ``registered`` event of ``version`` recorded; None for a legacy version."""
        for entry in reversed(self._read_history(strict=False)[0]):
            if entry.get("event") == "registered" and entry.get("version") == version:
                digest = entry.get("manifest_sha256")
                return str(digest) if digest else None
        return None

    def integrity(self, version: str) -> tuple[str, str]:
        """``(state, detail)`` of ``version``'s bytes: ``intact``, ``legacy`` (verifies, but the manifest
        has no recorded sha256: written before manifests were hashed) or ``corrupt`` (detail: why)."""
        try:
            self.verify(version)
            covered = manifest_covered(self.version_path(version))
        except (RegistryError, BundleError) as exc:
            return "corrupt", str(exc)
        if not covered:
            return "legacy", (
                "weights and listed files verify; manifest not covered (no manifest.sha256: registered by an "
                "older melanoma_ml)"
            )
        return "intact", "every file matches its sha256, the manifest included"

    def pointer(self) -> dict[str, Any] | None:
        """The parsed ``current.json`` or None when nothing was promoted yet."""
        if not self.current_file.is_file():
            return None
        try:
            data = json.loads(self.current_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RegistryError(
                f"{self.current_file} is not valid JSON ({exc}); rebuild it from history with "
                "`melanoma-ml registry repair`, or serve a version by name with `melanoma-ml rollback --to`"
            ) from exc
        if not isinstance(data, dict) or "version" not in data:
            raise RegistryError(
                f"{self.current_file} lacks 'version'; rebuild it from history with `melanoma-ml registry "
                "repair`, or serve a version by name with `melanoma-ml rollback --to`"
            )
        return data

    def current(self) -> str | None:
        """The promoted version, or None."""
        pointer = self.pointer()
        return None if pointer is None else str(pointer["version"])

    def current_path(self) -> Path | None:
        """Folder of the promoted version, or None."""
        version = self.current()
        return None if version is None else self.version_path(version)

    def load_current(self, **load_kwargs: Any) -> Bundle | None:
        """Load (and verify) the promoted bundle, or None when nothing was promoted yet."""
        from melanoma_ml.serving.bundle import load_bundle

        path = self.current_path()
        return None if path is None else load_bundle(path, **load_kwargs)

    def pointer_stamp(self) -> tuple[int, int, int] | None:
        """Cheap change detector for the pointer: ``(inode, mtime_ns, size)`` of ``current.json``.

        The pointer is replaced with ``os.replace``, so every move gives a new inode; an app can call
        this per request and reload only when the stamp changes.
        """
        try:
            st = os.stat(self.current_file)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def history(self) -> list[dict[str, Any]]:
        """All events, oldest first.

        Raises:
            RegistryError: a line is not a JSON object (the message names it).
        """
        return self._read_history(strict=True)[0]

    def _read_history(self, *, strict: bool) -> tuple[list[dict[str, Any]], list[str]]:
        """Events, and (``strict=False``) one note per unreadable line skipped, e.g. a killed writer's."""
        if not self.history_file.is_file():
            return [], []
        text = self.history_file.read_text(encoding="utf-8", errors="replace")
        lines = ((f"{self.history_file} line {n}", line) for n, line in enumerate(text.splitlines(), start=1))
        return parse_events(lines, strict=strict, fix="fix or delete that line")

    def served_stack(self, events: list[dict[str, Any]] | None = None) -> list[str]:
        """Versions served over time, oldest first, with rolled-back ones popped.

        Repeated rollbacks walk backwards through it; the last entry is what ``current.json`` should name.
        A version the pointer was moved away from by a rollback is no longer on it, so nothing falls back
        to a model someone rolled back on purpose.

        Args:
            events: History events (default: read leniently, skipping unreadable lines).
        """
        if events is None:
            events = self._read_history(strict=False)[0]
        stack: list[str] = []
        for entry in events:
            version = entry.get("version")
            if entry.get("event") == "promoted":
                stack.append(version)
            elif entry.get("event") in ("rolled_back", "repaired"):
                if version in stack:
                    del stack[stack.index(version) + 1 :]
                else:
                    stack.append(version)
        return stack

    def check(self, version: str) -> str | None:
        """Why ``version`` cannot be served (unknown, files missing, sha256 mismatch), or None if it verifies."""
        try:
            self.verify(version)
        except (RegistryError, BundleError) as exc:
            return str(exc)
        return None

    def orphans(self) -> dict[str, str]:
        """Complete versions that were never served, each with why (from history)."""
        events = self._read_history(strict=False)[0]
        served = {e.get("version") for e in events if e.get("event") in SERVED_EVENTS}
        out = {}
        for version in self.versions():
            if version in served:
                continue
            mine = [e for e in events if e.get("version") == version]
            refused = [e for e in mine if e.get("event") == "refused"]
            registered = [e for e in mine if e.get("event") == "registered"]
            if refused:
                last = refused[-1]
                out[version] = f"promotion refused {last.get('time', '?')}: {last.get('error', '?')}"
            elif registered:
                first = registered[0]
                out[version] = (
                    f"registered {first.get('time', '?')} (reason {first.get('reason', '')!r}) but never "
                    "promoted: the writer crashed or was stopped before promoting it, or it was registered "
                    "without promotion"
                )
            else:
                out[version] = (
                    f"not in {HISTORY_FILE}: the writer was killed between writing the bundle and logging it, "
                    "or the folder was put there by hand"
                )
        return out

    # ----------------------------------------------------------------- moving the pointer
    def promote(self, version: str, reason: str = "") -> None:
        """Point ``current`` at ``version`` (verified first) and log it."""
        self._move_pointer(version, reason, event="promoted")

    def rollback(self, to: str | None = None, reason: str = "rollback", *, adopt: bool = False) -> str:
        """Point ``current`` back at ``to``, or (None) at the version served before the current one.

        A rollback returns only to a version history shows as served before: an orphan (a version
        registered but never promoted, e.g. a writer killed before its history line) is refused unless
        ``adopt``, which verifies every byte of it and logs a ``promoted`` event (``adopted: true``).

        Returns:
            The version now current.

        Raises:
            RegistryError: nothing promoted yet, no earlier version to return to, ``to`` is current, or
                ``to`` was never promoted (and not ``adopt``).
        """
        try:
            current = self.current()
        except RegistryError as exc:
            if to is None:
                raise
            log.warning("rolling back to %s over an unreadable pointer: %s", to, exc)
            current = None
        else:
            if current is None:
                raise RegistryError(
                    f"nothing is promoted in registry {self.root}; promote a version first (if "
                    f"{CURRENT_FILE} was deleted, `melanoma-ml registry repair` rebuilds it from history)"
                )
        if to is None:
            stack = self.served_stack(self.history())
            if len(stack) < 2:
                raise RegistryError(
                    f"no earlier served version to roll back to in {self.root} (current {current}); "
                    f"name one explicitly: rollback(to=...), known versions {self.versions()}"
                )
            to = stack[-2]
        if to == current:
            raise RegistryError(f"{to} is already current in {self.root}; nothing to roll back")
        if to not in self._ever_served():
            self.version_path(to)  # an unknown version is refused as such
            if not adopt:
                why = self.orphans().get(to, f"no promoted event in {HISTORY_FILE}")
                raise RegistryError(
                    f"{to} was never promoted in {self.root} ({why}); a rollback returns only to a version "
                    f"that served before. Check its bytes with `melanoma-ml registry verify`, then serve it "
                    f"with `melanoma-ml rollback --to {to} --adopt` (verifies every file and logs a promoted "
                    "event), or re-run promotion to register a new version"
                )
            self._move_pointer(to, f"adopted: {reason}", event="promoted", previous=current, adopted=True)
            return to
        self._move_pointer(to, reason, event="rolled_back", previous=current)
        return to

    def _ever_served(self) -> set[str]:
        """Versions some history event pointed ``current`` at (promoted, rolled back to, repaired to)."""
        events = self._read_history(strict=False)[0]
        return {str(e.get("version")) for e in events if e.get("event") in SERVED_EVENTS}

    def repair(self, reason: str = "repair: pointer rebuilt from history") -> RepairReport:
        """Make ``current.json`` name a servable version, using only ``history.jsonl`` and the versions.

        A pointer that parses and names a version that verifies is left alone. Otherwise (missing, not
        JSON, or naming a corrupt version) it is rewritten atomically to the newest version on the served
        stack (``served_stack``) that verifies, and a ``repaired`` event is logged. Unreadable history lines
        are skipped and reported.

        Raises:
            RegistryError: no version history shows as served verifies (the message says what to do).
        """
        notes: list[str] = []
        try:
            pointer = self.pointer()
        except RegistryError as exc:
            pointer = None
            notes.append(f"{CURRENT_FILE} is unreadable: {exc}")
        else:
            if pointer is None:
                notes.append(f"{CURRENT_FILE} is missing")
        events, skipped = self._read_history(strict=False)
        notes += skipped
        current = None if pointer is None else str(pointer["version"])
        if current is not None:
            problem = self.check(current)
            if problem is None:
                notes.append(f"{CURRENT_FILE} names {current}, which verifies: nothing to repair")
                return RepairReport(version=current, changed=False, notes=tuple(notes))
            notes.append(f"{CURRENT_FILE} names {current}, which cannot be served: {problem}")
        seen = {current}
        for version in reversed(self.served_stack(events)):
            if version in seen:
                continue
            seen.add(version)
            problem = self.check(version)
            if problem is not None:
                notes.append(f"skipped {version} (served earlier): {problem}")
                continue
            self._move_pointer(version, reason, event="repaired", previous=current)
            notes.append(
                f"{CURRENT_FILE} now names {version}: the last version history shows as served that verifies"
            )
            return RepairReport(version=version, changed=True, notes=tuple(notes))
        raise RegistryError(
            f"no promoted version in {self.history_file} verifies, so {CURRENT_FILE} cannot be rebuilt from "
            f"history ({'; '.join(notes) or 'no promote events'}); serve a version by name with "
            f"`melanoma-ml rollback --to VERSION` (versions here: {self.versions()})"
        )

    def _move_pointer(self, version: str, reason: str, *, event: str, **details: Any) -> None:
        path = self.version_path(version)
        with self._writing():
            try:
                self.verify(version)  # never point the app at a tampered or incomplete bundle
            except BundleError as exc:
                self._append_history(
                    {
                        "event": "refused",
                        "action": event,
                        "version": version,
                        "reason": reason,
                        "error": str(exc),
                    }
                )
                raise
            now = _now()
            atomic_write_json(
                self.current_file,
                {"version": version, "path": str(path), "promoted_at": now, "reason": reason},
            )
            self._append_history(
                {"event": event, "version": version, "reason": reason, "time": now, **details}
            )

    def _append_history(self, event: dict[str, Any]) -> None:
        """Append one JSON line with a single ``write`` on an ``O_APPEND`` descriptor (no interleaving).

        If a killed writer left a torn last line (no newline), the event starts on a fresh line.
        """
        event = {"time": _now(), **event}
        line = (json.dumps(event, sort_keys=True, default=str) + "\n").encode("utf-8")
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.history_file, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass(frozen=True)
class RepairReport:
    """What ``ModelRegistry.repair`` found and did.

    Attributes:
        version: The version ``current.json`` names now.
        changed: Whether ``current.json`` was rewritten.
        notes: One line per finding or action, in order.
    """

    version: str
    changed: bool
    notes: tuple[str, ...]

    def text(self) -> str:
        return "\n".join(self.notes)


def parse_events(
    items: Iterable[tuple[str, str]], *, strict: bool, fix: str
) -> tuple[list[dict[str, Any]], list[str]]:
    """Parse ``(where, json_text)`` history entries into events; blank texts are ignored.

    Args:
        items: Each entry's location (for messages) and its text.
        strict: Raise on an entry that is not a JSON object; otherwise skip it with a note.
        fix: What the strict error tells the user to do about the bad entry.

    Raises:
        RegistryError: ``strict`` and an entry is not a JSON object (the message names it).
    """
    events, skipped = [], []
    for where, text in items:
        if not text.strip():
            continue
        try:
            event = json.loads(text)
            if not isinstance(event, dict):
                raise ValueError(f"a JSON {type(event).__name__}, not an object")
        except ValueError as exc:  # JSONDecodeError is a ValueError
            problem = f"{where} is not a valid event ({exc})"
            if strict:
                raise RegistryError(f"{problem}; {fix}") from exc
            skipped.append(f"{problem}: skipped")
            continue
        events.append(event)
    return events, skipped


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _fsync_dir(path: Path) -> None:
    """fsync a folder, so a rename into it survives a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
