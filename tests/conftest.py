"""Shared fixtures. Every test writes only under ``tmp_path``; network chatter is off."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from melanoma_ml.runtime import quiet_network_chatter  # noqa: E402

quiet_network_chatter()  # telemetry and update checks off (the library's own defaults)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the model hub
os.environ.setdefault("MPLBACKEND", "Agg")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MELANOMA_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _test_seed() -> int:
    raw = os.environ.get("MELANOMA_TEST_SEED", "0").strip() or "0"
    try:
        return int(raw)
    except ValueError:
        raise ValueError(
            f"MELANOMA_TEST_SEED={raw!r} is not an integer; set it to e.g. 1 (or unset it for the default 0)"
        ) from None


TEST_SEED = _test_seed()
"""Added to the seeds of the fixtures that train or draw a tiny network (synthetic data, ``training.seed``,
random init), so the suite can be rerun under other draws: ``MELANOMA_TEST_SEED=3 ./dev test``. The
default 0 keeps each fixture's own seed. Tests whose assertions depend on what a tiny network learned
carry margins measured over several seeds; this is how anyone re-checks them."""


def pytest_report_header() -> str:
    return f"MELANOMA_TEST_SEED={TEST_SEED} (seed offset of the tiny training fixtures)"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it), for servers the tests start."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require(condition: bool, reason: str) -> None:
    """Skip with ``reason`` on a user's machine; fail under CI (``CI=true``), where it must be there."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required under CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def isic_sample_dir() -> Path:
    """The real HAM10000 sample (1,391 images) from ../shared/data/isic_sample."""
    path = SHARED_DATA / "isic_sample"
    require(path.is_dir(), f"real ISIC sample not found at {path} (set MELANOMA_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def isic_metadata_dir() -> Path:
    """Official ISIC 2020/2019 and HAM10000 metadata tables from ../shared/data/isic_metadata."""
    path = SHARED_DATA / "isic_metadata"
    require(path.is_dir(), f"real ISIC metadata not found at {path} (set MELANOMA_SHARED_DATA)")
    return path


@pytest.fixture(autouse=True)
def _default_sigterm():
    """Children must die on SIGTERM: a library that leaves SIGTERM ignored in this process would make every
    later subprocess (servers, lease holders) inherit the ignore and outlive its test. Restore it."""
    import signal

    yield
    if signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
