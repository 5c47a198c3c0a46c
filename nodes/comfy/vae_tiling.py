"""Our exact one-pass tiled VAE and MultiDiffusion on the host's VAE and model objects, with the host's fallbacks."""
import gc
import logging

import comfy.model_management
import comfy.samplers
import comfy.utils
import psutil

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
"""Our exact path keeps each layer's full activation on the GPU; it runs there only when that takes at most this
share of the free GPU memory (tiles, other models and the host's own work need the rest). Otherwise the host's
tiled VAE runs: it holds only tiles. (Keeping the activations in RAM instead, `storage_device`, is exact but
measured 70x the untiled time on an H200 at 2048 px: see docs/performance.md.)"""


def _activations_fit(vae, shape, encode):
    """Whether our exact path's stored activations fit the VAE device's free memory (always so on the CPU, where
    `check_fits_in_memory` guards the images)."""
    if vae.device.type == "cpu":
        return True
    needed = tiled_vae.stored_bytes(vae.first_stage_model, shape, encode)
    free = comfy.model_management.get_free_memory(vae.device)
    if needed <= free * VRAM_SHARE_FOR_ACTIVATIONS:
        return True
    log.info("Astria tiled VAE: the exact path would hold %.1f GB of activations with %.1f GB of GPU memory free; "
             "using ComfyUI's tiled VAE", needed / 2**30, free / 2**30)
    return False


def _with_oom_retry(run_ours, run_host, tile_size, fits, what):
    """Our exact path with tile_size (the host's tiled VAE when the activations do not fit); on a GPU out-of-memory
    error retry once with half the tile, and if that fails too, the host's tiled VAE at half the tile. Each step
    is said in the log."""
    smaller = max(64, tile_size // 2)
    if not fits():
        return run_host(tile_size)
    try:
        return run_ours(tile_size)
    except comfy.model_management.OOM_EXCEPTION:
        pass  # retried below, outside the handler: the traceback holds the failed try's tensors until it ends
    log.warning("Astria tiled VAE %s ran out of GPU memory with %d px tiles; retrying with %d px tiles",
                what, tile_size, smaller)
    _release_failed_try()
    try:
        return run_ours(smaller)
    except comfy.model_management.OOM_EXCEPTION:
        pass
    log.warning("Astria tiled VAE %s ran out of GPU memory again; using ComfyUI's tiled VAE with %d px tiles",
                what, smaller)
    _release_failed_try()
    return run_host(smaller)


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

    def run_ours(tile):
        return tiled_vae.tiled_encode(vae.first_stage_model, model_input, tile, device=vae.device,
                                      dtype=vae.vae_dtype, should_cancel=_raise_if_interrupted, progress=progress)

    def run_host(tile):
        return vae.encode_tiled(pixels, tile_x=tile, tile_y=tile, overlap=min(overlap, tile // 4))

    latent = _with_oom_retry(run_ours, run_host, tile_size,
                             lambda: _activations_fit(vae, model_input.shape, encode=True), "encode")
    return latent.to(vae.output_device).float()


def _host_decode(vae, samples, tile_size, overlap):
    """The host's tiled decode with our pixel tile size and overlap (its arguments are in latent pixels)."""
    tile = max(8, tile_size // 8)
    return vae.decode_tiled(samples, tile_x=tile, tile_y=tile, overlap=min(overlap // 8, tile // 4))


def decode(vae, samples, tile_size, overlap=DEFAULT_OVERLAP_PX):
    """(B, H, W, C) pixels in 0..1 of a latent tensor: our exact one-pass tiled decode, or the host's."""
    if not _ours_supported(vae):
        return _host_decode(vae, samples, tile_size, overlap)
    vae.throw_exception_if_invalid()
    _load(vae, samples.shape, encode=False)
    latent = samples.to(vae.vae_dtype).to(vae.device)
    progress = _progress_bar()

    def run_ours(tile):
        decoded = tiled_vae.tiled_decode(vae.first_stage_model, latent, tile, device=vae.device,
                                         dtype=vae.vae_dtype, should_cancel=_raise_if_interrupted, progress=progress)
        return vae.process_output(decoded.to(vae.output_device).float()).movedim(1, -1)

    def run_host(tile):
        return _host_decode(vae, samples, tile, overlap)

    return _with_oom_retry(run_ours, run_host, tile_size, lambda: _activations_fit(vae, latent.shape, encode=False),
                           "decode")


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
