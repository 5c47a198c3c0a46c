"""Browser tier: headless Chromium (Debian's `chromium`) driven by Playwright against a running test ComfyUI.

Every test here is marked `browser`. scripts/browser.sh installs Chromium and Playwright; the tests are skipped
only when no Chromium executable can be found (set ASTRIA_CHROMIUM to use another one).
"""
import os
import shutil

import pytest

from comfyui_astria.tests.server.conftest import ComfyServer
from comfyui_astria.tests.support import paths

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1600, "height": 1000}


def pytest_collection_modifyitems(items):
    for item in items:
        if "/tests/browser/" in str(item.fspath):
            item.add_marker(pytest.mark.browser)


def chromium_executable():
    """The Chromium to drive: ASTRIA_CHROMIUM, else Debian's chromium on PATH, else None."""
    configured = os.environ.get("ASTRIA_CHROMIUM")
    if configured:
        return configured
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="session")
def browser():
    """A headless Chromium, closed at the end."""
    executable = chromium_executable()
    if executable is None:
        pytest.skip("no Chromium installed: on Debian/Ubuntu run `apt-get install -y chromium` (scripts/browser.sh "
                    "does it as root), or set ASTRIA_CHROMIUM to a Chromium executable")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the Python package playwright is missing: run ./scripts/test (scripts/browser.sh installs it) "
                    "or `pip install playwright` for the python that runs these tests")
    with sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="session")
def browser_server(tmp_path_factory):
    """A ComfyUI server of its own for the browser tier, stopped at the end."""
    if not (paths.COMFY_DIR / "main.py").is_file():
        pytest.fail(f"no ComfyUI tree at {paths.COMFY_DIR}: run ./scripts/test (it sets it up) or set COMFYUI_PATH")
    server = ComfyServer(tmp_path_factory.mktemp("browser_server"))
    try:
        yield server
    finally:
        server.stop()
