"""The pack's ComfyExtension: the one list of every node ComfyUI-Astria registers."""
from ._api import ComfyExtension, io
from .encode import ENCODE_NODES
from .lora import LORA_NODES
from .prompt import PROMPT_NODES
from .remote import REMOTE_NODES
from .tiling_nodes import TILING_NODES
from .upscale import UPSCALE_NODES


class AstriaExtension(ComfyExtension):
    """Registers the Astria nodes (routes are added by comfy_entrypoint: 0.3.75 never calls on_load)."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        """Every node class of the pack, in menu order."""
        return [*PROMPT_NODES, *LORA_NODES, *ENCODE_NODES, *UPSCALE_NODES, *TILING_NODES, *REMOTE_NODES]
