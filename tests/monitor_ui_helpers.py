"""A Dagster home whose ``serving_monitor`` has monitored several days, and its webserver on loopback.

Shared by ``tests/live/test_monitor_ui.py`` (the browser test) and ``benchmarks/monitor_screenshot.py``
(the README's picture), so both show the same thing. The served bundle is the constructed one of
``tests/monitor_helpers.py`` (a random-weight network with that module's out-of-fold rows and metadata
reference); the prediction log holds ``quiet_days`` in-distribution days, then one shifted day (another
clinic: squeezed scores, older patients, more OOD flags) as the last full UTC day, which is what the asset
page shows first. Each day is materialized in-process into a persistent SQLite instance under ``home``;
the webserver (no daemon: nothing else runs) then reads that instance.

Importable as ``from monitor_ui_helpers import ...`` from the tests (their folder is on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from conftest import free_port
from monitor_helpers import IN_DISTRIBUTION, SHIFTED, append_day, day_of_log, register_served_bundle

if TYPE_CHECKING:
    from playwright.sync_api import Page

    from melanoma_ml.serving.manifest import BundleManifest

REPO = Path(__file__).resolve().parents[1]
INSTANCE_YAML = "telemetry:\n  enabled: false\n"


@dataclass(frozen=True)
class MonitoredHome:
    """What :func:`prepare_monitored_log` built.

    Attributes:
        home: ``DAGSTER_HOME`` (``dagster.yaml`` and the SQLite storage).
        artifacts: The artifact root (registry and prediction log).
        version: The served bundle's version.
        days: The logged UTC days (``YYYY-MM-DD``), oldest first; the last one is shifted.
    """

    home: Path
    artifacts: Path
    version: str
    days: tuple[str, ...]

    @property
    def shifted_day(self) -> str:
        return self.days[-1]


@dataclass(frozen=True)
class MonitoredDay:
    """One ``serving_monitor`` materialization: its float metadata and the checks that warned."""

    numbers: dict[str, float]
    warned: frozenset[str]


def monitored_days(quiet_days: int, today: date | None = None) -> tuple[str, ...]:
    """The ``quiet_days + 1`` full UTC days before ``today`` (default: now), oldest first."""
    today = today or datetime.now(UTC).date()
    return tuple((today - timedelta(days=k)).isoformat() for k in range(quiet_days + 1, 0, -1))


def write_logged_day(
    artifacts: Path, manifest: BundleManifest, day: str, *, shifted: bool, n: int, seed: int
) -> None:
    """``n`` records of ``day`` served by ``manifest`` through ``PredictionLog``, one a minute from 08:00."""
    from melanoma_ml.monitoring.prediction_log import PredictionLog

    start = datetime.fromisoformat(day).replace(hour=8, tzinfo=UTC)
    minutes = iter(range(n))
    log = PredictionLog(artifacts, clock=lambda: start + timedelta(minutes=next(minutes)))
    rows = day_of_log(manifest, SHIFTED if shifted else IN_DISTRIBUTION, n, seed, version=manifest.version)
    if None in append_day(log, rows):
        raise RuntimeError(
            f"the prediction log under {artifacts} lost a record of {day}; see the log warning"
        )


def prepare_monitored_log(
    root: Path,
    *,
    seed: int = 0,
    quiet_days: int = 4,
    cases_per_day: int | Sequence[int] = 200,
    today: date | None = None,
) -> MonitoredHome:
    """A promoted bundle and its prediction log of ``quiet_days`` + 1 days under ``root``, and an empty
    Dagster instance (its SQLite storage created, so a webserver started next finds it ready).

    ``cases_per_day``: one volume for every day, or one per day (oldest first).
    """
    import dagster as dg

    home, artifacts = root / "dagster_home", root / "artifacts"
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(INSTANCE_YAML)
    with dg.DagsterInstance.from_config(str(home)):
        pass
    manifest = register_served_bundle(artifacts, seed)
    days = monitored_days(quiet_days, today)
    volumes = [cases_per_day] * len(days) if isinstance(cases_per_day, int) else list(cases_per_day)
    if len(volumes) != len(days):
        raise ValueError(f"cases_per_day has {len(volumes)} volumes for {len(days)} days (quiet_days + 1)")
    for k, (day, n) in enumerate(zip(days, volumes, strict=True)):
        shifted = k == len(days) - 1
        write_logged_day(artifacts, manifest, day, shifted=shifted, n=n, seed=seed * 1000 + k)
    return MonitoredHome(home, artifacts, str(manifest.version), days)


def materialize_monitor(monitored: MonitoredHome) -> dict[str, MonitoredDay]:
    """Materialize ``serving_monitor`` in-process for each logged day into ``monitored.home``'s instance."""
    import dagster as dg

    from melanoma_assets.assets.monitoring import serving_monitor
    from melanoma_assets.resources import ArtifactStorage, DataSource, PipelineSettings, TrainingHardware

    settings = PipelineSettings(
        profile="tiny",
        overrides_json=json.dumps({}),
        storage=ArtifactStorage(root=str(monitored.artifacts)),
        hardware=TrainingHardware(),
        source=DataSource(),
    )
    found = {}
    with dg.DagsterInstance.from_config(str(monitored.home)) as instance:
        for day in monitored.days:
            result = dg.materialize(
                [serving_monitor], partition_key=day, resources={"settings": settings}, instance=instance
            )
            if not result.success:
                raise RuntimeError(f"serving_monitor failed for {day}: see its run in {monitored.home}")
            [event] = result.asset_materializations_for_node("serving_monitor")
            numbers = {k: v.value for k, v in event.metadata.items() if isinstance(v, dg.FloatMetadataValue)}
            warned = frozenset(e.check_name for e in result.get_asset_check_evaluations() if not e.passed)
            found[day] = MonitoredDay(numbers, warned)
    return found


class DagsterWebserver:
    """``dagster-webserver`` over ``monitored``'s instance on a free loopback port (no daemon).

    The code location is the project's ``workspace.yaml`` with the tiny profile, the same artifact root,
    and the partitions starting at the first logged day (``MELANOMA_MONITOR_START``: the day serving began),
    so the plots span the logged days. Entering starts it without waiting (materialize meanwhile);
    :meth:`wait_until_up` waits for it; leaving stops its process group.
    """

    def __init__(self, monitored: MonitoredHome, log: Path, timeout: float = 180) -> None:
        self.monitored, self.log, self.timeout = monitored, log, timeout
        self.url = f"http://127.0.0.1:{free_port()}"
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> DagsterWebserver:
        from melanoma_assets.assets.monitoring import START_ENV

        env = {k: v for k, v in os.environ.items() if not k.startswith("MELANOMA_")}
        env.update(
            DAGSTER_HOME=str(self.monitored.home),
            MELANOMA_PROFILE="tiny",
            MELANOMA_ARTIFACT_ROOT=str(self.monitored.artifacts),
            DAGSTER_DISABLE_TELEMETRY="1",
            **{START_ENV: self.monitored.days[0]},
        )
        port = self.url.rsplit(":", 1)[1]
        webserver = Path(sys.executable).with_name("dagster-webserver")
        command = [str(webserver), "-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1", "-p", port]
        with open(self.log, "wb") as out:
            self._process = subprocess.Popen(
                command,
                cwd=self.monitored.home,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def wait_until_up(self) -> str:
        """The URL, once the webserver answers; raises with the log's tail if it exits or stays silent."""
        if self._process is None:
            raise RuntimeError("start the webserver first: `with DagsterWebserver(...) as server:`")
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"dagster-webserver exited with {self._process.returncode}:\n{self._tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/server_info", timeout=2):
                    return self.url
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        raise RuntimeError(
            f"dagster-webserver did not answer on {self.url} in {self.timeout:.0f} s:\n{self._tail()}"
        )

    def _tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def __exit__(self, *exc: object) -> None:
        process = self._process
        if process is None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def open_asset_page(page: Page, url: str, view: str | None = None) -> None:
    """Go to ``serving_monitor``'s page (``view``: a tab such as ``checks``), past Dagster's welcome dialog."""
    page.add_locator_handler(
        page.get_by_text("Join the Dagster community"),
        lambda: page.get_by_role("button", name="Skip").click(),
    )
    page.goto(f"{url}/assets/serving_monitor" + (f"?view={view}" if view else ""))


def show_metadata_plots(page: Page) -> None:
    """On the Overview tab: metadata as plots over the partitions, navigation hidden for room."""
    page.get_by_text("Hide navigation").click()
    page.get_by_text("Plots", exact=True).click()
