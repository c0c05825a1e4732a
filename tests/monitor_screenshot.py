"""The README's picture of the serving monitor in the Dagster UI (``docs/images/serving_monitor.png``).

Builds the same constructed deployment as ``tests/live/test_monitor_ui.py`` (``tests/monitor_ui_helpers.py``:
a promoted bundle, ``--days`` of its prediction log whose last day is a shifted clinic, ``serving_monitor``
materialized for each), starts ``dagster-webserver`` on loopback, opens the asset's Overview with its
metadata as plots in headless Chromium and saves the status and the first ``--rows`` rows of plots.
Prints what each day measured and which checks warned. Needs Chromium at /usr/bin/chromium.

    .venv/bin/python tests/monitor_screenshot.py --out docs/images/serving_monitor.png

It lives beside the test helpers it shares (``benchmarks/`` import no test module); Python puts this folder
on ``sys.path`` when it runs the script, so ``monitor_ui_helpers`` and ``conftest`` import as in the tests.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from browser_helpers import CHROMIUM, CHROMIUM_MISSING, launch_chromium
from monitor_ui_helpers import (
    DagsterWebserver,
    materialize_monitor,
    open_asset_page,
    prepare_monitored_log,
    show_metadata_plots,
)

PLOTS_PER_ROW = 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images/serving_monitor.png"))
    parser.add_argument("--days", type=int, default=14, help="logged days, the last one shifted (default 14)")
    parser.add_argument(
        "--cases", type=int, default=200, help="mean cases a day, Poisson, at least 120 (default 200)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", type=int, default=2, help="rows of plots in the picture (default 2)")
    parser.add_argument("--width", type=int, default=1300, help="browser viewport width in px (default 1300)")
    args = parser.parse_args()
    if not CHROMIUM.is_file():
        raise SystemExit(CHROMIUM_MISSING)
    if args.days < 2:
        raise SystemExit(f"--days {args.days}: need at least 2 (quiet days, then the shifted one)")

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="monitor_screenshot_") as work:
        root = Path(work)
        volumes = np.maximum(np.random.default_rng(args.seed).poisson(args.cases, args.days), 120).tolist()
        monitored = prepare_monitored_log(
            root, seed=args.seed, quiet_days=args.days - 1, cases_per_day=volumes
        )
        with DagsterWebserver(monitored, root / "webserver.log") as server:
            days = materialize_monitor(monitored)
            url = server.wait_until_up()
            for day, found in days.items():
                numbers = found.numbers
                print(
                    f"{day}: cases {numbers['cases']:.0f}, score_psi {numbers['score_psi']:.3f}, "
                    f"estimated_auc {numbers['estimated_auc']:.3f}, ood_flag_rate {numbers['ood_flag_rate']:.3f}, "
                    f"warned: {', '.join(sorted(found.warned)) or 'none'}"
                )
            shoot(url, args.out, rows=args.rows, width=args.width)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} kB) in {time.monotonic() - started:.0f} s")


def shoot(url: str, out: Path, *, rows: int, width: int) -> None:
    """The Overview tab from its top to the bottom of the ``rows``-th row of plots, main column only."""
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=60_000)
    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page(viewport={"width": width, "height": 1400})
            page.set_default_timeout(60_000)
            open_asset_page(page, url)
            show_metadata_plots(page)
            canvases = page.locator("canvas")
            expect(canvases.first).to_be_visible()
            last = canvases.nth(min(rows * PLOTS_PER_ROW, canvases.count()) - 1)
            plot = last.bounding_box()
            if plot is None:
                raise RuntimeError("the metadata plots are not on the page; see the webserver log")
            page.wait_for_timeout(1500)  # let the charts finish their entry animation
            right = plot["x"] + plot["width"] + 24
            bottom = plot["y"] + plot["height"] + 16
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), clip={"x": 0, "y": 0, "width": right, "height": bottom})
        finally:
            browser.close()


if __name__ == "__main__":
    main()
