"""The pack's own ComfyUI socket type, and the schema helper every node of the pack is declared with."""
import inspect

from ._api import io

AstriaPromptType = io.Custom("ASTRIA_PROMPT")


class ListTypedCombo(io.Combo.Input):
    """A combo input typed by its option list, as V1 nodes (KSampler) type sampler/scheduler, so a linked output
    of those options (Astria Settings' sampler_name/scheduler) passes ComfyUI's link type check."""

    def get_io_type(self):
        return self.options


def node_schema(cls, node_id, display_name, inputs, outputs, category="Astria", **more) -> io.Schema:
    """One of our nodes' schema; its description is the class docstring (one text: the code's and the user's)."""
    return io.Schema(node_id=node_id, display_name=display_name, category=category,
                     description=inspect.getdoc(cls), inputs=inputs, outputs=outputs, **more)
