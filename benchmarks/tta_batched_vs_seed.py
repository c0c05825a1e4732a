"""8-view TTA latency: one batched forward pass (melanoma_ml.serving.inference) vs the seed project's loop.

The seed project made each TTA view with PIL (flips/rotations of the PIL image), ran torchvision
Resize/CenterCrop/ToTensor/Normalize on each view and called the network once per view (batch 1, plain
NCHW weights, ``torch.no_grad``). Ours preprocesses once, makes the 8 dihedral views with tensor ops and
runs them as ONE channels-last forward pass under ``torch.inference_mode``.

Random weights (``pretrained=False``) and random 600x450 RGB images: latency does not depend on either.

Usage::

    .venv/bin/python benchmarks/tta_batched_vs_seed.py [--repeats 7] [--batch-images 8] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from melanoma_ml.config import ModelConfig
from melanoma_ml.features import MetadataEncoder
from melanoma_ml.model import normalization_for
from melanoma_ml.serving.bundle import Bundle
from melanoma_ml.serving.inference import predict
from melanoma_ml.spec import ModelSpec

CASES = [("test_efficientnet", 64), ("efficientnet_b0", 256)]
ORIGINAL_SHAPE = (450, 600, 3)
META = {"age": 55, "sex": "male", "site": "torso"}
SEED_VIEWS: list[Callable[[Image.Image], Image.Image]] = [
    lambda im: im,
    lambda im: im.transpose(Image.Transpose.ROTATE_90),
    lambda im: im.transpose(Image.Transpose.ROTATE_180),
    lambda im: im.transpose(Image.Transpose.ROTATE_270),
    lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    lambda im: im.transpose(Image.Transpose.ROTATE_90).transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    lambda im: im.transpose(Image.Transpose.ROTATE_180).transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    lambda im: im.transpose(Image.Transpose.ROTATE_270).transpose(Image.Transpose.FLIP_LEFT_RIGHT),
]


def build_bundle(backbone: str, size: int) -> Bundle:
    encoder = MetadataEncoder(
        age_mean=50.0, age_std=15.0, sexes=("female", "male"), sites=("head/neck", "torso")
    )
    network = ModelConfig(backbone=backbone, meta_hidden=[128, 64], meta_dropout=0.3, head_dropout=0.3)
    draft = ModelSpec(network, size, [0.5] * 3, [0.5] * 3, encoder)
    net = draft.build_network()
    spec = replace(draft, **normalization_for(net.backbone))
    net = net.eval().requires_grad_(False).to(memory_format=torch.channels_last)
    return Bundle(path=Path("benchmark"), net=net, spec=spec, manifest={}, threshold=0.5, version=backbone)


def seed_predict(net: torch.nn.Module, spec: ModelSpec, image: np.ndarray, meta: torch.Tensor) -> float:
    """The seed project's TTA: 8 PIL views, each preprocessed and run as its own forward pass."""
    to_input = transforms.Compose(
        [
            transforms.Resize(spec.image_size),
            transforms.CenterCrop(spec.image_size),
            transforms.ToTensor(),
            transforms.Normalize(spec.mean, spec.std),
        ]
    )
    pil = Image.fromarray(image)
    probabilities = []
    with torch.no_grad():
        for make_view in SEED_VIEWS:
            x = to_input(make_view(pil)).unsqueeze(0)
            probabilities.append(torch.sigmoid(net(x, meta)).item())
    return float(np.mean(probabilities))


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):  # warm-up (allocator, oneDNN kernel selection)
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_case(backbone: str, size: int, images: list[np.ndarray], repeats: int) -> dict[str, float]:
    """Milliseconds per image for the seed loop, a 1-image request and a batched request."""
    bundle = build_bundle(backbone, size)
    seed_net = copy.deepcopy(bundle.net).to(memory_format=torch.contiguous_format)
    meta = torch.from_numpy(bundle.spec.encoder.encode_one(**META)[None])
    seed_ms = 1000 * median_seconds(lambda: seed_predict(seed_net, bundle.spec, images[0], meta), repeats)
    one_ms = 1000 * median_seconds(lambda: predict(bundle, images[:1], [META]), repeats)
    batch_s = median_seconds(lambda: predict(bundle, images, [META] * len(images)), repeats)
    gap = abs(
        seed_predict(seed_net, bundle.spec, images[0], meta) - float(predict(bundle, images[:1], [META])[0])
    )
    return {"seed_ms": seed_ms, "one_ms": one_ms, "batch_ms": 1000 * batch_s / len(images), "gap": gap}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch-images", type=int, default=8, help="images per request in the batched row")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, ORIGINAL_SHAPE, dtype=np.uint8) for _ in range(args.batch_images)]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
        f"{os.getloadavg()[0]:.2f}, originals {ORIGINAL_SHAPE[1]}x{ORIGINAL_SHAPE[0]}, "
        f"median of {args.repeats} (ms per image)"
    )
    header = f"{'model':<18}{'px':>5}{'seed 8x1 passes':>17}{'ours 1 image':>14}{'ours batch':>12}{'speed-up':>10}{'|dp|':>10}"
    print(header)
    print("-" * len(header))
    for backbone, size in CASES:
        row = measure_case(backbone, size, images, args.repeats)
        print(
            f"{backbone:<18}{size:>5}{row['seed_ms']:>17.1f}{row['one_ms']:>14.1f}{row['batch_ms']:>12.1f}"
            f"{row['seed_ms'] / row['one_ms']:>9.2f}x{row['gap']:>10.1e}"
        )
    print(
        f"speed-up = seed / ours for a 1-image request; 'ours batch' = per image in a {args.batch_images}-image "
        "request; |dp| = probability gap between the two (resampling differs: torchvision bilinear vs the "
        "cache's Lanczos)"
    )


if __name__ == "__main__":
    main()
