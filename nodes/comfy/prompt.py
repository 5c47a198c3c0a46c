"""Astria Prompt and Astria Settings: paste the block copied from Astria's gallery, get what ComfyUI needs."""
import comfy.samplers

from ..core import attention, settings, spec_tables, syntax
from ._api import io
from .types import AstriaPromptType, node_schema

EXAMPLE_PROMPT = spec_tables.DOCS_UPSCALE_EXAMPLE


def parse_for_node(text):
    """The parsed prompt; a syntax error is the node's error as it is (ComfyUI shows `ComfyUI-Astria.
    AstriaSyntaxError: line L, column C: problem; fix`)."""
    return syntax.parse_prompt(text)


def text_refusal(text):
    """None when the parser accepts `text`; else the sentence ComfyUI shows before the run (line, column, fix).

    ComfyUI words a failed validation "Custom validation failed for node: text - <ours>"; ours names the prompt.
    A linked text (another node's output) is None at validation time and is checked when the node runs.
    """
    if text is None:
        return None
    try:
        syntax.parse_prompt(text)
    except syntax.AstriaSyntaxError as error:
        return f"the Astria prompt does not parse at {error}"
    return None


def settings_for_node(prompt, **defaults):
    """The prompt's settings with the node's widgets (settings.SamplerDefaults fields) filling what it leaves unset;
    a prompt that cannot run locally raises AstriaSettingsError, shown by ComfyUI as it is (no wrapper)."""
    return settings.sampler_settings(prompt, settings.SamplerDefaults(**defaults))


def comfy_text(text, weighting):
    """Prompt text in ComfyUI's syntax with the same weights (or verbatim, brackets escaped, for `none`)."""
    converted = attention.comfy_literal(text) if weighting == "none" else attention.to_comfy(text)
    return converted.text, converted.warnings


def prompt_summary(prompt, **defaults):
    """What was understood: LoRAs, flags, settings, remote-only items, warnings (for the summary output)."""
    understood = settings_for_node(prompt, **defaults)
    lines = [f"Prompt: {prompt.positive}"]
    if prompt.negative_prompt:
        lines.append(f"Negative: {prompt.negative_prompt}")
    lines += understood.summary_lines()
    lines += [f"Warning: {warning}" for warning in prompt.warnings]
    return understood, lines


class AstriaPrompt(io.ComfyNode):
    """Paste a prompt as copied from Astria's gallery: text with <lora:NAME:W> tags, --flags and key=value lines.
    Outputs the parsed prompt every Astria node reads, and ComfyUI-syntax prompt strings."""

    @classmethod
    def define_schema(cls):
        return node_schema(
            cls, "AstriaPrompt", "Astria Prompt",
            inputs=[
                io.String.Input("text", multiline=True, default=EXAMPLE_PROMPT,
                                tooltip="The Astria prompt block: prompt text, <lora:...> tags, --flags, then "
                                        "key=value lines (steps=16, denoising_strength=0.1, negative_prompt=...)."),
            ],
            outputs=[
                AstriaPromptType.Output(display_name="ASTRIA_PROMPT",
                                        tooltip="The parsed prompt (text, LoRA tags, flags, params) for the other "
                                                "Astria nodes."),
                io.String.Output(display_name="positive",
                                 tooltip="The prompt text without tags and flags, in ComfyUI's weight syntax (for "
                                         "CLIP Text Encode)."),
                io.String.Output(display_name="negative",
                                 tooltip="The negative_prompt in ComfyUI's weight syntax (for CLIP Text Encode)."),
                io.String.Output(display_name="summary",
                                 tooltip="What was understood: settings, LoRAs, what a local run applies and what "
                                         "not (why), warnings."),
            ],
        )

    @classmethod
    def validate_inputs(cls, text) -> bool | str:
        """Refuse before the run what the parser refuses; only `text` is named, so ComfyUI still checks the rest."""
        return text_refusal(text) or True

    @classmethod
    def execute(cls, text) -> io.NodeOutput:
        prompt = parse_for_node(text)
        try:
            understood, lines = prompt_summary(prompt)
            weighting = understood.weighting
        except ValueError as error:  # e.g. a scheduler only Astria's cloud knows: the remote node can still run it
            lines = [f"Prompt: {prompt.positive}", f"Local run not possible: {error}"]
            weighting = settings.weighting_from_prompt(prompt)
        positive, positive_notes = comfy_text(prompt.positive, weighting)
        negative, negative_notes = comfy_text(prompt.negative_prompt or "", weighting)
        lines += [f"Warning (positive text): {note}" for note in positive_notes]
        lines += [f"Warning (negative text): {note}" for note in negative_notes]
        return io.NodeOutput(prompt, positive, negative, "\n".join(lines))


class AstriaSettings(io.ComfyNode):
    """The prompt's steps, seed, cfg, denoise, sampler, scheduler and size as plain values, so a pasted prompt can
    drive KSampler or any graph."""

    @classmethod
    def define_schema(cls):
        return node_schema(
            cls, "AstriaSettings", "Astria Settings",
            inputs=[
                AstriaPromptType.Input("astria_prompt", tooltip="The parsed prompt from Astria Prompt."),
                io.Int.Input("seed", default=0, min=0, max=spec_tables.SEED_MAX, control_after_generate=True,
                             tooltip="Seed used when the prompt's seed= is empty (0 to 2^32-1, Astria's range)."),
                io.Int.Input("default_steps", default=16, min=1, max=150,
                             tooltip="Steps used when the prompt sets none (or steps=0)."),
                io.Float.Input("default_cfg", default=6.0, min=0.0, max=30.0, step=0.1,
                               tooltip="CFG used when the prompt sets no cfg_scale."),
                io.Float.Input("default_denoise", default=0.1, min=0.0, max=1.0, step=0.01,
                               tooltip="Denoise used when the prompt sets no denoising_strength."),
            ],
            outputs=[
                io.Int.Output(display_name="steps", tooltip="Steps of the full schedule (the prompt's steps=, else "
                                                            "default_steps); A1111 img2img runs only part of them."),
                io.Int.Output(display_name="seed", tooltip="The prompt's seed=, else the seed widget."),
                io.Float.Output(display_name="cfg", tooltip="The prompt's cfg_scale=, else default_cfg."),
                io.Float.Output(display_name="denoise",
                                tooltip="The prompt's denoising_strength=, else default_denoise."),
                io.Combo.Output(display_name="sampler_name", options=comfy.samplers.SAMPLER_NAMES,
                                tooltip="ComfyUI's sampler for the prompt's scheduler= (euler_a: euler_ancestral)."),
                io.Combo.Output(display_name="scheduler", options=comfy.samplers.SCHEDULER_NAMES,
                                tooltip="ComfyUI's scheduler for the prompt's scheduler= (normal, karras, ...)."),
                io.Int.Output(display_name="width", tooltip="The prompt's w=, or 0 when it sets none."),
                io.Int.Output(display_name="height", tooltip="The prompt's h=, or 0 when it sets none."),
            ],
        )

    @classmethod
    def execute(cls, astria_prompt, seed, default_steps, default_cfg, default_denoise) -> io.NodeOutput:
        understood = settings_for_node(astria_prompt, steps=default_steps, cfg=default_cfg, denoise=default_denoise,
                                       seed=seed)
        return io.NodeOutput(understood.steps, understood.seed, understood.cfg, understood.denoise,
                             understood.sampler_name, understood.scheduler, understood.width or 0,
                             understood.height or 0)


PROMPT_NODES = [AstriaPrompt, AstriaSettings]
