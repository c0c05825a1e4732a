"""What every benchmark shares: a finished run, median timing, the machine's load, scoring, the seed loop.

* :func:`open_run` opens a finished pipeline run through ``melanoma_ml.artifacts`` (the one definition of
  the artifact layout): folds table, trained folds, evaluation reports, the registry and its served bundle.
  No benchmark spells a layout path itself.
* :func:`median_seconds` is the one timing rule (warm-up calls, then the median of timed calls) and
  :func:`machine_load` prints the load average before and after a benchmark, so a reader can tell an idle
  machine's number from a shared one's.
* :func:`tta_scores` scores images through the library's own TTA path (``serving.inference.score``: the
  8 dihedral views in one call per member, members averaged in the bundle's space, calibrator applied), the
  path the app and ``predict`` use.
* :func:`seed_loop_predict` is the seed project's per-view loop, the one baseline every TTA benchmark
  compares against.
* :func:`random_bundle`, :func:`upload` and :func:`launch_local` build what the serving benchmarks time.

Benchmarks import it as ``from _common import ...`` (Python puts the script's folder on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import socket
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from melanoma_ml.artifacts import ArtifactPaths, artifact_paths
from melanoma_ml.config import PipelineConfig

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import torch

    from melanoma_ml.evaluation import EvaluationReport
    from melanoma_ml.serving.bundle import Bundle
    from melanoma_ml.serving.inference import Scores
    from melanoma_ml.serving.registry import ModelRegistry
    from melanoma_ml.spec import ModelSpec
    from melanoma_ml.training.train import FoldResult

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MELANOMA_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
"""Where the read-only real data lives (``MELANOMA_SHARED_DATA`` overrides)."""
ISIC_SAMPLE = SHARED_DATA / "isic_sample"
"""The 1,391-image HAM10000 sample (docs/real-data.md)."""


# ---------------------------------------------------------------- the machine's load and timing


def load_average() -> str:
    """The 1/5/15-minute load averages, e.g. ``0.52 0.61 0.70`` (``n/a`` where the OS has none)."""
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


@contextlib.contextmanager
def machine_load(out: Callable[[str], Any] = print) -> Iterator[None]:
    """Print the load average before and after the block (also when the block raises)."""
    out(f"load average before: {load_average()} ({os.cpu_count()} CPUs visible)")
    try:
        yield
    finally:
        out(f"load average after: {load_average()}")


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    """Median wall seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls (allocator,
    oneDNN kernel selection, lazy imports)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def percentiles(seconds: Sequence[float]) -> tuple[float, float]:
    """(p50, p95) in milliseconds (p95 by nearest rank)."""
    ms = sorted(s * 1000 for s in seconds)
    return statistics.median(ms), ms[min(len(ms) - 1, math.ceil(0.95 * len(ms)) - 1)]


# ---------------------------------------------------------------- a finished run


@dataclass(frozen=True)
class FinishedRun:
    """A finished pipeline run under one artifact root, read through its :class:`ArtifactPaths`."""

    config: PipelineConfig
    paths: ArtifactPaths

    def folds_table(self) -> pd.DataFrame:
        """The clean table with each row's fold (the locked test rows included)."""
        import pandas as pd

        return pd.read_parquet(self.paths.folds_table)

    def backbones(self) -> list[str]:
        """The backbones that have trained folds, sorted."""
        return sorted(p.name for p in self.paths.checkpoints.iterdir() if p.is_dir())

    def fold_results(self, backbone: str) -> list[FoldResult]:
        """``backbone``'s finished folds, fold 0 upwards (stops at the first fold never trained)."""
        from melanoma_ml.training.train import FoldResult

        results, fold = [], 0
        while self.paths.checkpoint(backbone, fold).is_dir():
            results.append(FoldResult.load(self.paths.checkpoint(backbone, fold)))
            fold += 1
        if not results:
            raise SystemExit(
                f"no trained fold of {backbone} under {self.paths.checkpoints}; trained: {self.backbones()}"
            )
        return results

    def report(self, backbone: str) -> EvaluationReport:
        """``backbone``'s out-of-fold evaluation report."""
        from melanoma_ml.evaluation import EvaluationReport

        return EvaluationReport.load(self.paths.report(backbone))

    def oof(self, backbone: str) -> pd.DataFrame:
        """``backbone``'s pooled out-of-fold predictions (what the leaderboard and the gate read)."""
        import pandas as pd

        return pd.read_parquet(self.paths.oof(backbone))

    def registry(self) -> ModelRegistry:
        """The run's model registry (``serving.registry_uri`` or ``<artifact_root>/registry``)."""
        from melanoma_ml.serving.remote_registry import open_registry

        return open_registry(self.config)

    def served_bundle(self, **load_kwargs: Any) -> Bundle:
        """The bundle the registry serves now (verified on load)."""
        bundle = self.registry().load_current(**load_kwargs)
        if bundle is None:
            raise SystemExit(
                f"nothing is served from the registry of {self.paths.root}: promote a model first"
            )
        return bundle


def recorded_settings(artifact_root: str | Path) -> dict[str, Any]:
    """The config a ``benchmarks/real_isic_sample.py`` run recorded in ``<root>/results.json`` (its data
    sources and test sources included), or ``{}`` for a run that recorded none."""
    results = Path(artifact_root) / "results.json"
    if not results.is_file():
        return {}
    settings = dict(json.loads(results.read_text()).get("config") or {})
    for source in settings.get("data", {}).get("test_sources", []):  # older runs left them unnamed
        source["name"] = source.get("name") or Path(source["path"]).name
    return settings


def open_run(artifact_root: str | Path, overrides: Mapping[str, Any] | None = None) -> FinishedRun:
    """Open the finished run under ``artifact_root`` (``overrides``: config values the run used, e.g.
    ``{"data": {"image_size": 128}}``).

    Raises:
        SystemExit: ``artifact_root`` holds no finished run (no folds table); the message says what to pass.
    """
    config = PipelineConfig(
        **{**recorded_settings(artifact_root), **dict(overrides or {}), "artifact_root": str(artifact_root)}
    )
    paths = artifact_paths(config)
    if not paths.folds_table.is_file():
        raise SystemExit(
            f"{paths.root} is not the artifact root of a finished run (no {paths.folds_table.relative_to(paths.root)}): "
            "pass the --artifact-root (or --workdir) a pipeline run wrote, e.g. benchmarks/real_isic_sample.py's"
        )
    return FinishedRun(config, paths)


# ---------------------------------------------------------------- scoring


def tta_scores(
    bundle: Bundle, images: Sequence[np.ndarray], metadata: Sequence[Mapping[str, Any]], *, views: int = 8
) -> Scores:
    """Score decoded images the way the app and ``predict`` do (``melanoma_ml.serving.inference.score``),
    averaging ``views`` dihedral views per member."""
    from melanoma_ml.serving.inference import score

    return score(bundle, images, metadata, views=views)


def seed_loop_net(net: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``net`` as the seed project ran it: plain NCHW weights, eval mode."""
    import copy

    import torch

    return copy.deepcopy(net).eval().to(memory_format=torch.contiguous_format)


def seed_loop_predict(net: torch.nn.Module, spec: ModelSpec, image: np.ndarray, meta: torch.Tensor) -> float:
    """The seed project's TTA, the baseline of every TTA benchmark: 8 PIL views of the original, each run
    through torchvision Resize/CenterCrop/ToTensor/Normalize and its own batch-1 forward pass under
    ``torch.no_grad``; the 8 sigmoid probabilities averaged. ``net`` from :func:`seed_loop_net`;
    ``meta`` the ``(1, k)`` encoded metadata."""
    import numpy as np
    import torch
    from PIL import Image
    from torchvision import transforms

    to_input = transforms.Compose(
        [
            transforms.Resize(spec.image_size),
            transforms.CenterCrop(spec.image_size),
            transforms.ToTensor(),
            transforms.Normalize(spec.mean, spec.std),
        ]
    )
    pil = Image.fromarray(image)
    rotations = (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)
    turns = [pil] + [pil.transpose(r) for r in rotations]
    views = turns + [view.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for view in turns]
    probabilities = []
    with torch.no_grad():
        for view in views:
            probabilities.append(torch.sigmoid(net(to_input(view).unsqueeze(0), meta)).item())
    return float(np.mean(probabilities))


# ---------------------------------------------------------------- what the serving benchmarks time


def random_bundle(
    registry_root: Path,
    backbone: str,
    size: int,
    *,
    members: int = 1,
    runtime: str = "torch",
    precision: str = "fp32",
    tolerance: float = 1e-3,
    seed: int = 0,
    sites: Sequence[str] | None = None,
    meta_hidden: Sequence[int] = (128, 64),
    views: int | None = None,
) -> str:
    """Register and promote a random-weight bundle of ``backbone`` at ``size`` px in ``registry_root``.

    ``members`` > 1 makes a ``folds`` ensemble of that many networks (seeds ``seed``, ``seed + 1``, ...);
    ``runtime`` other than ``torch`` (``auto`` included) exports every member at registration, checked on
    random probe views within ``tolerance`` as promotion does. ``views``: what the bundle records
    (``serving.views``; None: unrecorded, served as 8). Returns the version.
    """
    import torch

    from melanoma_ml import schema
    from melanoma_ml.config import ModelConfig
    from melanoma_ml.features import MetadataEncoder
    from melanoma_ml.model import create_backbone, normalization_for
    from melanoma_ml.serving.bundle import EnsembleToSave, MemberNet, RuntimeRequest
    from melanoma_ml.serving.inference import dihedral_views, encode_metadata
    from melanoma_ml.serving.registry import ModelRegistry
    from melanoma_ml.spec import ModelSpec

    norm = normalization_for(create_backbone(backbone, pretrained=False))
    spec = ModelSpec(
        network=ModelConfig(
            backbone=backbone, meta_hidden=list(meta_hidden), meta_dropout=0.3, head_dropout=0.3
        ),
        image_size=size,
        mean=norm["mean"],
        std=norm["std"],
        encoder=MetadataEncoder(
            age_mean=50.0, age_std=15.0, sexes=schema.SEXES, sites=tuple(sites or schema.SITES)
        ),
    )
    nets = []
    for k in range(members):
        torch.manual_seed(seed + k)
        nets.append(spec.build_network().eval())
    ensemble = None
    if members > 1:
        ensemble = EnsembleToSave("folds", "probability", [MemberNet(n, spec, k) for k, n in enumerate(nets)])
    request = None
    if runtime != "torch":
        x = dihedral_views(torch.randn(2, 3, size, size))
        meta = encode_metadata([{}] * 2, spec, 2).repeat(8, 1)
        request = RuntimeRequest(runtime, precision, tolerance, (x, meta))
    registry = ModelRegistry(registry_root)
    version = registry.register_bundle(
        nets[0],
        spec,
        threshold=0.5,
        metrics={"auc": {"value": 0.5, "lo": 0.4, "hi": 0.6}},
        data_version=f"benchmark-{seed}",
        code_version="benchmark",
        ensemble=ensemble,
        runtime=request,
        views=views,
    )
    registry.promote(version, reason="benchmark")
    return version


def loaded_random_bundle(workdir: Path, backbone: str, size: int, **kwargs: Any) -> Bundle:
    """:func:`random_bundle` registered under ``workdir`` and loaded the way the app loads it (verified,
    channels-last, its runtime's scorers); ``kwargs`` go to :func:`random_bundle`."""
    from melanoma_ml.serving.registry import ModelRegistry

    root = Path(workdir) / f"{backbone}-{size}px-registry"
    random_bundle(root, backbone, size, **kwargs)
    bundle = ModelRegistry(root).load_current()
    assert bundle is not None  # random_bundle promoted it
    return bundle


def upload(path: Path) -> Path:
    """Write a 600x450 JPEG with some texture (decoding cost like a real photo) to ``path``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    small = rng.integers(60, 220, (45, 60, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((600, 450), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    path.write_bytes(buffer.getvalue())
    return path


def launch_local(demo: Any, serving: Any) -> str:
    """Launch the Gradio ``demo`` on a free 127.0.0.1 port with the app's launch options; its URL.

    Non-blocking; the caller closes it with ``demo.close()``.
    """
    from melanoma_ml.serving.app import launch_options

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    demo.launch(
        prevent_thread_lock=True,
        server_name="127.0.0.1",
        server_port=port,
        quiet=True,
        **launch_options(serving),
    )
    return f"http://127.0.0.1:{port}/"
