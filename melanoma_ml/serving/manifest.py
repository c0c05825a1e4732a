"""What a serving bundle's ``manifest.json`` holds: one typed shape for its writer and every reader.

``BundleManifest`` is validated when a bundle is read (``bundle.read_manifest``) and written by
``bundle.save_bundle``; nobody reads the JSON by key. The JSON stays plain and readable: the model spec
(backbone, input size, normalization, metadata encoder), the threshold, the metrics as
``{"value", "lo", "hi", "level"}`` estimates, versions, and the networks it serves.

Schema 3 has one shape for the networks: ``ensemble.members``, one entry per network (a one-network bundle
is a one-member ensemble of kind ``best_fold``), each with its weights file and sha256, its spec, the fold
it was trained without, its fold checkpoint's sha256, its exported runtime file and runtime.
:meth:`BundleManifest.hashed_files` is the one list of the files the manifest hashes: what
``bundle.verify_bundle`` checks, ``bundle.bundle_file_names`` lists and the registries copy.

``schema_version`` names the shape. Schema 2 (one network: top-level ``model_spec``, ``weights_sha256``,
``fold``, ``checkpoint_sha256``, ``runtime.file``; an ensemble: ``ensemble.members``) is read by
:func:`from_schema_2`, which rebuilds it in schema 3 in memory (the file on disk, and so its sha256, is never
rewritten). Any other schema is refused as a whole (no field-by-field guessing): :func:`stored_schema`
tells which one a file holds, so the error can say so.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, model_validator

from melanoma_ml.config import EnsembleKind, ViewCount
from melanoma_ml.evaluation.estimate import Estimate
from melanoma_ml.serving.monitor_reference import MonitorReference
from melanoma_ml.spec import ModelSpec
from melanoma_ml.weights import WEIGHTS_FILE as WEIGHTS_NAME

if TYPE_CHECKING:
    import pandas as pd

MANIFEST_SCHEMA_VERSION = 3
READABLE_SCHEMAS = (2, MANIFEST_SCHEMA_VERSION)
"""Schemas ``bundle.read_manifest`` reads: schema 2 through :func:`from_schema_2`."""

UNRECORDED_VIEWS = 8
"""``BundleManifest.views`` of a manifest that does not record it: bundles written before the views were
recorded served ``serving.views``' default then, all 8 dihedral views."""

"""Schema 1 (``format_version: 1``) kept the provenance in a free-form ``extra`` dict and CIs without a level."""


def stored_schema(data: Mapping[str, Any]) -> Any:
    """The schema a parsed ``manifest.json`` declares (schema 1 called it ``format_version``); None if none."""
    return data.get("schema_version", data.get("format_version"))


def from_schema_2(data: Mapping[str, Any]) -> dict[str, Any]:
    """A schema-2 ``manifest.json`` object rebuilt in schema 3 (in memory: nothing on disk changes).

    A one-network manifest becomes a one-member ``best_fold`` ensemble whose member carries the top-level
    ``model_spec``, ``weights_sha256``, ``fold``, ``checkpoint_sha256`` and ``runtime.file``; ensemble
    members without a runtime of their own get the bundle's (schema 2 read them so). Fields it does not
    move are passed on unchanged, so schema 3's validation judges them.

    Raises:
        ValueError: ``data`` is not schema 2, or its ensemble's member 0 is not its ``weights_sha256``.
    """
    if stored_schema(data) != 2:
        raise ValueError(f"from_schema_2 reads schema 2 manifests, got schema {stored_schema(data)!r}")
    old = dict(data)
    weights = {"name": WEIGHTS_NAME, "sha256": old.pop("weights_sha256", None)}
    provenance = {key: old.pop(key, None) for key in ("model_spec", "fold", "checkpoint_sha256")}
    runtime = old.pop("runtime", None)
    runtime_file, member_runtime = None, None
    if isinstance(runtime, Mapping):
        runtime = dict(runtime)
        runtime_file = runtime.pop("file", None)
        if (runtime.get("runtime"), runtime.get("precision")) != ("torch", "fp32"):
            member_runtime = {key: runtime[key] for key in ("runtime", "precision") if key in runtime}
    ensemble = old.pop("ensemble", None)
    if ensemble is None:
        member = {"weights": weights, **provenance, "runtime_file": runtime_file, "runtime": member_runtime}
        ensemble = {"kind": "best_fold", "average": "probability", "members": [member]}
    elif isinstance(ensemble, Mapping) and isinstance(ensemble.get("members"), list):
        members = [
            {**m, "runtime": m.get("runtime") or member_runtime} if isinstance(m, Mapping) else m
            for m in ensemble["members"]
        ]
        first = members[0].get("weights") if members and isinstance(members[0], Mapping) else None
        if first != weights:
            raise ValueError(
                f"ensemble member 0 must be {WEIGHTS_NAME} with the manifest's weights_sha256 "
                f"{weights['sha256']}, got {first}"
            )
        ensemble = {**ensemble, "members": members}
    return {**old, "schema_version": 3, "ensemble": ensemble, "runtime": runtime}


def _estimate(value: Any) -> Estimate:
    return Estimate.from_dict(value, where="metric")  # InputValueError is a ValueError: pydantic reports it


def _spec(value: Any) -> ModelSpec:
    if isinstance(value, ModelSpec):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"must be a dict written by ModelSpec.to_dict(), got {type(value).__name__}")
    try:
        return ModelSpec.from_dict(dict(value))
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"is not a valid model spec ({exc})") from exc


StoredEstimate = Annotated[
    Estimate, PlainValidator(_estimate), PlainSerializer(lambda e: e.to_dict(), when_used="always")
]
StoredSpec = Annotated[
    ModelSpec, PlainValidator(_spec), PlainSerializer(lambda s: s.to_dict(), when_used="always")
]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class ValidationPredictions(BaseModel):
    """The served fold model's out-of-fold predictions, one list per column (enough for a paired comparison
    with the next candidate and for the gallery to find the model's own validation images)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image_name: list[str]
    group_id: list[str]
    fold: list[int]
    target: list[Literal[0, 1]]
    prob: list[Annotated[float, Field(ge=0.0, le=1.0)]]

    @model_validator(mode="after")
    def _same_length(self) -> ValidationPredictions:
        lengths = {name: len(getattr(self, name)) for name in type(self).model_fields}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"columns differ in length: {lengths}")
        return self

    @classmethod
    def columns(cls) -> tuple[str, ...]:
        """The stored columns, in order (a subset of the training out-of-fold table's columns)."""
        return tuple(cls.model_fields)

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> ValidationPredictions:
        """The :meth:`columns` of an out-of-fold predictions table."""
        return cls(**{column: frame[column].tolist() for column in cls.columns()})

    def to_frame(self) -> pd.DataFrame:
        import pandas as pd

        return pd.DataFrame(self.model_dump())


class TestMetrics(BaseModel):
    """The served model on one test set nothing was tuned on, at the bundle's own threshold.

    Attributes:
        ood_flag_rate: Share of the set's images the bundle's out-of-distribution detector flagged (None:
            the bundle has no detector, or the manifest predates the field).
        used_in_selection: The set's numbers chose or gated this model (``evaluation.select_on`` other than
            ``oof``, or ``evaluation.max_external_gap``): no longer an untouched estimate.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    metrics: dict[str, StoredEstimate]
    n_images: int = Field(ge=1)
    n_melanoma: int = Field(ge=1)
    ood_flag_rate: float | None = Field(None, ge=0, le=1)
    used_in_selection: bool = False


class StoredCalibration(BaseModel):
    """The served model's post-hoc calibrator (``evaluation.calibration``), fitted on its own out-of-fold rows.

    Attributes:
        method: ``temperature``, ``platt`` or ``isotonic`` (chosen by cross-fitted NLL).
        parameters: The calibrator's ``to_dict()`` (read back by :meth:`calibrator`).
        prevalence: Melanoma rate of the rows it was fitted on (``shift_prior``'s training prevalence).
        n_rows: How many out-of-fold rows it was fitted on.
        report: ``calibration_report`` entries (``ece_before``, ``ece_after``, ``brier_*``, ...), each an
            :class:`Estimate`, measured on :attr:`report_on`.
        report_on: Which rows :attr:`report` scores (e.g. cross-fitted out-of-fold rows).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str
    parameters: dict[str, Any]
    prevalence: Annotated[float, Field(gt=0.0, lt=1.0, allow_inf_nan=False)]
    n_rows: int = Field(ge=2)
    report: dict[str, StoredEstimate] = Field(default_factory=dict)
    report_on: str = ""

    @model_validator(mode="after")
    def _readable(self) -> StoredCalibration:
        if self.parameters.get("method") != self.method:
            raise ValueError(
                f"method {self.method!r} differs from the parameters' {self.parameters.get('method')!r}"
            )
        self.calibrator()  # InputValueError (a ValueError) names the bad field
        return self

    def calibrator(self) -> Any:
        """The stored calibrator (``evaluation.calibration.calibrator_from_dict``)."""
        from melanoma_ml.evaluation.calibration import calibrator_from_dict

        return calibrator_from_dict(self.parameters)


class BundleFile(BaseModel):
    """A file of the bundle besides ``weights.safetensors``, checked against its sha256 before it is read."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")]
    sha256: Sha256

    @model_validator(mode="after")
    def _inside_bundle(self) -> BundleFile:
        if ".." in self.name.split("/"):
            raise ValueError(f"file {self.name!r} points outside the bundle folder")
        return self


class MemberRuntime(BaseModel):
    """How one ensemble member runs, chosen for it at promotion (``serving.runtime: auto`` chooses per member).

    Attributes:
        runtime: ``torch`` or an exported runtime (its file is the member's ``runtime_file``).
        precision: ``fp32``, ``bf16`` or ``int8``.
        parity: This member's agreement with its eager fp32 network on the probe (``max_abs_prob_diff``, ...).
        note: Why (e.g. why ``auto`` fell back to torch fp32 for this member); empty when it got what was asked.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    runtime: str
    precision: str
    parity: dict[str, float] = Field(default_factory=dict)
    note: str = ""


class EnsembleMember(BaseModel):
    """One network of a bundle (member 0's weights are ``weights.safetensors``).

    Attributes:
        weights: Its safetensors file.
        model_spec: The spec that rebuilds it (members of ``top_k`` ensembles may differ in backbone).
        fold: The fold it was trained without (its out-of-fold rows), or None (e.g. a network exported by
            hand).
        checkpoint_sha256: sha256 of the fold checkpoint's weights it was exported from (tells "already
            served"), or None.
        runtime_file: The member's exported model (None: served by torch).
        runtime: The runtime this member serves with; None: torch fp32.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    weights: BundleFile
    model_spec: StoredSpec
    fold: int | None = None
    checkpoint_sha256: Sha256 | None = None
    runtime_file: BundleFile | None = None
    runtime: MemberRuntime | None = None


class Ensemble(BaseModel):
    """The networks a bundle serves (``serving.ensemble``) and the space it averages them in.

    ``kind`` uses ``serving.ensemble``'s words (``config.EnsembleKind``): ``best_fold`` is one network (the best fold model, or a
    network exported by hand), ``folds`` and ``top_k`` average several. One member is its own average in
    either space (``evaluation.ensemble.average_probabilities``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: EnsembleKind
    average: Literal["logit", "probability"]
    members: list[EnsembleMember] = Field(min_length=1)

    @model_validator(mode="after")
    def _member_zero_is_the_weights_file(self) -> Ensemble:
        if self.members[0].weights.name != WEIGHTS_NAME:
            raise ValueError(f"member 0 must be {WEIGHTS_NAME}, got {self.members[0].weights.name!r}")
        if self.kind == "best_fold" and len(self.members) != 1:
            raise ValueError(f"kind 'best_fold' serves one network, got {len(self.members)} members")
        return self


class ServingRuntime(BaseModel):
    """The bundle's runtime in one line (``serving.runtime`` / ``serving.precision``), for the card and
    ``models``; what each network runs with is its member's ``runtime`` and ``runtime_file``.

    Attributes:
        runtime: ``torch`` or an exported runtime (``onnxruntime``, ...); for an ensemble whose members
            differ (``auto`` fell back for some), the exported one, and :attr:`note` names the others.
        precision: ``fp32``, ``bf16`` or ``int8``.
        parity: Measured agreement with eager fp32 at promotion (``max_abs_prob_diff``, ``n_inputs``),
            the worst member's.
        note: Why this runtime was chosen (e.g. why ``auto`` fell back to torch, per member).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    runtime: str
    precision: str
    parity: dict[str, float] = Field(default_factory=dict)
    note: str = ""


class StoredOOD(BaseModel):
    """The out-of-distribution detector shipped with the bundle (``serving.ood``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    file: BundleFile
    method: str
    threshold: float
    summary: dict[str, Any] = Field(default_factory=dict)


class BundleManifest(BaseModel):
    """The parsed ``manifest.json`` of a bundle.

    Attributes:
        schema_version: :data:`MANIFEST_SCHEMA_VERSION`.
        version: The registry version (``v0003``) once registered, else None.
        threshold: Probability at or above which a lesion is flagged.
        metrics: Evaluation metrics of the served model, each an :class:`Estimate` with its CI level.
        data_version: Identifier of the training data (e.g. the folds table hash).
        code_version: Identifier of the code that trained it.
        created_at: ISO time the bundle was written (UTC).
        oof: The served model's out-of-fold predictions (a ``best_fold`` network's: only its own fold's
            rows), else None.
        test_metrics: Test set name (``internal``: the locked test split; else a ``data.test_sources``
            name) -> the model's metrics there, at :attr:`threshold` (fixed before the test). None when no
            untouched test set existed; optional, so schema 2 manifests without it stay valid.
        calibration: The calibrator served probabilities go through (:attr:`threshold` is on its scale),
            or None: an older bundle, served with the model's raw (uncalibrated) probabilities. Optional,
            so schema 2 manifests without it stay valid.
        uncalibrated_reason: Why a bundle promoted with calibration on serves raw probabilities (too few
            out-of-fold patients with melanoma to cross-fit a calibrator), else None. Set only when
            :attr:`calibration` is None.
        ensemble: The networks served (one member for one network): each one's weights, spec, fold,
            checkpoint sha256 and runtime. Member 0 (``weights.safetensors``, :attr:`model_spec`) is the
            network Grad-CAM explains.
        views: Dihedral views averaged per member (``serving.views`` at promotion): what every reader
            scores with (the app, ``predict``, batch scoring, the gallery, the card's test numbers). A
            manifest written before it was recorded (schema 2, early schema 3) reads as
            :data:`UNRECORDED_VIEWS`, what those bundles served.
        runtime: The runtime in one line (None: torch fp32); each member's own is its ``runtime``.
        ood: The out-of-distribution detector, or None (no flags).
        monitor_reference: The metadata mix of the :attr:`oof` rows, the serving monitor's reference, or
            None (a bundle promoted without the folds table, or before monitoring).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[3] = MANIFEST_SCHEMA_VERSION
    version: str | None = None
    threshold: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
    metrics: dict[str, StoredEstimate]
    data_version: str
    code_version: str
    created_at: str
    oof: ValidationPredictions | None = None
    test_metrics: dict[str, TestMetrics] | None = None
    calibration: StoredCalibration | None = None
    uncalibrated_reason: str | None = None
    ensemble: Ensemble
    views: ViewCount = UNRECORDED_VIEWS
    runtime: ServingRuntime | None = None
    ood: StoredOOD | None = None
    monitor_reference: MonitorReference | None = None

    @model_validator(mode="after")
    def _oof_is_the_folds_own(self) -> BundleManifest:
        fold = self.ensemble.members[0].fold
        one = self.ensemble.kind == "best_fold" and fold is not None
        if one and self.oof is not None and set(self.oof.fold) - {fold}:
            raise ValueError(
                f"oof holds rows of folds {sorted(set(self.oof.fold))}, but the bundle serves fold {fold}: "
                "store only that fold model's own validation rows"
            )
        return self

    @model_validator(mode="after")
    def _uncalibrated_only_without_a_calibrator(self) -> BundleManifest:
        if self.uncalibrated_reason is not None and self.calibration is not None:
            raise ValueError("uncalibrated_reason is set, but the bundle has a calibration: keep one of them")
        return self

    @model_validator(mode="after")
    def _one_sha256_per_file(self) -> BundleManifest:
        named: dict[str, str] = {}
        for entry in self.hashed_files():
            if named.setdefault(entry.name, entry.sha256) != entry.sha256:
                raise ValueError(
                    f"file {entry.name!r} is listed with two different sha256: give each its own name"
                )
        return self

    @property
    def model_spec(self) -> ModelSpec:
        """Member 0's spec: architecture, input size, normalization and the fitted metadata encoder; its
        optional ``pretrained`` holds the backbone's initial weights' origin and sha256."""
        return self.ensemble.members[0].model_spec

    @property
    def weights_sha256(self) -> str:
        """sha256 of ``weights.safetensors`` (member 0's weights)."""
        return self.ensemble.members[0].weights.sha256

    @property
    def backbone(self) -> str:
        """The served backbones, distinct, joined by ``+`` (``top_k`` ensembles may mix them)."""
        return "+".join(dict.fromkeys(m.model_spec.backbone for m in self.ensemble.members))

    def pretrained_lineages(self) -> list[Any]:
        """Where the served networks' backbones were initialised from (``ModelSpec.pretrained`` of each
        member's spec), distinct, in member order; empty: random init or a bundle written before lineage
        was recorded."""
        specs = [m.model_spec for m in self.ensemble.members]
        return list(dict.fromkeys(s.pretrained for s in specs if s.pretrained is not None))

    def hashed_files(self) -> list[BundleFile]:
        """Every file the manifest hashes, each once, in order: the members' weights (member 0's is
        ``weights.safetensors``) and exported models, then the detector. The one list of a bundle's
        files besides ``manifest.json`` and ``manifest.sha256``: verified, listed and copied from here."""
        files: list[BundleFile] = []
        for member in self.ensemble.members:
            files.append(member.weights)
            if member.runtime_file is not None:
                files.append(member.runtime_file)
        if self.ood is not None:
            files.append(self.ood.file)
        return list(dict.fromkeys(files))

    def describe_model(self) -> str:
        """One line: what the bundle serves (``efficientnet_b0 fold 2`` or ``mean of 5 ... fold models``)."""
        members = self.ensemble.members
        if self.ensemble.kind == "best_fold":
            fold = members[0].fold
            return self.backbone if fold is None else f"{self.backbone} fold {fold}"
        what = "fold models" if self.ensemble.kind == "folds" else "models (top_k)"
        return f"{self.backbone}: {self.ensemble.average} mean of {len(members)} {what}"

    def to_json(self) -> dict[str, Any]:
        """The JSON object written as ``manifest.json`` (strict JSON: NaN bounds stored as null)."""
        return self.model_dump(mode="json")

    def oof_frame(self) -> pd.DataFrame:
        """:attr:`oof` as a table; an empty one (same columns) when none is stored."""
        if self.oof is None:
            import pandas as pd

            return pd.DataFrame(columns=list(ValidationPredictions.columns()))
        return self.oof.to_frame()


def bundle_validation_rows(manifest: BundleManifest, folds_table: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The served model's own validation images, as rows of the current ``folds_table``.

    They are the images of the out-of-fold predictions stored in the bundle (``manifest.oof``, only the
    served fold's rows), not the table's current rows of the members' folds: folds re-made since the promotion
    may put training images there.

    Returns:
        ``(rows, "")``: the folds-table rows in stored order, plus ``stored_prob`` (the stored
        prediction); or an empty frame and why there are none.
    """
    stored = manifest.oof_frame()
    if stored.empty:
        return stored, "it stores no out-of-fold predictions (manifest oof) to tell its validation images"
    own = stored[["image_name", "prob", "fold"]].rename(
        columns={"prob": "stored_prob", "fold": "stored_fold"}
    )
    current = folds_table.drop(columns=["stored_prob", "stored_fold"], errors="ignore")
    rows = own.merge(current, on="image_name", how="inner")
    if rows.empty:
        return rows, (
            "none of its validation images are in the current folds table (the data changed since it was "
            "promoted); re-run training and promotion"
        )
    return rows, ""
