"""Image cache build throughput: images read from an HDF5 file (ISIC 2024 train-image.hdf5) vs a JPEG folder.

Both sides hold the same JPEG bytes (the synthetic ISIC 2024 set, then each HDF5 entry written out as a
file), are cleaned by the same loader and cached by the same ``build_image_cache`` from a fresh folder, so the
only difference is where the bytes come from. Prints images/s for each and the ratio HDF5 / JPEG folder.

    python benchmarks/hdf5_vs_jpeg_cache.py --patients 100 --size 512 --cache-size 128 --repeat 3
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import h5py
from _common import machine_load

from melanoma_ml import schema
from melanoma_ml.config import SyntheticConfig
from melanoma_ml.images.cache import build_image_cache
from melanoma_ml.metadata.layouts import load_dataset
from melanoma_ml.synthetic_isic2024 import generate_isic2024_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=100)
    parser.add_argument("--size", type=int, default=512, help="side of the generated originals")
    parser.add_argument("--cache-size", type=int, default=128, help="side of the cached images")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = SyntheticConfig(n_patients=args.patients, images_per_patient=(2, 6), image_size=args.size)
        made = generate_isic2024_dataset(root / "isic2024", config)
        folder = root / "jpeg-form"
        images = folder / "train-image" / "image"
        images.mkdir(parents=True)
        shutil.copy(made.csv_path, folder / made.csv_path.name)
        with h5py.File(made.hdf5_path, "r") as store:
            for key in store:
                (images / f"{key}.jpg").write_bytes(store[key][()].tobytes())
        tables = {
            "hdf5": load_dataset(made.root, hash_images=False).clean,
            "jpeg folder": load_dataset(folder, hash_images=False).clean,
        }
        n = len(tables["hdf5"])
        assert tables["jpeg folder"][schema.IMAGE].tolist() == tables["hdf5"][schema.IMAGE].tolist()
        best: dict[str, float] = {}
        for attempt in range(args.repeat):
            for name, table in tables.items():
                cache_dir = root / f"cache-{name.replace(' ', '-')}-{attempt}"
                started = time.perf_counter()
                build_image_cache(table, cache_dir, args.cache_size, workers=args.workers)
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - started)
        print(
            f"{n} images, {args.size} px JPEG originals -> {args.cache_size} px cache, workers={args.workers}, "
            f"best of {args.repeat}"
        )
        for name, seconds in best.items():
            print(f"  {name:<12} {n / seconds:8.1f} img/s  ({seconds:.2f} s)")
        print(f"ratio hdf5 / jpeg folder: {best['jpeg folder'] / best['hdf5']:.2f}x")


if __name__ == "__main__":
    with machine_load():
        main()
