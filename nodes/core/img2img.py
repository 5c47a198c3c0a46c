"""Only-upscale arithmetic: A1111's img2img sigma schedule, target sizes, padding to the model's grid, colour fix.

Pure torch, no ComfyUI: the node feeds it the host's sigmas and images and gets tensors back.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

MAX_SIDE_PX = 16384
MIN_SIDE_PX = 64
COLOR_FIX_MODES = ("none", "wavelet", "adain")
WAVELET_LEVELS = 5  # the blur radii double per level: 5 levels keep detail below ~32 px, colour above it
WAVELET_HALO = 2**WAVELET_LEVELS - 1
"""Rows a banded wavelet split reads beyond its band: the radii summed (1 + 2 + ... + 16); past them a band's
reflection at its cut no longer reaches, so each band equals the whole image's split there."""
BAND_ROWS = 256
"""Rows per band for the full-size image passes (colour fix, Lanczos conversion)."""


def a1111_steps_to_run(steps: int, denoise: float) -> int:
    """How many model steps A1111's img2img runs: t_enc + 1, with t_enc = int(min(denoise, 0.999) * steps); 0 at 0."""
    if steps <= 0 or denoise <= 0:
        return 0
    return int(min(denoise, 0.999) * steps) + 1


def a1111_sigma_schedule(full_sigmas: torch.Tensor, denoise: float) -> torch.Tensor:
    """The tail of a `steps`-step schedule (steps + 1 sigmas) that A1111's img2img runs.

    A1111 starts at index steps - t_enc - 1, so t_enc + 1 steps run (16 steps at 0.1 runs 2, 20 at 0.5 runs 11).
    Denoise 0 gives an empty schedule: nothing runs (A1111 would still run one step at the smallest sigma).
    """
    steps = full_sigmas.shape[0] - 1
    to_run = a1111_steps_to_run(steps, denoise)
    if to_run == 0:
        return full_sigmas[:0]
    return full_sigmas[steps - to_run:]


def target_size(width: int, height: int, scale: float, target_width: int = 0, target_height: int = 0) -> tuple[int, int]:
    """Output (width, height): explicit sizes win; one given keeps the aspect ratio; else the input times scale."""
    if target_width > 0 and target_height > 0:
        out = (target_width, target_height)
    elif target_width > 0:
        out = (target_width, max(1, round(height * target_width / width)))
    elif target_height > 0:
        out = (max(1, round(width * target_height / height)), target_height)
    else:
        out = (max(1, round(width * scale)), max(1, round(height * scale)))
    if max(out) > MAX_SIDE_PX:
        raise ValueError(f"the target {out[0]}x{out[1]} px is over the {MAX_SIDE_PX} px limit per side: "
                         f"lower the scale or the target width/height")
    return out


def check_input_size(width: int, height: int) -> None:
    """Refuse images too small to upscale meaningfully, with the fix."""
    if min(width, height) < MIN_SIDE_PX:
        raise ValueError(f"the input image is {width}x{height} px; the only-upscale needs at least {MIN_SIDE_PX} px "
                         f"per side (upscale it first, e.g. with an Upscale Image node)")


def pad_to_multiple(image: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad a (B, H, W, C) image on the bottom/right to a multiple; returns it and the original (H, W)."""
    height, width = image.shape[1], image.shape[2]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    if pad_h == 0 and pad_w == 0:
        return image, (height, width)
    channels_first = image.movedim(-1, 1)
    # reflect needs pad < size; replicate covers the (tiny) rest
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    padded = F.pad(channels_first, (0, pad_w, 0, pad_h), mode=mode)
    return padded.movedim(1, -1), (height, width)


def crop_to(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop a (B, H, W, C) image back to (H, W) from the top left."""
    return image[:, : size[0], : size[1], :]


def to_bytes(image: torch.Tensor) -> np.ndarray:
    """One (H, W, C) image in 0..1 as 8-bit pixels, the way ComfyUI hands images to PIL (scaled by 255, clipped,
    truncated)."""
    return (image.float().cpu().numpy() * 255.0).clip(0, 255).astype(np.uint8)


def lanczos_from_bytes(as_bytes: np.ndarray, out: torch.Tensor) -> None:
    """Resize one (h, w, C) 8-bit image with PIL's Lanczos into `out` (H, W, C), converted in row bands."""
    height, width, channels = out.shape
    resized = np.asarray(Image.fromarray(as_bytes).resize((width, height), resample=Image.Resampling.LANCZOS))
    resized = resized.reshape(height, width, channels)
    for start in range(0, height, BAND_ROWS):
        band = torch.from_numpy(resized[start:start + BAND_ROWS].copy()).to(out.device, torch.float32) / 255.0
        out[start:start + BAND_ROWS] = band


def lanczos_resize(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """A (B, H, W, C) image in 0..1 resized to (width, height) with PIL's Lanczos (what ComfyUI's `lanczos` upscale
    does, pixel for pixel), holding one float32 copy of the result: each resized 8-bit image is converted into the
    output in row bands instead of through whole-image float32 temporaries."""
    batch, channels = image.shape[0], image.shape[3]
    out = torch.empty(batch, height, width, channels, dtype=image.dtype, device=image.device)
    for index in range(batch):
        lanczos_from_bytes(to_bytes(image[index]), out[index])
    return out


def _blur(image: torch.Tensor, radius: int, full_size: tuple[int, int]) -> torch.Tensor:
    """A separable [1, 2, 1]-style 'a trous' blur of a (B, C, H, W) image with holes of the given radius; the
    reflection radius follows the whole image's `full_size` (H, W) so row bands of it blur alike."""
    kernel = torch.tensor([0.25, 0.5, 0.25], dtype=image.dtype, device=image.device)
    channels = image.shape[1]
    pad = min(radius, full_size[0] - 1, full_size[1] - 1)
    if pad < 1:
        return image
    horizontal = kernel.view(1, 1, 1, 3).repeat(channels, 1, 1, 1)
    vertical = kernel.view(1, 1, 3, 1).repeat(channels, 1, 1, 1)
    out = F.pad(image, (pad, pad, 0, 0), mode="reflect")
    out = F.conv2d(out, horizontal, groups=channels, dilation=(1, pad))
    out = F.pad(out, (0, 0, pad, pad), mode="reflect")
    return F.conv2d(out, vertical, groups=channels, dilation=(pad, 1))


def _wavelet_split(image: torch.Tensor, full_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(high-frequency detail, low-frequency colour) of a (B, C, H, W) image (or a row band of one `full_size`)."""
    low = image
    for level in range(WAVELET_LEVELS):
        low = _blur(low, 2**level, full_size)
    return image - low, low


def row_bands(height: int, halo: int, rows: int | None = None):
    """(rows to write, rows to read) of bands of `rows` rows (default `BAND_ROWS`) covering `height`, each read with
    `halo` rows either side (clipped at the image's edges)."""
    rows = rows or BAND_ROWS
    for start in range(0, height, rows):
        stop = min(height, start + rows)
        yield slice(start, stop), slice(max(0, start - halo), min(height, stop + halo))


def _channel_mean_std(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (batch, channel) mean and unbiased standard deviation of a (B, H, W, C) image, summed band by band."""
    sums = torch.zeros(image.shape[0], image.shape[3], dtype=torch.float64, device=image.device)
    squares = torch.zeros_like(sums)
    for rows, _ in row_bands(image.shape[1], 0):
        band = image[:, rows].to(torch.float64)
        sums += band.sum(dim=(1, 2))
        squares += band.square().sum(dim=(1, 2))
    count = image.shape[1] * image.shape[2]
    mean = sums / count
    var = ((squares - count * mean.square()) / max(1, count - 1)).clamp_min(0)
    return mean[:, None, None, :].float(), var.sqrt()[:, None, None, :].float()


def color_fix(result: torch.Tensor, reference: torch.Tensor, mode: str) -> torch.Tensor:
    """Give result (B, H, W, C) the colours of reference (same size): `wavelet` swaps the low frequencies,
    `adain` matches per-channel mean and standard deviation, `none` returns result.

    Runs in row bands (the wavelet's with a halo of `WAVELET_HALO` rows, which makes each band exact): besides the
    two inputs it holds the output and one band's temporaries, never a whole-image float32 temporary."""
    if mode == "none":
        return result
    if mode not in COLOR_FIX_MODES:
        raise ValueError(f"unknown color_fix {mode!r}: choose one of {', '.join(COLOR_FIX_MODES)}")
    out = torch.empty_like(result)
    full_size = (result.shape[1], result.shape[2])
    if mode == "wavelet":
        for rows, read in row_bands(result.shape[1], WAVELET_HALO):
            detail, _ = _wavelet_split(result[:, read].movedim(-1, 1).float(), full_size)
            _, colour = _wavelet_split(reference[:, read].movedim(-1, 1).float(), full_size)
            fixed = (detail + colour)[:, :, rows.start - read.start:rows.stop - read.start]
            out[:, rows] = fixed.clamp(0, 1).movedim(1, -1).to(result.dtype)
        return out
    res_mean, res_std = _channel_mean_std(result)
    ref_mean, ref_std = _channel_mean_std(reference)
    for rows, _ in row_bands(result.shape[1], 0):
        band = result[:, rows].float()
        out[:, rows] = ((band - res_mean) / res_std.clamp_min(1e-6) * ref_std + ref_mean).clamp(0, 1)
    return out
