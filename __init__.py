"""ComfyUI-Astria: paste an Astria prompt into ComfyUI and upscale locally or through Astria's API."""

WEB_DIRECTORY = "./js"


async def comfy_entrypoint():
    """Return the pack's ComfyExtension; ComfyUI calls this once when it loads the pack."""
    from .nodes.comfy.extension import AstriaExtension

    return AstriaExtension()
