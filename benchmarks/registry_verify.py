"""What ``melanoma-ml models`` costs per registered version: the sha256 check of each version's files.

Registers ``--versions`` random-weight bundles of ``--backbone`` (``--members`` networks each: 1, or a fold
ensemble; ``--runtime`` as ``serving.runtime``, whose exported files are hashed too) in a temporary artifact
root, then times, median of ``--repeats``:

* ``ModelRegistry.check`` of one version (what ``models`` runs per version: every file of the bundle
  against its manifest sha256), per version;
* the whole ``melanoma-ml models`` command with and without ``--no-verify``; their difference divided by
  the number of versions is the verification cost per version as a user meets it.

Files are read from the page cache (they were just written): a cold disk adds its read time.

Usage::

    .venv/bin/python benchmarks/registry_verify.py [--backbone efficientnet_b0] [--size 256] [--versions 3]
        [--members 1 5] [--runtime torch] [--repeats 5]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
from pathlib import Path

from melanoma_ml.runtime import quiet_network_chatter

quiet_network_chatter()

from _common import machine_load, median_seconds, random_bundle  # noqa: E402

from melanoma_ml.artifacts import artifact_paths  # noqa: E402
from melanoma_ml.cli import main as melanoma_ml  # noqa: E402
from melanoma_ml.config import PipelineConfig  # noqa: E402
from melanoma_ml.serving.registry import ModelRegistry  # noqa: E402


def bundle_megabytes(registry: ModelRegistry, version: str) -> float:
    folder = registry.version_path(version)
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def models_seconds(root: Path, repeats: int, *flags: str) -> float:
    """Median seconds of ``melanoma-ml models --artifact-root root [flags]`` (its output discarded)."""

    def run() -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            code = melanoma_ml(["models", "--artifact-root", str(root), *flags])
        if code != 0:
            raise SystemExit(f"melanoma-ml models exited {code} on {root}")

    return median_seconds(run, repeats, warmup=1)


def measure(args: argparse.Namespace, members: int, workdir: Path) -> None:
    paths = artifact_paths(PipelineConfig(artifact_root=str(workdir / f"members-{members}")))
    versions = [
        random_bundle(
            paths.registry, args.backbone, args.size, members=members, runtime=args.runtime, seed=seed
        )
        for seed in range(args.versions)
    ]
    registry = ModelRegistry(paths.registry)
    checks = [median_seconds(lambda v=v: registry.check(v), args.repeats, warmup=1) for v in versions]
    verified = models_seconds(paths.root, args.repeats)
    unverified = models_seconds(paths.root, args.repeats, "--no-verify")
    per_version = (verified - unverified) / len(versions)
    print(
        f"| {args.backbone} {args.size} px | {members} | {args.runtime} | {bundle_megabytes(registry, versions[0]):.1f} | "
        f"{1000 * sorted(checks)[len(checks) // 2]:.1f} | {1000 * verified:.0f} / {1000 * unverified:.0f} | "
        f"{1000 * per_version:.1f} |",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="efficientnet_b0")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--versions", type=int, default=3)
    parser.add_argument("--members", type=int, nargs="+", default=[1], help="networks per bundle")
    parser.add_argument(
        "--runtime", default="torch", help="serving.runtime of the bundles (auto exports ONNX)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.versions < 1:
        parser.error("--versions must be at least 1")
    print(f"{args.versions} versions per row, median of {args.repeats} (ms), files in the page cache")
    print(
        "| bundle | members | runtime | MB per version | check one version | `models` verify / --no-verify, all versions | "
        "verification per version |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory(prefix="registry-verify-") as tmp:
        for members in args.members:
            measure(args, members, Path(tmp))


if __name__ == "__main__":
    with machine_load():
        main()
