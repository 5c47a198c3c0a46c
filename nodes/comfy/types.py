"""The pack's own ComfyUI socket type: a parsed Astria prompt, so every node reads the same settings."""
from ._api import io

AstriaPromptType = io.Custom("ASTRIA_PROMPT")


class ListTypedCombo(io.Combo.Input):
    """A combo input typed by its option list, as V1 nodes (KSampler) type sampler/scheduler, so a linked output
    of those options (Astria Settings' sampler_name/scheduler) passes ComfyUI's link type check."""

    def get_io_type(self):
        return self.options
