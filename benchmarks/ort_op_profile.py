"""What stops efficientnet_b0 short of the CPU's GEMM peak under ONNX Runtime: time and FLOPs per kind of op.

Exports the project network (``test`` or any timm backbone + metadata MLP, random init) with the serving
exporter (``melanoma_ml.serving.runtimes.export_onnx``), runs one 8-view TTA batch ``--repeats`` times with
ONNX Runtime's profiler on (CPU EP, ``--threads`` threads) and groups the per-node kernel time by kind:
depthwise convolutions (``group`` > 1), other convolutions (1x1 and the stem), matrix products, and the rest
(activations, squeeze-excitation pooling, elementwise, layout reorders). FLOPs per kind come from each
profiled kernel's own shapes (2 per multiply-add; convolutions and matrix products only), so each kind's
achieved GFLOP/s is measured on the same run. Compare with the GEMM peak printed by ``benchmarks/roofline.py``.

Usage::

    .venv/bin/python benchmarks/ort_op_profile.py [--backbone efficientnet_b0] [--size 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from _common import machine_load  # noqa: E402

from melanoma_ml import schema  # noqa: E402
from melanoma_ml.config import ModelConfig  # noqa: E402
from melanoma_ml.features import MetadataEncoder  # noqa: E402
from melanoma_ml.serving.runtimes import export_onnx  # noqa: E402
from melanoma_ml.spec import ModelSpec  # noqa: E402

N_VIEWS = 8


def kind_and_flops(args: dict) -> tuple[str, float]:
    """An ONNX Runtime profile node event's kind and FLOPs (2 per multiply-add), from its logical shapes.

    ORT reports NCHW shapes even for its NCHWc-reordered kernels: ``Conv`` inputs are ``[x, weight(, bias)]``
    with the weight ``[C_out, C_in / group, kh, kw]``, so a weight with one input channel per group on a
    multi-channel input is a depthwise convolution.
    """
    op = args.get("op_name", "")
    inputs = [next(iter(t.values())) for t in args.get("input_type_shape", [])]
    outputs = [next(iter(t.values())) for t in args.get("output_type_shape", [])]
    out = float(np.prod(outputs[0])) if outputs else 0.0
    if op in ("Conv", "FusedConv", "NchwcConv") and len(inputs) >= 2:
        x, w = inputs[0], inputs[1]
        depthwise = len(w) == 4 and w[1] == 1 and len(x) == 4 and x[1] > 1
        return ("depthwise conv" if depthwise else "other conv"), 2.0 * out * float(np.prod(w[1:]))
    if op in ("Gemm", "FusedGemm", "MatMul", "FusedMatMul") and inputs:
        return "matmul/gemm", 2.0 * out * float(inputs[0][-1])
    return "other ops", 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="efficientnet_b0")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    spec = ModelSpec(
        network=ModelConfig(backbone=args.backbone, meta_hidden=[128, 64]),
        image_size=args.size,
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
        encoder=MetadataEncoder(age_mean=50.0, age_std=15.0, sexes=schema.SEXES, sites=schema.SITES),
    )
    net = spec.build_network().eval()
    with tempfile.TemporaryDirectory(prefix="ort-profile-") as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(net, spec, path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feeds = {
            "image": np.random.default_rng(0)
            .normal(size=(N_VIEWS, 3, args.size, args.size))
            .astype(np.float32),
            "metadata": np.zeros((N_VIEWS, spec.encoder.n_features), np.float32),
        }
        session.run(None, feeds)  # warm-up (not profiled separately: dropped below as run 0)
        for _ in range(args.repeats):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    run_ms = [e["dur"] / 1000 for e in runs[1:]]
    node_us: dict[str, float] = defaultdict(float)
    flop_sum: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            kind, node_flops = kind_and_flops(e.get("args", {}))
            node_us[kind] += e["dur"]
            flop_sum[kind] += node_flops
    n_runs = len(runs)
    flops = {kind: value / n_runs for kind, value in flop_sum.items()}
    total_us = sum(node_us.values())
    print(
        f"{args.backbone} @ {args.size} px, one {N_VIEWS}-view TTA batch, ONNX Runtime {ort.__version__} CPU EP, "
        f"{args.threads} threads; model_run median {np.median(run_ms):.1f} ms over {len(run_ms)} runs"
    )
    print(f"{'kind':<16} {'time %':>7} {'ms/run':>8} {'GFLOP/run':>10} {'FLOP %':>7} {'GFLOP/s':>8}")
    all_flops = sum(flops.values())
    for kind in ("depthwise conv", "other conv", "matmul/gemm", "other ops"):
        ms = node_us.get(kind, 0.0) / 1000 / n_runs
        gflop = flops.get(kind, 0.0) / 1e9
        rate = gflop / (ms / 1000) if ms > 0 and gflop > 0 else float("nan")
        print(
            f"{kind:<16} {100 * node_us.get(kind, 0.0) / total_us:>6.1f}% {ms:>8.1f} {gflop:>10.2f} "
            f"{100 * flops.get(kind, 0.0) / all_flops:>6.1f}% {rate:>8.1f}"
        )
    print(f"all kernels: {total_us / 1000 / n_runs:.1f} ms/run, {all_flops / 1e9:.2f} GFLOP/run")


if __name__ == "__main__":
    with machine_load():
        main()
