"""CPU roofline for 8-view TTA serving: this CPU's GEMM peak, each model's FLOPs, and how close runtimes get.

For each serving model (project network: timm backbone + metadata MLP, random init) it prints, per
runtime/precision: ms per 8-view TTA batch (the network call only, median), the achieved GFLOP/s and its
fraction of the measured GEMM peak for that precision, the speed-up over eager fp32 measured in the same
run, the speed-up over the seed project's per-view loop (end to end: our preprocessing + 8 views + the
call vs the seed's PIL views and 8 forward passes, ``benchmarks/tta_batched_vs_seed.py``), and the parity:
max |probability difference| vs eager fp32 over every view of ``--parity-images`` real images.

Runtimes: eager fp32 (NCHW), eager fp32 channels-last (what serving runs today), bf16 autocast,
``torch.compile`` (inductor, freezing on), ONNX Runtime CPU fp32 (``melanoma_ml.serving.runtimes``), ONNX
Runtime int8 static PTQ (QDQ, per-channel weights, calibrated on real images disjoint from the parity
images) and, when ``openvino`` is installed, OpenVINO CPU on the fp32 and the int8 ONNX files.

Peaks: best of N large square matmuls with torch, all ``--threads`` threads: fp32, bf16 and int8
(``torch._int_mm``). FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matmuls,
2 per multiply-add) for one view. Real images: ``../shared/data/isic_sample`` (HAM10000, read in place).
Weights are random (``pretrained=False``); the last linear layer is rescaled so eager logits on the parity
images have std 2 (``spread_logits``), else every probability sits at 0.5 and any runtime looks exact.

Usage::

    .venv/bin/python benchmarks/roofline.py [--threads 2] [--repeats 7] [--parity-images 64]
        [--calibration-images 64] [--skip-compile] [--models efficientnet_b0 test_efficientnet]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _common import (
    ISIC_SAMPLE,
    loaded_random_bundle,
    machine_load,
    median_seconds,
    seed_loop_net,
    seed_loop_predict,
)
from torch.utils.flop_counter import FlopCounterMode

from melanoma_ml.atomic import sha256_file
from melanoma_ml.images.io import load_rgb
from melanoma_ml.serving.inference import N_VIEWS, dihedral_views, encode_metadata, preprocess
from melanoma_ml.serving.runtimes import OnnxRunner, export_onnx, max_probability_gap
from melanoma_ml.spec import ModelSpec

DEFAULT_DATA = ISIC_SAMPLE
SIZES = {"efficientnet_b0": 256, "test_efficientnet": 64}
LogitsFn = Callable[[torch.Tensor, torch.Tensor], object]


@dataclass
class Row:
    name: str
    precision: str  # which peak it is measured against: fp32, bf16 or int8
    ms: float | None = None
    gap: float | None = None
    note: str = ""


# ---------------------------------------------------------------- the CPU's peak


def gemm_peak(dtype: torch.dtype, sizes: tuple[int, ...], repeats: int) -> tuple[float, str]:
    """Best GFLOP/s (GOP/s for int8) of square ``n x n @ n x n`` products over ``sizes``."""
    best, detail = 0.0, []
    for n in sizes:
        if dtype == torch.int8:
            a = torch.randint(-128, 128, (n, n), dtype=torch.int8)
            b = torch.randint(-128, 128, (n, n), dtype=torch.int8)
            mm = torch._int_mm  # int8 x int8 -> int32, oneDNN (VNNI where the CPU has it)
        else:
            a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
            mm = torch.mm
        mm(a, b)
        fastest = min(_seconds(lambda a=a, b=b, mm=mm: mm(a, b)) for _ in range(repeats))
        rate = 2 * n**3 / fastest / 1e9
        detail.append(f"n={n}: {rate:.0f}")
        best = max(best, rate)
    return best, ", ".join(detail)


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cpu_flags() -> str:
    """The CPU's bf16/AMX/VNNI flags from /proc/cpuinfo (Linux), to say what bf16 and int8 can use."""
    try:
        flags = next(
            line.split(":", 1)[1].split()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        )
    except (OSError, StopIteration):
        return "unknown (no /proc/cpuinfo)"
    wanted = ["avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"]
    return " ".join(f"{f}={'yes' if f in flags else 'NO'}" for f in wanted)


# ---------------------------------------------------------------- real images


def real_inputs(
    data: Path, spec: ModelSpec, start: int, n: int
) -> tuple[list[np.ndarray], torch.Tensor, torch.Tensor]:
    """``n`` real images from ``start``: decoded originals, their 8 views ``(8n, 3, S, S)`` and metadata."""
    table = pd.read_csv(data / "metadata.csv").iloc[start : start + n]
    if len(table) < n:
        raise SystemExit(f"{data / 'metadata.csv'} has fewer than {start + n} rows; lower --parity-images")
    originals = [load_rgb(data / "images" / f"{name}.jpg") for name in table["image_name"]]
    records = [
        {"age": r.age_approx, "sex": r.sex, "site": r.anatom_site_general_challenge}
        for r in table.itertuples()
    ]
    x = preprocess(originals, spec)
    meta = encode_metadata(records, spec, n)
    views = torch.cat([dihedral_views(x[i : i + 1]) for i in range(n)])  # image-major: 8 views per image
    return originals, views, meta.repeat_interleave(N_VIEWS, dim=0)


def spread_logits(net: torch.nn.Module, views: torch.Tensor, meta: torch.Tensor, std: float = 2.0) -> None:
    """Rescale the random-init head so eager logits on ``views`` have mean 0 and standard deviation ``std``.

    A random-init network puts every probability within ~0.01 of 0.5, where any runtime's error vanishes
    in the sigmoid's flat scale; a trained model's logits spread over several units. Scaling the last
    linear layer scales every runtime's logit error by the same factor, so the parity becomes readable.
    """
    with torch.inference_mode():
        logits = torch.cat([net(views[i : i + 64], meta[i : i + 64]) for i in range(0, views.shape[0], 64)])
    scale = std / float(logits.std())
    linear = net.head[-1]
    with torch.no_grad():
        linear.weight.mul_(scale)
        linear.bias.mul_(scale).sub_(float(logits.mean()) * scale)


# ---------------------------------------------------------------- runtimes


def eager(net: torch.nn.Module, *, channels_last: bool, bf16: bool = False) -> LogitsFn:
    net = copy.deepcopy(net).to(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )

    def run(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            return net(x, m).float()

    return run


def compiled(net: torch.nn.Module, x: torch.Tensor, m: torch.Tensor) -> tuple[LogitsFn, float]:
    """``torch.compile`` (inductor, weights frozen and prepacked for oneDNN); also the compile seconds."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    net = copy.deepcopy(net).to(memory_format=torch.channels_last)
    fn = torch.compile(net, dynamic=False)

    def run(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return fn(x.contiguous(memory_format=torch.channels_last), m)

    seconds = _seconds(lambda: run(x, m))
    return run, seconds


def ort_int8(fp32_path: Path, calibration: tuple[torch.Tensor, torch.Tensor], workdir: Path) -> Path:
    """Static PTQ with ONNX Runtime exactly as a bundle's int8 export does it (``runtimes._quantize_int8``:
    QDQ, uint8 activations with MinMax ranges, per-channel int8 weights), calibrated one TTA batch at a time."""
    from melanoma_ml.serving.runtimes import _quantize_int8

    out = workdir / "int8.onnx"
    out.write_bytes(_quantize_int8(fp32_path, calibration, workdir, batch=N_VIEWS))
    return out


def openvino_runner(path: Path, threads: int) -> tuple[LogitsFn, str]:
    """The library's own OpenVINO runner (``runtimes.OpenVinoRunner``: inference precision pinned to f32, so
    a CPU with native bf16 does not silently run the "fp32" row in bf16)."""
    import openvino as ov

    from melanoma_ml.atomic import sha256_file
    from melanoma_ml.serving.runtimes import OpenVinoRunner

    runner = OpenVinoRunner(path, sha256_file(path), threads=threads)
    precision = runner.model.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    return runner, f"openvino {ov.__version__.split('-')[0]}, inference precision {precision}"


# ---------------------------------------------------------------- one model


def measure_model(backbone: str, args: argparse.Namespace, peaks: dict[str, float]) -> None:
    size = SIZES[backbone]
    with tempfile.TemporaryDirectory(prefix="roofline-bundle-") as tmp:
        bundle = loaded_random_bundle(Path(tmp), backbone, size)
    spec, net = bundle.spec, bundle.net
    originals, views, meta = real_inputs(args.data, spec, 0, args.parity_images)
    spread_logits(net, views, meta)
    reference = copy.deepcopy(net).to(memory_format=torch.contiguous_format)  # eager fp32 NCHW

    k = spec.encoder.n_features
    with FlopCounterMode(display=False) as counter:
        reference(torch.zeros(1, 3, size, size), torch.zeros(1, k))
    flops_batch = N_VIEWS * counter.get_total_flops()

    calibration = real_inputs(args.data, spec, args.parity_images, args.calibration_images)[1:]
    x, m = views[:N_VIEWS], meta[:N_VIEWS]  # the timed batch: the 8 views of one real image

    seed_net = seed_loop_net(reference)
    seed_ms = 1000 * median_seconds(
        lambda: seed_loop_predict(seed_net, spec, originals[0], m[:1]), args.repeats
    )
    prep_ms = 1000 * median_seconds(lambda: dihedral_views(preprocess(originals[:1], spec)), args.repeats)

    rows: list[tuple[Row, LogitsFn | None]] = [
        (Row("eager fp32 NCHW", "fp32"), eager(net, channels_last=False)),
        (Row("eager fp32 channels_last", "fp32", note="serving today"), eager(net, channels_last=True)),
        (Row("eager bf16 autocast (CL)", "bf16"), eager(net, channels_last=True, bf16=True)),
    ]
    if args.skip_compile:
        rows.append((Row("torch.compile fp32 (CL)", "fp32", note="skipped (--skip-compile)"), None))
    else:
        try:
            fn, seconds = compiled(net, x, m)
            rows.append(
                (
                    Row(
                        "torch.compile fp32 (CL)", "fp32", note=f"inductor+freezing, compile {seconds:.0f} s"
                    ),
                    fn,
                )
            )
        except Exception as err:  # report why compile is unusable here, keep measuring the rest
            rows.append(
                (
                    Row("torch.compile fp32 (CL)", "fp32", note=f"failed: {type(err).__name__}: {err}"[:90]),
                    None,
                )
            )

    with tempfile.TemporaryDirectory(prefix="roofline-") as tmp:
        workdir = Path(tmp)
        start = time.perf_counter()
        fp32_path = workdir / "fp32.onnx"
        digest = export_onnx(reference, spec, fp32_path)
        export_s = time.perf_counter() - start
        rows.append(
            (
                Row("onnxruntime fp32", "fp32", note=f"export {export_s:.0f} s"),
                OnnxRunner(fp32_path, digest, threads=args.threads),
            )
        )
        int8_path = None
        try:
            start = time.perf_counter()
            int8_path = ort_int8(fp32_path, calibration, workdir)
            note = (
                f"QDQ static PTQ, {args.calibration_images} calib images, {time.perf_counter() - start:.0f} s"
            )
            rows.append(
                (
                    Row("onnxruntime int8", "int8", note=note),
                    OnnxRunner(int8_path, sha256_file(int8_path), threads=args.threads),
                )
            )
        except Exception as err:
            rows.append(
                (Row("onnxruntime int8", "int8", note=f"failed: {type(err).__name__}: {err}"[:90]), None)
            )
        try:
            fn, note = openvino_runner(fp32_path, args.threads)
            rows.append((Row("openvino fp32", "fp32", note=note), fn))
            if int8_path is not None:
                fn, note = openvino_runner(int8_path, args.threads)
                rows.append((Row("openvino int8 (QDQ)", "int8", note=note), fn))
        except ImportError:
            rows.append((Row("openvino", "fp32", note="skipped: openvino not installed"), None))

        for row, fn in rows:
            if fn is None:
                continue
            row.ms = 1000 * median_seconds(lambda fn=fn: fn(x, m), args.repeats)
            row.gap = max_probability_gap(reference, fn, views, meta, batch_size=N_VIEWS)

    with torch.inference_mode():
        probabilities = torch.sigmoid(reference(views, meta))
    print_table(backbone, size, flops_batch, peaks, rows, seed_ms, prep_ms, probabilities)


def print_table(
    backbone: str,
    size: int,
    flops_batch: float,
    peaks: dict[str, float],
    rows: list[tuple[Row, LogitsFn | None]],
    seed_ms: float,
    prep_ms: float,
    probabilities: torch.Tensor,
) -> None:
    base = rows[0][0].ms
    print(
        f"\n{backbone} @ {size} px: {flops_batch / N_VIEWS / 1e9:.3f} GFLOP per view, "
        f"{flops_batch / 1e9:.2f} GFLOP per 8-view batch; seed per-view loop {seed_ms:.1f} ms/image; "
        f"our preprocessing + 8 views {prep_ms:.1f} ms"
    )
    header = (
        f"{'runtime':<26}{'ms/8 views':>11}{'GFLOP/s':>9}{'% peak':>8}{'vs eager':>9}{'vs seed':>9}"
        f"{'max|dp|':>10}  note"
    )
    print(header)
    print("-" * (len(header) + 30))
    for row, _ in rows:
        if row.ms is None:
            print(f"{row.name:<26}{'-':>11}{'':>9}{'':>8}{'':>9}{'':>9}{'':>10}  {row.note}")
            continue
        rate = flops_batch / (row.ms / 1000) / 1e9
        print(
            f"{row.name:<26}{row.ms:>11.1f}{rate:>9.1f}{100 * rate / peaks[row.precision]:>7.1f}%"
            f"{base / row.ms:>8.2f}x{seed_ms / (prep_ms + row.ms):>8.2f}x{row.gap:>10.1e}  {row.note}"
        )
    p = probabilities
    print(
        f"% peak is against the measured {{fp32, bf16, int8}} GEMM peak of the row's precision; vs seed is "
        f"end to end (preprocessing {prep_ms:.1f} ms + the call). max|dp| over {p.numel()} views; eager "
        f"probabilities span [{float(p.min()):.3f}, {float(p.max()):.3f}] (std {float(p.std()):.3f})"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per runtime (median)")
    parser.add_argument("--gemm-repeats", type=int, default=5, help="matmuls per size for the peak (best)")
    parser.add_argument("--parity-images", type=int, default=64)
    parser.add_argument("--calibration-images", type=int, default=64)
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--models", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the isic_sample folder (read only)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not (args.data / "metadata.csv").is_file():
        raise SystemExit(f"real sample not found at {args.data}; pass --data or set MELANOMA_SHARED_DATA")

    with machine_load():
        print(
            f"{platform.processor() or platform.machine()}, torch {torch.__version__} (capability "
            f"{torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads\n"
            f"CPU flags: {cpu_flags()}"
        )
        peaks, sizes = {}, (2048, 4096)
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("int8", torch.int8)):
            peaks[name], detail = gemm_peak(dtype, sizes, args.gemm_repeats)
            unit = "GOP/s" if name == "int8" else "GFLOP/s"
            print(f"peak {name} GEMM: {peaks[name]:.0f} {unit} (best of {args.gemm_repeats}; {detail})")
        for backbone in args.models:
            measure_model(backbone, args, peaks)


if __name__ == "__main__":
    main()
