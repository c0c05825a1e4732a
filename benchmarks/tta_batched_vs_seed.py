"""8-view TTA latency: one batched forward pass (melanoma_ml.serving.inference) vs the seed project's loop.

The seed project made each TTA view with PIL (flips/rotations of the PIL image), ran torchvision
Resize/CenterCrop/ToTensor/Normalize on each view and called the network once per view (batch 1, plain
NCHW weights, ``torch.no_grad``). Ours preprocesses once, makes the 8 dihedral views with tensor ops and
runs them as ONE channels-last forward pass under ``torch.inference_mode``.

Random weights (``pretrained=False``, a one-network bundle registered and loaded as the app loads it, torch
runtime) and random 600x450 RGB images: latency does not depend on either. The seed loop is
``_common.seed_loop_predict``, the same one ``roofline.py`` times.

Usage::

    .venv/bin/python benchmarks/tta_batched_vs_seed.py [--repeats 7] [--batch-images 8] [--threads N]
        [--models test_efficientnet efficientnet_b0]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from _common import loaded_random_bundle, machine_load, median_seconds, seed_loop_net, seed_loop_predict

from melanoma_ml.serving.inference import predict

CASES = {"test_efficientnet": 64, "efficientnet_b0": 256}
ORIGINAL_SHAPE = (450, 600, 3)
META = {"age": 55, "sex": "male", "site": "torso"}
SITES = ("head/neck", "torso")


def measure_case(
    backbone: str, size: int, images: list[np.ndarray], repeats: int, workdir: Path
) -> dict[str, float]:
    """Milliseconds per image for the seed loop, a 1-image request and a batched request."""
    bundle = loaded_random_bundle(workdir, backbone, size, sites=SITES)
    seed_net = seed_loop_net(bundle.net)
    meta = torch.from_numpy(bundle.spec.encoder.encode_one(**META)[None])
    seed_ms = 1000 * median_seconds(
        lambda: seed_loop_predict(seed_net, bundle.spec, images[0], meta), repeats
    )
    one_ms = 1000 * median_seconds(lambda: predict(bundle, images[:1], [META]), repeats)
    batch_s = median_seconds(lambda: predict(bundle, images, [META] * len(images)), repeats)
    gap = abs(
        seed_loop_predict(seed_net, bundle.spec, images[0], meta)
        - float(predict(bundle, images[:1], [META])[0])
    )
    return {"seed_ms": seed_ms, "one_ms": one_ms, "batch_ms": 1000 * batch_s / len(images), "gap": gap}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch-images", type=int, default=8, help="images per request in the batched row")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, ORIGINAL_SHAPE, dtype=np.uint8) for _ in range(args.batch_images)]
    with machine_load():
        run(args, images)


def run(args: argparse.Namespace, images: list[np.ndarray]) -> None:
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, originals "
        f"{ORIGINAL_SHAPE[1]}x{ORIGINAL_SHAPE[0]}, median of {args.repeats} after 3 warm-up calls (ms per image); "
        "seed loop: _common.seed_loop_predict (also roofline.py's)"
    )
    header = f"{'model':<18}{'px':>5}{'seed 8x1 passes':>17}{'ours 1 image':>14}{'ours batch':>12}{'speed-up':>10}{'|dp|':>10}"
    print(header)
    print("-" * len(header))
    for backbone in args.models:
        size = CASES[backbone]
        with tempfile.TemporaryDirectory(prefix="tta-batched-") as tmp:
            row = measure_case(backbone, size, images, args.repeats, Path(tmp))
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
