"""Our exact one-pass tiled VAE and MultiDiffusion on the host's VAE and model objects, with the host's fallbacks."""
import gc
import logging

import comfy.model_management
import comfy.samplers
import comfy.utils
import psutil
import torch

from ..core import multidiffusion, tiled_vae, tiling

log = logging.getLogger("astria")
DEFAULT_OVERLAP_PX = 64
DEFAULT_TILE_BATCH = 4
BYTES_PER_PIXEL_HELD = 3 * 4 * 4  # RGB float32: input, upscaled, decoded and colour-fixed copies live at once


def check_fits_in_memory(width, height, batch, tile_size):
    """Refuse a target whose full-size images cannot fit in RAM, saying how big it is and what to change."""
    needed = width * height * batch * BYTES_PER_PIXEL_HELD
    available = psutil.virtual_memory().available
    if needed > available:
        raise ValueError(f"a {width}x{height} px result (batch {batch}) needs about {needed / 2**30:.1f} GB of RAM "
                         f"for its images alone, and {available / 2**30:.1f} GB are free: lower the scale or the "
                         f"batch size (tile_size {tile_size} only bounds the model's working memory)")


def _raise_if_interrupted():
    """The host's Cancel, asked per tile and per layer chunk; raises ComfyUI's own interrupt exception."""
    comfy.model_management.throw_exception_if_processing_interrupted()
    return False


def _progress_bar():
    """A progress callback (done, total) that drives ComfyUI's progress bar."""
    bar = {}

    def progress(done, total):
        if "bar" not in bar:
            bar["bar"] = comfy.utils.ProgressBar(total)
        bar["bar"].update_absolute(done, total)

    return progress


def _ours_supported(vae):
    """Whether our exact tiled path knows this VAE's shape (SD1.x/SDXL-style 2D image VAEs)."""
    if getattr(vae, "latent_dim", 2) != 2 or not hasattr(vae, "first_stage_model"):
        return False
    try:
        tiled_vae.check_vae(vae.first_stage_model)
        return True
    except tiled_vae.UnsupportedVAE as reason:
        log.info("Astria tiled VAE: this VAE's shape is not supported (%s); using ComfyUI's tiled VAE", reason)
        return False


VRAM_SHARE_FOR_ACTIVATIONS = 0.5
"""Keep the full activations on the GPU only when they take at most this share of its free memory (the tiles,
the other models and the host's own work need the rest); else they live in RAM and tiles travel."""


def _storage_device(vae, shape, encode):
    """None (activations on the VAE's device) or the CPU, when the GPU's free memory is short for them."""
    device = vae.device
    if device.type == "cpu":
        return None
    needed = tiled_vae.stored_bytes(vae.first_stage_model, shape, encode)
    free = comfy.model_management.get_free_memory(device)
    if needed <= free * VRAM_SHARE_FOR_ACTIVATIONS:
        return None
    log.info("Astria tiled VAE: keeping activations in RAM (%.1f GB; %.1f GB of GPU memory free)",
             needed / 2**30, free / 2**30)
    return torch.device("cpu")


def _with_oom_retry(run, tile_size, storage, what):
    """Run with tile_size; on a GPU out-of-memory retry once with half the tile and the activations in RAM,
    saying so in the log."""
    try:
        return run(tile_size, storage)
    except comfy.model_management.OOM_EXCEPTION:
        pass  # retried below, outside the handler: the traceback holds the failed try's tensors until it ends
    smaller = max(64, tile_size // 2)
    log.warning("Astria tiled VAE %s ran out of GPU memory with %d px tiles; retrying with %d px tiles and the "
                "activations in RAM", what, tile_size, smaller)
    _release_failed_try()
    return run(smaller, torch.device("cpu"))


def _release_failed_try():
    """Free what a failed out-of-memory try left behind (its frames, then the allocator's cache)."""
    gc.collect()
    comfy.model_management.soft_empty_cache()


def _load(vae, shape, encode):
    """Load the VAE onto its device the host's way."""
    memory = (vae.memory_used_encode if encode else vae.memory_used_decode)(shape, vae.vae_dtype)
    comfy.model_management.load_models_gpu([vae.patcher], memory_required=min(memory, 2**30))


def encode(vae, pixels, tile_size, overlap=DEFAULT_OVERLAP_PX):
    """Latent (B, C, H/8, W/8) of (B, H, W, C) pixels in 0..1: our exact one-pass tiled encode, or the host's."""
    pixels = pixels[..., :3]
    if not _ours_supported(vae):
        return vae.encode_tiled(pixels, tile_x=tile_size, tile_y=tile_size, overlap=overlap)
    vae.throw_exception_if_invalid()
    channels_first = pixels.movedim(-1, 1)
    _load(vae, channels_first.shape, encode=True)
    model_input = vae.process_input(channels_first).to(vae.vae_dtype).to(vae.device)
    progress = _progress_bar()

    def run(tile, storage):
        return tiled_vae.tiled_encode(vae.first_stage_model, model_input, tile, device=vae.device,
                                      dtype=vae.vae_dtype, should_cancel=_raise_if_interrupted, progress=progress,
                                      storage_device=storage)

    storage = _storage_device(vae, model_input.shape, encode=True)
    return _with_oom_retry(run, tile_size, storage, "encode").to(vae.output_device).float()


def decode(vae, samples, tile_size, overlap=DEFAULT_OVERLAP_PX):
    """(B, H, W, C) pixels in 0..1 of a latent tensor: our exact one-pass tiled decode, or the host's."""
    if not _ours_supported(vae):
        tile = max(8, tile_size // 8)
        return vae.decode_tiled(samples, tile_x=tile, tile_y=tile, overlap=overlap // 8)
    vae.throw_exception_if_invalid()
    _load(vae, samples.shape, encode=False)
    latent = samples.to(vae.vae_dtype).to(vae.device)
    progress = _progress_bar()

    def run(tile, storage):
        return tiled_vae.tiled_decode(vae.first_stage_model, latent, tile, device=vae.device, dtype=vae.vae_dtype,
                                      should_cancel=_raise_if_interrupted, progress=progress, storage_device=storage)

    storage = _storage_device(vae, latent.shape, encode=False)
    decoded = _with_oom_retry(run, tile_size, storage, "decode")
    return vae.process_output(decoded.to(vae.output_device).float()).movedim(1, -1)


def _resize_hint(hint, height, width):
    """Resize a ControlNet hint crop the way the host's ControlNet resizes its hint, so tiles see the same pixels."""
    return comfy.utils.common_upscale(hint, width, height, "nearest-exact", "center")


def with_tiled_diffusion(model, tile_size, overlap=DEFAULT_OVERLAP_PX, tile_batch_size=DEFAULT_TILE_BATCH):
    """A clone of the model whose every sampling step denoises overlapping latent tiles and blends them
    (MultiDiffusion), for latents larger than one tile; smaller latents run untouched. On a GPU out-of-memory
    error the step is retried once with half the tile size (and one tile per batch), and that stays in force."""
    current = {"tile": tile_size, "batch": tile_batch_size, "retried": False}

    def plan_for(latent_height, latent_width):
        return tiling.latent_tile_plan(latent_height, latent_width, current["tile"], overlap)

    def build():
        return multidiffusion.make_tiled_calc_cond_batch(plan_for, comfy.samplers.calc_cond_batch, current["batch"],
                                                         should_cancel=_raise_if_interrupted, resize=_resize_hint)

    hooks = [build()]

    def hook(args):
        if current["retried"]:
            return hooks[0](args)
        try:
            return hooks[0](args)
        except comfy.model_management.OOM_EXCEPTION:
            pass  # retried below, outside the handler, so the failed try's tensors can be freed first
        current.update(tile=max(256, current["tile"] // 2), batch=1, retried=True)
        log.warning("Astria tiled diffusion ran out of GPU memory; retrying with %d px tiles, one per batch",
                    current["tile"])
        _release_failed_try()
        hooks[0] = build()
        return hooks[0](args)

    patched = model.clone()
    patched.set_model_sampler_calc_cond_batch_function(hook)
    return patched
