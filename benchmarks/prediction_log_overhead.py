"""What the prediction log costs a request: the logging call itself, and ``ModelService.predict`` with vs
without it, p50 and p95 (goal: p50 overhead under 2 ms).

Each "with" request is what the app's ``/predict`` handler does (``predict_and_log``): the upload's read
and sha256 start on the log's worker thread, ``ModelService.predict`` runs on a 600x450 JPEG upload, then
one ``O_APPEND`` write of the JSON line.
"Without" and "with" requests alternate, so both see the same machine load; on a busy machine their p50s
differ by more noise than the log costs, so the request thread's own logging time is also timed inside
requests (hash started before the forward pass, then waited for and the line written after it), for the
upload and for a ``--large-mb`` file (a full-resolution dermoscopy photo is a few MB: the sha256 of its
bytes is most of the work). The logging call is also timed alone (synchronous read, hash and write). ``--keep-images`` also keeps each upload (temp file, fsync,
rename; only the first copy of an image is written, later ones touch it).

The bundle has random weights (latency does not depend on them) and everything is written to a temporary
folder that is removed afterwards.

Usage::

    .venv/bin/python benchmarks/prediction_log_overhead.py [--requests 200] [--warmup 10]
        [--model test_efficientnet:64] [--large-mb 5] [--keep-images]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import machine_load, percentiles, random_bundle, upload  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="timed requests of each kind")
    parser.add_argument("--warmup", type=int, default=10, help="untimed requests first")
    parser.add_argument("--model", default="test_efficientnet:64", help="backbone:size of the random bundle")
    parser.add_argument("--large-mb", type=float, default=5.0, help="size of the large file the log hashes")
    parser.add_argument("--keep-images", action="store_true", help="serving.keep_images on")
    return parser.parse_args()


def row(name: str, seconds: list[float]) -> str:
    p50, p95 = percentiles(seconds)
    return f"{name:<44} p50 {p50:8.3f} ms   p95 {p95:8.3f} ms"


def main() -> None:
    args = parse_args()
    from melanoma_ml.config import ServingConfig
    from melanoma_ml.monitoring.prediction_log import PredictionLog, log_served_prediction, predict_and_log
    from melanoma_ml.serving.registry import ModelRegistry
    from melanoma_ml.serving.service import ModelService, PredictionRequest

    backbone, size = args.model.split(":")
    with tempfile.TemporaryDirectory(prefix="prediction-log-bench-") as folder, machine_load():
        work = Path(folder)
        random_bundle(work / "models", backbone, int(size))
        service = ModelService(ModelRegistry(work / "models"), ServingConfig(tta=False, cam_method="gradcam"))
        log = PredictionLog(work / "root", keep_images=args.keep_images)
        image = upload(work / "upload.jpg")
        large = work / "large.jpg"
        large.write_bytes(image.read_bytes() + os.urandom(int(args.large_mb * 1e6)))
        request = PredictionRequest(image=image, age=50, sex="female", cam_method="none")
        print(
            f"bundle {backbone} {size} px, single view, no CAM; upload {image.stat().st_size / 1e3:.0f} kB "
            f"JPEG; keep_images {'on' if args.keep_images else 'off'}; {args.requests} requests each"
        )

        for _ in range(args.warmup):
            predict_and_log(service, request, log)
        without, with_log, log_call, log_large = [], [], [], []
        in_request: dict[str, list[float]] = {"upload": [], "large": []}
        for _ in range(args.requests):
            start = time.perf_counter()
            service.predict(request)
            without.append(time.perf_counter() - start)

            start = time.perf_counter()
            prediction, _case_id = predict_and_log(service, request, log)
            with_log.append(time.perf_counter() - start)

            for name, path in (("upload", image), ("large", large)):
                in_request[name].append(logging_seconds_in_request(service, request, log, path))

            start = time.perf_counter()
            log_served_prediction(log, prediction, str(image))
            log_call.append(time.perf_counter() - start)

            start = time.perf_counter()
            log_served_prediction(log, prediction, str(large))
            log_large.append(time.perf_counter() - start)

        large_mb = f"{large.stat().st_size / 1e6:.1f} MB"
        print(row("log call alone, upload", log_call))
        print(row(f"log call alone, {large_mb} file", log_large))
        print(row("logging time inside a request, upload", in_request["upload"]))
        print(row(f"logging time inside a request, {large_mb}", in_request["large"]))
        print(row("ModelService.predict without the log", without))
        print(row("predict_and_log (the app's path)", with_log))
        (p50_without, _), (p50_with, _) = percentiles(without), percentiles(with_log)
        print(
            f"p50 with - without: {p50_with - p50_without:+.3f} ms ({p50_with / p50_without:.3f}x); "
            f"records written {log.written_records}, lost {log.lost_records}"
        )


def logging_seconds_in_request(service, request, log, path: Path) -> float:
    """``predict_and_log``'s steps on ``path``, timing only the request thread's logging work: starting the
    hash before the forward pass, then waiting for it and writing the line after it (the model's time is
    left out, so this is the overhead within one request, free of the noise between two requests)."""
    from melanoma_ml.monitoring.prediction_log import log_served_prediction

    start = time.perf_counter()
    pending = log.hash_soon(str(path))
    submitted = time.perf_counter()
    prediction = service.predict(request)  # the upload's forward pass; the log hashes ``path`` meanwhile
    answered = time.perf_counter()
    log_served_prediction(log, prediction, str(path), pending)
    return (submitted - start) + (time.perf_counter() - answered)


if __name__ == "__main__":
    main()
