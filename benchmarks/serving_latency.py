"""Per-request latency of the app's model service: TTA on/off x CAM off/EigenCAM/Grad-CAM, p50 and p95.

Each request is what the app does for one upload: decode a 600x450 JPEG with ``load_rgb`` (serving size
limits), validate and encode the metadata, predict (the bundle's recorded dihedral views in one batched pass when TTA is on: 8 for
the random ``--models`` bundles, ``serving.views`` for ``--default-bundle``)
and, when asked, compute the CAM on the un-augmented view. ``ModelService.predict`` is called directly;
``--client`` also times the same request through a live app on 127.0.0.1 via ``gradio_client``.

Bundles have random weights (latency does not depend on them) and are written to a temporary folder that
is removed afterwards. ``--default-bundle`` times the bundle the defaults serve (``PipelineConfig()``: the
first default backbone at ``data.image_size``, a ``data.n_folds``-member fold ensemble, ``serving.runtime``
``auto`` resolved as promotion resolves it, ``serving.views`` views in the TTA-on rows); ``--artifact-root`` times the bundle
a finished run's registry serves (its trained members, runtime and OOD detector). Every row names the
bundle's backbone, size, members and runtime from its manifest.

Usage::

    .venv/bin/python benchmarks/serving_latency.py [--requests 20] [--warmup 2] [--threads N] [--client]
        [--models test_efficientnet:64 efficientnet_b0:256] [--members 1 5] [--runtimes torch onnxruntime]
        [--no-cam] [--default-bundle] [--artifact-root DIR]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import launch_local, machine_load, open_run, percentiles, random_bundle, upload  # noqa: E402

from melanoma_ml import schema  # noqa: E402
from melanoma_ml.runtime import quiet_network_chatter  # noqa: E402

quiet_network_chatter()  # gradio analytics off unless the user set GRADIO_ANALYTICS_ENABLED

DEFAULT_MODELS = ("test_efficientnet:64", "efficientnet_b0:256")
SETTINGS = [(tta, cam) for cam in ("none", "eigencam", "gradcam") for tta in (False, True)]


def default_bundle(root: Path) -> Path:
    """A random-weight bundle shaped like what the defaults serve (``PipelineConfig()``): the first default
    backbone at ``data.image_size``, ``data.n_folds`` fold members when ``serving.ensemble`` is ``folds``,
    exported for ``serving.runtime`` / ``serving.precision`` (``auto``: what promotion would choose), recording
    ``serving.views`` (what "TTA on" then averages)."""
    from melanoma_ml.config import PipelineConfig

    config = PipelineConfig()
    members = config.data.n_folds if config.serving.ensemble == "folds" else 1
    random_bundle(
        root,
        config.backbones[0],
        config.data.image_size,
        members=members,
        runtime=config.serving.runtime,
        precision=config.serving.precision,
        tolerance=config.serving.runtime_parity_tolerance,
        meta_hidden=config.model.meta_hidden,
        views=config.serving.views,
    )
    return root


def describe(registry) -> tuple[str, int, int, str]:
    """(backbone, px, members, runtime) of the registry's current bundle, from its manifest."""
    manifest = registry.manifest(registry.current())
    spec = manifest.model_spec
    members = len(manifest.ensemble.members)
    runtime = "torch" if manifest.runtime is None else manifest.runtime.runtime
    return spec.network.backbone, spec.image_size, members, runtime


class Timings:
    """Wall-clock seconds per request, and this process's CPU seconds per request (all threads).

    On a shared machine wall time includes waiting for a core; CPU time shows the work itself.
    """

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def measure(self, fn: Callable[[], object]) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        self.cpu.append(time.process_time() - cpu)
        self.wall.append(time.perf_counter() - wall)


def time_service(service, image: Path, tta: bool, cam: str, requests: int, warmup: int) -> Timings:
    from melanoma_ml.serving.service import PredictionRequest

    request = PredictionRequest(
        image=image, age=55, sex="female", site=schema.SITES[0], tta=tta, cam_method=cam
    )
    for _ in range(warmup):
        service.predict(request)
    timings = Timings()
    for _ in range(requests):
        timings.measure(lambda: service.predict(request))
    return timings


def time_client(service, image: Path, work: Path, tta: bool, cam: str, requests: int, warmup: int) -> Timings:
    """The same request through a live app on 127.0.0.1 (upload, queue, JSON and PNG outputs included)."""
    os.environ["GRADIO_TEMP_DIR"] = str(work / "server")
    from gradio_client import Client, handle_file

    from melanoma_ml.serving.app import create_app

    demo = create_app(service)
    url = launch_local(demo, service.config)
    try:
        client = Client(url, verbose=False, download_files=str(work / "client"), analytics_enabled=False)
        site = schema.SITES[0]

        def once() -> None:
            client.predict(handle_file(str(image)), "55", "female", site, tta, cam, None, api_name="/predict")

        for _ in range(warmup):
            once()
        timings = Timings()  # server and client share this process: CPU time covers both sides
        for _ in range(requests):
            timings.measure(once)
        return timings
    finally:
        demo.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="backbone:size pairs")
    parser.add_argument("--requests", type=int, default=20, help="timed requests per setting (bounded loop)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--client", action="store_true", help="also time TTA+EigenCAM through gradio_client")
    parser.add_argument(
        "--members", nargs="+", type=int, default=[1], help="bundle sizes to time (5: a 5-fold ensemble)"
    )
    parser.add_argument(
        "--runtimes", nargs="+", default=["torch"], help="serving.runtime values to time (torch, onnxruntime)"
    )
    parser.add_argument("--no-cam", action="store_true", help="only the TTA off/on rows (no CAM)")
    parser.add_argument(
        "--default-bundle",
        action="store_true",
        help="time the bundle the defaults serve (k-fold ensemble, serving.runtime auto) instead of --models",
    )
    parser.add_argument(
        "--artifact-root", type=Path, default=None, help="time the bundle this finished run's registry serves"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= 1000:
        parser.error("--requests must be between 1 and 1000")

    import torch

    import melanoma_ml.serving.explain  # noqa: F401  (cold imports outside the clock)

    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs visible, CPU only"
    )
    print(f"{args.requests} timed requests per row after {args.warmup} warm-up; 600x450 JPEG upload\n")
    with machine_load(), tempfile.TemporaryDirectory(prefix="serving-latency-") as tmp:
        measure(args, Path(tmp))
    print(
        "p50/p95: wall clock per request; CPU ms: median CPU time of this process per request (all threads)"
    )


def registries(args: argparse.Namespace, work: Path):
    """(label, registry) of every bundle to time, built as they are needed."""
    from melanoma_ml.serving.registry import ModelRegistry

    if args.artifact_root is not None:
        yield "served by the run", open_run(args.artifact_root).registry()
    if args.default_bundle:
        yield "defaults", ModelRegistry(default_bundle(work / "defaults-registry"))
    if args.artifact_root is not None or args.default_bundle:
        return
    for model, members, runtime in itertools.product(args.models, args.members, args.runtimes):
        backbone, _, size = model.partition(":")
        folder = work / f"{backbone}-{members}-{runtime}-registry"
        random_bundle(folder, backbone, int(size or 256), members=members, runtime=runtime)
        yield "random weights", ModelRegistry(folder)


def measure(args: argparse.Namespace, work: Path) -> None:
    from melanoma_ml.config import ServingConfig
    from melanoma_ml.serving.model_card import ood_text, runtime_text
    from melanoma_ml.serving.service import ModelService

    header = (
        f"{'backbone':<18} {'px':>4} {'members':>7} {'runtime':<12} {'path':<8} {'TTA':<4} {'CAM':<9} "
        f"{'p50 ms':>8} {'p95 ms':>8} {'CPU ms':>8}"
    )
    image = upload(work / "upload.jpg")
    settings = [(tta, cam) for tta, cam in SETTINGS if not (args.no_cam and cam != "none")]
    for label, registry in registries(args, work):
        backbone, size, members, runtime = describe(registry)
        manifest = registry.manifest(registry.current())
        print(
            f"{label}: {registry.current()}, runtime {runtime_text(manifest)}; OOD check: {ood_text(manifest)}"
        )
        print(header)
        print("-" * len(header))
        service = ModelService(registry, ServingConfig())
        service.status()  # load outside the clock
        rows = [
            ("service", tta, cam, time_service(service, image, tta, cam, args.requests, args.warmup))
            for tta, cam in settings
        ]
        if args.client:
            timings = time_client(
                service, image, work / backbone, True, "eigencam", args.requests, args.warmup
            )
            rows.append(("client", True, "eigencam", timings))
        for path, tta, cam, timings in rows:
            p50, p95 = percentiles(timings.wall)
            cpu = statistics.median(timings.cpu) * 1000
            print(
                f"{backbone:<18} {size:>4} {members:>7} {runtime:<12} {path:<8} {'on' if tta else 'off':<4} "
                f"{cam:<9} {p50:>8.1f} {p95:>8.1f} {cpu:>8.1f}",
                flush=True,
            )
        print()


if __name__ == "__main__":
    main()
