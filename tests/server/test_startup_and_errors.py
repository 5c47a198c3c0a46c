"""What the user reads in ComfyUI's console and error dialog: no torchaudio tracebacks through scripts/serve's filter,
and the pack's own errors named `ComfyUI-Astria.<Error>` with our sentence, no cache path, no chain of wrappers."""
import re

from comfyui_astria.tools import host_log_filter

UNKNOWN_LORA = "no_such_lora_anywhere"


def test_the_serve_filter_leaves_no_traceback_in_the_real_startup_log(comfy_server):
    log = comfy_server.log()
    startup = log[: log.index("To see the GUI go to")]
    filtered = host_log_filter.filter_text(startup)
    assert "Traceback" not in filtered and "IMPORT FAILED" not in filtered and "pip install" not in filtered
    if "No module named 'torchaudio'" in startup:  # our host: the sentence replaces the complaints, once
        assert "Traceback (most recent call last):" in startup
        assert filtered.count(host_log_filter.NOTE) == 1
    kept = [line for line in startup.splitlines() if line.strip() and "torchaudio" not in line
            and not line.startswith(("Traceback", " ", "IMPORT FAILED", "WARNING: some comfy_extras",
                                     "This issue might be caused", "Please do a"))]
    assert kept and [line for line in filtered.splitlines() if line in kept] == kept  # everything else, in order


def execution_error(comfy_server, graph) -> dict:
    entry = comfy_server.wait(comfy_server.queue(graph))
    assert entry["status"]["status_str"] == "error", entry["status"]
    errors = [body for kind, body in entry["status"]["messages"] if kind == "execution_error"]
    assert len(errors) == 1, entry["status"]["messages"]
    return errors[0]


def assert_reads_well(error, shown_type, message_start, comfy_server):
    assert error["exception_type"] == shown_type
    message = error["exception_message"]
    assert message.startswith(message_start), message
    assert "/" not in error["exception_type"] and "_x_" not in error["exception_type"]
    assert "ValueError" not in message and "Astria prompt:" not in message
    # The console: ComfyUI logs the traceback; its last line is our type and sentence, with no chained error.
    log = comfy_server.log()
    start = log.rindex(f"!!! Exception during processing !!! {message.strip()[:40]}")
    console = log[start:log.index(f"{shown_type}: ", start)]
    assert "The above exception was the direct cause" not in console and "During handling" not in console
    assert "_x_" not in log[start:log.index("\n", log.index(f"{shown_type}: ", start))]


def test_a_missing_lora_reaches_the_dialog_as_our_error_and_sentence(comfy_server):
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15_pixel.safetensors"}},
        "2": {"class_type": "AstriaPrompt", "inputs": {"text": f"a photo <lora:{UNKNOWN_LORA}:1> --only_upscale"}},
        "3": {"class_type": "AstriaLoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                           "astria_prompt": ["2", 0], "strength_model_scale": 1.0,
                                                           "strength_clip_scale": 1.0, "on_missing": "error"}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 2]}},
    }
    error = execution_error(comfy_server, graph)
    assert_reads_well(error, "ComfyUI-Astria.LoraNotFoundError", f"<lora:{UNKNOWN_LORA}>: ", comfy_server)
    assert re.search(r"lora_aliases\.json|loras", error["exception_message"])  # and what to do


def test_a_setting_that_cannot_run_locally_reaches_the_dialog_as_our_error(comfy_server):
    graph = {
        "1": {"class_type": "AstriaPrompt", "inputs": {"text": "a photo --only_upscale\nscheduler=tcd"}},
        "2": {"class_type": "AstriaSettings", "inputs": {"astria_prompt": ["1", 0], "seed": 0, "default_steps": 16,
                                                         "default_cfg": 6.0, "default_denoise": 0.1}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}},
    }
    error = execution_error(comfy_server, graph)
    assert_reads_well(error, "ComfyUI-Astria.AstriaSettingsError", "scheduler=tcd", comfy_server)
