"""MultiDiffusion (our tile planner and blender) on the host's model objects: a model clone whose sampling steps
denoise overlapping latent tiles."""
import logging

import comfy.model_management
import comfy.samplers
import comfy.utils

from ..core import multidiffusion, tiling
from .host_runtime import memory_budget, raise_if_interrupted, refuse_unless_fits, release_failed_try

log = logging.getLogger("astria")
DEFAULT_TILE_BATCH = 4
LATENT_COPIES = 6
"""Latent-sized float32 tensors a tiled step holds beside the UNet's tile work: the input, the blended cond and
uncond sums, their weights, the sampler's own state."""


def _resize_hint(hint, height, width):
    """Resize a ControlNet hint crop the way the host's ControlNet resizes its hint, so tiles see the same pixels."""
    return comfy.utils.common_upscale(hint, width, height, "nearest-exact", "center")


def with_tiled_diffusion(model, tile_size, overlap=tiling.DEFAULT_OVERLAP, tile_batch_size=DEFAULT_TILE_BATCH):
    """A clone of the model whose every sampling step denoises overlapping latent tiles and blends them
    (MultiDiffusion), for latents larger than one tile; smaller latents run untouched. On a GPU out-of-memory
    error the step is retried once with half the tile size (and one tile per batch), and that stays in force."""
    current = {"tile": tile_size, "batch": tile_batch_size, "retried": False}

    def plan_for(latent_height, latent_width):
        return tiling.latent_tile_plan(latent_height, latent_width, current["tile"], overlap)

    def build():
        return multidiffusion.make_tiled_calc_cond_batch(plan_for, comfy.samplers.calc_cond_batch, current["batch"],
                                                         should_cancel=raise_if_interrupted, resize=_resize_hint)

    hooks = [build()]

    def hook(args):
        if "checked" not in current:
            x = args["input"]
            refuse_unless_fits(f"tiled diffusion of a {x.shape[-1] * 8}x{x.shape[-2] * 8} px image (batch "
                               f"{x.shape[0]})", x.numel() * 4 * LATENT_COPIES, memory_budget(),
                               "lower the image size or the batch size (or free RAM)")
            current["checked"] = True
        if current["retried"]:
            return hooks[0](args)
        try:
            return hooks[0](args)
        except comfy.model_management.OOM_EXCEPTION:
            pass  # retried below, outside the handler, so the failed try's tensors can be freed first
        current.update(tile=max(256, current["tile"] // 2), batch=1, retried=True)
        log.warning("Astria tiled diffusion ran out of GPU memory; retrying with %d px tiles, one per batch",
                    current["tile"])
        release_failed_try()
        hooks[0] = build()
        return hooks[0](args)

    patched = model.clone()
    patched.set_model_sampler_calc_cond_batch_function(hook)
    return patched
