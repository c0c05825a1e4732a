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


# --- the scale-out profile ------------------------------------------------------------------------------
SCALE_OUT = "scale-out"
DEFAULT_SERVICES = {"postgres", "dagster-code", "dagster-webserver", "dagster-daemon", "app"}
WORKERS = ("celery-worker-1", "celery-worker-2")
INTERPOLATION = re.compile(r"\$\{([A-Z_]+)(?::([-?])([^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}`` against ``env`` (an ``.env``)."""
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        name, kind, word = match.groups()
        if env.get(name):
            return env[name]
        if kind == "?":
            raise ValueError(f"{name}: {word}")
        return word if kind == "-" else env.get(name, "")

    return INTERPOLATION.sub(one, value).replace("$$", "$")


def resolved_environment(service: str, env: dict[str, str]) -> dict[str, str]:
    return {k: interpolate(v, env) for k, v in compose()["services"][service]["environment"].items()}


def test_without_the_profile_the_stack_is_the_one_it_was() -> None:
    services = compose()["services"]
    default = {name for name, service in services.items() if not service.get("profiles")}
    assert default == DEFAULT_SERVICES
    assert {name for name in services if name not in default} == {"redis", "s3", *WORKERS}
    assert all(services[name]["profiles"] == [SCALE_OUT] for name in services if name not in default)


def test_the_example_env_keeps_steps_in_process_and_files_local(monkeypatch) -> None:
    from melanoma_assets.executors import executor_name_from_env
    from melanoma_assets.object_store import store_uri_from_env
    from melanoma_ml.config import load_config

    example = (REPO / ".env.example").read_text()
    env = dict(re.findall(r"^([A-Z_]+)=(.*)$", example, flags=re.MULTILINE))  # copied as it is
    env["POSTGRES_PASSWORD"] = "from-dotenv"  # its one required line
    for service in DEFAULT_SERVICES - {"postgres"}:
        resolved = resolved_environment(service, env)
        assert resolved["MELANOMA_ARTIFACT_ROOT"] == "/data/artifacts"
        for key, value in resolved.items():
            monkeypatch.setenv(key, value)
        assert executor_name_from_env() == "in_process", service
        assert store_uri_from_env() is None, service
        assert load_config("tiny").serving.registry_uri in (None, ""), service


def test_scale_out_workers_share_only_the_bucket_and_take_trainings() -> None:
    services = compose()["services"]
    env = {
        "POSTGRES_PASSWORD": "p",
        "MELANOMA_EXECUTOR": "celery",
        "MELANOMA_ARTIFACT_STORE": "s3://melanoma/artifacts",
        "AWS_SECRET_ACCESS_KEY": "s",
    }
    hostnames = set()
    for name in WORKERS:
        worker = services[name]
        mounts = [str(volume).split(":")[0] for volume in worker.get("volumes", [])]
        assert not {"artifacts", "dagster-storage", "s3data"} & set(mounts), f"{name} mounts {mounts}"
        resolved = resolved_environment(name, env)
        assert resolved["MELANOMA_ARTIFACT_ROOT"] != "/data/artifacts"
        assert resolved["MELANOMA_EXECUTOR"] == "celery"
        assert resolved["MELANOMA_ARTIFACT_STORE"] == env["MELANOMA_ARTIFACT_STORE"]
        assert resolved["MELANOMA_CELERY_BROKER"].startswith("redis://redis:")
        command = " ".join(worker["command"])
        queues = re.search(r"-Q (\S+)", command).group(1).split(",")
        assert "training" in queues and "--concurrency=1" in command, command
        assert "--prefetch-multiplier=1" in command and "melanoma_assets.celery_app" in command
        assert set(worker["depends_on"]) >= {"postgres", "redis", "s3"}
        hostnames.add(worker["hostname"])
    assert len(hostnames) == len(WORKERS)
    for name in ("redis", "s3", *WORKERS):
        assert not services[name].get("ports"), f"{name} must publish no port"


def test_the_local_build_covers_every_scale_out_image() -> None:
    services = compose()["services"]
    local = yaml.safe_load((REPO / "docker-compose.local.yml").read_text())["services"]
    built = {name for name, service in services.items() if "build" in service}
    assert {"s3", *WORKERS} <= built
    pulled = {name for name in services if name not in built}
    assert pulled == {"postgres", "redis"}
    assert all("build" in local[name] for name in (pulled | built))
    for name in ("redis", "seaweedfs"):
        assert (REPO / "deploy" / name / "Dockerfile").is_file()


def compose_cli() -> list[str] | None:
    import shutil
    import subprocess

    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        probe = subprocess.run([*command, "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return command
    return None


@pytest.mark.parametrize("profile", [None, SCALE_OUT])
def test_docker_compose_accepts_the_files_with_and_without_the_profile(tmp_path: Path, profile) -> None:
    import subprocess

    cli = compose_cli()
    if cli is None:
        pytest.skip("needs docker compose or docker-compose (not installed in CI)")
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        "POSTGRES_PASSWORD=p\nMELANOMA_EXECUTOR=celery\nMELANOMA_ARTIFACT_STORE=s3://melanoma/artifacts\n"
        "AWS_ACCESS_KEY_ID=a\nAWS_SECRET_ACCESS_KEY=s\n"
    )
    args = [*cli, "--project-directory", str(REPO), "--env-file", str(dotenv)]
    args += ["-f", str(REPO / "docker-compose.yml"), "-f", str(REPO / "docker-compose.local.yml")]
    args += ["--profile", profile] if profile else []
    listed = subprocess.run([*args, "config"], capture_output=True, text=True, check=False)
    assert listed.returncode == 0, listed.stderr
    config = yaml.safe_load(listed.stdout)
    # docker-compose 1.x lists every service; what `up` starts is those of no profile or an active one.
    started = {
        name
        for name, service in config["services"].items()
        if not service.get("profiles") or profile in service["profiles"]
    }
    assert started == DEFAULT_SERVICES | ({"redis", "s3", *WORKERS} if profile else set())
    worker = config["services"][WORKERS[0]]["environment"]
    assert worker["MELANOMA_ARTIFACT_ROOT"] == "/data/work"
    assert worker["MELANOMA_ARTIFACT_STORE"] == "s3://melanoma/artifacts"
