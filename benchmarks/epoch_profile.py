"""Where one CPU training epoch goes: data, forward, backward, optimizer step and Lightning's own overhead.

For each ``--models`` entry (timm name and image size, ``pretrained=False``) on a few hundred synthetic
dermoscopy images, one training epoch is timed twice with the same network, loader, loss, metrics and
optimizer (``MelanomaModule``'s own objects):

* a plain PyTorch loop, split into data (cache read + augmentation + collate, in-process: no loader
  workers), forward (network + loss), backward, optimizer step and the torchmetrics update;
* ``Trainer.fit`` for one epoch, set up as ``train_fold`` sets it up (deterministic="warn", the
  TensorBoard logger, no validation). ``gap`` = Lightning fit wall / plain loop wall - 1.

Every ``--variants`` entry (default: fp32, bf16 autocast and fp32 channels-last) is measured in the same
invocation, the variants' epochs interleaved (epoch 1 of each, then epoch 2 of each, ...) so load drift hits
them alike, and each variant's train img/s is printed as a ratio against the fp32 NCHW row of this same run.
Last, the epoch's data time with the pre-resized uint8 cache vs decoding the originals
(``--original-size`` px JPEGs, ISIC-like) with ``load_resized`` every epoch.

    python benchmarks/epoch_profile.py
    python benchmarks/epoch_profile.py --models efficientnet_b0:128 --repeat 2 --skip-decode
    python benchmarks/epoch_profile.py --variants 32-true 32-true+CL
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
from _common import machine_load
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, Dataset

from melanoma_ml import schema
from melanoma_ml.config import PipelineConfig, SyntheticConfig, load_config
from melanoma_ml.features import MetadataEncoder
from melanoma_ml.images.cache import ImageCache, build_image_cache, load_resized, resize_centre_crop
from melanoma_ml.images.io import load_rgb
from melanoma_ml.images.transforms import train_transform
from melanoma_ml.metadata.layouts import load_dataset
from melanoma_ml.model import build_model, normalization_for
from melanoma_ml.synthetic import generate_synthetic_dataset
from melanoma_ml.training.data import MelanomaDataset, make_loader
from melanoma_ml.training.module import MelanomaModule

PARTS = ("data", "forward", "backward", "optimizer", "metrics")
FP32 = ("32-true", False)
DEFAULT_VARIANTS = ("32-true", "bf16-mixed", "32-true+CL")
"""``precision[+CL]``: Lightning precision, ``+CL`` for channels-last model and batches."""


def parse_variant(text: str) -> tuple[str, bool]:
    """``"bf16-mixed+CL"`` -> ``("bf16-mixed", True)``."""
    precision, plus, flag = text.partition("+")
    if plus and flag != "CL":
        raise argparse.ArgumentTypeError(
            f"variant {text!r}: write precision or precision+CL, e.g. 32-true+CL"
        )
    return precision, bool(plus)


def variant_name(variant: tuple[str, bool]) -> str:
    return variant[0] + (" +CL" if variant[1] else "")


@dataclass
class Setup:
    """One model at one size: its config, training dataset and an identically seeded network factory."""

    backbone: str
    size: int
    config: PipelineConfig
    dataset: MelanomaDataset
    n_meta: int

    def module(self) -> MelanomaModule:
        L.seed_everything(self.config.training.seed, verbose=False)
        net = build_model(self.config.model_for(self.backbone), self.n_meta)
        return MelanomaModule(net, self.config.training)

    def with_hardware(self, precision: str, channels_last: bool) -> PipelineConfig:
        return self.config.model_copy(
            update={
                "training": self.config.training.model_copy(
                    update={"precision": precision, "channels_last": channels_last}
                )
            }
        )


@contextmanager
def _deterministic_warn() -> Iterator[None]:
    """What ``Trainer(deterministic="warn")`` sets, for the plain loop too (undone afterwards)."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _optimizer(module: MelanomaModule) -> torch.optim.Optimizer:
    configured = module.configure_optimizers()
    return configured["optimizer"] if isinstance(configured, dict) else configured


def plain_epoch(
    setup: Setup, precision: str, channels_last: bool, max_batches: int | None = None
) -> dict[str, float]:
    """One epoch (or its first ``max_batches``) in a plain loop; seconds per part, ``wall``, ``images``."""
    config = setup.with_hardware(precision, channels_last)
    module = setup.module()
    net = module.net.to(memory_format=torch.channels_last) if channels_last else module.net
    net.train()
    optimizer = _optimizer(module)
    loader = make_loader(setup.dataset, config.training, shuffle=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision.startswith("bf16") else nullcontext()
    times = dict.fromkeys(PARTS, 0.0)
    images = 0
    with _deterministic_warn():
        started = time.perf_counter()
        batches = iter(loader)
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None) if max_batches is None or max_batches > 0 else None
            if batch is None:
                times["data"] += time.perf_counter() - t0
                break
            image, metadata, target = batch
            t1 = time.perf_counter()
            with autocast:
                logits = net(image, metadata)
                loss = module.criterion(logits.float(), target.float())
            t2 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            t3 = time.perf_counter()
            optimizer.step()
            t4 = time.perf_counter()
            module.train_metrics.update(torch.sigmoid(logits.detach().float()), target.int())
            t5 = time.perf_counter()
            for part, seconds in zip(PARTS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
                times[part] += seconds
            images += len(target)
            max_batches = None if max_batches is None else max_batches - 1
        module.train_metrics.compute()
        times["wall"] = time.perf_counter() - started
    times["images"] = images
    return times


class _EpochClock(L.Callback):
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds = time.perf_counter() - self.started


def lightning_epoch(setup: Setup, precision: str, channels_last: bool, log_dir: Path) -> dict[str, float]:
    """One epoch of ``Trainer.fit`` as ``train_fold`` configures it; ``wall`` (whole fit) and ``epoch``."""
    config = setup.with_hardware(precision, channels_last)
    module = setup.module()
    if channels_last:
        module.net.to(memory_format=torch.channels_last)
    clock = _EpochClock()
    loader = make_loader(setup.dataset, config.training, shuffle=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = L.Trainer(
            max_epochs=1,
            accelerator="cpu",
            devices=1,
            precision=precision,
            callbacks=[clock],
            logger=TensorBoardLogger(log_dir, name="logs", default_hp_metric=False),
            log_every_n_steps=1,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            deterministic="warn",
        )
        started = time.perf_counter()
        trainer.fit(module, train_dataloaders=loader)
        wall = time.perf_counter() - started
    torch.use_deterministic_algorithms(False)
    return {"wall": wall, "epoch": clock.seconds, "images": len(loader.dataset)}


def _best(runs: list[dict[str, float]]) -> dict[str, float]:
    return min(runs, key=lambda run: run["wall"])


class DecodingDataset(Dataset):
    """The same items as ``MelanomaDataset``, but each image decoded from its original file every time:
    with ``load_resized`` (reduced-scale JPEG decode, the cache's own path) or, ``full=True``, a full-size
    decode then the same resize (what a loader without either does)."""

    def __init__(self, paths: list[str], size: int, dataset: MelanomaDataset, *, full: bool = False) -> None:
        self.paths, self.size, self.dataset, self.full = paths, size, dataset, full

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        path = self.paths[self.dataset.rows[index]]
        pixels = resize_centre_crop(load_rgb(path), self.size) if self.full else load_resized(path, self.size)
        image = self.dataset.transform(image=pixels)["image"]
        return (
            image,
            torch.from_numpy(self.dataset.metadata[index]),
            torch.tensor(self.dataset.targets[index]),
        )


def data_epoch_seconds(dataset: Dataset, batch_size: int) -> float:
    """One pass over a shuffled in-process loader (read + augment + collate), nothing else."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0)
    started = time.perf_counter()
    for _batch in loader:
        pass
    return time.perf_counter() - started


def build_setup(backbone: str, size: int, table: pd.DataFrame, root: Path, batch_size: int) -> Setup:
    config = load_config(
        "demo",
        {
            "data": {"image_size": size},
            "model": {"backbone": backbone, "pretrained": False},
            "training": {"batch_size": batch_size, "num_workers": 0, "accelerator": "cpu", "devices": 1},
        },
    )
    cache: ImageCache = build_image_cache(table, root / f"cache-{size}", size, workers=2)
    encoder = MetadataEncoder.fit(table)
    norm = normalization_for(build_model(config.model_for(backbone), encoder.n_features).backbone)
    dataset = MelanomaDataset(
        cache.array(),
        cache.rows_for(table[schema.IMAGE]),
        encoder.transform(table),
        table[schema.TARGET].to_numpy(),
        train_transform(size, config.training.augmentation, norm["mean"], norm["std"], seed=0),
    )
    return Setup(backbone, size, config, dataset, encoder.n_features)


def _timed(label: str, fn: Callable[[], Any]) -> Any:
    started = time.perf_counter()
    value = fn()
    print(f"  ({label}: {time.perf_counter() - started:.0f} s)", flush=True)
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="test_efficientnet:64,efficientnet_b0:128", help="name:px,...")
    parser.add_argument("--patients", type=int, default=100, help="synthetic patients, 2-4 images each")
    parser.add_argument("--original-size", type=int, default=1024, help="side of the generated originals")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--variants",
        nargs="+",
        type=parse_variant,
        default=[parse_variant(v) for v in DEFAULT_VARIANTS],
        help="precision[+CL] per variant, all measured in this run against its 32-true row "
        f"(default: {' '.join(DEFAULT_VARIANTS)})",
    )
    parser.add_argument("--repeat", type=int, default=2, help="best of this many epochs per side")
    parser.add_argument(
        "--data-dir", type=Path, help="keep/reuse the synthetic originals here (else a temp dir)"
    )
    parser.add_argument("--data-only", action="store_true", help="only the cache vs decode data times")
    parser.add_argument("--skip-decode", action="store_true", help="skip cache vs decode-every-epoch")
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no per-Trainer "GPU available" chatter

    variants = [FP32] + [v for v in dict.fromkeys(args.variants) if v != FP32]  # the baseline first, once
    models = [(name, int(px)) for name, px in (item.split(":") for item in args.models.split(","))]
    with tempfile.TemporaryDirectory(prefix="epoch-profile-") as tmp:
        root = Path(tmp)
        synthetic = SyntheticConfig(
            n_patients=args.patients, images_per_patient=(2, 4), image_size=args.original_size
        )
        data_dir = args.data_dir or root / "synthetic"  # generate_synthetic_dataset reuses a matching one
        made = _timed("synthetic data", lambda: generate_synthetic_dataset(data_dir, synthetic))
        table = load_dataset(made.root, hash_images=False).clean.reset_index(drop=True)
        print(
            f"{len(table)} training images ({args.original_size} px synthetic JPEG originals), batch "
            f"{args.batch_size}, torch {torch.__version__}, CPU threads {torch.get_num_threads()}, "
            f"cpu capability {torch.backends.cpu.get_cpu_capability()}",
            flush=True,
        )
        header = (
            f"{'model':<18}{'px':>4} {'variant':<18}"
            + "".join(f"{part:>14}" for part in PARTS)
            + f"{'plain s':>9}{'img/s':>7} |{'fit s':>7}{'epoch s':>8}{'img/s':>7}{'gap':>7}"
        )
        rows, speed = [], {}
        setups = {}
        for backbone, size in models:
            setup = setups[(backbone, size)] = build_setup(backbone, size, table, root, args.batch_size)
            measured = [] if args.data_only else variants
            for precision, channels_last in measured:
                plain_epoch(setup, precision, channels_last, max_batches=2)  # warm-up: oneDNN kernels
            plain: dict[tuple[str, bool], list] = {v: [] for v in measured}
            fit: dict[tuple[str, bool], list] = {v: [] for v in measured}
            for attempt in range(args.repeat):  # interleaved: each variant's k-th epoch close in time
                for precision, channels_last in measured:
                    log_dir = root / f"tb-{attempt}"
                    plain[(precision, channels_last)].append(plain_epoch(setup, precision, channels_last))
                    fit[(precision, channels_last)].append(
                        lightning_epoch(setup, precision, channels_last, log_dir)
                    )
            for variant in measured:
                p, f = _best(plain[variant]), _best(fit[variant])
                name = variant_name(variant)
                speed[(backbone, size, name)] = (p["images"] / p["wall"], f["images"] / f["wall"])
                rows.append(
                    f"{backbone:<18}{size:>4} {name:<18}"
                    + "".join(f"{p[part]:>7.2f} ({100 * p[part] / p['wall']:>2.0f}%)" for part in PARTS)
                    + f"{p['wall']:>9.2f}{p['images'] / p['wall']:>7.1f} |{f['wall']:>7.2f}{f['epoch']:>8.2f}"
                    f"{f['images'] / f['wall']:>7.1f}{100 * (f['wall'] / p['wall'] - 1):>+6.1f}%"
                )
                print(rows[-1], flush=True)
        print(f"\nbest of {args.repeat} epochs per side (s = seconds in the epoch; % of the plain loop wall)")
        print(header)
        print("\n".join(rows))
        if not args.data_only:
            print("\ntrain img/s of each variant / the 32-true row of this same run:")
            for backbone, size in models:
                base = speed[(backbone, size, "32-true")]
                for variant in variants:
                    name = variant_name(variant)
                    plain_rate, fit_rate = speed[(backbone, size, name)]
                    print(
                        f"  {backbone:<18}{size:>4} px  {name:<14} plain {plain_rate:6.1f} img/s "
                        f"({plain_rate / base[0]:.2f}x)   lightning fit {fit_rate:6.1f} img/s ({fit_rate / base[1]:.2f}x)"
                    )
        if not args.skip_decode:
            print(f"\nepoch data time (read + augment + collate), {len(table)} images, in-process:")
            paths = table[schema.IMAGE_PATH].astype(str).tolist()
            for (_backbone, size), setup in setups.items():
                cached = min(data_epoch_seconds(setup.dataset, args.batch_size) for _ in range(args.repeat))
                line = f"  {size:>4} px: cache {cached:6.2f} s ({len(table) / cached:6.1f} img/s)"
                for label, full in (("reduced-scale decode", False), ("full decode", True)):
                    decoding = DecodingDataset(paths, size, setup.dataset, full=full)
                    seconds = min(data_epoch_seconds(decoding, args.batch_size) for _ in range(args.repeat))
                    line += f" | {label} {seconds:6.2f} s: cache {seconds / cached:4.1f}x faster"
                print(line, flush=True)


if __name__ == "__main__":
    with machine_load():
        main()
