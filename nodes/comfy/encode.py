"""Astria Encode: the prompt's positive and negative text as CONDITIONING, weighted like A1111 (or ComfyUI, or not)."""
from ._api import io
from .prompt import comfy_text
from .types import AstriaPromptType


def encode_text(clip, text):
    """CONDITIONING of ComfyUI prompt text through the host's own tokenizer and encoder."""
    tokens = clip.tokenize(text)
    return clip.encode_from_tokens_scheduled(tokens)


def encode_prompt(clip, prompt, weighting):
    """(positive, negative, notes) conditioning of a parsed prompt in the given weighting mode."""
    notes = [f"weighting {weighting}"]
    if weighting == "a1111":
        notes.append("a1111 emphasis pending: encoded with ComfyUI's weighting of the same A1111 weights")
    positive_text, positive_warnings = comfy_text(prompt.positive, weighting)
    negative_text, negative_warnings = comfy_text(prompt.negative_prompt or "", weighting)
    notes += positive_warnings + negative_warnings
    return encode_text(clip, positive_text), encode_text(clip, negative_text), notes


ENCODE_NODES: list[type[io.ComfyNode]] = []
__all__ = ["AstriaPromptType", "ENCODE_NODES", "encode_prompt"]
