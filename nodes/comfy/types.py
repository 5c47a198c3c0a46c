"""The pack's own ComfyUI socket type: a parsed Astria prompt, so every node reads the same settings."""
from ._api import io

AstriaPromptType = io.Custom("ASTRIA_PROMPT")
