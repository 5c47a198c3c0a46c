"""The one import of ComfyUI's versioned node API, so a future API move touches one line."""
from comfy_api.v0_0_2 import ComfyExtension, io, ui  # noqa: F401
