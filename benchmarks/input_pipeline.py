"""Would the input pipeline starve the model? Loader img/s per worker count next to training-step img/s.

Input pipeline: the training ``DataLoader`` exactly as ``train_fold`` builds it (``make_loader``): rows
read from the pre-resize uint8 memmap cache, the train augmentation (``train_transform``: flips, affine,
colour jitter, coarse dropout, normalisation), collate into batches; for 0, 1, ... ``--max-workers``
workers. Data: synthetic dermoscopy-like images generated at ``--source-px`` (512) into a temp folder and
cached at ``--size`` (256), as ``prepare_source``/``build_cache`` do.

Model: one training step (forward, focal loss, backward, Adam step) of the project network (timm
``--backbone`` + metadata MLP, random init) on random batches of ``--batch-size`` at ``--size``: fp32 and
bf16 autocast on the CPU, and on CUDA when present (channels-last there, as ``training.channels_last:
auto`` does).

The verdict compares each worker count's loader img/s with each model row's img/s: below 1x the model
waits for data. The two are measured apart: on a machine whose loader workers and model share the same
few CPU cores (a CPU-only fit), the combined rate is lower than either.

Usage::

    .venv/bin/python benchmarks/input_pipeline.py [--max-workers N] [--images 192] [--batches 24]
        [--model-steps 5] [--backbone efficientnet_b0] [--no-cpu-model]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from melanoma_ml.runtime import quiet_network_chatter  # noqa: E402  (before albumentations loads)

quiet_network_chatter()
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import machine_load  # noqa: E402

from melanoma_ml.config import AugmentationConfig, ModelConfig, TrainingConfig, load_config  # noqa: E402
from melanoma_ml.images.cache import ImageCache  # noqa: E402
from melanoma_ml.images.transforms import train_transform  # noqa: E402
from melanoma_ml.model import build_model, normalization_for  # noqa: E402
from melanoma_ml.pipeline import build_cache, clean_source, prepare_source  # noqa: E402
from melanoma_ml.training.data import MelanomaDataset, make_loader  # noqa: E402
from melanoma_ml.training.hardware import usable_cpus  # noqa: E402
from melanoma_ml.training.losses import build_loss  # noqa: E402

N_META = 12
"""Width of the random metadata vectors (about what age + sex + site one-hot encode to)."""


@dataclass(frozen=True)
class ModelRow:
    device: str
    precision: str
    channels_last: bool
    images_per_second: float

    @property
    def label(self) -> str:
        return f"{self.device} {self.precision}{' NHWC' if self.channels_last else ''}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-workers", type=int, default=min(usable_cpus(), 8))
    parser.add_argument("--images", type=int, default=192, help="synthetic images to generate and cache")
    parser.add_argument("--source-px", type=int, default=512, help="side of the generated originals")
    parser.add_argument("--size", type=int, default=256, help="cache and training side")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=24, help="timed loader batches per worker count")
    parser.add_argument("--model-steps", type=int, default=5, help="timed training steps per model row")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed training steps before those")
    parser.add_argument("--backbone", default="efficientnet_b0")
    parser.add_argument("--no-cpu-model", action="store_true", help="skip the CPU model rows (slow)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the data here (default: a temp dir)")
    return parser.parse_args(argv)


def synthetic_cache(workdir: Path, n_images: int, source_px: int, size: int) -> ImageCache:
    """Generate ``n_images`` synthetic originals of ``source_px`` and cache them at ``size``."""
    config = load_config(
        "demo",
        {
            "artifact_root": str(workdir / "artifacts"),
            "data": {
                "image_size": size,
                "test_fraction": 0.0,
                "synthetic": {
                    "n_patients": max(2, n_images // 2),
                    "images_per_patient": (2, 2),
                    "image_size": source_px,
                },
            },
        },
    )
    clean = clean_source(config, prepare_source(config)).clean
    return build_cache(config, clean)


def loader_images_per_second(
    cache: ImageCache, workers: int, batch_size: int, batches: int, seed: int = 0
) -> float:
    """Images per second the training loader yields with ``workers`` (after its first batch)."""
    normalisation = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}  # timm ImageNet defaults
    n = cache.n_images
    rng = np.random.default_rng(seed)
    dataset = MelanomaDataset(
        cache.array(),
        np.arange(n),
        rng.normal(size=(n, N_META)).astype(np.float32),
        (np.arange(n) % 5 == 0).astype(np.float32),
        train_transform(
            cache.size, AugmentationConfig(), normalisation["mean"], normalisation["std"], seed=seed
        ),
    )
    training = TrainingConfig(batch_size=batch_size, num_workers=workers, accelerator="cpu", seed=seed)
    loader = make_loader(dataset, training, shuffle=True)

    def endless(batches_of: torch.utils.data.DataLoader):
        while True:
            yield from batches_of

    stream = endless(loader)
    next(stream)  # worker start-up and the first batch are not throughput
    images = 0
    started = time.perf_counter()
    for _ in range(batches):
        images += int(next(stream)[0].shape[0])
    return images / (time.perf_counter() - started)  # returning drops the loader and stops its workers


def model_images_per_second(
    backbone: str,
    device: str,
    precision: str,
    channels_last: bool,
    size: int,
    batch_size: int,
    steps: int,
    warmup_steps: int = 2,
) -> float:
    """Images per second of full training steps (forward, loss, backward, Adam) on random batches."""
    torch.manual_seed(0)
    net = build_model(ModelConfig(backbone=backbone, pretrained=False, meta_hidden=[128, 64]), N_META)
    normalization_for(net.backbone)  # the same lookup train_fold does; fails early on an odd backbone
    memory = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(device=device, memory_format=memory).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    criterion = build_loss(TrainingConfig())
    image = torch.randn(batch_size, 3, size, size, device=device).contiguous(memory_format=memory)
    metadata = torch.randn(batch_size, N_META, device=device)
    target = (torch.arange(batch_size, device=device) % 5 == 0).float()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def step() -> None:
        with torch.autocast(device_type=device, dtype=dtype, enabled=precision == "bf16"):
            logits = net(image, metadata)
        loss = criterion(logits.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup_steps):  # allocator, cuDNN autotuning, oneDNN primitive caches
        step()
    sync()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps * batch_size / (time.perf_counter() - started)


def model_rows(args: argparse.Namespace) -> list[ModelRow]:
    plans: list[tuple[str, str, bool]] = []
    if not args.no_cpu_model:
        plans += [("cpu", "fp32", False), ("cpu", "bf16", False)]
    if torch.cuda.is_available():
        plans += [("cuda", "fp32", True), ("cuda", "bf16", True)]
    rows = []
    for device, precision, channels_last in plans:
        steps = args.model_steps if device == "cpu" else max(args.model_steps, 30)
        rate = model_images_per_second(
            args.backbone,
            device,
            precision,
            channels_last,
            args.size,
            args.batch_size,
            steps,
            args.warmup_steps,
        )
        rows.append(ModelRow(device, precision, channels_last, rate))
        print(f"  model {device} {precision}: {rate:.1f} img/s", flush=True)
    return rows


def report(loader_rates: dict[int, float], models: list[ModelRow]) -> str:
    """Markdown: loader img/s per worker count, each model row's img/s, and the ratio with a verdict."""
    header = [
        "loader workers",
        "loader img/s",
        *(f"vs {m.label} ({m.images_per_second:.2g} img/s)" for m in models),
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for workers, rate in loader_rates.items():
        cells = [str(workers), f"{rate:.0f}"]
        for model in models:
            ratio = rate / model.images_per_second
            cells.append(f"{ratio:.1f}x {'starves' if ratio < 1 else 'keeps up'}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load = os.getloadavg()
    print(
        f"{platform.processor() or platform.machine()}, usable CPUs {usable_cpus()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), CUDA: "
        f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}; "
        f"load average at start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="input-pipeline-") as tmp:
        workdir = args.workdir or Path(tmp)
        started = time.perf_counter()
        cache = synthetic_cache(workdir, args.images, args.source_px, args.size)
        print(
            f"{cache.n_images} synthetic {args.source_px} px images cached at {cache.size} px in "
            f"{time.perf_counter() - started:.1f} s",
            flush=True,
        )
        loader_rates: dict[int, float] = {}
        for workers in range(args.max_workers + 1):
            loader_rates[workers] = loader_images_per_second(cache, workers, args.batch_size, args.batches)
            print(f"  loader, {workers} workers: {loader_rates[workers]:.1f} img/s", flush=True)
    models = model_rows(args)
    load = os.getloadavg()
    print(f"load average at end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}\n")
    print(
        f"{args.backbone} + metadata MLP, {args.size} px, batch {args.batch_size}; loader = memmap cache "
        "read + train augment + collate\n"
    )
    print(report(loader_rates, models))


if __name__ == "__main__":
    with machine_load():
        main()
