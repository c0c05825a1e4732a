"""Headless Chromium for the browser tests and the monitor screenshot: where it is and how it starts.

Importable as ``from browser_helpers import ...`` (this folder is on ``sys.path``, like ``conftest``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Playwright

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_MISSING = f"Chromium not found at {CHROMIUM} (apt-get install chromium)"
CHROMIUM_ARGS = (
    "--no-sandbox",  # runs as root in containers and CI
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # no calls home: the pages are on loopback
    "--disable-component-update",
    "--disable-sync",
)


def launch_chromium(playwright: Playwright) -> Browser:
    """The system Chromium, headless, with ``CHROMIUM_ARGS``; close it when done."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=list(CHROMIUM_ARGS), headless=True)
