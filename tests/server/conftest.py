"""Server tier: ComfyUI's `main.py --cpu` as a subprocess on a free 127.0.0.1 port, driven over HTTP.

Every test here is marked `server`. The server gets temp user/input/output/temp folders and database, the test
models and the pack through a generated extra_model_paths yaml, and is stopped by its PID even when a test fails.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest

from comfyui_astria.tests.support import paths

STARTUP_TIMEOUT_S = 180


def pytest_collection_modifyitems(items):
    for item in items:
        if "/tests/server/" in str(item.fspath):
            item.add_marker(pytest.mark.server)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ComfyServer:
    """A running ComfyUI process: its URL, folders and log, with small HTTP helpers."""

    def __init__(self, base, env_extra=None, args_extra=()):
        self.base = base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dirs = {name: base / name for name in ("user", "input", "output", "temp")}
        for folder in self.dirs.values():
            folder.mkdir(parents=True, exist_ok=True)
        self.log_path = base / "comfyui.log"
        yaml = paths.models_yaml(base / "extra_model_paths.yaml", paths.pack_link_folder())
        command = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                   "--extra-model-paths-config", str(yaml), "--disable-auto-launch",
                   "--user-directory", str(self.dirs["user"]), "--input-directory", str(self.dirs["input"]),
                   "--output-directory", str(self.dirs["output"]), "--temp-directory", str(self.dirs["temp"]),
                   "--database-url", f"sqlite:///{self.dirs['user']}/comfyui.db", *args_extra]
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
        self.log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen(command, cwd=paths.COMFY_DIR, stdout=self.log_file,
                                        stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self._wait_ready()

    def _wait_ready(self):
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                pytest.fail(f"ComfyUI exited with {self.process.returncode} at startup:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        pytest.fail(f"ComfyUI did not answer within {STARTUP_TIMEOUT_S} s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        """Everything the server printed so far."""
        if not self.log_file.closed:
            self.log_file.flush()
        return self.log_path.read_text(errors="replace")

    def request(self, path, data=None, method=None, timeout=30):
        """(status, body bytes) of one HTTP request; JSON bodies for dict data."""
        body = json.dumps(data).encode() if isinstance(data, (dict, list)) else data
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Content-Type": "application/json"} if body else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def get(self, path):
        """JSON of a GET that must succeed."""
        status, body = self.request(path)
        assert status == 200, f"GET {path} -> {status}: {body[:500]!r}"
        return json.loads(body)

    def queue(self, graph, extra_data=None) -> str:
        """POST /prompt; returns the prompt id (fails the test with the server's error on rejection)."""
        payload = {"prompt": graph, "client_id": uuid.uuid4().hex}
        if extra_data:
            payload["extra_data"] = extra_data
        status, body = self.request("/prompt", payload)
        assert status == 200, f"/prompt rejected the graph ({status}): {body.decode(errors='replace')}"
        return json.loads(body)["prompt_id"]

    def wait(self, prompt_id, timeout=300) -> dict:
        """The /history entry of a finished prompt (fails the test on timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.5)
        pytest.fail(f"prompt {prompt_id} did not finish in {timeout} s:\n{self.log()[-3000:]}")

    def stop(self):
        """Stop the server by its PID (its whole process group), then close the log."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=15)
        self.log_file.close()


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """One ComfyUI server for the server tier, stopped at the end whatever happened."""
    if not (paths.COMFY_DIR / "main.py").is_file():
        pytest.fail(f"no ComfyUI tree at {paths.COMFY_DIR}: run ./scripts/test (it sets it up) or set COMFYUI_PATH")
    server = ComfyServer(tmp_path_factory.mktemp("comfy_server"))
    try:
        yield server
    finally:
        server.stop()


def output_images(server, entry) -> list:
    """Paths of the images a finished prompt saved into the server's output folder."""
    found = []
    for node_output in entry.get("outputs", {}).values():
        for image in node_output.get("images", []):
            folder = server.dirs["output" if image.get("type") == "output" else "temp"]
            found.append(folder / image.get("subfolder", "") / image["filename"])
    return found


