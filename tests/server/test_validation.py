"""A prompt the parser refuses is stopped by ComfyUI's own validation (POST /prompt), before anything runs.

Astria Prompt's `validate_inputs(cls, text)` refuses exactly what the parser refuses; missing LoRAs and remote-only
settings stay execution-time errors (the remote template names Astria LoRAs that have no local files).
"""
import json

import pytest

from comfyui_astria.nodes.core import syntax

SYNTAX_ERROR_TEXT = "a quiet valley --only_upscale\nsteps=abc"


def parser_message(text):
    """The parser's own sentence for a refused text (line, column, problem, fix)."""
    with pytest.raises(syntax.AstriaSyntaxError) as refused:
        syntax.parse_prompt(text)
    return str(refused.value)


# ComfyUI prefixes the input name: the dialog reads "Custom validation failed for node: text - the Astria prompt ..."
SYNTAX_ERROR_DETAILS = f"text - the Astria prompt does not parse at {parser_message(SYNTAX_ERROR_TEXT)}"


def prompt_graph(text, checkpoint=None):
    """Astria Prompt -> Preview as Text; with `checkpoint`, also a checkpoint loader -> Preview as Text."""
    graph = {"1": {"class_type": "AstriaPrompt", "inputs": {"text": text}},
             "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 3]}}}
    if checkpoint:
        graph["3"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}}
        graph["4"] = {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}}
    return graph


def post_prompt(server, graph):
    """(status, JSON answer) of POST /prompt."""
    status, body = server.request("/prompt", {"prompt": graph, "client_id": "validation-test"})
    return status, json.loads(body)


def test_a_prompt_that_does_not_parse_is_refused_at_validation_with_our_sentence(comfy_server):
    history_before = comfy_server.get("/history")
    status, answer = post_prompt(comfy_server, prompt_graph(SYNTAX_ERROR_TEXT))
    assert status == 400, answer
    errors = answer["node_errors"]["1"]["errors"]
    assert [error["type"] for error in errors] == ["custom_validation_failed"]
    assert errors[0]["details"] == SYNTAX_ERROR_DETAILS
    assert "line 2, column 7: steps=abc is not a whole number" in errors[0]["details"]
    assert errors[0]["extra_info"]["input_name"] == "text"
    assert answer["node_errors"]["1"]["class_type"] == "AstriaPrompt"
    assert comfy_server.get("/history") == history_before, "nothing may run when validation fails"


def test_the_hosts_own_checks_still_run_on_the_other_nodes(comfy_server):
    status, answer = post_prompt(comfy_server, prompt_graph(SYNTAX_ERROR_TEXT, checkpoint="no_such_model.safetensors"))
    assert status == 400, answer
    assert answer["node_errors"]["1"]["errors"][0]["details"] == SYNTAX_ERROR_DETAILS
    assert answer["node_errors"]["3"]["errors"][0]["type"] == "value_not_in_list"


def test_missing_loras_and_remote_only_settings_pass_validation(comfy_server):
    text = "a quiet valley <lora:no_such_lora:0.5> --only_upscale --tiled_upscale\nsteps=16\nscheduler=tcd"
    status, answer = post_prompt(comfy_server, prompt_graph(text))
    assert status == 200, answer
    assert answer.get("node_errors") == {}
    entry = comfy_server.wait(answer["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
