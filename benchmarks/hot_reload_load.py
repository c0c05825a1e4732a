"""Requests under load while the registry pointer moves: N client threads call predict while a background
thread promotes and rolls back versions every ``--swap-every`` seconds.

What it shows: how many requests failed during hot reloads (the service's promise is none), the latency
distribution while models are loaded beside the served one, and which versions answered. The in-process
``ModelService`` is always measured; ``--client`` adds the same load through a live app on 127.0.0.1 via
``gradio_client`` (loopback only).

Bundles are tiny random-weight ``test_efficientnet`` networks (``_common.random_bundle``) in a
temporary folder that is removed afterwards. Bounded: at most ``--requests`` requests per phase and
``--seconds`` seconds per phase; it stops by itself.

Usage::

    .venv/bin/python benchmarks/hot_reload_load.py [--clients 4] [--requests 400] [--seconds 20]
        [--swap-every 0.5] [--versions 3] [--cam none] [--client]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import launch_local, machine_load, percentiles, random_bundle, upload  # noqa: E402

from melanoma_ml.runtime import quiet_network_chatter  # noqa: E402

quiet_network_chatter()  # gradio analytics off unless the user set GRADIO_ANALYTICS_ENABLED


@dataclass
class Tally:
    """What the client threads saw (appended under ``lock``)."""

    seconds: list[float] = field(default_factory=list)
    versions: Counter = field(default_factory=Counter)
    failures: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def requests(self) -> int:
        return len(self.seconds) + sum(self.failures.values())


def swap_pointer(
    registry, versions: list[str], every: float, stop: threading.Event, moves: list[str]
) -> None:
    """Alternate promote (forward) and rollback --to (backward) through ``versions`` until ``stop``."""
    step = 0
    while not stop.wait(every):
        step += 1
        target = versions[step % len(versions)]
        if target == registry.current():
            continue
        if step % 2:
            registry.promote(target, reason="hot reload benchmark")
        else:
            registry.rollback(to=target, reason="hot reload benchmark")
        moves.append(target)


def run_phase(
    name: str, call: Callable[[], str], registry, versions: list[str], args: argparse.Namespace
) -> None:
    """``args.clients`` threads run ``call`` (returns the answering version) while the pointer moves."""
    tally, stop, budget = Tally(), threading.Event(), threading.Semaphore(args.requests)

    def client() -> None:
        while not stop.is_set() and budget.acquire(blocking=False):
            started = time.perf_counter()
            try:
                version = call()
            except Exception as exc:  # counted and reported: a failed request is the measurement
                with tally.lock:
                    tally.failures[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1
                continue
            with tally.lock:
                tally.seconds.append(time.perf_counter() - started)
                tally.versions[version] += 1

    moves: list[str] = []
    swapper = threading.Thread(target=swap_pointer, args=(registry, versions, args.swap_every, stop, moves))
    workers = [threading.Thread(target=client) for _ in range(args.clients)]
    started = time.perf_counter()
    swapper.start()
    for worker in workers:
        worker.start()
    deadline = started + args.seconds
    for worker in workers:
        worker.join(max(0.0, deadline - time.perf_counter()))
    stop.set()
    for thread in [*workers, swapper]:
        thread.join(60)
    wall = time.perf_counter() - started
    p50, p95 = percentiles(tally.seconds) if tally.seconds else (float("nan"), float("nan"))
    print(
        f"{name}: {tally.requests} requests in {wall:.1f} s by {args.clients} clients, "
        f"{sum(tally.failures.values())} failed; p50 {p50:.1f} ms, p95 {p95:.1f} ms; "
        f"{len(moves)} pointer moves; versions seen {dict(sorted(tally.versions.items()))}"
    )
    for failure, count in tally.failures.most_common(5):
        print(f"  {count} x {failure}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4, help="concurrent client threads")
    parser.add_argument("--requests", type=int, default=400, help="most requests per phase")
    parser.add_argument("--seconds", type=float, default=20.0, help="most seconds per phase")
    parser.add_argument("--swap-every", type=float, default=0.5, help="seconds between pointer moves")
    parser.add_argument("--versions", type=int, default=3, help="versions to move between (>= 2)")
    parser.add_argument(
        "--cam", default="none", choices=["none", "gradcam", "eigencam"], help="CAM per request"
    )
    parser.add_argument("--client", action="store_true", help="also load a live app on 127.0.0.1")
    args = parser.parse_args(argv)
    if args.versions < 2:
        parser.error("--versions must be at least 2 to move the pointer")

    with tempfile.TemporaryDirectory(prefix="hot_reload_load-") as tmp:
        work = Path(tmp)
        os.environ["GRADIO_TEMP_DIR"] = str(work / "gradio")
        from melanoma_ml.config import ServingConfig
        from melanoma_ml.serving.registry import ModelRegistry
        from melanoma_ml.serving.service import ModelService, PredictionRequest

        registry = ModelRegistry(work / "model-registry")
        versions = [
            random_bundle(registry.root, "test_efficientnet", 64, seed=seed, meta_hidden=(8,))
            for seed in range(args.versions)
        ]
        registry.rollback(to=versions[0], reason="hot reload benchmark start")
        image = upload(work / "lesion.jpg")
        serving = ServingConfig(views=1, concurrency_limit=args.clients)
        service = ModelService(registry, serving)
        request = PredictionRequest(image=image, age=55, sex="male", site="torso", cam_method=args.cam)
        service.predict(request)  # warm-up: first load outside the timings
        print(
            f"{args.versions} tiny test_efficientnet bundles, pointer moved every {args.swap_every} s, "
            f"CAM {args.cam}, TTA off, CPU threads {_torch_threads()}"
        )
        run_phase(
            "ModelService.predict", lambda: service.predict(request).model_version, registry, versions, args
        )

        if args.client:
            from gradio_client import Client, handle_file

            from melanoma_ml.serving.app import create_app

            demo = create_app(service)
            url = launch_local(demo, serving)
            clients = threading.local()

            def via_app() -> str:
                if not hasattr(clients, "client"):  # one client per thread
                    clients.client = Client(url, verbose=False, download_files=str(work / "dl"))
                answer = clients.client.predict(
                    handle_file(str(image)), "55", "male", "torso", False, args.cam, None, api_name="/predict"
                )
                return answer[0]["model_version"]

            try:
                run_phase(f"gradio_client on {url}", via_app, registry, versions, args)
            finally:
                demo.close()


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    with machine_load():
        main()
