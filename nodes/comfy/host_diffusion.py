"""MultiDiffusion (our tile planner and blender) on the host's model objects: a model clone whose sampling steps
denoise overlapping latent tiles."""
import contextlib
import logging
import weakref

import comfy.model_management
import comfy.patcher_extension
import comfy.utils

from ..core import multidiffusion, tiling
from .host_attention import with_sdpa_on_cpu
from .host_memory_format import channels_last_convolutions
from .host_runtime import memory_budget, raise_if_interrupted, refuse_unless_fits, release_failed_try

log = logging.getLogger("astria")
DEFAULT_TILE_BATCH = 4
CPU_TILE_BATCH = 1
"""Tiles per UNet call on the CPU for the only-upscale: on 2 CPU cores one 68-latent tile per call (2 rows with cfg)
measured 0.75-0.80x the time per tile of 4 tiles in one call, and a quarter of the call's working memory (at
1024 -> 2048 the batched call was the whole run's memory peak). GPUs keep `DEFAULT_TILE_BATCH` (fuller kernels)."""


def tile_batch_for(model):
    """Tiles per UNet call for the only-upscale: one on the CPU, `DEFAULT_TILE_BATCH` on a GPU."""
    device = getattr(model, "load_device", None)
    return CPU_TILE_BATCH if getattr(device, "type", "cpu") == "cpu" else DEFAULT_TILE_BATCH


WRAPPER_KEY = "astria_tiled_diffusion"
EASYCACHE_KEY = "easycache"  # the key (and transformer_options entry) ComfyUI's EasyCache node installs under
CALC_COND_BATCH = comfy.patcher_extension.WrappersMP.CALC_COND_BATCH
DIFFUSION_MODEL = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
LATENT_COPIES = 6
"""Latent-sized float32 tensors a tiled step holds beside the UNet's tile work: the input, the blended cond and
uncond sums, their weights, the sampler's own state."""


def _resize_hint(hint, height, width):
    """Resize a ControlNet hint crop the way the host's ControlNet resizes its hint, so tiles see the same pixels."""
    return comfy.utils.common_upscale(hint, width, height, "nearest-exact", "center")


def _without_easycache(model_options):
    """model_options for tile calls with EasyCache's model wrapper left out (its holder stays for its other parts)."""
    transformer_options = dict(model_options["transformer_options"])
    wrappers = dict(transformer_options["wrappers"])
    wrappers[DIFFUSION_MODEL] = {key: found for key, found in wrappers[DIFFUSION_MODEL].items()
                                 if key != EASYCACHE_KEY}
    transformer_options["wrappers"] = wrappers
    return {**model_options, "transformer_options": transformer_options}


def _has_easycache(model_options) -> bool:
    """Whether ComfyUI's EasyCache node's per-model-call wrapper is installed for this sampling run."""
    wrappers = model_options.get("transformer_options", {}).get("wrappers", {})
    return EASYCACHE_KEY in wrappers.get(DIFFUSION_MODEL, {})


def with_tiled_diffusion(model, tile_size, overlap=tiling.DEFAULT_OVERLAP, tile_batch_size=DEFAULT_TILE_BATCH):
    """A clone of the model whose every sampling step denoises overlapping latent tiles and blends them
    (MultiDiffusion), for latents larger than one tile; smaller latents run untouched. On a GPU out-of-memory
    error the step is retried once with half the tile size (and one tile per batch), and that stays in force.

    It is a composable `calc_cond_batch` wrapper (not the single `sampler_calc_cond_batch_function` slot): wrappers
    installed before it run once per step around it, those installed after it run once per tile batch. EasyCache's
    per-step state cannot follow tiles, so a tiled run leaves EasyCache out, with a warning. On the CPU a tiled run's UNet
    attention goes through the host's SDPA function instead of its sub-quadratic default (host_attention.py) and its
    convolutions run channels_last for the step (host_memory_format.py)."""
    current = {"tile": tile_size, "batch": tile_batch_size, "retried": False}
    warned = weakref.WeakSet()  # EasyCache holders (one per sampling run) already warned about

    def plan_for(latent_height, latent_width):
        return tiling.latent_tile_plan(latent_height, latent_width, current["tile"], overlap)

    def build():
        return multidiffusion.make_tiled_calc_cond_batch_wrapper(plan_for, current["batch"],
                                                                 should_cancel=raise_if_interrupted,
                                                                 resize=_resize_hint)

    tiled = [build()]

    def bypass_easycache(model_options):
        holder = model_options["transformer_options"].get(EASYCACHE_KEY)
        if holder is not None and holder not in warned:
            warned.add(holder)
            log.warning("Astria Tiled Diffusion: EasyCache is off for this tiled run (its step-skipping state "
                        "follows one whole latent per step, not tiles, and would blend wrong tiles in). Leave "
                        "EasyCache out of tiled runs, or use LazyCache, which works on the whole latent.")
        return _without_easycache(model_options)

    def wrapper(executor, model, conds, x, sigma, model_options):
        several_tiles = len(plan_for(*x.shape[-2:])) > 1  # one tile runs untouched: the host's own sampling
        if several_tiles:
            model_options = with_sdpa_on_cpu(model_options)
            if _has_easycache(model_options):
                model_options = bypass_easycache(model_options)

        def tiled_step(executor, model, conds, x, sigma, model_options):
            layout = contextlib.nullcontext()
            if several_tiles and x.device.type == "cpu":
                layout = channels_last_convolutions(model.diffusion_model)
            with layout:
                return tiled[0](executor, model, conds, x, sigma, model_options)

        if "checked" not in current:
            refuse_unless_fits(f"tiled diffusion of a {x.shape[-1] * 8}x{x.shape[-2] * 8} px image (batch "
                               f"{x.shape[0]})", x.numel() * 4 * LATENT_COPIES, memory_budget(),
                               "lower the image size or the batch size (or free RAM)")
            current["checked"] = True
        if current["retried"]:
            return tiled_step(executor, model, conds, x, sigma, model_options)
        try:
            return tiled_step(executor, model, conds, x, sigma, model_options)
        except comfy.model_management.OOM_EXCEPTION:
            pass  # retried below, outside the handler, so the failed try's tensors can be freed first
        current.update(tile=max(256, current["tile"] // 2), batch=1, retried=True)
        log.warning("Astria tiled diffusion ran out of GPU memory; retrying with %d px tiles, one per batch",
                    current["tile"])
        release_failed_try()
        tiled[0] = build()
        return tiled_step(executor, model, conds, x, sigma, model_options)

    patched = model.clone()
    patched.remove_wrappers_with_key(CALC_COND_BATCH, WRAPPER_KEY)  # a second Tiled Diffusion node replaces the first
    patched.add_wrapper_with_key(CALC_COND_BATCH, WRAPPER_KEY, wrapper)
    return patched
