"""Our exact one-pass tiled VAE on the host's VAE objects, with the host's tiled VAE as the fallback."""
import logging

import comfy.model_management
import psutil

from ..core import tiled_vae, tiling
from .host_runtime import progress_bar, raise_if_interrupted, release_failed_try

log = logging.getLogger("astria")
BYTES_PER_PIXEL_HELD = 3 * 4 * 4  # RGB float32: input, upscaled, decoded and colour-fixed copies live at once


def check_fits_in_memory(width, height, batch, tile_size):
    """Refuse a target whose full-size images cannot fit in RAM, saying how big it is and what to change."""
    needed = width * height * batch * BYTES_PER_PIXEL_HELD
    available = psutil.virtual_memory().available
    if needed > available:
        raise ValueError(f"a {width}x{height} px result (batch {batch}) needs about {needed / 2**30:.1f} GB of RAM "
                         f"for its images alone, and {available / 2**30:.1f} GB are free: lower the scale or the "
                         f"batch size (tile_size {tile_size} only bounds the model's working memory)")


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
    release_failed_try()
    try:
        return run_ours(smaller)
    except comfy.model_management.OOM_EXCEPTION:
        pass
    log.warning("Astria tiled VAE %s ran out of GPU memory again; using ComfyUI's tiled VAE with %d px tiles",
                what, smaller)
    release_failed_try()
    return run_host(smaller)


def _load(vae, shape, encode):
    """Load the VAE onto its device the host's way."""
    memory = (vae.memory_used_encode if encode else vae.memory_used_decode)(shape, vae.vae_dtype)
    comfy.model_management.load_models_gpu([vae.patcher], memory_required=min(memory, 2**30))


def encode(vae, pixels, tile_size, overlap=tiling.DEFAULT_OVERLAP):
    """Latent (B, C, H/8, W/8) of (B, H, W, C) pixels in 0..1: our exact one-pass tiled encode, or the host's."""
    pixels = pixels[..., :3]
    if not _ours_supported(vae):
        return vae.encode_tiled(pixels, tile_x=tile_size, tile_y=tile_size, overlap=overlap)
    vae.throw_exception_if_invalid()
    channels_first = pixels.movedim(-1, 1)
    _load(vae, channels_first.shape, encode=True)
    model_input = vae.process_input(channels_first).to(vae.vae_dtype).to(vae.device)
    progress = progress_bar()

    def run_ours(tile):
        return tiled_vae.tiled_encode(vae.first_stage_model, model_input, tile, device=vae.device,
                                      dtype=vae.vae_dtype, should_cancel=raise_if_interrupted, progress=progress)

    def run_host(tile):
        return vae.encode_tiled(pixels, tile_x=tile, tile_y=tile, overlap=min(overlap, tile // 4))

    latent = _with_oom_retry(run_ours, run_host, tile_size,
                             lambda: _activations_fit(vae, model_input.shape, encode=True), "encode")
    return latent.to(vae.output_device).float()


def _host_decode(vae, samples, tile_size, overlap):
    """The host's tiled decode with our pixel tile size and overlap (its arguments are in latent pixels)."""
    tile = max(8, tile_size // 8)
    return vae.decode_tiled(samples, tile_x=tile, tile_y=tile, overlap=min(overlap // 8, tile // 4))


def decode(vae, samples, tile_size, overlap=tiling.DEFAULT_OVERLAP):
    """(B, H, W, C) pixels in 0..1 of a latent tensor: our exact one-pass tiled decode, or the host's."""
    if not _ours_supported(vae):
        return _host_decode(vae, samples, tile_size, overlap)
    vae.throw_exception_if_invalid()
    _load(vae, samples.shape, encode=False)
    latent = samples.to(vae.vae_dtype).to(vae.device)
    progress = progress_bar()

    def run_ours(tile):
        decoded = tiled_vae.tiled_decode(vae.first_stage_model, latent, tile, device=vae.device,
                                         dtype=vae.vae_dtype, should_cancel=raise_if_interrupted, progress=progress)
        return vae.process_output(decoded.to(vae.output_device).float()).movedim(1, -1)

    def run_host(tile):
        return _host_decode(vae, samples, tile, overlap)

    return _with_oom_retry(run_ours, run_host, tile_size, lambda: _activations_fit(vae, latent.shape, encode=False),
                           "decode")
