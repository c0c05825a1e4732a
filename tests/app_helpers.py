"""Builders shared by the serving and app tests: tiny bundles, hostile uploads, an app on a free port.

Importable from any test as ``from app_helpers import ...`` (this folder is on ``sys.path`` because it holds
``conftest.py``), the same way the tests import ``conftest``.
"""

from __future__ import annotations

import struct
import zlib
from typing import TYPE_CHECKING, Any

from conftest import free_port

if TYPE_CHECKING:
    from melanoma_ml.config import ServingConfig
    from melanoma_ml.serving.registry import ModelRegistry

SIZE = 64
"""Input size of the tiny bundles (px)."""
SITES = ("head/neck", "lower extremity", "torso")
METRICS = {
    "auc": {"value": 0.81, "lo": 0.74, "hi": 0.88},
    "sensitivity": {"value": 0.9, "lo": 0.82, "hi": 0.96},
    "specificity": {"value": 0.55, "lo": 0.47, "hi": 0.63},
    "brier": {"value": 0.12, "lo": None, "hi": None},
}
"""Headline metrics stored in the tiny bundles' manifests."""


def register_tiny(
    registry: ModelRegistry,
    *,
    seed: int,
    threshold: float = 0.5,
    promote: bool = True,
    size: int = SIZE,
    test_metrics: dict | None = None,
    views: int | None = None,
) -> str:
    """Register (and promote) a random-weight test_efficientnet bundle (recording ``views``, None: the
    manifest's default); returns its version."""
    import torch

    from melanoma_ml.config import ModelConfig
    from melanoma_ml.features import MetadataEncoder
    from melanoma_ml.spec import ModelSpec

    torch.manual_seed(seed)
    encoder = MetadataEncoder(age_mean=50.0, age_std=15.0, sexes=("female", "male"), sites=SITES)
    spec = ModelSpec(
        network=ModelConfig(
            backbone="test_efficientnet", meta_hidden=[8], meta_dropout=0.0, head_dropout=0.0
        ),
        image_size=size,
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
        encoder=encoder,
    )
    net = spec.build_network().eval()
    version = registry.register_bundle(
        net,
        spec,
        threshold=threshold,
        metrics=METRICS,
        data_version=f"test-{seed}",
        code_version="test",
        test_metrics=test_metrics,
        views=views,
    )
    if promote:
        registry.promote(version, reason="test")
    return version


def huge_png(side: int = 20_000) -> bytes:
    """A valid 1-bit PNG of side x side pixels (~50 kB on disk, 1.2 GB if decoded to RGB)."""
    row = b"\x00" * (1 + (side + 7) // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def launch_local(demo: Any, serving: ServingConfig) -> str:
    """Launch the Gradio ``demo`` on a free 127.0.0.1 port with the app's launch options; its URL.

    Non-blocking; the caller closes it with ``demo.close()``.
    """
    from melanoma_ml.serving.app import launch_options

    port = free_port()
    demo.launch(
        prevent_thread_lock=True,
        server_name="127.0.0.1",
        server_port=port,
        quiet=True,
        **launch_options(serving),
    )
    return f"http://127.0.0.1:{port}/"
