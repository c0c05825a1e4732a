"""The serving monitor as a user sees it: ``dagster-webserver`` on loopback, its asset page in headless Chromium.

Five logged days (four in distribution, then a shifted clinic as the last full UTC day) are materialized
in-process into a fresh instance (``tests/monitor_ui_helpers.py``, also behind the README's screenshot)
while the webserver loads the code location. The page must show every day materialized, the five checks
warning on the shifted day with their reasons, each number plotted over the days, and the day's report table.
Screenshots land under the module's temporary folder.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from browser_helpers import CHROMIUM, CHROMIUM_MISSING, launch_chromium
from conftest import TEST_SEED, require
from monitor_ui_helpers import (
    DagsterWebserver,
    MonitoredDay,
    MonitoredHome,
    materialize_monitor,
    open_asset_page,
    prepare_monitored_log,
    show_metadata_plots,
)

from melanoma_ml.monitoring.monitor import CHECKS

pytestmark = [pytest.mark.live, pytest.mark.browser, pytest.mark.slow]

TIMEOUT_MS = 60_000
QUIET_DAYS = 4


@dataclass(frozen=True)
class Served:
    """The module's webserver, its instance's days, what each materialization measured, where shots go."""

    url: str
    monitored: MonitoredHome
    days: dict[str, MonitoredDay]
    shots: Path

    @property
    def shifted(self) -> MonitoredDay:
        return self.days[self.monitored.shifted_day]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    require(CHROMIUM.is_file(), CHROMIUM_MISSING)
    root = tmp_path_factory.mktemp("monitor_ui")
    monitored = prepare_monitored_log(root, seed=TEST_SEED, quiet_days=QUIET_DAYS)
    with DagsterWebserver(monitored, root / "webserver.log") as server:
        days = materialize_monitor(monitored)  # while the webserver loads the code location
        yield Served(server.wait_until_up(), monitored, days, root)


@pytest.fixture(scope="module")
def browser(served: Served):
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)  # the first page of a fresh webserver can take a while
    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            yield browser
        finally:
            browser.close()
            expect.set_options(timeout=5_000)  # Playwright's default, for the modules that follow


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        yield page
    finally:
        context.close()


def test_the_shifted_day_warned_on_every_check_in_process(served: Served) -> None:
    assert served.shifted.warned == set(CHECKS)
    assert served.shifted.numbers["score_psi"] > 0.2 and served.shifted.numbers["cases"] == 200


def test_the_partitions_tab_shows_every_logged_day_materialized(served: Served, page) -> None:
    from playwright.sync_api import expect

    open_asset_page(page, served.url, "partitions")
    n = len(served.monitored.days)
    expect(page.get_by_text(f"Materialized ({n})", exact=True)).to_be_visible()
    expect(page.get_by_text("Missing (0)", exact=True)).to_be_visible()
    for day in served.monitored.days:
        expect(page.get_by_text(day, exact=True).first).to_be_visible()
    page.screenshot(path=str(served.shots / "partitions.png"))


def test_the_checks_tab_shows_the_shifted_day_warnings_and_why(served: Served, page) -> None:
    from playwright.sync_api import expect

    open_asset_page(page, served.url, "checks")
    expect(page.get_by_text(f"Checks ({len(CHECKS)})", exact=True)).to_be_visible()
    for name in CHECKS:
        expect(page.get_by_text(name, exact=True).first).to_be_visible()
    expect(page.get_by_text("Failed", exact=True)).to_have_count(len(CHECKS) + 1)  # the list, and the detail
    expect(page.get_by_text("This is a non-blocking asset check.")).to_be_visible()

    page.get_by_text("score_shift", exact=True).first.click()
    page.get_by_text("[Show Markdown]").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("served probabilities shifted: PSI")
    expect(dialog).to_contain_text("monitoring.score_psi_warn")
    page.screenshot(path=str(served.shots / "checks.png"))


def test_the_overview_plots_every_number_over_the_days(served: Served, page) -> None:
    from playwright.sync_api import expect

    open_asset_page(page, served.url)
    expect(page.get_by_text(served.monitored.shifted_day, exact=True).first).to_be_visible()  # latest
    show_metadata_plots(page)
    numbers = sorted(served.shifted.numbers)
    for name in ("score_psi", "estimated_auc", "ood_flag_rate", "age_band_psi"):
        assert name in numbers
    for name in numbers:
        expect(page.get_by_text(name, exact=True).first).to_be_attached()
    expect(page.locator("canvas")).to_have_count(len(numbers))
    page.screenshot(path=str(served.shots / "plots.png"), full_page=True)


def test_the_report_shows_the_days_table_and_warnings(served: Served, page) -> None:
    from playwright.sync_api import expect

    open_asset_page(page, served.url)
    page.get_by_text("[Show Markdown]").click()
    dialog = page.get_by_role("dialog")
    psi = served.shifted.numbers["score_psi"]
    expect(dialog.get_by_role("row", name=f"score_psi {psi:.4g}", exact=True)).to_be_visible()
    expect(dialog.get_by_role("row", name="cases 200", exact=True)).to_be_visible()
    expect(dialog).to_contain_text("Warnings")
    expect(dialog).to_contain_text("of cases flagged out-of-distribution")
    page.screenshot(path=str(served.shots / "report.png"))
