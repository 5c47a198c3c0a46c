"""Astria Remote Upscale inside ComfyUI against the fake Astria server: what is sent, seeds, guards, errors, Cancel, key.

The fake runs on 127.0.0.1 in its own thread (real time, prompts finish at once unless a test holds them); the node
finds it through ASTRIA_API_URL, as a user's ComfyUI would find Astria.
"""
import asyncio
import importlib
import logging
import shutil
import threading

import pytest
import torch

from comfyui_astria.tests.unit.fake_astria import FakeAstriaThread, Faults, png_bytes

from .conftest import run_node

KEY = "sk-SENTINEL-remote-7f3a9c21d00d"
TUNE = 690204
PROMPT = """masterpiece, best quality, highres, <lora:more_details:0.5> --only_upscale
negative_prompt=(worst quality:2) JuggernautNegative-neg
seed=
steps=16
denoising_strength=0.1
use_lpw=false"""
RESULT_SIZE = (24, 16)  # (width, height) of every image the fake returns


def seed_coloured_png(prompt):
    """The fake's result image for a prompt: its red channel is the prompt's seed mod 256 (so order is visible)."""
    return png_bytes(RESULT_SIZE, (int(prompt.attrs["seed"]) % 256, 7, 9))


@pytest.fixture
def astria(comfy_host, monkeypatch):
    """A fresh fake Astria, the environment pointing at it, and an empty user/__astria/ (journal, key file)."""
    folder = comfy_host.base / "user" / "__astria"
    shutil.rmtree(folder, ignore_errors=True)  # each fake numbers prompts from 1001: old journals would clash
    runner = FakeAstriaThread(KEY, Faults(render_s=0.0), image_for=seed_coloured_png)
    fake = runner.start()
    monkeypatch.setenv("ASTRIA_API_URL", fake.base_url)
    monkeypatch.setenv("ASTRIA_API_KEY", KEY)
    monkeypatch.setenv("ASTRIA_CREATE_SETTLE_S", "0.1")
    try:
        yield fake
    finally:
        runner.stop()
        host_model_management().interrupt_current_processing(False)


def host_model_management():
    """ComfyUI's comfy.model_management (importable once comfy_host has set ComfyUI up)."""
    return importlib.import_module("comfy.model_management")


def parsed(comfy_host, text=PROMPT):
    """The ASTRIA_PROMPT the Astria Prompt node makes of `text`."""
    return run_node(comfy_host, "AstriaPrompt", text=text)[0]


def batch(*colours, size=(16, 12)):
    """An IMAGE batch of flat colours (0..255 RGB), size (width, height)."""
    width, height = size
    return torch.stack([torch.tensor(colour, dtype=torch.float32).div(255).expand(height, width, 3)
                        for colour in colours])


def remote(comfy_host, image, prompt, **widgets):
    """Run Astria Remote Upscale with the node's defaults for widgets not given; returns its IMAGE."""
    inputs = dict(tune_id=TUNE, seed=100, concurrency=2, max_prompts=16)
    inputs.update(widgets)
    return run_node(comfy_host, "AstriaRemoteUpscale", image=image, astria_prompt=prompt, **inputs)[0]


def sent_seeds(fake):
    """The prompt[seed] of every create the fake received, in the order received."""
    return sorted(int(request.fields["prompt[seed]"]) for request in fake.creates())


def test_a_batch_of_two_creates_two_prompts_with_consecutive_seeds_and_returns_results_in_order(comfy_host, astria):
    result = remote(comfy_host, batch((10, 20, 30), (200, 100, 50)), parsed(comfy_host), seed=100)
    assert result.shape == (2, RESULT_SIZE[1], RESULT_SIZE[0], 3)
    assert [round(float(result[i, 0, 0, 0]) * 255) for i in range(2)] == [100, 101]  # image i: seed 100 + i
    creates = astria.creates()
    assert sent_seeds(astria) == [100, 101]
    for request in creates:
        assert request.path == f"/tunes/{TUNE}/prompts"
        assert request.fields["prompt[text]"] == (
            "masterpiece, best quality, highres, <lora:more_details:0.5> --only_upscale")
        assert request.fields["prompt[negative_prompt]"] == "(worst quality:2) JuggernautNegative-neg"
        assert (request.fields["prompt[steps]"], request.fields["prompt[denoising_strength]"]) == ("16", "0.1")
        assert request.fields["prompt[use_lpw]"] == "false"
        assert request.files["prompt[input_image]"] > 0
    assert all(not request.has_auth for request in astria.image_requests)


def test_only_upscale_is_added_the_prompt_seed_wins_and_input_image_url_is_not_sent(comfy_host, astria, caplog):
    prompt = parsed(comfy_host, "a house\nseed=4294967295\ninput_image_url=https://example.com/x.png\ncfg_scale=6")
    with caplog.at_level(logging.WARNING, logger="astria"):
        result = remote(comfy_host, batch((1, 2, 3), (4, 5, 6)), prompt, seed=7)
    assert result.shape[0] == 2
    assert sent_seeds(astria) == [0, 4294967295]  # the prompt's seed, then seed + 1 wraps to 0
    for request in astria.creates():
        assert request.fields["prompt[text]"] == "a house --only_upscale"
        assert request.fields["prompt[cfg_scale]"] == "6.0"
        assert "prompt[input_image_url]" not in request.fields and "prompt[seed]" in request.fields
    warnings = caplog.text
    assert "--only_upscale" in warnings and "input_image_url was not sent" in warnings


def test_the_prompt_text_is_sent_as_written_and_unset_params_are_not_sent(comfy_host, astria):
    written = ('<faceid:123:1> ohwx woman in a garden, <lora:more_details:1>\n  detailed skin --only_upscale '
               '--mask_prompt "face"')
    prompt = parsed(comfy_host, written + "\nsteps=16\nsuper_resolution=\nscheduler=undefined\nnegative_prompt=\n"
                                          "film_grain=true\nmy_new_param=abc")
    remote(comfy_host, batch((1, 2, 3)), prompt, seed=11)
    fields = astria.creates()[0].fields
    # Astria reads tags in place: `<faceid:ID:1> NAME` needs the class name right after the tag, so the text is
    # not rewritten (tags moved to the end, weights reformatted, lines joined, quotes dropped).
    assert fields["prompt[text]"] == written
    assert fields == {"prompt[text]": written, "prompt[steps]": "16", "prompt[seed]": "11",
                      "prompt[film_grain]": "true", "prompt[my_new_param]": "abc"}
    assert list(astria.creates()[0].files) == ["prompt[input_image]"]


def test_without_an_image_the_prompts_input_image_url_is_sent_instead_of_a_file(comfy_host, astria):
    url = "https://example.com/photos/x.png"
    prompt = parsed(comfy_host, f"a house --only_upscale\ninput_image_url={url}\nsteps=16")
    result = remote(comfy_host, None, prompt, seed=5)
    assert result.shape[0] == 1 and result.shape[1:3] == (RESULT_SIZE[1], RESULT_SIZE[0])
    (request,) = astria.creates()
    assert request.fields["prompt[input_image_url]"] == url and request.fields["prompt[seed]"] == "5"
    assert request.files == {}


def test_without_an_image_or_an_input_image_url_nothing_is_sent_and_the_error_says_what_to_connect(comfy_host,
                                                                                                   astria):
    with pytest.raises(ValueError, match="connect an IMAGE, or give the prompt an input_image_url="):
        remote(comfy_host, None, parsed(comfy_host, "a house --only_upscale"))
    assert astria.creates() == []


def test_poll_interval_retry_base_and_deadline_come_from_the_environment(comfy_host, astria, monkeypatch):
    """ASTRIA_POLL_INTERVAL_S and ASTRIA_RETRY_BASE_S: with the defaults (5 s, 30 s after a 500) this render of
    0.4 s would be polled twice; ASTRIA_DEADLINE_S bounds a prompt that never finishes."""
    monkeypatch.setenv("ASTRIA_POLL_INTERVAL_S", "0.05")
    monkeypatch.setenv("ASTRIA_RETRY_BASE_S", "0.05")
    astria.faults.render_s = 0.4
    astria.faults.fail_500_times = 1
    result = remote(comfy_host, batch((1, 2, 3)), parsed(comfy_host), seed=3)
    assert result.shape[0] == 1
    assert len(astria.api("GET", "/prompts/")) >= 4
    monkeypatch.setenv("ASTRIA_DEADLINE_S", "0.3")
    astria.faults.never_finish = True
    with pytest.raises(RuntimeError, match="before the deadline"):
        remote(comfy_host, batch((9, 9, 9)), parsed(comfy_host), seed=4)


def test_a_bad_wait_setting_in_the_environment_is_refused_before_anything_is_sent(comfy_host, astria, monkeypatch):
    monkeypatch.setenv("ASTRIA_POLL_INTERVAL_S", "soon")
    with pytest.raises(ValueError, match="ASTRIA_POLL_INTERVAL_S='soon' is not a number of seconds"):
        remote(comfy_host, batch((1, 2, 3)), parsed(comfy_host))
    assert astria.creates() == []


def test_identical_images_get_distinct_seeds_and_one_prompt_each(comfy_host, astria):
    result = remote(comfy_host, batch((9, 9, 9), (9, 9, 9), (9, 9, 9)), parsed(comfy_host), seed=500,
                    concurrency=3)
    assert sent_seeds(astria) == [500, 501, 502]
    assert len(astria.prompts) == 3
    assert [round(float(result[i, 0, 0, 0]) * 255) for i in range(3)] == [500 % 256, 501 % 256, 502 % 256]


def test_max_prompts_refuses_a_bigger_batch_before_sending_anything(comfy_host, astria):
    with pytest.raises(ValueError, match=r"would create 3 paid Astria prompts.*max_prompts=2.*nothing was sent"):
        remote(comfy_host, batch((1, 1, 1), (2, 2, 2), (3, 3, 3)), parsed(comfy_host), max_prompts=2)
    assert astria.requests == []


def test_a_user_error_names_the_failed_image_and_a_rerun_pays_nothing_for_the_finished_one(comfy_host, astria):
    astria.faults.user_error = "Face not detected in the input image"
    astria.faults.user_error_seeds = (301,)
    images = batch((1, 2, 3), (4, 5, 6))
    with pytest.raises(RuntimeError) as failure:
        remote(comfy_host, images, parsed(comfy_host), seed=300, concurrency=1)
    text = str(failure.value)
    assert "1 of 2 image(s) failed" in text
    assert "image 2:" in text and "Face not detected in the input image" in text and "image 1:" not in text
    assert "seed (300)" in text
    assert len(astria.creates()) == 2
    # the same run again: image 1 is fetched from its delivered prompt, image 2's prompt still reports its error
    with pytest.raises(RuntimeError, match="image 2: .*Face not detected"):
        remote(comfy_host, images, parsed(comfy_host), seed=300, concurrency=1)
    assert len(astria.creates()) == 2


def test_cancel_mid_poll_raises_comfyuis_interrupt_and_says_the_prompt_may_be_billed(comfy_host, astria, caplog):
    model_management = host_model_management()
    astria.faults.never_finish = True
    pressed = threading.Event()

    def press_cancel_after_the_first_poll():
        while not pressed.is_set():
            if astria.api("GET", "/prompts/"):
                model_management.interrupt_current_processing(True)
                pressed.set()
            pressed.wait(0.02)

    watcher = threading.Thread(target=press_cancel_after_the_first_poll, daemon=True)
    watcher.start()
    try:
        with caplog.at_level(logging.WARNING, logger="astria"):
            with pytest.raises(model_management.InterruptProcessingException):
                remote(comfy_host, batch((5, 5, 5)), parsed(comfy_host), seed=1)
    finally:
        pressed.set()
        watcher.join()
    polls = astria.api("GET", "/prompts/")
    # Astria's poll interval is 5 s: a single poll means the wait stopped before the next one was due
    assert len(polls) == 1 and len(astria.creates()) == 1
    prompt_id = next(iter(astria.prompts))
    assert f"Prompt {prompt_id} was already created on Astria and may still be billed" in caplog.text
    assert not model_management.processing_interrupted()  # the flag is cleared, as ComfyUI's own check does


def test_the_key_appears_in_no_log_record_or_error(comfy_host, astria, caplog):
    astria.faults.reject_422 = "Invalid prompt"
    astria.faults.echo_auth_in_errors = True  # a careless server that echoes the Authorization header
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(RuntimeError) as failure:
            remote(comfy_host, batch((1, 2, 3)), parsed(comfy_host))
    assert "Invalid prompt" in str(failure.value)
    assert KEY not in str(failure.value) and KEY not in repr(failure.value)
    assert caplog.records and all(KEY not in record.getMessage() for record in caplog.records)
    assert KEY not in caplog.text


def test_the_key_file_is_used_when_the_environment_has_no_key(comfy_host, astria, monkeypatch):
    monkeypatch.delenv("ASTRIA_API_KEY")
    folder = comfy_host.base / "user" / "__astria"
    folder.mkdir(parents=True, exist_ok=True)
    key_file = folder / "api_key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    result = remote(comfy_host, batch((1, 2, 3)), parsed(comfy_host), seed=42)
    assert result.shape[0] == 1 and sent_seeds(astria) == [42]  # the fake accepts only KEY


def test_without_any_key_the_error_says_how_to_set_one(comfy_host, astria, monkeypatch):
    monkeypatch.delenv("ASTRIA_API_KEY")
    with pytest.raises(ValueError, match=r"ASTRIA_API_KEY.*__astria/api_key.*chmod 600"):
        remote(comfy_host, batch((1, 2, 3)), parsed(comfy_host))
    assert astria.requests == []


def test_results_of_different_sizes_are_a_clear_error_naming_the_prompts(comfy_host, astria):
    astria.image_for = lambda prompt: png_bytes((24 + int(prompt.attrs["seed"]) % 2 * 8, 16))
    with pytest.raises(ValueError, match=r"different sizes \(image 1 \(prompt \d+\): 24x16, image 2 \(prompt \d+\): "
                                         r"32x16\)"):
        remote(comfy_host, batch((1, 2, 3), (3, 2, 1)), parsed(comfy_host), seed=10)


def test_progress_bar_and_status_text_follow_the_batch(comfy_host, astria, monkeypatch):
    import comfy.utils
    import server

    texts, bar = [], []

    class RecordingServer:
        def send_progress_text(self, text, node_id, sid=None):
            texts.append((node_id, text))

    monkeypatch.setattr(server.PromptServer, "instance", RecordingServer(), raising=False)
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK",
                        lambda value, total, preview, node_id=None: bar.append((value, total, node_id)))
    cls = comfy_host.nodes.NODE_CLASS_MAPPINGS["AstriaRemoteUpscale"]
    clone = cls.PREPARE_CLASS_CLONE({"UNIQUE_ID": "42"})
    outputs = asyncio.run(clone.execute(image=batch((1, 2, 3), (4, 5, 6)), astria_prompt=parsed(comfy_host),
                                        tune_id=TUNE, seed=5, concurrency=1, max_prompts=16))
    assert outputs.result[0].shape[0] == 2
    assert bar == [(1, 2, "42"), (2, 2, "42")]
    assert {node_id for node_id, _ in texts} == {"42"}
    shown = "\n".join(text for _, text in texts)
    assert "Creating the prompt on Astria (seed 5)" in shown and "Creating the prompt on Astria (seed 6)" in shown
    assert "Downloading image 1 of 1 of prompt" in shown
    assert texts[-1][1].startswith("Astria: 2 of 2 image(s) done")
