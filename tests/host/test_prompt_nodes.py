"""Astria Prompt and Astria Settings inside ComfyUI: the docs' example block, errors, the settings outputs."""
import pytest

from comfyui_astria.nodes.core.spec_tables import docs_example

from .conftest import run_node

DOCS_EXAMPLE = docs_example(use_lpw="true")  # weighted: the summary and outputs show A1111 weighting


def test_prompt_node_parses_the_docs_example(comfy_host):
    prompt, positive, negative, summary = run_node(comfy_host, "AstriaPrompt", text=DOCS_EXAMPLE)
    assert prompt.loras == (("more_details", 0.5), ("SDXLrender_v2.0", 1.0))
    assert "<lora" not in positive and "--only_upscale" not in positive
    assert positive.startswith("masterpiece, best quality, highres")
    assert negative == "(worst quality, low quality, normal quality:2) JuggernautNegative-neg"
    assert "more_details" in summary and "euler_ancestral" in summary and "2 run" in summary


def test_prompt_node_writes_a1111_weights_in_comfy_syntax(comfy_host):
    _, positive, _, _ = run_node(comfy_host, "AstriaPrompt", text="a ((cat:1.5)) [dog]")
    assert "(cat:1.65" in positive
    assert "(dog:0.909090909091)" in positive


def test_syntax_error_fails_the_node_with_line_and_fix(comfy_host):
    with pytest.raises(ValueError, match=r"line 3.*denoising_strength=1.5 is out of range 0-1"):
        run_node(comfy_host, "AstriaPrompt", text="a cat\nsteps=16\ndenoising_strength=1.5")
    # ComfyUI keeps working: the next prompt parses
    assert run_node(comfy_host, "AstriaPrompt", text="a cat")[0].positive == "a cat"


def test_settings_node_outputs_the_prompt_values_and_widget_fallbacks(comfy_host):
    prompt = run_node(comfy_host, "AstriaPrompt", text=DOCS_EXAMPLE)[0]
    steps, seed, cfg, denoise, sampler, scheduler, width, height = run_node(
        comfy_host, "AstriaSettings", astria_prompt=prompt, seed=1234)
    assert (steps, seed, cfg, denoise, sampler, scheduler, width, height) == (
        16, 1234, 6.0, 0.1, "euler_ancestral", "normal", 0, 0)
    explicit = run_node(comfy_host, "AstriaPrompt", text="x\nseed=77\nscheduler=dpm++2m_karras\nw=1024\nh=768")[0]
    outputs = run_node(comfy_host, "AstriaSettings", astria_prompt=explicit, seed=5)
    assert outputs[1] == 77 and outputs[4:] == ("dpmpp_2m", "karras", 1024, 768)


def test_unknown_scheduler_lists_the_known_ones(comfy_host):
    prompt = run_node(comfy_host, "AstriaPrompt", text="x --only_upscale\nscheduler=fancy")
    with pytest.raises(ValueError, match="euler_a"):
        run_node(comfy_host, "AstriaSettings", astria_prompt=prompt[0], seed=0)
