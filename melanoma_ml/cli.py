"""``melanoma-ml``: run the pure-Python pipeline, inspect a dataset folder, manage the model registry.

Subcommands::

    melanoma-ml demo [--profile demo] [--artifact-root DIR] [--set training.epochs=3 ...]
    melanoma-ml inspect DATA_DIR [--layout auto] [--image-dir DIR] [--no-images] [--no-hash]
    melanoma-ml models [--artifact-root DIR]
    melanoma-ml rollback [--to VERSION] [--artifact-root DIR]
    melanoma-ml config [--profile P] [--set key=value ...]

Settings resolve as everywhere else (``config.load_config``): profile, then ``MELANOMA_*`` environment
variables / ``.env``, then ``--set`` overrides. Bad input (missing folder, unknown layout, bad config
value, unknown version) prints one ``error:`` line to stderr and exits with status 2; ``--traceback``
shows the full traceback instead.

Only argparse is imported at module level, so ``melanoma-ml --help`` is fast; each subcommand imports
what it needs (torch, timm and lightning only for ``demo``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from melanoma_ml.config import PipelineConfig

EXIT_OK = 0
EXIT_BAD_INPUT = 2


class UsageError(ValueError):
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

    overrides = overrides_dict(getattr(args, "set", None) or [])
    if getattr(args, "artifact_root", None):
        overrides["artifact_root"] = str(args.artifact_root)
    return load_config(args.profile, overrides)


def _registry(args: argparse.Namespace):  # -> ModelRegistry
    from melanoma_ml.pipeline import artifact_paths
    from melanoma_ml.serving.registry import ModelRegistry

    config = resolve_config(args)
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


def cmd_models(args: argparse.Namespace) -> int:
    """List registry versions (oldest first) with backbone, AUC, threshold; mark the current one."""
    from melanoma_ml.serving.bundle import read_manifest

    registry = _registry(args)
    versions = registry.versions()
    current = registry.current()
    print(f"registry: {registry.root}")
    if not versions:
        print("no versions registered yet (run `melanoma-ml demo` or the Dagster pipeline)")
        return EXIT_OK
    print(f"  {'':1} {'version':<8} {'backbone':<22} {'auc':>6} {'auc 95% CI':>15} {'threshold':>9}  created")
    for version in versions:
        manifest = read_manifest(registry.version_path(version))
        auc = (manifest.get("metrics") or {}).get("auc")
        auc_text, ci_text = _auc_columns(auc)
        mark = "*" if version == current else ""
        print(
            f"  {mark:1} {version:<8} {str(manifest.get('backbone', '?')):<22} {auc_text:>6} {ci_text:>15} "
            f"{float(manifest['threshold']):>9.4f}  {manifest.get('created_at', '?')}"
        )
    print(f"current: {current or 'none (nothing promoted yet)'}")
    return EXIT_OK


def _auc_columns(auc: Any) -> tuple[str, str]:
    """``("0.873", "[0.812, 0.921]")`` from a metrics entry (``{"value","lo","hi"}`` or a number)."""
    if isinstance(auc, dict):
        value, lo, hi = auc.get("value"), auc.get("lo"), auc.get("hi")
    else:
        value, lo, hi = auc, None, None
    value_text = "-" if value is None else f"{float(value):.3f}"
    ci_text = "-" if lo is None or hi is None else f"[{float(lo):.3f}, {float(hi):.3f}]"
    return value_text, ci_text


def cmd_rollback(args: argparse.Namespace) -> int:
    """Move the registry's current pointer back (to ``--to`` or the previously served version)."""
    registry = _registry(args)
    before = registry.current()
    after = registry.rollback(args.to, reason=args.reason)
    print(f"rolled back: {before} -> {after} (registry {registry.root})")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """Run ``pipeline.run_all`` on a profile and print progress and a summary."""
    from melanoma_ml.pipeline import run_all

    config = resolve_config(args)
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


def summary_text(result: Any, wall_seconds: float) -> str:
    """The final ``demo`` summary: data, leaderboard, promotion, gallery, wall time."""
    cleaning = result.cleaning.summary
    lines = [
        f"data: {result.source.root} ({'synthetic' if result.source.synthetic else result.source.layout}); "
        f"{cleaning['rows_clean']} clean images, {cleaning['rows_quarantined']} quarantined, "
        f"{cleaning['melanoma']} melanoma",
        "leaderboard (out-of-fold, patient-bootstrap 95% CI):",
    ]
    for row_text in _leaderboard_lines(result.reports, result.leaderboard.table):
        lines.append(f"  {row_text}")
    promotion = result.promotion
    verdict = "promoted" if promotion.registered else "not promoted"
    lines.append(
        f"candidate: {promotion.candidate} (fold {promotion.fold}) {verdict}: {promotion.decision.reason}"
    )
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
        report = reports[backbone]
        auc, pauc = report.metric("auc"), report.metric("pauc")
        lines.append(
            f"{rank}. {backbone:<22} AUC {auc.value:.3f} [{auc.lo:.3f}, {auc.hi:.3f}]  "
            f"pAUC {pauc.value:.3f} [{pauc.lo:.3f}, {pauc.hi:.3f}]  threshold {report.threshold.value:.3f}"
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
    settings(models)

    rollback = add("rollback", cmd_rollback, "point the registry back at an earlier version")
    rollback.add_argument("--to", metavar="VERSION", help="version to serve (default: the previous one)")
    rollback.add_argument("--reason", default="rollback (melanoma-ml CLI)", help="recorded in history")
    settings(rollback)

    config = add("config", cmd_config, "print the resolved config as JSON")
    settings(config, root=False)
    return parser


PACKAGE_DIR = Path(__file__).resolve().parent
"""Errors raised from files under this folder count as input errors (see ``is_input_error``)."""


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


def is_input_error(err: BaseException) -> bool:
    """Errors our own code raises for bad input (they carry a message naming the fix).

    Config validation (pydantic) errors, and ValueError/FileNotFoundError/NotADirectoryError/RuntimeError
    subclasses raised inside ``melanoma_ml`` itself (metadata, folds, images, bundles, registry, missing
    pretrained weights). The same types raised deep inside numpy, torch or sklearn are bugs: they keep
    their traceback.
    """
    from pydantic import ValidationError

    if isinstance(err, ValidationError):
        return True
    if not isinstance(err, ValueError | FileNotFoundError | NotADirectoryError | RuntimeError):
        return False
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(PACKAGE_DIR)


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


if __name__ == "__main__":
    sys.exit(main())
