"""Per-request latency of the app's model service: TTA on/off x CAM off/EigenCAM/Grad-CAM, p50 and p95.

Each request is what the app does for one upload: decode a 600x450 JPEG with ``load_rgb`` (serving size
limits), validate and encode the metadata, predict (8 dihedral views in one batched pass when TTA is on)
and, when asked, compute the CAM on the un-augmented view. ``ModelService.predict`` is called directly;
``--client`` also times the same request through a live app on 127.0.0.1 via ``gradio_client``.

Bundles have random weights (latency does not depend on them) and are written to a temporary folder that
is removed afterwards.

Usage::

    .venv/bin/python benchmarks/serving_latency.py [--requests 20] [--warmup 2] [--threads N] [--client]
        [--models test_efficientnet:64 efficientnet_b0:256] [--members 1 5] [--runtimes torch onnxruntime]
        [--no-cam]
"""

from __future__ import annotations

import argparse
import io
import itertools
import math
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from melanoma_ml import schema  # noqa: E402
from melanoma_ml.runtime import quiet_network_chatter  # noqa: E402

quiet_network_chatter()  # gradio analytics off unless the user set GRADIO_ANALYTICS_ENABLED

DEFAULT_MODELS = ("test_efficientnet:64", "efficientnet_b0:256")
SETTINGS = [(tta, cam) for cam in ("none", "eigencam", "gradcam") for tta in (False, True)]


def register_random_bundle(
    root: Path, backbone: str, size: int, *, members: int = 1, runtime: str = "torch"
) -> Path:
    """A random-weight bundle of ``backbone`` at ``size`` px, registered and promoted in ``root``.

    ``members`` > 1 makes a ``folds`` ensemble of that many networks (different seeds); ``runtime`` other
    than ``torch`` exports every member for it at registration (checked on random probe views).
    """
    import torch

    from melanoma_ml.config import ModelConfig
    from melanoma_ml.features import MetadataEncoder
    from melanoma_ml.model import create_backbone, normalization_for
    from melanoma_ml.serving.bundle import EnsembleToSave, MemberNet, RuntimeRequest
    from melanoma_ml.serving.inference import dihedral_views, encode_metadata
    from melanoma_ml.serving.registry import ModelRegistry
    from melanoma_ml.spec import ModelSpec

    torch.manual_seed(0)
    norm = normalization_for(create_backbone(backbone, pretrained=False))
    spec = ModelSpec(
        network=ModelConfig(backbone=backbone, meta_hidden=[128, 64], meta_dropout=0.3, head_dropout=0.3),
        image_size=size,
        mean=norm["mean"],
        std=norm["std"],
        encoder=MetadataEncoder(age_mean=50.0, age_std=15.0, sexes=schema.SEXES, sites=schema.SITES),
    )
    nets = []
    for seed in range(members):
        torch.manual_seed(seed)
        nets.append(spec.build_network().eval())
    ensemble = None
    if members > 1:
        ensemble = EnsembleToSave("folds", "probability", [MemberNet(n, spec, k) for k, n in enumerate(nets)])
    request = None
    if runtime != "torch":
        x = dihedral_views(torch.randn(2, 3, size, size))
        meta = encode_metadata([{}] * 2, spec, 2).repeat(8, 1)
        request = RuntimeRequest(runtime, "fp32", 1e-3, (x, meta))
    registry = ModelRegistry(root)
    metrics = {"auc": {"value": 0.5, "lo": 0.4, "hi": 0.6}}
    version = registry.register_bundle(
        nets[0],
        spec,
        threshold=0.5,
        metrics=metrics,
        data_version="bench",
        code_version="bench",
        ensemble=ensemble,
        runtime=request,
    )
    registry.promote(version, reason="latency benchmark")
    return root


def upload(path: Path) -> Path:
    """A 600x450 JPEG with some texture (decoding cost like a real photo)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    small = rng.integers(60, 220, (45, 60, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((600, 450), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    path.write_bytes(buffer.getvalue())
    return path


def percentiles(seconds: list[float]) -> tuple[float, float]:
    """(p50, p95) in milliseconds (p95 by nearest rank)."""
    ms = sorted(s * 1000 for s in seconds)
    return statistics.median(ms), ms[min(len(ms) - 1, math.ceil(0.95 * len(ms)) - 1)]


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

    from melanoma_ml.serving.app import create_app, launch_options

    demo = create_app(service)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    options = launch_options(service.config)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True, **options)
    try:
        url = f"http://127.0.0.1:{port}/"
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


def main() -> None:
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
    args = parser.parse_args()
    if not 1 <= args.requests <= 1000:
        parser.error("--requests must be between 1 and 1000")

    import torch

    import melanoma_ml.serving.explain  # noqa: F401  (cold imports outside the clock)
    from melanoma_ml.config import ServingConfig
    from melanoma_ml.serving.registry import ModelRegistry
    from melanoma_ml.serving.service import ModelService

    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs visible, CPU only"
    )
    print(f"{args.requests} timed requests per row after {args.warmup} warm-up; 600x450 JPEG upload")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}\n")
    header = (
        f"{'backbone':<18} {'px':>4} {'members':>7} {'runtime':<12} {'path':<8} {'TTA':<4} {'CAM':<9} "
        f"{'p50 ms':>8} {'p95 ms':>8} {'CPU ms':>8}"
    )
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory(prefix="serving-latency-") as tmp:
        work = Path(tmp)
        image = upload(work / "upload.jpg")
        settings = [(tta, cam) for tta, cam in SETTINGS if not (args.no_cam and cam != "none")]
        for model, members, runtime in itertools.product(args.models, args.members, args.runtimes):
            backbone, _, size = model.partition(":")
            folder = work / f"{backbone}-{members}-{runtime}" / "registry"
            root = register_random_bundle(
                folder, backbone, int(size or 256), members=members, runtime=runtime
            )
            service = ModelService(ModelRegistry(root), ServingConfig())
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
                    f"{backbone:<18} {size:>4} {members:>7} {runtime:<12} {path:<8} {'on' if tta else 'off':<4} {cam:<9} "
                    f"{p50:>8.1f} {p95:>8.1f} {cpu:>8.1f}",
                    flush=True,
                )
    print(f"\nload average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(
        "p50/p95: wall clock per request; CPU ms: median CPU time of this process per request (all threads)"
    )


if __name__ == "__main__":
    main()
