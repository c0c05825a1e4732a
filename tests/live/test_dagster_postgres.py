"""The docker-compose Dagster instance config (deploy/dagster.postgres.yaml) against a real PostgreSQL.

No Docker engine is needed: a private PostgreSQL 15 cluster is started on loopback as the
``postgres`` OS user, Dagster reads the same dagster.yaml the compose services use, the data assets
are materialized on it, and the run and its materializations are read back from PostgreSQL.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO_ROOT, free_port, require

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def _pg_bin() -> Path | None:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def _as_postgres(args: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; CI and this machine run tests as root.
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *args]
    return args


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[dict[str, str]]:
    bin_dir = _pg_bin()
    require(bin_dir is not None, "PostgreSQL server binaries (initdb) not found; apt-get install postgresql")
    if os.geteuid() == 0:
        require(shutil.which("runuser") is not None, "runuser is needed to start PostgreSQL as root")
        require(
            subprocess.run(["id", "postgres"], capture_output=True).returncode == 0,
            "the 'postgres' OS user is missing; apt-get install postgresql creates it",
        )
    # The cluster folder must be readable by the postgres user, and pytest's tmp_path (0700, root) is not;
    # this temp folder is removed at teardown.
    workdir = Path(tempfile.mkdtemp(prefix="melanoma-pg-"))
    workdir.chmod(0o777)
    data, sockets = workdir / "data", workdir / "sock"
    sockets.mkdir()
    sockets.chmod(0o777)
    if os.geteuid() == 0:
        shutil.chown(workdir, "postgres")
        shutil.chown(sockets, "postgres")
    port = free_port()
    try:
        subprocess.run(
            _as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-U", "dagster", "--auth=trust"]),
            check=True,
            capture_output=True,
        )
        subprocess.run(
            _as_postgres(
                [
                    str(bin_dir / "pg_ctl"),
                    "-D",
                    str(data),
                    "-o",
                    f"-c listen_addresses=127.0.0.1 -p {port} -k {sockets}",
                    "-l",
                    str(workdir / "server.log"),
                    "-w",
                    "start",
                ]
            ),
            check=True,
            capture_output=True,
        )
        subprocess.run(
            _as_postgres(
                [str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "dagster", "dagster"]
            ),
            check=True,
            capture_output=True,
        )
        yield {
            "DAGSTER_POSTGRES_USER": "dagster",
            "DAGSTER_POSTGRES_PASSWORD": "",
            "DAGSTER_POSTGRES_DB": "dagster",
            "DAGSTER_POSTGRES_HOST": "127.0.0.1",
            "DAGSTER_POSTGRES_PORT": str(port),
        }
    finally:
        subprocess.run(
            _as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"]),
            capture_output=True,
        )
        shutil.rmtree(workdir, ignore_errors=True)


def test_compose_instance_config_stores_runs_in_postgres(postgres_server, tmp_path, monkeypatch):
    import dagster as dg
    import psycopg2

    from melanoma_assets.definitions import build_definitions
    from melanoma_assets.groups import DATA
    from melanoma_assets.resources import ArtifactStorage, DataSource, PipelineSettings, TrainingHardware

    for key, value in postgres_server.items():
        monkeypatch.setenv(key, value)
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "deploy" / "dagster.postgres.yaml", home / "dagster.yaml")

    settings = PipelineSettings(
        profile="tiny",
        storage=ArtifactStorage(root=str(tmp_path / "artifacts")),
        hardware=TrainingHardware(accelerator="cpu"),
        source=DataSource(),
    )
    defs = build_definitions("tiny")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        result = dg.materialize(
            [*defs.assets, *(defs.asset_checks or [])],
            selection=dg.AssetSelection.groups(DATA),
            resources={
                "settings": settings,
                "io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path / "io")),
            },
            instance=instance,
        )
        assert result.success
        run_id = result.run_id
        assert instance.get_run_by_id(run_id).is_success

    connection = psycopg2.connect(
        host="127.0.0.1", port=int(postgres_server["DAGSTER_POSTGRES_PORT"]), user="dagster", dbname="dagster"
    )
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT status FROM runs WHERE run_id = %s", (run_id,))
            assert cursor.fetchone() == ("SUCCESS",)
            cursor.execute(
                "SELECT count(*) FROM event_logs WHERE run_id = %s AND dagster_event_type = 'ASSET_MATERIALIZATION'",
                (run_id,),
            )
            assert cursor.fetchone()[0] >= 4  # source, clean, folds and cache assets
    finally:
        connection.close()
