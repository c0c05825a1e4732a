"""Device leases: on a machine with several accelerators, each training holds its own devices.

A backfill of every backbone x fold runs as many trainings at once as the Dagster ``training`` pool
allows (set it to the device count). Each training then leases devices from ``training.device_pool``
with an exclusive ``fcntl.flock`` on ``<artifact_root>/locks/<host>/device-<kind>-<index>.lock``. The
kernel drops the lock when the holding process exits for any reason (``kill -9``, out of memory), so a
crashed run never leaves a device "taken", and two runs never train on one device, whatever the pool
limit says. The lock file also records who holds it (pid, host, what trains), for the waiting message.

Locks are per host: an artifact root on a shared disk does not make two machines wait for each other's
``cuda:0``. ``flock`` is Linux/macOS only, like the rest of the project's deployment.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from melanoma_ml.config import DEVICE_NAME, TrainingConfig
from melanoma_ml.errors import InputStateError, InputValueError

_ACCELERATOR = {"cuda": "gpu", "cpu": "cpu", "mps": "mps"}
"""Lightning's accelerator name for each device kind."""


class DeviceLeaseTimeout(InputStateError):
    """No free device within ``training.device_wait_s``."""


@dataclass(frozen=True)
class Placement:
    """Where one fit runs: the arguments ``lightning.Trainer`` takes, and the devices leased for it.

    Attributes:
        accelerator: Lightning accelerator (``gpu``, ``cpu``, ``mps`` or ``auto``).
        devices: Lightning devices: CUDA indices (``[1]``), a count, or ``"auto"``.
        strategy: Lightning strategy (``auto``, or ``ddp_spawn``/``ddp_fork`` for several devices).
        leased: The device names this fit holds locks on; empty when no pool is configured.
    """

    accelerator: str
    devices: int | list[int] | str
    strategy: str
    leased: tuple[str, ...] = ()


def parse_device(name: str) -> tuple[str, int]:
    """``("cuda", 1)`` for ``"cuda:1"``.

    Raises:
        InputValueError: not ``cpu:<i>``, ``cuda:<i>`` or ``mps:<i>``.
    """
    match = DEVICE_NAME.fullmatch(name.strip())
    if match is None:
        raise InputValueError(
            f"training.device_pool entry {name!r} is not a device name; use cuda:<index> (e.g. cuda:0), "
            "mps:0 or cpu:<slot>"
        )
    return match.group(1), int(match.group(2))


def resolve_pool(training: TrainingConfig) -> list[str]:
    """The device names trainings lease from; ``[]`` means "no lease, train where the config says".

    ``"auto"`` is every CUDA device (``torch.cuda.device_count()``) unless ``training.accelerator`` asks
    for the CPU or MPS; a machine without CUDA gets no lease, so CPU and Apple runs behave as before.
    """
    pool = training.device_pool
    if pool == "off":
        return []
    if pool == "auto":
        if training.accelerator not in ("auto", "gpu"):
            return []
        import torch

        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return list(pool)


def lightning_strategy(strategy: str, n_devices: int | str) -> str:
    """The strategy for a fit on ``n_devices``.

    Several devices with ``"auto"`` mean ``ddp_spawn``: Lightning's own choice there, ``ddp``, starts
    the other ranks by re-running ``sys.argv``, which inside a Dagster step (or pytest) is the wrong
    program. ``ddp_spawn`` starts them from this process and hands the trained weights back to it.
    """
    if strategy == "auto" and isinstance(n_devices, int) and n_devices > 1:
        return "ddp_spawn"
    return strategy


def placement_for(leased: Sequence[str], training: TrainingConfig) -> Placement:
    """The Lightning arguments that train on exactly ``leased`` (or as configured when it is empty).

    Raises:
        InputValueError: devices of different kinds, or an accelerator that contradicts the pool.
    """
    if not leased:
        return Placement(
            training.accelerator,
            training.devices,
            lightning_strategy(training.strategy, training.devices),
        )
    kinds = {parse_device(name)[0] for name in leased}
    if len(kinds) != 1:
        raise InputValueError(
            f"training.device_pool mixes device kinds {sorted(kinds)}; list devices of one kind"
        )
    kind = kinds.pop()
    accelerator = _ACCELERATOR[kind]
    if training.accelerator not in ("auto", accelerator):
        raise InputValueError(
            f"training.accelerator={training.accelerator!r} but training.device_pool holds {kind} devices "
            f"{list(leased)}; set training.accelerator to 'auto' or {accelerator!r}, or change the pool"
        )
    # Lightning picks CUDA devices by index; a CPU or MPS "device" is a slot, so only the count matters.
    devices: int | list[int] = [parse_device(n)[1] for n in leased] if kind == "cuda" else len(leased)
    return Placement(accelerator, devices, lightning_strategy(training.strategy, len(leased)), tuple(leased))


def devices_per_fit(training: TrainingConfig, pool: Sequence[str]) -> int:
    """How many pool devices one fit leases: ``training.devices``, or the whole pool for ``"auto"``.

    Raises:
        InputValueError: more devices asked for than the pool holds.
    """
    count = len(pool) if training.devices == "auto" else int(training.devices)
    if count > len(pool):
        raise InputValueError(
            f"training.devices={training.devices} but training.device_pool has only {len(pool)} device(s) "
            f"{list(pool)}; lower training.devices or list more devices"
        )
    return count


WAITING_PREFIX = "waiting-"
"""Name prefix of the files :func:`lease_devices` keeps while it waits (:func:`waiting_for_devices`)."""


@contextmanager
def lease_devices(
    pool: Sequence[str],
    count: int,
    lock_dir: str | Path,
    *,
    holder: str,
    wait_s: float,
    poll_s: float = 0.5,
) -> Iterator[tuple[str, ...]]:
    """Hold ``count`` devices of ``pool`` exclusively until the block ends (or the process dies).

    Takes the first free devices in pool order. All or nothing: when fewer than ``count`` are free it
    releases what it took and tries again every ``poll_s`` seconds, so two multi-device fits cannot
    each hold half of what the other needs.

    Args:
        pool: Device names (``cuda:0`` ...), validated by ``parse_device``.
        count: Devices to hold (1 <= count <= len(pool)).
        lock_dir: Folder of the lock files (created); per host, e.g. ``<artifact_root>/locks/<host>``.
        holder: What trains (written into the lock file, shown to whoever waits).
        wait_s: Give up after this many seconds.
        poll_s: Seconds between attempts.

    Raises:
        DeviceLeaseTimeout: no ``count`` free devices within ``wait_s`` (the message names the holders).
    """
    for name in pool:
        parse_device(name)
    if not 1 <= count <= len(pool):
        raise InputValueError(f"cannot lease {count} device(s) from a pool of {len(pool)}: {list(pool)}")
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    waiting = lock_dir / f"{WAITING_PREFIX}{os.getpid()}-{time.monotonic_ns()}.json"
    try:
        while True:
            with ExitStack() as held:
                taken: list[str] = []
                for name in pool:
                    handle = _try_lock(lock_dir / _lock_name(name), holder)
                    if handle is not None:
                        held.callback(_unlock, handle)
                        taken.append(name)
                        if len(taken) == count:
                            break
                if len(taken) == count:
                    waiting.unlink(missing_ok=True)
                    yield tuple(taken)
                    return
            if time.monotonic() >= deadline:
                raise DeviceLeaseTimeout(
                    f"no {count} free device(s) in {list(pool)} after {wait_s:.0f} s for {holder}; held: "
                    f"{describe_holders(pool, lock_dir)}. Set the Dagster 'training' pool limit to the device "
                    "count divided by training.devices, or raise training.device_wait_s"
                )
            if not waiting.exists():
                waiting.write_text(json.dumps({"pid": os.getpid(), "holder": holder, "count": count}))
            time.sleep(poll_s)
    finally:
        waiting.unlink(missing_ok=True)


def waiting_for_devices(lock_dir: str | Path) -> list[dict[str, object]]:
    """Who is waiting in :func:`lease_devices` for devices of ``lock_dir`` now (pid, holder, count): each
    waiter keeps a ``waiting-*.json`` file there from its first failed attempt until it holds its devices
    or gives up. Best effort: a file may vanish while it is read."""
    waiters = []
    for path in sorted(Path(lock_dir).glob(f"{WAITING_PREFIX}*.json")):
        try:
            waiters.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return waiters


def describe_holders(pool: Sequence[str], lock_dir: str | Path) -> str:
    """Who holds each device, from the lock files (best effort: a file may change while it is read)."""
    parts = []
    for name in pool:
        path = Path(lock_dir) / _lock_name(name)
        try:
            info = json.loads(path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            info = {}
        parts.append(f"{name}: pid {info.get('pid', '?')} ({info.get('holder', 'unknown')})")
    return "; ".join(parts)


def host_lock_dir(locks_root: str | Path) -> Path:
    """This host's lock folder under ``locks_root`` (devices belong to one machine)."""
    return Path(locks_root) / re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname() or "localhost")


@contextmanager
def training_placement(
    training: TrainingConfig, locks_root: str | Path, *, holder: str
) -> Iterator[Placement]:
    """The placement of one fit, holding its devices' leases for the whole block.

    Without a pool (``resolve_pool`` is empty) nothing is locked and the placement is the config's.
    """
    pool = resolve_pool(training)
    if not pool:
        yield placement_for((), training)
        return
    count = devices_per_fit(training, pool)
    with lease_devices(
        pool, count, host_lock_dir(locks_root), holder=holder, wait_s=training.device_wait_s
    ) as leased:
        yield placement_for(leased, training)


def _lock_name(device: str) -> str:
    kind, index = parse_device(device)
    return f"device-{kind}-{index}.lock"


def _try_lock(path: Path, holder: str) -> IO[str] | None:
    """The open, exclusively flocked file at ``path``, or ``None`` when another process holds it."""
    handle = open(path, "a+")  # noqa: SIM115 - stays open as long as the lease; closed by _unlock
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "holder": holder}))
    handle.flush()
    return handle


def _unlock(handle: IO[str]) -> None:
    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    handle.close()
