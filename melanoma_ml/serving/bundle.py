"""The serving bundle: a folder with ``manifest.json``, ``manifest.sha256`` and the files the manifest hashes.

The manifest (``manifest.BundleManifest``, schema 3) carries everything needed to rebuild and trust the
networks without unpickling anything: per member (one network is a one-member ensemble) its spec, weights
file and sha256, fold and runtime; the decision threshold, the evaluation metrics with their CIs and
data/code versions. ``BundleManifest.hashed_files`` is the one list of its files (member 0's weights are
``weights.safetensors``): each is checked against its sha256 before it is read. Schema-2 manifests of older
registries are read through ``manifest.from_schema_2``, their bytes left as they are.

Every byte is covered: ``manifest.sha256`` (``sha256sum`` format, written with the manifest by
``write_manifest``) holds the sha256 of ``manifest.json`` itself, so an edited threshold or calibrator is
refused like edited weights. A bundle written before that file existed (a *legacy* bundle in an older
registry) still verifies what its manifest lists; ``manifest_covered`` tells the two apart.

torch and safetensors are imported inside the functions that need them, so ``read_manifest`` and
``verify_bundle`` stay cheap for callers that only inspect a bundle (the registry, the app's poller).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from melanoma_ml.atomic import atomic_directory, atomic_write_bytes, sha256_file, to_json_text
from melanoma_ml.errors import InputValueError
from melanoma_ml.serving.manifest import (
    MANIFEST_SCHEMA_VERSION,
    READABLE_SCHEMAS,
    BundleFile,
    BundleManifest,
    from_schema_2,
    stored_schema,
)
from melanoma_ml.spec import ModelSpec
from melanoma_ml.weights import WEIGHTS_FILE, WeightsError, load_weights, save_weights

if TYPE_CHECKING:
    import torch
    from torch import nn

    from melanoma_ml.evaluation.estimate import Estimate
    from melanoma_ml.serving.manifest import ValidationPredictions
    from melanoma_ml.serving.monitor_reference import MonitorReference
    from melanoma_ml.serving.ood import OODScorer
    from melanoma_ml.serving.runtimes import MergedSlot, RuntimeSelection

LogitsFn = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]

MANIFEST_FILE = "manifest.json"
MANIFEST_DIGEST_FILE = "manifest.sha256"
"""The sha256 of ``manifest.json``'s bytes, as ``sha256sum`` writes it (``sha256sum -c`` checks it)."""


class BundleError(InputValueError):
    """A bundle folder is missing, incomplete or unreadable (the message says which file and what to do)."""


class ManifestSchemaError(BundleError):
    """The manifest was written in another schema than this code reads (an older or newer melanoma_ml)."""


class BundleIntegrityError(BundleError):
    """A bundle file does not match its recorded sha256 (weights, extras, or the manifest itself)."""


@dataclass(frozen=True)
class Bundle:
    """A loaded serving bundle.

    Attributes:
        path: The bundle folder.
        net: The network, in eval mode, parameters frozen (``requires_grad=False``).
        spec: Architecture, preprocessing and metadata encoder.
        manifest: The validated ``manifest.json``.
        threshold: Probability at or above which a lesion is flagged.
        version: ``manifest.version`` when set (registry bundles), else the folder name.
        scorers: One per served network (several for an ensemble bundle), each with the runtime the
            manifest names; ``net`` is member 0's torch network, kept for Grad-CAM.
        ood: The out-of-distribution detector, or None when the bundle ships none.
    """

    path: Path
    net: nn.Module
    spec: ModelSpec
    manifest: BundleManifest
    threshold: float
    version: str
    scorers: tuple[Scorer, ...] = field(default=())
    ood: OODScorer | None = None

    def __post_init__(self) -> None:
        if not self.scorers:  # a bundle built by hand around one torch network
            object.__setattr__(self, "scorers", (Scorer(self.spec, torch_logits(self.net)),))

    @property
    def metrics(self) -> dict[str, Estimate]:
        return self.manifest.metrics

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device


@dataclass(frozen=True)
class Scorer:
    """One served network: how to preprocess for it (``spec``) and its logits for a preprocessed batch.

    ``logits(x, meta)``: ``x`` normalized ``(B, 3, S, S)`` float32 images, ``meta`` ``(B, k)`` float32 encoded
    metadata -> ``(B,)`` float32 logits on the CPU. ``merged``: the member's place in the bundle's one
    merged ONNX Runtime graph (``inference.members_view_logits`` runs its members in one call), or None
    when it runs alone.
    """

    spec: ModelSpec
    logits: LogitsFn
    merged: MergedSlot | None = None


def torch_logits(net: nn.Module) -> LogitsFn:
    """``net``'s logits as a :class:`Scorer` function (eager torch, the network's own device and dtype)."""
    import torch

    def logits(x: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        device = next(net.parameters()).device
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        out = net(x, meta.to(device, dtype=torch.float32, non_blocking=True))
        return out.float().reshape(-1).cpu()

    return logits


@dataclass(frozen=True)
class MemberNet:
    """A network to store in an ensemble bundle, with where it came from."""

    net: nn.Module
    spec: ModelSpec
    fold: int | None = None
    checkpoint_sha256: str | None = None


@dataclass(frozen=True)
class EnsembleToSave:
    """``save_bundle``'s ensemble argument: member 0 must be the bundle's own ``net``."""

    kind: str
    average: str
    members: Sequence[MemberNet]


@dataclass(frozen=True)
class ProbeImages:
    """Decoded images and their metadata records, made into each member's own network inputs.

    Members of one ensemble may differ in metadata encoder (each fold fits its own: a site no training
    image of a fold shows is no column of that fold's encoder) and, for ``top_k``, in backbone
    normalization, so an export is probed and int8-calibrated on :meth:`inputs` of its own spec.

    Attributes:
        images: ``(H, W, 3)`` uint8 RGB arrays.
        metadata: One ``{"age", "sex", "site"[, "tabular"]}`` dict per image.
    """

    images: Sequence[Any]
    metadata: Sequence[Mapping[str, Any]]

    def __post_init__(self) -> None:
        if len(self.images) != len(self.metadata):
            raise InputValueError(
                f"probe has {len(self.images)} images but {len(self.metadata)} metadata records; pass one "
                "record per image"
            )

    def inputs(self, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """``(views, meta)`` for the network of ``spec``: 8 dihedral views of each image, preprocessed with
        its size and normalization, and the metadata encoded with its encoder, repeated per view."""
        from melanoma_ml.serving.network_inputs import N_VIEWS, dihedral_views, encode_metadata, preprocess

        views = dihedral_views(preprocess(self.images, spec))
        return views, encode_metadata(self.metadata, spec, len(self.images)).repeat(N_VIEWS, 1)


@dataclass(frozen=True)
class RuntimeRequest:
    """``save_bundle``'s runtime argument (``serving.runtime``/``serving.precision``).

    Attributes:
        runtime: ``auto``, ``torch``, ``onnxruntime``, ...; ``auto`` chooses per member.
        precision: ``fp32``, ``bf16``, ``int8``.
        tolerance: Largest max |probability difference| to eager fp32 accepted on ``probe``.
        probe: What each export is checked on (validation images of member 0): :class:`ProbeImages`,
            made into each member's own inputs, or ``(x, meta)`` already preprocessed views and encoded
            metadata, usable only when every member shares that encoding (refused otherwise).
        calibration: Training images that calibrate int8 quantization, in the same two forms (None: not
            int8).
    """

    runtime: str
    precision: str
    tolerance: float
    probe: ProbeImages | tuple[Any, Any]
    calibration: ProbeImages | tuple[Any, Any] | None = None


def save_bundle(
    out_dir: str | Path,
    net: nn.Module,
    spec: ModelSpec,
    *,
    threshold: float,
    metrics: Mapping[str, Estimate | Mapping[str, Any]],
    data_version: str,
    code_version: str,
    version: str | None = None,
    fold: int | None = None,
    checkpoint_sha256: str | None = None,
    oof: ValidationPredictions | Mapping[str, list[Any]] | None = None,
    test_metrics: Mapping[str, Any] | None = None,
    calibration: Mapping[str, Any] | None = None,
    uncalibrated_reason: str | None = None,
    ensemble: EnsembleToSave | None = None,
    views: int | None = None,
    runtime: RuntimeRequest | None = None,
    ood: OODScorer | None = None,
    monitor_reference: MonitorReference | None = None,
) -> Path:
    """Write ``net`` and its manifest to ``out_dir`` atomically (temp folder + rename).

    A crash or error part-way leaves no ``out_dir`` (and no temp folder); an existing ``out_dir`` is
    replaced only once the new bundle is complete.

    Args:
        out_dir: Final bundle folder.
        net: The trained network (any device; weights are written from CPU copies).
        spec: The spec that rebuilds ``net`` (``spec.build_network()``).
        threshold: Decision threshold on the probability, in [0, 1].
        metrics: Evaluation metrics, name -> ``Estimate`` or its dict (``EvaluationReport.to_dict()["metrics"]``).
        data_version: Identifier of the training data (e.g. the folds table hash).
        code_version: Identifier of the code (e.g. git commit or package version).
        version: The registry version this bundle becomes (set by ``ModelRegistry``).
        fold, checkpoint_sha256: A one-network bundle's member 0: the fold its model was trained without
            and its checkpoint's weights sha256 (an ensemble gives them per member: ``MemberNet``).
        oof: The served model's out-of-fold predictions (see ``BundleManifest``).
        test_metrics: The model's metrics per untouched test set (``BundleManifest.test_metrics``), or None.
        calibration: The served calibrator (``BundleManifest.calibration``), or None (raw probabilities).
        uncalibrated_reason: Why no calibrator was fitted (``BundleManifest.uncalibrated_reason``), or None.
        ensemble: The networks to average (member 0 is ``net``), or None: ``net`` alone (stored as a
            one-member ``best_fold`` ensemble).
        views: Dihedral views averaged per member when the bundle is served (``BundleManifest.views``:
            ``serving.views`` at promotion); None: ``manifest.UNRECORDED_VIEWS`` (all 8).
        runtime: Export the networks for this runtime (checked against eager fp32 on its probe), or None
            (torch fp32).
        ood: An out-of-distribution detector to ship (``serving.ood``), or None.
        monitor_reference: The serving monitor's reference (``BundleManifest.monitor_reference``), or None.

    Returns:
        The bundle folder.

    Raises:
        BundleError: a field does not fit ``BundleManifest`` (e.g. a threshold outside [0, 1]); nothing is
            written.
    """
    out_dir = Path(out_dir)
    if ensemble is None:
        ensemble = EnsembleToSave("best_fold", "probability", [MemberNet(net, spec, fold, checkpoint_sha256)])
    elif fold is not None or checkpoint_sha256 is not None:
        raise BundleError(
            "fold and checkpoint_sha256 describe a one-network bundle; an ensemble gives them per member "
            "(MemberNet.fold, MemberNet.checkpoint_sha256)"
        )
    elif ensemble.members and ensemble.members[0].spec != spec:
        raise BundleError("an ensemble bundle's member 0 must have the bundle's own spec (spec)")
    with atomic_directory(out_dir) as tmp:  # an invalid field raises in here: no out_dir is left behind
        stored_ensemble, stored_runtime = _save_networks(tmp, net, ensemble, runtime)
        fields = {
            "version": version,
            "threshold": threshold,
            "metrics": dict(metrics),
            "data_version": str(data_version),
            "code_version": str(code_version),
            "created_at": datetime.now(UTC).isoformat(),
            "oof": oof,
            "test_metrics": test_metrics,
            "calibration": calibration,
            "uncalibrated_reason": uncalibrated_reason,
            "ensemble": stored_ensemble,
            **({} if views is None else {"views": views}),
            "runtime": stored_runtime,
            "ood": None if ood is None else _save_ood(tmp, ood),
            "monitor_reference": monitor_reference,
        }
        manifest = _validated(fields, f"the manifest for {out_dir}")
        write_manifest(tmp, manifest)
    return out_dir


def write_manifest(folder: str | Path, manifest: BundleManifest) -> str:
    """Write ``manifest.json`` and its digest ``manifest.sha256`` into ``folder``; return the digest.

    Each file is replaced atomically; call it on a folder no reader serves yet (a temp or staging folder
    that is renamed into place afterwards), so nobody sees the new manifest with the old digest.
    """
    folder = Path(folder)
    data = manifest_bytes(manifest)
    atomic_write_bytes(folder / MANIFEST_FILE, data)
    digest = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(folder / MANIFEST_DIGEST_FILE, digest_file_bytes(digest))
    return digest


def manifest_bytes(manifest: BundleManifest) -> bytes:
    """The bytes of ``manifest.json`` for ``manifest`` (strict, sorted JSON)."""
    return to_json_text(manifest.to_json(), where=MANIFEST_FILE).encode("utf-8")


def digest_file_bytes(digest: str) -> bytes:
    """The bytes of ``manifest.sha256`` for a manifest whose sha256 is ``digest``."""
    return f"{digest}  {MANIFEST_FILE}\n".encode("ascii")


def _save_networks(
    folder: Path, net: nn.Module, ensemble: EnsembleToSave, runtime: RuntimeRequest | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Write every member's weights and runtime exports; return the manifest's ``ensemble``, ``runtime``."""
    if not ensemble.members or ensemble.members[0].net is not net:
        raise BundleError("an ensemble bundle's member 0 must be the bundle's own network (net)")
    members = list(ensemble.members)
    stored_members: list[dict[str, Any]] = []
    for index, member in enumerate(members):
        name = WEIGHTS_FILE if index == 0 else f"members/member{index}.safetensors"
        (folder / name).parent.mkdir(exist_ok=True)
        weights = {"name": name, "sha256": sha256_file(save_weights(folder / name, member.net))}
        stored_members.append(
            {
                "weights": weights,
                "model_spec": member.spec,
                "fold": member.fold,
                "checkpoint_sha256": member.checkpoint_sha256,
                "runtime_file": None,
            }
        )
    stored_runtime = None if runtime is None else _export_runtime(folder, members, stored_members, runtime)
    stored_ensemble = {"kind": ensemble.kind, "average": ensemble.average, "members": stored_members}
    return stored_ensemble, stored_runtime


def _export_runtime(
    folder: Path, members: Sequence[MemberNet], stored: list[dict[str, Any]], request: RuntimeRequest
) -> dict[str, Any]:
    """Export and check every member for ``request``, each on its own inputs; return the bundle's entry.

    Each member is probed (and int8-calibrated) with its own preprocessing and metadata encoder. Under
    ``auto`` each member chooses for itself: a member whose export fails or misses the tolerance serves
    torch fp32 while the others keep theirs. A runtime asked for by name is used for every member or
    refused. Members on ONNX Runtime fp32 are exported into ONE graph (``runtimes.choose_merged_runtime``,
    the file every such member's ``runtime_file`` names), so one session serves them; otherwise each member
    is exported alone (``choose_runtime``). Fills each stored member's ``runtime_file`` and ``runtime``.
    """
    from melanoma_ml.serving.runtimes import REFERENCE, choose_merged_runtime, choose_runtime, merges

    inputs = [  # every member's, before anything is exported: an unfit probe is refused up front
        (
            _member_inputs(request.probe, member.spec, index, "probe"),
            _member_inputs(request.calibration, member.spec, index, "int8 calibration set"),
        )
        for index, member in enumerate(members)
    ]
    merged: list[RuntimeSelection] | None = None
    if merges(request.runtime, request.precision, len(members)):
        merged = choose_merged_runtime(
            [m.net for m in members],
            [m.spec for m in members],
            folder,
            request.runtime,
            [probe for probe, _ in inputs],
            request.tolerance,
        )
    selections = []
    for index, (member, (probe, calibration)) in enumerate(zip(members, inputs, strict=True)):
        stem = "model" if index == 0 else f"members/member{index}"
        selection = merged[index] if merged is not None else choose_runtime(
            member.net,
            member.spec,
            folder,
            stem,
            request.runtime,
            request.precision,
            probe,
            request.tolerance,
            calibration=calibration,
        )  # fmt: skip
        selections.append(selection)
        if selection.file is not None:
            stored[index]["runtime_file"] = {"name": selection.file[0], "sha256": selection.file[1]}
        stored[index]["runtime"] = {
            "runtime": selection.choice.runtime,
            "precision": selection.choice.precision,
            "parity": selection.parity,
            "note": selection.note,
        }
    parity: dict[str, float] = {}
    for selection in selections:  # the worst member
        parity = {k: max(v, parity.get(k, v)) for k, v in selection.parity.items()}
    choices = [s.choice for s in selections]
    served = next((c for c in choices if c != REFERENCE), choices[0])
    if len(selections) == 1:
        note = selections[0].note
    else:
        fell_back = [i for i, c in enumerate(choices) if c != served]
        notes = [f"member {i}: {s.note}" for i, s in enumerate(selections) if s.note]
        if fell_back:
            notes.insert(0, f"members {', '.join(map(str, fell_back))} of {len(choices)} serve {REFERENCE}")
        note = "; ".join(notes)
    return {"runtime": served.runtime, "precision": served.precision, "parity": parity, "note": note}


def _member_inputs(
    inputs: ProbeImages | tuple[Any, Any] | None, spec: ModelSpec, index: int, what: str
) -> tuple[Any, Any] | None:
    """``inputs`` as member ``index``'s network takes them (``ProbeImages.inputs``), or as given when they
    are already encoded and fit its spec.

    Raises:
        BundleError: encoded inputs whose metadata width or image size differ from the member's spec.
    """
    if inputs is None or isinstance(inputs, ProbeImages):
        return None if inputs is None else inputs.inputs(spec)
    x, meta = inputs
    width, size = spec.encoder.n_features, spec.image_size
    if meta.shape[-1] != width or tuple(x.shape[-2:]) != (size, size):
        raise BundleError(
            f"the runtime {what} holds {meta.shape[-1]} metadata columns and {tuple(x.shape[-2:])} pixel "
            f"images, but ensemble member {index} takes {width} ({', '.join(spec.encoder.feature_names)}) "
            f"and {size}x{size}: pass the images and records as ProbeImages so each member gets its own "
            "encoding"
        )
    return inputs


def _save_ood(folder: Path, scorer: OODScorer) -> dict[str, Any]:
    from melanoma_ml.serving.ood import save_ood

    path = save_ood(folder / "ood.safetensors", scorer)
    summary = scorer.summary()
    return {
        "file": {"name": path.name, "sha256": sha256_file(path)},
        "method": str(summary.get("method", type(scorer).__name__)),
        "threshold": float(scorer.threshold),
        "summary": summary,
    }


def _validated(data: Mapping[str, Any], where: str) -> BundleManifest:
    """``BundleManifest.model_validate(data)``, its errors as one ``BundleError`` naming every bad field."""
    try:
        return BundleManifest.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'manifest'}: {err['msg']}" for err in exc.errors()
        )
        raise BundleError(f"{where} is invalid: {problems}") from exc


def read_manifest(path: str | Path) -> BundleManifest:
    """Parse and validate ``manifest.json`` of the bundle at ``path`` (no weights read, no torch).

    A schema-2 manifest (an older registry's) is read into the schema-3 model (``manifest.from_schema_2``);
    its file is left as it is, so its recorded sha256 still holds.

    Raises:
        ManifestSchemaError: the manifest is of a schema this code does not read (``READABLE_SCHEMAS``).
        BundleError: missing folder, missing manifest, invalid JSON or fields that do not fit.
    """
    path = Path(path)
    if not path.is_dir():
        raise BundleError(
            f"bundle folder not found: {path}; export one with save_bundle() or point at a registry version"
        )
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise BundleError(
            f"{MANIFEST_FILE} missing in bundle {path}; the export did not finish or the folder is not a "
            "bundle: re-export it"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(
            f"{manifest_path} is not valid JSON ({exc}); the bundle is corrupted: re-export it"
        ) from exc
    if not isinstance(manifest, dict):
        raise BundleError(f"{manifest_path} must hold a JSON object; the bundle is corrupted: re-export it")
    schema = stored_schema(manifest)
    if schema == 2:
        try:
            manifest = from_schema_2(manifest)
        except ValueError as exc:
            raise BundleError(
                f"{manifest_path} (schema 2) is invalid: {exc}; roll back or re-export it"
            ) from exc
    elif schema != MANIFEST_SCHEMA_VERSION:
        found = "no manifest schema_version" if schema is None else f"manifest schema {schema!r}"
        readable = " and ".join(map(str, READABLE_SCHEMAS))
        raise ManifestSchemaError(
            f"bundle {path} has {found}, this version of melanoma_ml reads schema {readable}: "
            "roll back to a version written by this code (`melanoma-ml rollback --to VERSION`), or re-run "
            "promotion (materialize `serving_model` or run `melanoma-ml demo`) to register a new one; while "
            "the current version is unreadable, move the registry folder aside first"
        )
    return _validated(manifest, str(manifest_path))


def verify_bundle(path: str | Path, *, manifest_sha256: str | None = None) -> BundleManifest:
    """Check that every file of the bundle matches its sha256, the manifest included; return the manifest.

    The manifest's bytes are checked first (against ``manifest.sha256`` and ``manifest_sha256``), then every
    file of ``BundleManifest.hashed_files`` (weights, exported models, detector) against its sha256. A
    legacy bundle (no ``manifest.sha256``, no ``manifest_sha256``) verifies what its manifest lists (see
    ``manifest_covered``).

    Args:
        path: The bundle folder.
        manifest_sha256: The manifest's sha256 as recorded elsewhere (the registry's history), or None.
            Given, a bundle whose ``manifest.sha256`` is missing is refused rather than read as legacy.

    Raises:
        BundleError: missing folder/files or bad manifest.
        BundleIntegrityError: a file's sha256 differs from the recorded one.
    """
    path = Path(path)
    check_manifest_digest(path, manifest_sha256)
    manifest = read_manifest(path)
    for entry in manifest.hashed_files():
        _verify_file(path, entry)
    return manifest


_FIX = (
    "the bundle was modified or corrupted after it was written; roll back to an intact version "
    "(`melanoma-ml rollback --to VERSION`, `melanoma-ml registry verify` lists them) or run "
    "`melanoma-ml registry repair`, or re-export it"
)


def check_manifest_digest(path: str | Path, recorded: str | None = None) -> bool:
    """Check ``manifest.json``'s bytes against ``manifest.sha256`` and ``recorded``; False for a legacy bundle.

    Returns:
        True when the manifest is covered by a digest (and matches it), False when the bundle has no
        ``manifest.sha256`` and nothing was ``recorded`` (written before manifests were hashed).

    Raises:
        BundleError: ``manifest.json`` missing, or ``manifest.sha256`` unreadable.
        BundleIntegrityError: the manifest's sha256 differs from a digest, or ``recorded`` is given but
            ``manifest.sha256`` was removed.
    """
    path = Path(path)
    manifest_path, digest_path = path / MANIFEST_FILE, path / MANIFEST_DIGEST_FILE
    if not manifest_path.is_file():
        read_manifest(path)  # raises the "missing manifest" error
    expected: list[tuple[str, str]] = []
    if digest_path.is_file():
        expected.append((str(digest_path), _read_digest(digest_path)))
    elif recorded is not None:
        raise BundleIntegrityError(
            f"{MANIFEST_DIGEST_FILE} missing in bundle {path}, whose manifest sha256 the registry recorded "
            f"({recorded}); {_FIX}"
        )
    if recorded is not None:
        expected.append(("the registry history", recorded))
    if not expected:
        return False
    actual = sha256_file(manifest_path)
    for where, digest in expected:
        if actual != digest:
            raise BundleIntegrityError(
                f"sha256 mismatch for {manifest_path}: {where} records {digest}, got {actual}; {_FIX}"
            )
    return True


def manifest_covered(path: str | Path) -> bool:
    """Whether the bundle at ``path`` has a ``manifest.sha256`` (False: a legacy bundle, manifest not covered)."""
    return (Path(path) / MANIFEST_DIGEST_FILE).is_file()


def _read_digest(digest_path: Path) -> str:
    """The hex sha256 in a ``manifest.sha256`` file, which must be exactly ``digest_file_bytes(digest)``."""
    data = digest_path.read_bytes()
    digest = data[:64].decode("ascii", errors="replace")
    if not all(c in "0123456789abcdef" for c in digest) or data != digest_file_bytes(digest):
        raise BundleIntegrityError(
            f"{digest_path} must hold exactly '<sha256 in lowercase hex>  {MANIFEST_FILE}' and a newline, got "
            f"{data[:100]!r}; {_FIX}"
        )
    return digest


def bundle_file_names(manifest: BundleManifest) -> list[str]:
    """Every file of a bundle, relative to its folder: the manifest, its digest, then
    ``manifest.hashed_files()`` (a legacy bundle lacks the digest: see ``manifest_covered``)."""
    return [MANIFEST_FILE, MANIFEST_DIGEST_FILE, *(entry.name for entry in manifest.hashed_files())]


def _verify_file(bundle: Path, entry: BundleFile) -> Path:
    """``bundle/entry.name`` after checking it exists and matches ``entry.sha256``."""
    file = bundle / entry.name
    if not file.is_file():
        raise BundleError(f"{entry.name} missing in bundle {bundle}; re-export the bundle or roll back")
    actual = sha256_file(file)
    if actual != entry.sha256:
        raise BundleIntegrityError(
            f"sha256 mismatch for {file}: expected {entry.sha256}, got {actual}; the bundle was modified "
            "or corrupted; re-export it or roll back"
        )
    return file


def load_bundle(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    channels_last: bool = True,
    manifest_sha256: str | None = None,
) -> Bundle:
    """Verify and load a bundle: sha256 first, then safetensors weights into ``spec.build_network()``.

    Nothing is unpickled (safetensors + JSON only).

    Args:
        path: The bundle folder.
        device: Where to put the network.
        channels_last: Store conv weights NHWC (faster convolutions on CPU and GPU; measured ~20% on
            efficientnet_b0 at 256 px on 2 CPU threads).
        manifest_sha256: The manifest's sha256 the registry recorded (``verify_bundle``), or None.

    Raises:
        BundleError: missing/invalid files or weights that do not fit the spec.
        BundleIntegrityError: a tampered or corrupted file (weights, manifest, extras).
    """

    path = Path(path)
    manifest = verify_bundle(path, manifest_sha256=manifest_sha256)
    spec = manifest.model_spec
    try:
        net = load_weights(spec, path / WEIGHTS_FILE)  # only after verify_bundle checked its sha256
    except WeightsError as exc:
        raise BundleError(f"{exc}; re-export the bundle from the matching checkpoint or roll back") from exc
    _prepare(net, device, channels_last)
    ood = None
    if manifest.ood is not None:
        from melanoma_ml.serving.ood import load_ood

        ood = load_ood(path / manifest.ood.file.name)  # verify_bundle checked its sha256
    return Bundle(
        path=path,
        net=net,
        spec=spec,
        manifest=manifest,
        threshold=manifest.threshold,
        version=manifest.version or path.name,
        scorers=_scorers(path, manifest, net, device, channels_last),
        ood=ood,
    )


def _prepare(net: nn.Module, device: str | torch.device, channels_last: bool) -> None:
    import torch

    net.requires_grad_(False)
    net.to(device)
    if channels_last:
        net.to(memory_format=torch.channels_last)


def _scorers(
    path: Path, manifest: BundleManifest, net: nn.Module, device: str | torch.device, channels_last: bool
) -> tuple[Scorer, ...]:
    """One :class:`Scorer` per served network, each in the manifest's runtime (files verified already).

    Torch networks are built only where the runtime needs them (member 0 always: Grad-CAM explains it).
    Members whose ``runtime_file`` is one shared ONNX Runtime graph (``runtimes.export_merged_onnx``) get one
    session between them, each its position in it, in member order.
    """
    from melanoma_ml.serving.runtimes import MergedOnnxRunner, MergedSlot, RuntimeChoice, load_logits_fn

    members = []
    for index, member in enumerate(manifest.ensemble.members):
        own = member.runtime  # None: torch fp32
        choice = None if own is None else (own.runtime, own.precision)
        member_net = net if index == 0 else None
        if member_net is None and (choice is None or choice[0] == "torch"):
            try:
                member_net = load_weights(member.model_spec, path / member.weights.name)
            except WeightsError as exc:
                raise BundleError(f"{exc}; re-export the bundle or roll back") from exc
            _prepare(member_net, device, channels_last)
        members.append((member.model_spec, member_net, member.runtime_file, choice))
    shared: dict[str, list[int]] = {}
    for index, (_, _, file, choice) in enumerate(members):
        if file is not None and choice == ("onnxruntime", "fp32"):
            shared.setdefault(file.name, []).append(index)
    slots: dict[int, MergedSlot] = {}
    for name, indices in shared.items():
        if len(indices) > 1:
            runner = MergedOnnxRunner(path / name, members[indices[0]][2].sha256)
            slots |= {index: MergedSlot(runner, position) for position, index in enumerate(indices)}
    scorers = []
    for index, (spec, member_net, file, choice) in enumerate(members):
        if index in slots:
            slot = slots[index]
            scorers.append(Scorer(spec, slot.runner.member(slot.position), merged=slot))
            continue
        if choice is None or choice == ("torch", "fp32"):
            scorers.append(Scorer(spec, torch_logits(member_net)))
            continue
        stored = None if file is None else (file.name, file.sha256)
        scorers.append(Scorer(spec, load_logits_fn(path, RuntimeChoice(*choice), stored, member_net)))
    return tuple(scorers)
