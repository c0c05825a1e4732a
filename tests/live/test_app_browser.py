"""The Gradio app in a real headless Chromium (Playwright): upload, fill metadata, analyse, read the result.

The served bundle is a random-weight ``test_efficientnet`` at 64 px registered through the registry API
(the client test covers a trained bundle). A screenshot of the finished page is saved under ``tmp_path``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from app_helpers import launch_local, register_tiny
from browser_helpers import CHROMIUM, CHROMIUM_MISSING, launch_chromium
from conftest import require
from PIL import Image, ImageDraw

pytestmark = [pytest.mark.browser, pytest.mark.slow]

TIMEOUT_MS = 60_000


def lesion_photo(path: Path) -> Path:
    """A brownish blob on skin tone, 160 x 120 px."""
    image = Image.new("RGB", (160, 120), (224, 180, 150))
    ImageDraw.Draw(image).ellipse((50, 30, 115, 92), fill=(90, 55, 40))
    image.save(path, quality=92)
    return path


@pytest.fixture()
def app_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from melanoma_ml.config import ServingConfig
    from melanoma_ml.serving.registry import ModelRegistry

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    from melanoma_ml.serving.app import create_app
    from melanoma_ml.serving.service import ModelService

    registry = ModelRegistry(tmp_path / "registry")
    register_tiny(registry, seed=0)
    serving = ServingConfig(cam_min_map_side=2)  # offers conv_head/bn2 (2x2 at 64 px) in the layer list
    demo = create_app(ModelService(registry, serving))
    try:
        yield launch_local(demo, serving)
    finally:
        demo.close()


def pick(page, elem_id: str, option: str) -> None:
    """Choose ``option`` in the Gradio dropdown with ``elem_id``."""
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def test_upload_fill_analyse_and_see_the_overlay(
    app_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    require(CHROMIUM.is_file(), CHROMIUM_MISSING)
    from playwright.sync_api import expect, sync_playwright

    # expect() has its own 5 s default apart from the page's: a loaded 2-core machine missed it on the
    # first render of the disclaimer; reset for the modules that follow.
    expect.set_options(timeout=TIMEOUT_MS)
    request.addfinalizer(lambda: expect.set_options(timeout=5_000))
    photo = lesion_photo(tmp_path / "lesion.jpg")
    screenshot = tmp_path / "app.png"
    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(app_url)
            expect(page.locator("#disclaimer")).to_contain_text("not a medical device")
            expect(page.locator("#model-status")).to_contain_text("Serving model v0001")
            page.locator("#upload input[type=file]").set_input_files(str(photo))
            expect(page.locator("#upload")).to_contain_text("lesion.jpg")
            page.locator("#age textarea, #age input").first.fill("62")
            pick(page, "sex", "female")
            pick(page, "site", "torso")
            pick(page, "cam-layer", "backbone.bn2")
            page.locator("#analyse").click()
            result = page.locator("#result")
            expect(result).to_contain_text("Melanoma probability", timeout=TIMEOUT_MS)
            match = re.search(r"Melanoma probability: ([0-9.]+)%", result.inner_text())
            assert match, result.inner_text()
            assert 0.0 <= float(match.group(1)) <= 100.0
            expect(result).to_contain_text("v0001")
            expect(result).to_contain_text("backbone.bn2")
            # The page refresh after a prediction keeps the user's picks.
            expect(page.locator("#cam-layer input")).to_have_value("backbone.bn2")
            expect(page.locator("#sex input")).to_have_value("female")
            overlay = page.locator("#cam-overlay img")
            expect(overlay).to_be_visible()
            assert overlay.evaluate("img => img.complete && img.naturalWidth") == 64
            expect(page.locator("#model-view img")).to_be_visible()
            page.screenshot(path=str(screenshot), full_page=True)

            # A bad upload shows a clear message on the page and the app keeps answering.
            notes = tmp_path / "notes.txt"
            notes.write_text("not an image")
            page.locator("#upload button[aria-label='Clear']").first.click()
            page.locator("#upload input[type=file]").set_input_files(str(notes))
            page.locator("#analyse").click()
            expect(page.get_by_text("not a recognised image format").first).to_be_visible()
        finally:
            browser.close()
    pixels = np.asarray(Image.open(screenshot))
    assert pixels.shape[1] == 1280 and pixels.std() > 10  # a rendered page, not a blank or loading screen
