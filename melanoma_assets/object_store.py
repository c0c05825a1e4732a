"""Step values and artifact files through an S3 bucket (``MELANOMA_ARTIFACT_STORE=s3://bucket/prefix``).

With the store set, every worker keeps its own local ``artifact_root`` (a working copy, no shared
filesystem) and the IO manager here wraps each step: when the step's resources start it pulls what other
workers published (``melanoma_ml.objectstore``); when the step hands over an output it writes the value
into the working root and pushes every file the step wrote, value included, as one commit. A step that
fails or whose worker dies publishes nothing. Read once when the definitions load, like the executor.

Values hold absolute paths of the worker that wrote them (a checkpoint folder, the cache, image paths in
a table). They are pickled with every path under the writer's root stored relative to it and resolved
under the reader's root on load, so a value written on one worker opens on another.
"""

from __future__ import annotations

import io
import os
import pickle
import time
from pathlib import Path, PurePath
from typing import Any

import dagster as dg
import pandas as pd
from pydantic import PrivateAttr

from melanoma_assets.resources import PipelineSettings
from melanoma_ml.artifacts import artifact_paths
from melanoma_ml.objectstore import ArtifactStore, parse_s3_uri

STORE_ENV = "MELANOMA_ARTIFACT_STORE"
VALUES_DIR = "dagster-values"
"""Folder of the working root that holds the pickled step values (synced like every other file)."""


def store_uri_from_env() -> str | None:
    """``MELANOMA_ARTIFACT_STORE`` (an ``s3://bucket/prefix``), or None: values stay on the Dagster instance."""
    return (os.environ.get(STORE_ENV) or "").strip() or None


def store_resources(settings: PipelineSettings, uri: str | None) -> dict[str, Any]:
    """The ``io_manager`` resource for the store ``uri`` (none when unset: Dagster's default stays).

    Raises:
        InputValueError: ``uri`` is not an ``s3://bucket/prefix``.
    """
    if uri is None:
        return {}
    parse_s3_uri(uri)
    return {"io_manager": ObjectStoreIOManager(uri=uri, settings=settings)}


class ObjectStoreIOManager(dg.ConfigurableIOManager):
    """Pickled values and the step's artifact files, published through ``uri`` (see the module doc)."""

    uri: str
    settings: PipelineSettings
    _store: Any = PrivateAttr(default=None)
    _baseline: Any = PrivateAttr(default=None)
    _pull_s: float = PrivateAttr(default=0.0)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        root = artifact_paths(self.settings.config()).root
        self._store = ArtifactStore(self.uri, root)
        started = time.perf_counter()
        self._store.pull()
        self._pull_s = time.perf_counter() - started
        self._baseline = self._store.snapshot()

    def _value_path(self, context: dg.InputContext | dg.OutputContext) -> Path:
        name = "__".join(context.asset_key.path) if context.has_asset_key else context.get_identifier()[-1]
        partition = context.asset_partition_key if context.has_asset_partitions else "__all__"
        return self._store.root / VALUES_DIR / name / f"{_safe(partition)}.pickle"

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        path = self._value_path(context)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".objectstore-partial-{path.name}")
        tmp.write_bytes(dumps_relocatable(obj, self._store.root))
        os.replace(tmp, path)
        label = f"{context.run_id} {context.step_key}"
        started = time.perf_counter()
        commit = self._store.push(self._baseline, label)
        push_s = time.perf_counter() - started
        self._baseline = self._store.snapshot()
        context.add_output_metadata(
            {
                "artifact_commit": commit or "unchanged",
                "artifact_pull_s": round(self._pull_s, 3),  # this step's pull before it ran
                "artifact_push_s": round(push_s, 3),
            }
        )

    def load_input(self, context: dg.InputContext) -> Any:
        if context.has_asset_partitions and len(context.asset_partition_keys) != 1:
            keys = context.asset_partition_keys
            return {key: self._load(context, self._partition_path(context, key)) for key in keys}
        return self._load(context, self._value_path(context))

    def _partition_path(self, context: dg.InputContext, key: str) -> Path:
        name = "__".join(context.asset_key.path)
        return self._store.root / VALUES_DIR / name / f"{_safe(key)}.pickle"

    def _load(self, context: dg.InputContext, path: Path) -> Any:
        if not path.exists():
            self._store.pull()
            self._baseline = self._store.snapshot()
        if not path.exists():
            raise dg.Failure(
                f"no value of {context.asset_key.to_user_string()} at {path} after pulling {self.uri}: "
                "materialize it first (it was never published, or its step failed)"
            )
        return loads_relocatable(path.read_bytes(), self._store.root)


def _safe(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in key)


# ----------------------------------------------------------------- root-relative pickling
class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, root: Path) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._prefix = str(root) + os.sep
        self._frames: set[int] = set()

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) is str and obj.startswith(self._prefix):
            return ("str", obj[len(self._prefix) :])
        if isinstance(obj, PurePath) and str(obj).startswith(self._prefix):
            return ("path", str(obj)[len(self._prefix) :])
        return None

    def reducer_override(self, obj: Any) -> Any:
        """Tables: text columns (Arrow-backed, not pickled string by string) go as objects, then back."""
        if not isinstance(obj, pd.DataFrame) or id(obj) in self._frames:
            return NotImplemented
        text = [
            c for c in obj.columns if pd.api.types.is_string_dtype(obj[c].dtype) and obj[c].dtype != object
        ]
        if not text:
            return NotImplemented
        plain = obj.astype(dict.fromkeys(text, object))
        self._frames.add(id(plain))
        return _restore_frame, (plain, {c: obj[c].dtype for c in text})


def _restore_frame(frame: pd.DataFrame, dtypes: dict[Any, Any]) -> pd.DataFrame:
    return frame.astype(dtypes)


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, root: Path) -> None:
        super().__init__(file)
        self._root = root

    def persistent_load(self, pid: Any) -> Any:
        kind, rel = pid
        if kind == "path":
            return self._root / rel
        return str(self._root / rel)


def dumps_relocatable(obj: Any, root: Path) -> bytes:
    """Pickle ``obj`` with every path (``Path`` or text) under ``root`` stored relative to it."""
    buffer = io.BytesIO()
    _Pickler(buffer, Path(root)).dump(obj)
    return buffer.getvalue()


def loads_relocatable(data: bytes, root: Path) -> Any:
    """Unpickle ``dumps_relocatable`` bytes with the relative paths resolved under this worker's ``root``."""
    return _Unpickler(io.BytesIO(data), Path(root)).load()
