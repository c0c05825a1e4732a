"""The model behind the app: follows the registry's ``current`` pointer and answers prediction requests.

No gradio here: the app (``melanoma_ml.serving.app``) is a thin UI over ``ModelService``, and tests and
benchmarks call the service directly.

Hot reload: every request (or, with ``serving.reload_check_interval_s``, at most that often) stats the
registry pointer. When it moved, one request thread loads and verifies the new bundle *beside* the model
being served, then swaps it in under a lock; other requests keep using the model they already hold, so
no request fails or waits during a swap. A bundle that fails to load (tampered weights, missing files)
is refused, the previous model keeps serving and the status says why.

Integrity of the served files (every byte, the manifest included: ``bundle.verify_bundle``): each check
also stats the served bundle's files (inode, size, mtime) and re-verifies their sha256 at once when one
changed, and every ``serving.reverify_seconds`` regardless (bit rot keeps the stat). A served version that
no longer verifies stops serving; so does nothing at start-up when the current version is refused. Then, with ``serving.fallback_to_last_valid``, the newest version the
history shows as served (and not rolled back from) that verifies is served instead, and the status and
every API answer (``fallback``) say which and why; without it, requests are refused with the reason.

Each served model has its own inference lock: pytorch-grad-cam registers hooks on the shared network,
so a forward pass of another request during a CAM would corrupt that CAM's activations.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from melanoma_ml.config import PipelineConfig, ServingConfig
from melanoma_ml.echo import echo
from melanoma_ml.errors import InputStateError
from melanoma_ml.images.io import UPLOAD_FORMATS_TEXT, ImageDecodeError, load_rgb
from melanoma_ml.serving.bundle import bundle_file_names, check_manifest_digest, read_manifest
from melanoma_ml.serving.registry import ModelRegistry
from melanoma_ml.serving.request_fields import (
    InvalidRequest,
    parse_cam_method,
    parse_metadata,
    parse_tabular,
    parse_target_layer,
)

if TYPE_CHECKING:
    from melanoma_ml.serving.bundle import Bundle
    from melanoma_ml.serving.manifest import BundleManifest

log = logging.getLogger(__name__)

NO_MODEL_MESSAGE = (
    "No model has been promoted yet. Train and promote one with `melanoma-ml demo` (synthetic data, a few "
    "minutes on a laptop) or by materializing the `serving_model` asset in Dagster; this app picks it up "
    "automatically, no restart needed."
)

DISCLAIMER = (
    "Research and education tool only. It is not a medical device and does not give a diagnosis: "
    "any concerning skin lesion must be examined by a qualified clinician."
)

_NOT_CHECKED = object()
"""Pointer stamp before the first check (distinct from ``None``, which means "no pointer")."""


class NoModelAvailable(InputStateError):
    """No model can be served: none promoted yet, or the current one was refused (the message says why)."""


FileStamp = tuple[int, int, int] | None
"""``(inode, mtime_ns, size)`` of a file, or None when it is missing."""


@dataclass(frozen=True)
class ServedModel:
    """A loaded bundle plus what the UI needs to describe it.

    Attributes:
        bundle: The verified, loaded bundle.
        version: Registry version (``v0003``).
        promoted_at: ISO time the pointer was moved to this version (from ``current.json``).
        loaded_at: ISO time this process loaded it.
        target_layers: CAM layer choices for this backbone, best first: only layers whose feature map at the
            bundle's image size keeps at least ``serving.cam_min_map_side`` cells a side.
        file_stamps: ``(file name, stat stamp)`` of the bundle's files, taken before they were verified.
        fallback: Why this version serves although ``current.json`` names another
            (``serving.fallback_to_last_valid``), or None.
        lock: Serializes forward passes on this network (CAM hooks are not thread-safe).
    """

    bundle: Bundle
    version: str
    promoted_at: str | None
    loaded_at: str
    target_layers: tuple[str, ...]
    file_stamps: tuple[tuple[str, FileStamp], ...] = ()
    fallback: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def backbone(self) -> str:
        return self.bundle.spec.backbone

    @property
    def threshold(self) -> float:
        return self.bundle.threshold

    @property
    def image_size(self) -> int:
        return self.bundle.spec.image_size

    @property
    def default_target_layer(self) -> str:
        return self.target_layers[0]

    @property
    def vocabulary(self) -> dict[str, list[str]]:
        """The encoder's categories: ``{"sex": [...], "site": [...]}``."""
        return {key: list(values) for key, values in self.bundle.spec.encoder.vocabulary.items()}

    @property
    def tabular_features(self) -> tuple[str, ...]:
        """The numeric tabular columns this model reads (``model.tabular_features``); empty for most."""
        return self.bundle.spec.encoder.tabular

    @property
    def manifest(self) -> BundleManifest:
        return self.bundle.manifest


@dataclass(frozen=True)
class PredictionRequest:
    """One request as it arrives from the UI or the API (values are validated by the service).

    Attributes:
        image: Path or bytes of the uploaded file; None when nothing was uploaded.
        age: Years, as a number or text; None/""/"unknown" means unknown.
        sex: One of the model's sex categories, or None/""/"unknown".
        site: One of the model's anatomic sites, or None/""/"unknown".
        tabular: ``{column: number}`` for a model trained with tabular features (or that mapping as JSON
            text); a column left out, None or "" is missing, encoded by the training rule. None: all missing.
        tta: Average the dihedral views the served bundle records (``BundleManifest.views``, chosen at
            promotion); False: the image alone. None: as True.
        cam_method: ``"eigencam"``, ``"gradcam"`` or ``"none"``; None uses ``serving.cam_method``.
        target_layer: CAM layer name; None/"" uses the backbone's default.
    """

    image: str | Path | bytes | None
    age: float | int | str | None = None
    sex: str | None = None
    site: str | None = None
    tta: bool | None = None
    cam_method: str | None = None
    target_layer: str | None = None
    tabular: Mapping[str, Any] | str | None = None


@dataclass(frozen=True)
class Prediction:
    """The answer to one request.

    Attributes:
        probability: Melanoma probability in [0, 1].
        threshold: The bundle's tuned decision threshold.
        positive: ``probability >= threshold``.
        model_version: Registry version that answered.
        backbone: timm backbone of that model.
        tta: Whether test-time views were averaged.
        views: How many dihedral views were averaged per member (1: none).
        view: ``(S, S, 3)`` uint8: the un-augmented square view the network saw.
        overlay: ``(S, S, 3)`` uint8 CAM overlay on ``view``, or None when CAM was off.
        cam_method: The CAM method used, or None.
        target_layer: The CAM layer used, or None.
        metadata: The validated metadata as encoded (None = unknown).
        seconds: Wall time spent on the request.
        model: The served model that answered (its manifest holds the evaluation metrics).
        ood_score: Out-of-distribution score of the un-augmented view (higher = less like the training
            images), or None when the bundle ships no detector.
        ood_flag: ``ood_score`` above the detector's threshold: the probability is not reliable for this
            image; None without a detector.
    """

    probability: float
    threshold: float
    positive: bool
    model_version: str
    backbone: str
    tta: bool
    views: int
    view: np.ndarray = field(repr=False)
    overlay: np.ndarray | None = field(repr=False)
    cam_method: str | None
    target_layer: str | None
    metadata: dict[str, Any]
    seconds: float
    model: ServedModel = field(repr=False)
    ood_score: float | None = None
    ood_flag: bool | None = None

    @property
    def decision(self) -> str:
        return "positive" if self.positive else "negative"

    @property
    def ood_threshold(self) -> float | None:
        """The served detector's threshold, or None when the bundle ships none."""
        detector = self.model.bundle.ood
        return None if detector is None or self.ood_score is None else float(detector.threshold)

    def to_json(self) -> dict[str, Any]:
        """The API answer: plain JSON types only.

        ``ood_score``, ``ood_flag`` and ``ood_threshold`` are present only when the served bundle ships an
        out-of-distribution detector (older bundles and ``serving.ood_detection: false`` have none).
        """
        answer = {
            "probability": self.probability,
            "threshold": self.threshold,
            "decision": self.decision,
            "model_version": self.model_version,
            "backbone": self.backbone,
            "tta": self.tta,
            "views": self.views,
            "cam_method": self.cam_method,
            "target_layer": self.target_layer,
            "metadata": dict(self.metadata),
            "seconds": round(self.seconds, 4),
            "fallback": self.model.fallback,
        }
        if self.ood_score is not None:
            answer |= {
                "ood_score": self.ood_score,
                "ood_flag": self.ood_flag,
                "ood_threshold": self.ood_threshold,
            }
        return answer


@dataclass(frozen=True)
class ServiceStatus:
    """What the page shows above the form.

    Attributes:
        model: The model being served, or None.
        reload_error: Why the latest promoted version was refused (previous model still serving), why the
            served version stopped, or why a fallback version serves (``ServedModel.fallback``); or None.
    """

    model: ServedModel | None
    reload_error: str | None


def registry_root(config: PipelineConfig) -> Path:
    """``<artifact_root>/registry``: the same registry the pipeline promotes into."""
    from melanoma_ml.artifacts import artifact_paths

    return artifact_paths(config).registry


class ModelService:
    """Serves the promoted model and reloads it when the registry pointer moves.

    Args:
        registry: The model registry to follow.
        config: Serving settings (TTA/CAM defaults, reload interval, image limits, age range).
        clock: Monotonic clock in seconds (injectable for tests of the check interval).
    """

    def __init__(
        self, registry: ModelRegistry, config: ServingConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.registry = registry
        self.config = config
        self._clock = clock
        self._state_lock = threading.Lock()  # guards the six fields below; held only for assignments
        self._served: ServedModel | None = None
        self._stamp: object = _NOT_CHECKED
        self._reload_error: str | None = None
        self._last_check = -math.inf
        self._file_stamps: tuple[tuple[str, FileStamp], ...] = ()  # of the served files, last verified
        self._verified_at = -math.inf
        self._load_lock = threading.Lock()  # one loader at a time; never held while answering requests

    @classmethod
    def from_config(cls, config: PipelineConfig) -> ModelService:
        """A service on ``serving.registry_uri`` (S3) or ``<artifact_root>/registry``, with ``config.serving``."""
        from melanoma_ml.serving.remote_registry import open_registry

        return cls(open_registry(config), config.serving)

    # ------------------------------------------------------------------ model lifecycle
    def status(self) -> ServiceStatus:
        """Refresh (cheaply) and describe what is being served."""
        self.refresh()
        with self._state_lock:
            return ServiceStatus(model=self._served, reload_error=self._reload_error)

    def refresh(self) -> ServedModel | None:
        """Load the promoted version if the pointer moved since the last check; return the served model.

        Also re-verifies the served files when their stat changed or ``serving.reverify_seconds`` passed.
        With a model already serving, a request that finds another thread loading does not wait: it keeps
        the current model. With nothing served yet it waits for the loader.
        """
        with self._state_lock:
            served = self._served
            now = self._clock()
            if now - self._last_check < self.config.reload_check_interval_s:
                return served
            self._last_check = now
            known_stamp = self._stamp
            known_files = self._file_stamps
            rehash_due = 0 < self.config.reverify_seconds <= now - self._verified_at
        changed = [] if served is None else _changed_files(served.bundle.path, known_files)
        reverify = served is not None and (bool(changed) or rehash_due)
        if self.registry.pointer_stamp() == known_stamp and not reverify:
            return served
        if not self._load_lock.acquire(blocking=served is None):
            return served
        try:
            if reverify:
                self._reverify(served, changed)
            self._load_if_moved()
        finally:
            self._load_lock.release()
        with self._state_lock:
            return self._served

    def _load_if_moved(self) -> None:
        """Under ``_load_lock``: read the pointer again and load its version beside the served model."""
        stamp = self.registry.pointer_stamp()
        with self._state_lock:
            if stamp == self._stamp:
                return
            served = self._served
        version = "the promoted model"
        try:
            pointer = self.registry.pointer() if stamp is not None else None
            if pointer is None:
                # No pointer (yet, or it was deleted): keep whatever is serving.
                self._record(stamp, served, None)
                return
            version = str(pointer["version"])
            if served is not None and served.version == version:
                self._record(stamp, dataclasses.replace(served, fallback=None), None)
                return
            model = self._load_version(version, pointer.get("promoted_at"))
        except (ValueError, OSError) as exc:  # BundleError/BundleIntegrityError/RegistryError are ValueErrors
            refused = f"{version} was refused: {exc}."
            if served is None:
                self._fall_back(stamp, None if version == "the promoted model" else version, refused)
                return
            message = (
                f"{refused} Still serving {served.version}; fix the bundle or promote/roll back to a good "
                "version (the app reloads on the next request)."
            )
            log.error(message)
            self._record(stamp, served, message)
            return
        log.info("serving model %s (%s), promoted %s", model.version, model.backbone, model.promoted_at)
        self._record(stamp, model, None)

    def _reverify(self, served: ServedModel, changed: list[str]) -> None:
        """Under ``_load_lock``: re-hash the served files; stop serving the version if they do not verify."""
        from melanoma_ml.serving.bundle import verify_bundle

        with self._state_lock:
            if self._served is not served:
                return  # another thread swapped models since this request looked
            stamp = self._stamp
        stamps = _stamp_files(served.bundle.path, bundle_file_names(served.manifest))
        try:
            recorded = self.registry.recorded_manifest_sha256(served.version)
            manifest = verify_bundle(served.bundle.path, manifest_sha256=recorded)
            if manifest.weights_sha256 != served.manifest.weights_sha256:
                raise ValueError(
                    f"its weights were replaced by others (sha256 {manifest.weights_sha256}, served "
                    f"{served.manifest.weights_sha256}); registry versions are immutable"
                )
        except (ValueError, OSError) as exc:
            what = (
                f"its files changed on disk ({', '.join(changed)})"
                if changed
                else f"the periodic sha256 re-check (every {self.config.reverify_seconds:g} s) failed"
            )
            self._fall_back(stamp, served.version, f"{served.version} stopped serving: {what}: {exc}.")
            return
        with self._state_lock:  # same bytes (e.g. touched): accept the new stat
            self._file_stamps = stamps
            self._verified_at = self._clock()

    def _fall_back(self, stamp: object, refused: str | None, reason: str) -> None:
        """Nothing valid to serve from the pointer: serve the last valid version if configured, else nothing."""
        if self.config.fallback_to_last_valid:
            model = self._last_valid(exclude=refused)
            if model is not None:
                notice = (
                    f"{reason} Now serving {model.version}: the newest version in the registry history that "
                    "was served, not rolled back from, and verifies (serving.fallback_to_last_valid is on). "
                    "Promote or roll back to a good version to end this."
                )
                log.error(notice)
                self._record(stamp, dataclasses.replace(model, fallback=notice), notice)
                return
            advice = "No earlier served version verifies either."
        else:
            advice = "Set serving.fallback_to_last_valid to serve the last valid version automatically."
        message = (
            f"{reason} No model is being served: roll back to a good version (`melanoma-ml rollback --to "
            f"VERSION`) or run `melanoma-ml registry repair` (the app reloads on the next request). {advice}"
        )
        log.error(message)
        self._record(stamp, None, message)

    def _last_valid(self, exclude: str | None) -> ServedModel | None:
        """The newest version on the registry's served stack (``served_stack``) other than ``exclude`` that loads."""
        try:
            stack = self.registry.served_stack()
        except (ValueError, OSError) as exc:
            log.error("cannot read the registry history to fall back: %s", exc)
            return None
        for version in dict.fromkeys(reversed(stack)):
            if version == exclude:
                continue
            try:
                return self._load_version(version, None)
            except (ValueError, OSError) as exc:
                log.warning("fallback candidate %s refused: %s", version, exc)
        return None

    def _record(self, stamp: object, served: ServedModel | None, error: str | None) -> None:
        with self._state_lock:
            if served is not None and (self._served is None or served.bundle is not self._served.bundle):
                self._file_stamps = served.file_stamps
                self._verified_at = self._clock()
            self._stamp = stamp
            self._served = served
            self._reload_error = error

    def _load_version(self, version: str, promoted_at: str | None) -> ServedModel:
        from melanoma_ml.serving.bundle import load_bundle
        from melanoma_ml.serving.explain import target_layer_names

        path = self.registry.version_path(version)
        recorded = self.registry.recorded_manifest_sha256(version)
        check_manifest_digest(path, recorded)  # an edited manifest is refused as such, before it is parsed
        # Stamped before verifying the rest: a change after this is seen by the next check.
        stamps = _stamp_files(path, bundle_file_names(read_manifest(path)))
        bundle = load_bundle(path, manifest_sha256=recorded)
        return ServedModel(
            bundle=bundle,
            version=version,
            promoted_at=promoted_at,
            loaded_at=datetime.now(UTC).isoformat(timespec="seconds"),
            target_layers=tuple(
                target_layer_names(bundle.net, bundle.spec.image_size, self.config.cam_min_map_side)
            ),
            file_stamps=stamps,
        )

    # ------------------------------------------------------------------ requests
    def predict(self, request: PredictionRequest) -> Prediction:
        """Validate ``request``, run the (TTA) prediction and, if asked, the CAM on the un-augmented view.

        Raises:
            NoModelAvailable: nothing promoted yet.
            InvalidRequest: bad image or metadata (the message says what to fix).
        """
        started = time.perf_counter()
        model = self.refresh()
        if model is None:
            with self._state_lock:
                raise NoModelAvailable(self._reload_error or NO_MODEL_MESSAGE)
        from melanoma_ml.serving.calibrated import decision_threshold
        from melanoma_ml.serving.inference import score

        prevalence = self.config.deployment_prevalence
        threshold = decision_threshold(model.manifest, prevalence)  # moves with the prior shift
        vocabulary = model.vocabulary
        metadata = parse_metadata(
            request.age,
            request.sex,
            request.site,
            vocabulary=vocabulary,
            min_age=self.config.min_age,
            max_age=self.config.max_age,
        )
        tabular = parse_tabular(request.tabular, model.tabular_features)
        if tabular is not None:
            metadata["tabular"] = tabular
        views = model.manifest.views if request.tta is None or bool(request.tta) else 1  # the bundle's
        tta = views > 1
        method = parse_cam_method(request.cam_method, default=self.config.cam_method)
        layer = parse_target_layer(request.target_layer, model.target_layers) if method else None
        # Decoded straight to the model's view by the same function that built the training cache, so
        # the network sees exactly the pixels it would have seen in training (no train/serve skew).
        view = self.decode(request.image, size=model.image_size)
        with model.lock:
            scores = score(model.bundle, [view], [metadata], views=views, deployment_prevalence=prevalence)
            explanation = (
                self._explain(model, view, metadata, method, layer, self.config.cam_min_map_side)
                if method
                else None
            )
        probability = float(scores.prob[0])
        return Prediction(
            probability=probability,
            threshold=threshold,
            positive=probability >= threshold,
            model_version=model.version,
            backbone=model.backbone,
            tta=tta,
            views=views,
            view=view,
            overlay=None if explanation is None else explanation.overlay,
            cam_method=method,
            target_layer=None if explanation is None else explanation.target_layer,
            metadata=metadata,
            seconds=time.perf_counter() - started,
            model=model,
            ood_score=None if scores.ood_score is None else float(scores.ood_score[0]),
            ood_flag=None if scores.ood_flag is None else bool(scores.ood_flag[0]),
        )

    @staticmethod
    def _explain(
        model: ServedModel,
        image: np.ndarray,
        metadata: dict[str, Any],
        method: str,
        layer: str,
        min_side: int,
    ):
        from melanoma_ml.serving.explain import explain

        try:
            return explain(
                model.bundle, image, metadata, method=method, target_layer=layer, min_side=min_side
            )
        except ValueError as exc:  # offered layers are size-checked at load; this is a CAM that still failed
            raise InvalidRequest(
                f"the {method} explanation failed on layer {layer}: {exc}. Pick another CAM target layer or "
                "turn the explanation off"
            ) from exc

    def decode(self, source: str | Path | bytes | None, size: int | None = None) -> np.ndarray:
        """Decode an upload with the serving size limits.

        Args:
            source: Upload path or bytes.
            size: When given, return the model's ``size`` x ``size`` view, decoded exactly as the training
                cache decodes (``images.cache.load_resized``); otherwise the whole image, at most
                ``max_image_side`` on its long side (for display).

        Raises:
            InvalidRequest: nothing uploaded, too large, or not a readable image.
        """
        if source is None or (isinstance(source, str) and not source.strip()):
            raise InvalidRequest(f"no image uploaded; upload a dermoscopy photo ({UPLOAD_FORMATS_TEXT})")
        name = "the uploaded image"
        if isinstance(source, str | Path):
            path = Path(source)
            name = echo(path.name)  # an uploaded file keeps its client-side name (up to 255 bytes)
            limit = self.config.max_upload_mb * 1024 * 1024
            if path.is_file() and path.stat().st_size > limit:
                raise InvalidRequest(
                    f"{name} is {path.stat().st_size / 1e6:.1f} MB, above the {self.config.max_upload_mb} MB "
                    "upload limit; upload a smaller or more compressed image"
                )
        try:
            if size is not None:
                from melanoma_ml.images.cache import load_resized

                return load_resized(source, size, max_pixels=self.config.max_image_pixels)
            return load_rgb(
                source, max_pixels=self.config.max_image_pixels, max_side=self.config.max_image_side
            )
        except ImageDecodeError as exc:
            raise InvalidRequest(f"could not use {name}: {exc.reason}") from exc


def _stamp_files(folder: Path, names: Sequence[str]) -> tuple[tuple[str, FileStamp], ...]:
    """Stat stamps of a bundle's files (``bundle_file_names``): what the per-request integrity check compares.

    Every hashed file counts, not only the weights: the OOD detector, ensemble members, exported runtimes.
    """
    stamps = []
    for name in names:
        try:
            st = os.stat(folder / name)
        except FileNotFoundError:
            stamps.append((name, None))
        else:
            stamps.append((name, (st.st_ino, st.st_mtime_ns, st.st_size)))
    return tuple(stamps)


def _changed_files(folder: Path, known: tuple[tuple[str, FileStamp], ...]) -> list[str]:
    """Names of the files whose stat stamp differs from ``known`` (one ``stat`` call per known file)."""
    now = dict(_stamp_files(folder, [name for name, _ in known]))
    return [name for name, stamp in known if now.get(name) != stamp]
