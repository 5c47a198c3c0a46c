"""Browser tier: headless Chromium (Debian's `chromium`) driven by Playwright against a running test ComfyUI.

Every test here is marked `browser` and runs on each frontend of FRONTENDS: the host's own (1.32.9 for 0.3.75) and
the newest (scripts/browser.sh installs it; ASTRIA_NEWEST_FRONTEND_ROOT), on its classic canvas and with Nodes 2.0.
scripts/browser.sh installs Chromium and Playwright; the tests are skipped only when no Chromium executable can be
found (set ASTRIA_CHROMIUM to use another one), and fail instead in CI (CI=true).
"""
import json
import os
import shutil
from pathlib import Path

import pytest

from comfyui_astria.tests.server.conftest import ComfyServer
from comfyui_astria.tests.support import paths

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1600, "height": 1000}
PACK_SOURCE = "/extensions/ComfyUI-Astria/"  # a console message from a script or request under this is ours
NEWEST_FRONTEND_ROOT = os.environ.get(
    "ASTRIA_NEWEST_FRONTEND_ROOT",
    str(paths.CACHE / "frontend-1.58.1" / "comfyui_frontend_package" / "static"))
# name -> (front-end root or None for the host's own, Nodes 2.0 on?)
FRONTENDS = {"host": (None, False), "newest": (NEWEST_FRONTEND_ROOT, False), "newest-nodes2": (NEWEST_FRONTEND_ROOT, True)}
QUIET_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingModelsWarning": False}


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
    if executable is None and os.environ.get("CI") == "true":
        pytest.fail("no Chromium in CI: the browser tier must run there (apt-get install chromium, or set "
                    "ASTRIA_CHROMIUM)")
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
def browser_servers(tmp_path_factory):
    """ComfyUI servers for the browser tier, one per front-end root, started on first use and stopped at the end."""
    if not (paths.COMFY_DIR / "main.py").is_file():
        pytest.fail(f"no ComfyUI tree at {paths.COMFY_DIR}: run ./scripts/test (it sets it up) or set COMFYUI_PATH")
    servers = {}

    def server_for(frontend_root):
        if frontend_root not in servers:
            if frontend_root is not None and not (Path(frontend_root) / "index.html").is_file():
                message = (f"the newest frontend is not installed at {frontend_root}: run ./scripts/test "
                           "(scripts/browser.sh installs it) or set ASTRIA_NEWEST_FRONTEND_ROOT")
                if os.environ.get("CI") == "true":
                    pytest.fail(message)
                pytest.skip(message)
            args = ["--front-end-root", frontend_root] if frontend_root else []
            servers[frontend_root] = ComfyServer(tmp_path_factory.mktemp("browser_server"), args_extra=args)
        return servers[frontend_root]

    try:
        yield server_for
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture(scope="module", params=list(FRONTENDS))
def frontend(request, browser_servers):
    """(name, server, nodes2) for each frontend: the server has the quiet first-run settings and the Nodes 2.0 one."""
    root, nodes2 = FRONTENDS[request.param]
    server = browser_servers(root)
    for setting, value in {**QUIET_SETTINGS, "Comfy.VueNodes.Enabled": nodes2}.items():
        status, _ = server.request(f"/settings/{setting}", json.dumps(value).encode(), method="POST")
        assert status == 200, f"could not set {setting}"
    return request.param, server, nodes2


class PackConsole:
    """Every console message, uncaught exception and failed request of a page whose source is the pack.

    The source is any script frame of the message's stack, or the URL of a failed request: a deprecation warning
    that the frontend prints from its own getter while our script reads it counts as ours. Messages of the frontend
    itself (1.58.1 on a 0.3.75 backend logs errors of its own) are not.
    """

    def __init__(self, page):
        self.messages = []
        self.session = page.context.new_cdp_session(page)
        self.session.on("Runtime.consoleAPICalled", self._console)
        self.session.on("Runtime.exceptionThrown", self._exception)
        self.session.on("Log.entryAdded", self._log)
        self.session.send("Runtime.enable")
        self.session.send("Log.enable")

    @staticmethod
    def _from_pack(stack, *urls):
        frames = (stack or {}).get("callFrames", [])
        return any(PACK_SOURCE in (url or "") for url in (*urls, *(frame.get("url") for frame in frames)))

    def _console(self, event):
        text = " ".join(str(arg.get("value", arg.get("description", ""))) for arg in event.get("args", []))
        if self._from_pack(event.get("stackTrace"), text):
            self.messages.append(f"console.{event['type']}: {text}")

    def _exception(self, event):
        details = event["exceptionDetails"]
        text = details.get("exception", {}).get("description") or details.get("text", "")
        if self._from_pack(details.get("stackTrace"), details.get("url"), text):
            self.messages.append(f"uncaught: {text}")

    def _log(self, event):
        entry = event["entry"]
        if self._from_pack(entry.get("stackTrace"), entry.get("url")):
            self.messages.append(f"{entry['level']}: {entry['text']} ({entry.get('url', '')})")
