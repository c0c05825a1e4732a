"""Deployment defaults: nothing published beyond this machine, no password in a tracked file, and both
Dagster instance configs end crashed runs (run monitoring) and retry them (run retries)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"
# "${MELANOMA_BIND_ADDRESS:-127.0.0.1}:3000:3000": a variable users may change, loopback by default.
BIND_VARIABLE = re.compile(r"^\$\{[A-Z_]+:-127\.0\.0\.1\}$")
VARIABLE = re.compile(r"^\$\{[A-Z_]+(:?[-?][^}]*)?\}$")


def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def published_ports() -> list[tuple[str, str]]:
    """``(service, port entry)`` for every published port (short or long syntax)."""
    return [
        (name, port) for name, service in compose()["services"].items() for port in service.get("ports", [])
    ]


def host_ip(port: str | dict) -> str | None:
    if isinstance(port, dict):
        return port.get("host_ip")
    parts = re.split(r":(?![^{]*\})", str(port))  # colons outside ${...}: "${IP:-x}:${PORT:-3000}:3000"
    return parts[0] if len(parts) == 3 else None


def environments(node: Any, where: str = "") -> list[tuple[str, str, Any]]:
    """``(where, key, value)`` of every ``environment`` entry in the compose file, anchors resolved."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "environment":
                items = value.items() if isinstance(value, dict) else (v.split("=", 1) for v in value)
                found += [(where, str(k), v) for k, v in items]
            else:
                found += environments(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += environments(value, f"{where}[{i}]")
    return found


def test_every_published_port_is_bound_to_loopback_by_default() -> None:
    ports = published_ports()
    assert {service for service, _ in ports} >= {"dagster-webserver", "app"}
    for service, port in ports:
        ip = host_ip(port)
        assert ip == LOOPBACK or (ip and BIND_VARIABLE.match(ip)), (
            f"{service} publishes {port!r} on every interface; bind it to ${{MELANOMA_BIND_ADDRESS:-127.0.0.1}}"
        )


def test_no_password_or_secret_is_written_in_the_compose_file() -> None:
    entries = environments(compose())
    secrets = [
        (where, key, value) for where, key, value in entries if re.search("PASSWORD|SECRET|TOKEN", key)
    ]
    assert {key for _, key, _ in secrets} >= {"POSTGRES_PASSWORD", "DAGSTER_POSTGRES_PASSWORD"}
    for where, key, value in secrets:
        assert isinstance(value, str) and VARIABLE.match(value), (
            f"{where}: {key} holds a literal; read it from .env"
        )
    text = (REPO / "docker-compose.yml").read_text()
    assert not re.search(r"PASSWORD[\"']?\s*[:=]\s*[\"']?(?!\$\{)\w", text), (
        "a literal password in docker-compose.yml"
    )


def test_secrets_come_from_a_git_ignored_env_file_with_a_tracked_example() -> None:
    ignored = {line.strip() for line in (REPO / ".gitignore").read_text().splitlines()}
    assert ".env" in ignored
    example = (REPO / ".env.example").read_text()
    names = set(re.findall(r"^([A-Z_]+)=", example, flags=re.MULTILINE))
    used = set(re.findall(r"\$\{([A-Z_]+)", (REPO / "docker-compose.yml").read_text()))
    assert used <= names, f"document {sorted(used - names)} in .env.example"


@pytest.mark.parametrize("path", ["dagster.yaml", "deploy/dagster.postgres.yaml"])
def test_instance_configs_end_and_retry_crashed_runs(path: str) -> None:
    config = yaml.safe_load((REPO / path).read_text())
    monitoring, retries = config.get("run_monitoring", {}), config.get("run_retries", {})
    assert monitoring.get("enabled") is True, f"{path}: enable run_monitoring"
    assert (
        monitoring.get("max_runtime_seconds", 0) > 0
    )  # the only end for a run orphaned with its code server
    assert monitoring.get("max_resume_run_attempts") == 0  # the default run launcher cannot resume runs
    assert monitoring.get("free_slots_after_run_end_seconds", 0) > 0  # a crashed run frees its pool slot
    assert retries.get("enabled") is True and retries.get("max_retries", 0) >= 1, (
        f"{path}: enable run_retries"
    )


def test_both_instance_configs_agree_on_crash_handling() -> None:
    local = yaml.safe_load((REPO / "dagster.yaml").read_text())
    deployed = yaml.safe_load((REPO / "deploy/dagster.postgres.yaml").read_text())
    for key in ("run_monitoring", "run_retries"):
        assert local[key] == deployed[key], (
            f"{key} differs between dagster.yaml and deploy/dagster.postgres.yaml"
        )
