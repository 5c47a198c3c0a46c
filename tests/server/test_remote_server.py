"""Astria Remote Upscale in a real ComfyUI process, against the fake Astria server this module starts.

A second ComfyUI server (its own user folder, ASTRIA_API_URL pointing at the fake, a sentinel API key) runs
LoadImage -> Astria Prompt -> Astria Remote Upscale -> SaveImage. Checked: the run completes; the key is in no
/history entry, queue, saved PNG or server log; ComfyUI's userdata routes cannot list or read the key file; a server
stopped mid-job resumes the paid prompt after a restart, even with the seed widget moved, without a second create.
"""
import json
import time
import types
import urllib.parse

import pytest
from PIL import Image

from comfyui_astria.tests.unit.fake_astria import FakeAstriaThread, Faults, png_bytes

from .conftest import ComfyServer, output_images

KEY = "sk-SENTINEL-server-91b2e4f0cafe"
TUNE = 690204
RESULT_SIZE = (40, 24)  # (width, height) of the fake's result images
INPUT_NAME = "astria_remote_in.png"
WAIT_S = 120


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    """The fake Astria and a ComfyUI server wired to it (replaceable by a test that restarts it); both stopped."""
    runner = FakeAstriaThread(KEY, Faults(render_s=0.0), image=png_bytes(RESULT_SIZE, (30, 160, 90)))
    fake = runner.start()
    base = tmp_path_factory.mktemp("comfy_remote")
    (base / "input").mkdir()
    (base / "input" / INPUT_NAME).write_bytes(png_bytes((16, 12), (200, 120, 40)))
    key_folder = base / "user" / "__astria"
    key_folder.mkdir(parents=True)
    (key_folder / "api_key").write_text(KEY + "\n")
    (key_folder / "api_key").chmod(0o600)
    env = {"ASTRIA_API_URL": fake.base_url, "ASTRIA_API_KEY": KEY, "ASTRIA_CREATE_SETTLE_S": "0.2"}
    state = types.SimpleNamespace(fake=fake, base=base, env=env, server=None)
    try:
        state.server = ComfyServer(base, env_extra=env)
        yield state
    finally:
        if state.server is not None:
            state.server.stop()
        runner.stop()


def graph(text, seed):
    """LoadImage -> AstriaPrompt -> AstriaRemoteUpscale -> SaveImage, in the API format /prompt takes."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": INPUT_NAME}},
        "2": {"class_type": "AstriaPrompt", "inputs": {"text": text}},
        "3": {"class_type": "AstriaRemoteUpscale",
              "inputs": {"image": ["1", 0], "astria_prompt": ["2", 0], "tune_id": TUNE, "seed": seed,
                         "concurrency": 2, "max_prompts": 16}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "astria_remote"}},
    }


def queue(server, text, seed):
    """Queue the graph with a workflow in extra_pnginfo, as the browser does; returns the prompt id."""
    workflow = {"nodes": [{"id": 3, "type": "AstriaRemoteUpscale", "widgets_values": [TUNE, seed, "randomize", 2, 16]}]}
    return server.queue(graph(text, seed), extra_data={"extra_pnginfo": {"workflow": workflow}})


def assert_no_key(where, text):
    """The sentinel key must not occur in `text` (named `where` in the failure)."""
    assert KEY not in text, f"the API key leaked into {where}"


def wait_for(condition, what, server):
    """Poll `condition()` until true (fails the test after WAIT_S with the server's log tail)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}:\n{server.log()[-3000:]}")


def test_the_graph_completes_and_the_key_is_in_no_history_png_or_log(remote):
    server, fake = remote.server, remote.fake
    prompt_id = queue(server, "a red barn --only_upscale\nsteps=16", 1000)
    entry = server.wait(prompt_id, timeout=WAIT_S)
    assert entry["status"]["status_str"] == "success", entry["status"]
    creates = [request for request in fake.creates() if request.fields["prompt[text]"].startswith("a red barn")]
    assert len(creates) == 1 and creates[0].fields["prompt[seed]"] == "1000"
    saved = output_images(server, entry)
    assert len(saved) == 1
    with Image.open(saved[0]) as picture:
        assert picture.size == RESULT_SIZE
        assert "workflow" in picture.text and "prompt" in picture.text  # metadata is there, the key is not
        assert_no_key("the saved PNG's metadata", json.dumps(picture.text))
    assert_no_key("the saved PNG's bytes", saved[0].read_bytes().decode("latin-1"))
    assert_no_key("/history", json.dumps(server.get("/history")))
    assert_no_key("the server log", server.log())


def test_an_error_that_echoes_the_key_reaches_history_without_it(remote):
    server, fake = remote.server, remote.fake
    fake.faults.reject_422, fake.faults.echo_auth_in_errors = "Invalid prompt", True
    try:
        entry = server.wait(queue(server, "a blue door --only_upscale", 2000), timeout=WAIT_S)
    finally:
        fake.faults.reject_422, fake.faults.echo_auth_in_errors = None, False
    assert entry["status"]["status_str"] == "error"
    errors = [message for message in entry["status"]["messages"] if message[0] == "execution_error"]
    assert errors and "Invalid prompt" in errors[0][1]["exception_message"]
    assert errors[0][1]["node_type"] == "AstriaRemoteUpscale"
    assert_no_key("/history", json.dumps(server.get("/history")))
    assert_no_key("the server log", server.log())


def test_userdata_routes_cannot_list_or_read_the_key_file(remote):
    server = remote.server
    probe = remote.base / "user" / "default" / "astria_probe.txt"
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text("public")
    assert server.request("/api/userdata/astria_probe.txt") == (200, b"public")  # the route serves user/default
    attempts = [f"/api/userdata?dir={urllib.parse.quote(folder, safe='')}{extra}"
                for folder in ("__astria", "../__astria", "..", "../", "default/../__astria")
                for extra in ("", "&recurse=true", "&recurse=true&full_info=true")]
    attempts += [f"/api/v2/userdata?path={urllib.parse.quote(folder, safe='')}"
                 for folder in ("__astria", "../__astria", "..")]
    attempts += [f"/api/userdata/{urllib.parse.quote(name, safe='')}"
                 for name in ("../__astria/api_key", "..%2F__astria%2Fapi_key", "__astria/api_key")]
    for path in attempts:
        status, body = server.request(path)
        text = body.decode("utf-8", "replace")
        assert_no_key(f"GET {path}", text)
        assert "api_key" not in text and "jobs.jsonl" not in text, f"GET {path} -> {status}: {text[:300]}"


def test_a_restart_mid_job_resumes_the_paid_prompt_with_a_moved_seed_and_creates_nothing(remote):
    fake = remote.fake
    text = "a green field --only_upscale\ndenoising_strength=0.2"

    def ours(requests):
        return [request for request in requests if request.fields.get("prompt[text]", "").startswith("a green")]

    fake.faults.never_finish = True
    first = queue(remote.server, text, 11)
    wait_for(lambda: ours(fake.creates()), "the create", remote.server)
    prompt_path = f"/prompts/{max(fake.prompts)}.json"
    wait_for(lambda: fake.api("GET", prompt_path), "the first poll", remote.server)
    running = remote.server.get("/queue")
    assert [item[1] for item in running["queue_running"]] == [first]
    assert_no_key("/queue", json.dumps(running))
    remote.server.stop()  # ComfyUI goes away while Astria still renders the paid prompt
    assert_no_key("the first server's log", remote.server.log_path.read_text(errors="replace"))
    remote.server = None
    fake.faults.never_finish = False

    remote.server = ComfyServer(remote.base, env_extra=remote.env)
    entry = remote.server.wait(queue(remote.server, text, 12), timeout=WAIT_S)  # the seed widget moved on
    assert entry["status"]["status_str"] == "success", entry["status"]
    creates = ours(fake.creates())
    assert len(creates) == 1 and creates[0].fields["prompt[seed]"] == "11"
    assert len(fake.api("GET", prompt_path)) >= 2  # polled before the restart and again after it
    saved = output_images(remote.server, entry)
    assert len(saved) == 1
    with Image.open(saved[0]) as picture:
        assert picture.size == RESULT_SIZE
    events = [json.loads(line) for line in (remote.base / "user" / "__astria" / "jobs.jsonl").read_text().splitlines()]
    resumed = [event for event in events if event.get("prompt_id") == int(prompt_path.split("/")[2][:-5])]
    assert [event["event"] for event in resumed] == ["created", "delivered"]
    assert_no_key("the restarted server's log", remote.server.log())
