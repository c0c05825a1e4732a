"""A file-system model registry: immutable bundle versions and an atomically moved ``current`` pointer.

Layout under ``root``::

    versions/v0001/          an immutable bundle (weights.safetensors + manifest.json)
    versions/v0002/
    current.json             {"version", "path", "promoted_at", "reason"}; replaced atomically
    history.jsonl            append-only events: registered / promoted / rolled_back
    .reserved/v0002          version reservations (os.mkdir is atomic, so two writers never share one)

A version number is reserved with ``os.mkdir`` before its bundle is written, so concurrent
registrations (threads or processes, same machine or a shared POSIX file system) get distinct
versions; a failed write burns its number instead of reusing it. Bundles are written with
``atomic_directory``, so a reader never sees a half-written version. Nothing is ever overwritten.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from melanoma_ml.atomic import atomic_directory, atomic_write_json
from melanoma_ml.serving.bundle import MANIFEST_FILE, WEIGHTS_FILE, save_bundle, verify_bundle

if TYPE_CHECKING:
    from torch import nn

    from melanoma_ml.serving.bundle import Bundle
    from melanoma_ml.spec import ModelSpec

VERSION_PATTERN = re.compile(r"^v(\d{4,})$")
CURRENT_FILE = "current.json"
HISTORY_FILE = "history.jsonl"


class RegistryError(ValueError):
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
        self._reserved_dir = self.root / ".reserved"

    # ----------------------------------------------------------------- registering
    def register_bundle(
        self, net: nn.Module, spec: ModelSpec, *, reason: str = "", **bundle_kwargs: Any
    ) -> str:
        """Export ``net`` as the next version (``save_bundle`` keywords: threshold, metrics, ...).

        ``extra["version"]`` is set to the new version name so the loaded bundle knows it.
        """
        extra = dict(bundle_kwargs.pop("extra", None) or {})

        def write(folder: Path, version: str) -> None:
            save_bundle(folder, net, spec, extra={**extra, "version": version}, **bundle_kwargs)

        return self._register_with(write, reason=reason)

    def register(self, bundle_dir: str | Path, *, reason: str = "") -> str:
        """Copy an existing, verified bundle folder in as the next version.

        The weights are copied unchanged (so the manifest's sha256 still holds); the manifest is rewritten
        with ``extra["version"]`` set to the new version, replacing any version the source carried (e.g.
        a bundle copied out of another registry), so the loaded bundle reports its name here.

        Raises:
            BundleError / BundleIntegrityError: ``bundle_dir`` is not a complete, untampered bundle.
        """
        source = Path(bundle_dir)
        manifest = verify_bundle(source)

        def write(folder: Path, version: str) -> None:
            renamed = {**manifest, "extra": {**(manifest.get("extra") or {}), "version": version}}
            with atomic_directory(folder) as tmp:
                shutil.copy2(source / WEIGHTS_FILE, tmp / WEIGHTS_FILE)
                atomic_write_json(tmp / MANIFEST_FILE, renamed)
            verify_bundle(folder)

        return self._register_with(write, reason=reason, source=str(source))

    def _register_with(self, write: Callable[[Path, str], None], *, reason: str, **event: Any) -> str:
        version = self._reserve_version()
        folder = self.versions_dir / version
        write(folder, version)
        self._append_history({"event": "registered", "version": version, "reason": reason, **event})
        return version

    def _reserve_version(self) -> str:
        self._reserved_dir.mkdir(parents=True, exist_ok=True)
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        while True:
            taken = {*self._numbers(self._reserved_dir), *self._numbers(self.versions_dir)}
            candidate = f"v{max(taken, default=0) + 1:04d}"
            try:
                os.mkdir(self._reserved_dir / candidate)
            except FileExistsError:
                continue  # another writer took it between our listing and mkdir: look again
            return candidate

    @staticmethod
    def _numbers(folder: Path) -> list[int]:
        if not folder.is_dir():
            return []
        return [int(m.group(1)) for p in folder.iterdir() if (m := VERSION_PATTERN.match(p.name))]

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

    def manifest(self, version: str) -> dict[str, Any]:
        """The verified manifest of ``version`` (sha256 of its weights checked)."""
        return verify_bundle(self.version_path(version))

    def pointer(self) -> dict[str, Any] | None:
        """The parsed ``current.json`` or None when nothing was promoted yet."""
        if not self.current_file.is_file():
            return None
        try:
            data = json.loads(self.current_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise RegistryError(
                f"{self.current_file} is not valid JSON ({exc}); restore it with promote(<version>) "
                "or rollback(<version>)"
            ) from exc
        if not isinstance(data, dict) or "version" not in data:
            raise RegistryError(f"{self.current_file} lacks 'version'; restore it with promote(<version>)")
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
        """All events, oldest first."""
        if not self.history_file.is_file():
            return []
        events = []
        for number, line in enumerate(self.history_file.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise RegistryError(
                    f"{self.history_file} line {number} is not valid JSON ({exc}); fix or delete that line"
                ) from exc
        return events

    # ----------------------------------------------------------------- moving the pointer
    def promote(self, version: str, reason: str = "") -> None:
        """Point ``current`` at ``version`` (verified first) and log it."""
        self._move_pointer(version, reason, event="promoted")

    def rollback(self, to: str | None = None, reason: str = "rollback") -> str:
        """Point ``current`` back at ``to``, or (None) at the version served before the current one.

        Returns:
            The version now current.

        Raises:
            RegistryError: nothing promoted yet, no earlier version to return to, or ``to`` is current.
        """
        current = self.current()
        if current is None:
            raise RegistryError(f"nothing is promoted in registry {self.root}; promote a version first")
        if to is None:
            stack = self._served_stack()
            if len(stack) < 2:
                raise RegistryError(
                    f"no earlier served version to roll back to in {self.root} (current {current}); "
                    f"name one explicitly: rollback(to=...), known versions {self.versions()}"
                )
            to = stack[-2]
        if to == current:
            raise RegistryError(f"{to} is already current in {self.root}; nothing to roll back")
        self._move_pointer(to, reason, event="rolled_back", previous=current)
        return to

    def _move_pointer(self, version: str, reason: str, *, event: str, **details: Any) -> None:
        path = self.version_path(version)
        verify_bundle(path)  # never point the app at a tampered or incomplete bundle
        now = _now()
        atomic_write_json(
            self.current_file,
            {"version": version, "path": str(path), "promoted_at": now, "reason": reason},
        )
        self._append_history({"event": event, "version": version, "reason": reason, "time": now, **details})

    def _served_stack(self) -> list[str]:
        """Versions served over time, with rolled-back ones popped (so repeated rollbacks walk backwards)."""
        stack: list[str] = []
        for entry in self.history():
            version = entry.get("version")
            if entry.get("event") == "promoted":
                stack.append(version)
            elif entry.get("event") == "rolled_back":
                if version in stack:
                    del stack[stack.index(version) + 1 :]
                else:
                    stack.append(version)
        return stack

    def _append_history(self, event: dict[str, Any]) -> None:
        """Append one JSON line with a single ``write`` on an ``O_APPEND`` descriptor (no interleaving)."""
        event = {"time": _now(), **event}
        line = (json.dumps(event, sort_keys=True, default=str) + "\n").encode("utf-8")
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.history_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


def _now() -> str:
    return datetime.now(UTC).isoformat()
