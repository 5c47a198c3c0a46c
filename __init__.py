"""ComfyUI-Astria: paste an Astria prompt into ComfyUI and upscale locally or through Astria's API."""

WEB_DIRECTORY = "./js"


async def comfy_entrypoint():
    """Return the pack's ComfyExtension (and add its /astria routes); ComfyUI calls this once at load."""
    from .nodes.comfy import routes
    from .nodes.comfy.extension import AstriaExtension

    routes.register()
    return AstriaExtension()
