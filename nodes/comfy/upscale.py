"""Astria Only Upscale: Astria's `--only_upscale` on the host: upscale, tiled encode, low-denoise img2img with A1111
step semantics, tiled decode, colour fix. The FromPrompt variant takes every setting from a pasted Astria prompt."""
import logging
from dataclasses import dataclass, replace
from typing import Any

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import numpy as np
import torch

from ..core import img2img, spec_tables
from . import host_diffusion, host_vae
from ._api import io
from .encode import FROM_PROMPT, WEIGHTING_CHOICES, encode_prompt
from .lora import apply_prompt_loras
from .prompt import settings_for_node
from .types import AstriaPromptType, ListTypedCombo, node_schema

log = logging.getLogger("astria")
STEP_SEMANTICS = ["astria", "comfyui"]
# 768 px diffusion tiles: at 512->1024 the untiled UNet's self-attention is the memory peak (bench/only_upscale.py:
# 3.12 GB at 1024 px tiles, 2.30 GB at 768, same time); 1024 px targets split into 2x2 tiles (1.13x UNet work).
DEFAULT_TILE_PX = 768
LATENT_GRID_PX = 8  # SD UNets need latents of whole pixels: image sides a multiple of 8
# Our tiled VAE is exact, so its tile only trades memory for time: 256 px tiles measured 0.76x the built-ins' peak
# RSS at 512->1024 for +3% time over 512 px tiles (bench/only_upscale.py); diffusion keeps the widget's tile_size.
VAE_TILE_PX = 256


UPSCALE_MODEL_COPIES = 7
"""Float32 RGB images at the upscale model's own output size the host's tiled ImageUpscaleWithModel holds at its
peak (its output, blend weights, the clamped and moved copies): measured 6.4 (bench/upscale_stages.py)."""
UPSCALE_MODEL_BAND_BYTES = 128 * 2**20
"""Float32 model-scale output per band of the upscale-model pass: the host's node holds about
`UPSCALE_MODEL_COPIES` times this at once, whatever the image's size."""
UPSCALE_MODEL_HALO_ROWS = 32
"""Input rows each band of the upscale-model pass reads beyond its own, then crops (the host's own tile overlap)."""


def _model_band_rows(width, scale):
    """Input rows per upscale-model band, so one band's model-scale float32 output is about the band budget."""
    per_input_row = max(1, int(width * scale * scale * 3 * 4))
    return max(2 * UPSCALE_MODEL_HALO_ROWS, UPSCALE_MODEL_BAND_BYTES // per_input_row)


def upscale_with_model(upscale_model, image, width, height):
    """The image through the upscale model (the host's tiled ImageUpscaleWithModel) in row bands of the input, each
    read with a halo that is cropped, then resized to (width, height) with Lanczos: only one band's model-scale work
    is held at a time, plus the model-scale image in 8 bits (what Lanczos reads anyway) unless it is the target."""
    from comfy_extras.nodes_upscale_model import ImageUpscaleWithModel

    batch, in_height, in_width, channels = image.shape
    scale = max(1.0, float(getattr(upscale_model, "scale", 4)))
    band_rows = _model_band_rows(in_width, scale)
    out = torch.empty(batch, height, width, channels, dtype=torch.float32)
    for index in range(batch):
        model_bytes = None
        for rows, read in img2img.row_bands(in_height, UPSCALE_MODEL_HALO_ROWS, band_rows):
            comfy.model_management.throw_exception_if_processing_interrupted()
            band = ImageUpscaleWithModel.execute(upscale_model, image[index:index + 1, read])[0][0]
            factor = band.shape[0] // (read.stop - read.start)  # the model's real scale (an integer for ESRGANs)
            model_height, model_width = in_height * factor, band.shape[1]
            kept = band[(rows.start - read.start) * factor:(rows.stop - read.start) * factor]
            if (model_width, model_height) == (width, height):
                out[index, rows.start * factor:rows.stop * factor] = kept
                continue
            if model_bytes is None:
                model_bytes = np.empty((model_height, model_width, channels), dtype=np.uint8)
            model_bytes[rows.start * factor:rows.stop * factor] = img2img.to_bytes(kept)
            del band, kept
        if model_bytes is not None:
            img2img.lanczos_from_bytes(model_bytes, out[index])
    return out


def upscale_pixels(image, width, height, upscale_model=None):
    """The input upscaled to (width, height): through the upscale model first when one is connected (in bands,
    then Lanczos), else Lanczos (ComfyUI's, in bands: one float32 copy of the result)."""
    if upscale_model is not None:
        return upscale_with_model(upscale_model, image, width, height)
    if image.shape[2] == width and image.shape[1] == height:
        return image
    return img2img.lanczos_resize(image, width, height)


def _stage_memory(job):
    """(stage, bytes) for the stages besides the VAE whose memory grows with the image: the upscale model's pass,
    one band of host work plus the model-scale image in 8 bits. (Tiled diffusion's grows only with the latent, 1/48
    of an image's bytes; its UNet with the tile.)"""
    if job.upscale_model is None:
        return []
    scale = max(1.0, float(getattr(job.upscale_model, "scale", 4)))
    width = job.image.shape[2]
    band_px = (_model_band_rows(width, scale) + 2 * UPSCALE_MODEL_HALO_ROWS) * width * scale * scale
    model_px = job.image.shape[1] * width * scale * scale
    return [("the upscale model's pass", int(band_px * 3 * 4 * UPSCALE_MODEL_COPIES + model_px * 3))]


def schedule_sigmas(model, steps, denoise, sampler_name, scheduler, step_semantics):
    """The sigmas to run: A1111's img2img tail (`astria`) or ComfyUI's KSampler denoise schedule (`comfyui`)."""
    if step_semantics == "astria":
        full = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                       scheduler=scheduler, denoise=1.0, model_options=model.model_options).sigmas
        return img2img.a1111_sigma_schedule(full, denoise)
    if denoise <= 0:
        return torch.zeros(0)
    return comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                   scheduler=scheduler, denoise=denoise, model_options=model.model_options).sigmas


def apply_control_net(positive, negative, control_net, hint_image, strength, vae):
    """Conditioning with the tile ControlNet applied, hinted by the upscaled image (the host's own machinery)."""
    if control_net is None or strength == 0:
        return positive, negative
    import nodes as host_nodes

    return host_nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, control_net, hint_image,
                                                                 strength, 0.0, 1.0, vae=vae)


def require_vae(vae):
    """A clear error when no VAE is connected (a checkpoint without one passes None)."""
    if vae is None:
        raise ValueError("Astria Only Upscale needs a VAE: connect the checkpoint loader's VAE output")


def only_upscale(job):
    """Run the whole only-upscale for one seed; `job` holds the node's inputs. Returns (B, H, W, C) images."""
    batch, in_height, in_width = job.image.shape[0], job.image.shape[1], job.image.shape[2]
    img2img.check_input_size(in_width, in_height)
    width, height = img2img.target_size(in_width, in_height, job.scale, job.width, job.height)
    vae_tile = min(job.tile_size, VAE_TILE_PX)
    local_attention = job.vae_attention == "local"
    _, decode_plan = host_vae.check_fits_in_memory(width, height, batch, job.vae, vae_tile, _stage_memory(job),
                                                   local_attention)
    upscaled = upscale_pixels(job.image, width, height, job.upscale_model)
    comfy.model_management.throw_exception_if_processing_interrupted()
    sigmas = schedule_sigmas(job.model, job.steps, job.denoise, job.sampler_name, job.scheduler, job.step_semantics)
    if sigmas.numel() < 2:
        return upscaled  # denoise 0: the upscaled image, no sampling
    padded, original = img2img.pad_to_multiple(upscaled, LATENT_GRID_PX)
    latent = host_vae.encode(job.vae, padded, vae_tile, notes=job.notes, local_attention=local_attention)
    positive, negative = apply_control_net(job.positive, job.negative, job.control_net, padded,
                                           job.control_strength, job.vae)
    model = host_diffusion.with_tiled_diffusion(job.model, job.tile_size,
                                                tile_batch_size=host_diffusion.tile_batch_for(job.model))
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = comfy.sample.prepare_noise(latent, job.seed)
    steps_to_run = sigmas.numel() - 1
    callback = job.callback or latent_preview.prepare_callback(model, steps_to_run)
    samples = comfy.sample.sample(model, noise, steps_to_run, job.cfg, job.sampler_name, job.scheduler, positive,
                                  negative, latent, sigmas=sigmas, callback=callback, seed=job.seed,
                                  disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED)
    del latent, noise, positive, negative, padded  # the conditioning holds the ControlNet's hint (the padded image)
    # only the colour fix reads the upscaled image again: where the decode spills, it waits in a spill file too
    reference = None if job.color_fix == "none" else (
        host_vae.park(upscaled) if decode_plan.way == "spill" else upscaled)
    del upscaled
    decoded = host_vae.decode(job.vae, samples, vae_tile, notes=job.notes, local_attention=local_attention)
    decoded = img2img.crop_to(decoded, original).clamp_(0, 1)
    return img2img.color_fix(decoded, reference, job.color_fix)


def upscale_widget_inputs():
    """The widgets both only-upscale nodes share, with Astria's docs defaults."""
    return [
        io.Float.Input("scale", default=2.0, min=0.25, max=16.0, step=0.05,
                       tooltip="Output size as a multiple of the input (ignored where width/height are set)."),
        io.Int.Input("width", default=0, min=0, max=img2img.MAX_SIDE_PX, step=8,
                     tooltip="Target width in pixels; 0 = from scale (or from height, keeping the aspect ratio)."),
        io.Int.Input("height", default=0, min=0, max=img2img.MAX_SIDE_PX, step=8,
                     tooltip="Target height in pixels; 0 = from scale (or from width, keeping the aspect ratio)."),
        io.Int.Input("steps", default=16, min=1, max=150,
                     tooltip="Sampling steps of the full schedule (Astria's steps=); with astria semantics only "
                             "int(denoise x steps) + 1 of them run."),
        io.Float.Input("denoise", default=0.1, min=0.0, max=1.0, step=0.01,
                       tooltip="How much to repaint (Astria's denoising_strength): 0.1 adds detail, 0 only resizes."),
        io.Float.Input("cfg", default=6.0, min=0.0, max=30.0, step=0.1,
                       tooltip="Classifier-free guidance (Astria's cfg_scale)."),
        ListTypedCombo("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="euler_ancestral",
                       tooltip="Sampler (Astria's euler_a = euler_ancestral)."),
        ListTypedCombo("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="normal",
                       tooltip="Noise schedule (Astria's schedulers map to normal or karras)."),
        io.Int.Input("seed", default=0, min=0, max=spec_tables.SEED_MAX, control_after_generate=True,
                     tooltip="Noise seed (0 to 2^32-1, Astria's range); used when the prompt sets no seed."),
        io.Int.Input("tile_size", default=DEFAULT_TILE_PX, min=256, max=4096, step=64,
                     tooltip="Tile side in pixels for tiled diffusion (images up to this size run in one piece); the "
                             "exact tiled VAE uses tiles of at most 256 px either way."),
        io.Combo.Input("color_fix", options=list(img2img.COLOR_FIX_MODES), default="wavelet",
                       tooltip="Keep the input's colours: wavelet (low frequencies from the upscaled input), adain "
                               "(channel mean/std), or none."),
        io.Combo.Input("step_semantics", options=STEP_SEMANTICS, default="astria",
                       tooltip="astria: A1111 img2img steps like Astria (16 steps at 0.1 runs 2); comfyui: "
                               "KSampler's (runs all 16 on a shortened schedule)."),
    ]


def optional_model_inputs():
    """The optional upscale model and tile ControlNet inputs, and the VAE attention choice."""
    return [
        io.UpscaleModel.Input("upscale_model", optional=True,
                              tooltip="Optional upscale model (e.g. 4x ESRGAN) run first, then resized to the target."),
        io.ControlNet.Input("control_net", optional=True,
                            tooltip="Optional tile ControlNet, hinted with the upscaled image (Astria's --resemblance)."),
        io.Float.Input("control_strength", default=spec_tables.DEFAULT_RESEMBLANCE, min=0.0, max=2.0, step=0.01,
                       optional=True,
                       tooltip="ControlNet strength (Astria's --resemblance, default 0.65); used with a ControlNet."),
        io.Combo.Input("vae_attention", options=host_vae.VAE_ATTENTION_CHOICES, default="exact", optional=True,
                       tooltip=host_vae.VAE_ATTENTION_TOOLTIP),
    ]


@dataclass(frozen=True)
class UpscaleJob:
    """Everything one only-upscale run needs (the node's inputs, resolved); a misspelt field is a TypeError."""

    image: torch.Tensor
    model: Any
    vae: Any
    positive: list
    negative: list
    scale: float
    width: int
    height: int
    steps: int
    denoise: float
    cfg: float
    sampler_name: str
    scheduler: str
    seed: int
    tile_size: int
    color_fix: str
    step_semantics: str
    upscale_model: Any = None
    control_net: Any = None
    control_strength: float = spec_tables.DEFAULT_RESEMBLANCE
    vae_attention: str = "exact"
    callback: Any = None  # a sampler callback; None: the host's latent preview
    notes: Any = None  # a list the run appends its VAE way notes to (which way ran and why), or None


IMAGE_TOOLTIP = "The upscaled image(s), in input order; from prompt: num_images per input image, one seed each."


class AstriaOnlyUpscale(io.ComfyNode):
    """Upscales the image and adds detail with a low-denoise img2img pass, like Astria's --only_upscale: tiled VAE,
    tiled diffusion, A1111 step semantics, colour fix. Any model, any conditioning."""

    @classmethod
    def define_schema(cls):
        return node_schema(
            cls, "AstriaOnlyUpscale", "Astria Only Upscale",
            inputs=[
                io.Image.Input("image", tooltip="The image(s) to upscale; a batch is fine."),
                io.Model.Input("model", tooltip="The diffusion model (with LoRAs applied if wanted)."),
                io.Vae.Input("vae", tooltip="The VAE that encodes and decodes the image."),
                io.Conditioning.Input("positive", tooltip="Positive conditioning (e.g. from Astria Encode)."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning (e.g. from Astria Encode)."),
                *upscale_widget_inputs(),
                *optional_model_inputs(),
            ],
            outputs=[io.Image.Output(display_name="IMAGE", tooltip=IMAGE_TOOLTIP)],
        )

    @classmethod
    def execute(cls, image, model, vae, positive, negative, scale, width, height, steps, denoise, cfg, sampler_name,
                scheduler, seed, tile_size, color_fix, step_semantics, upscale_model=None, control_net=None,
                control_strength=spec_tables.DEFAULT_RESEMBLANCE, vae_attention="exact") -> io.NodeOutput:
        require_vae(vae)
        job = UpscaleJob(image=image, model=model, vae=vae, positive=positive, negative=negative, scale=scale,
                         width=width, height=height, steps=steps, denoise=denoise, cfg=cfg,
                         sampler_name=sampler_name, scheduler=scheduler, seed=seed, tile_size=tile_size,
                         color_fix=color_fix, step_semantics=step_semantics, upscale_model=upscale_model,
                         control_net=control_net, control_strength=control_strength, vae_attention=vae_attention)
        return io.NodeOutput(only_upscale(job))


class AstriaOnlyUpscaleFromPrompt(io.ComfyNode):
    """Runs Astria's --only_upscale from a pasted prompt: applies its LoRAs, encodes it with its prompt weights
    (use_lpw), takes steps/denoise/cfg/scheduler/seed/size from it (widgets fill only what the prompt leaves unset)
    and reports what was and was not applied. The one node a user needs after pasting a prompt."""

    @classmethod
    def define_schema(cls):
        return node_schema(
            cls, "AstriaOnlyUpscaleFromPrompt", "Astria Only Upscale (from prompt)",
            inputs=[
                io.Image.Input("image", tooltip="The image(s) to upscale; a batch is fine."),
                io.Model.Input("model", tooltip="The diffusion model (the prompt's LoRAs are applied to it)."),
                io.Clip.Input("clip", tooltip="The text encoder (the prompt's LoRAs are applied to it)."),
                io.Vae.Input("vae", tooltip="The VAE that encodes and decodes the image."),
                AstriaPromptType.Input("astria_prompt", tooltip="The parsed prompt from Astria Prompt."),
                *upscale_widget_inputs(),
                io.Combo.Input("weighting", options=WEIGHTING_CHOICES, default=FROM_PROMPT,
                               tooltip="Prompt weighting: from the prompt's use_lpw (lpw, diffusers' pipelines as "
                                       "on Astria, unless use_lpw=false), or force lpw, a1111 (A1111's emphasis), "
                                       "comfy (ComfyUI's formula) or none (brackets as text)."),
                *optional_model_inputs(),
            ],
            outputs=[io.Image.Output(display_name="IMAGE", tooltip=IMAGE_TOOLTIP),
                     io.String.Output(display_name="summary",
                                      tooltip="What was understood and done: the settings that ran (and which came "
                                              "from the widgets), LoRAs, encoding, and every item not applied, why.")],
        )

    @classmethod
    def execute(cls, image, model, clip, vae, astria_prompt, scale, width, height, steps, denoise, cfg, sampler_name,
                scheduler, seed, tile_size, color_fix, step_semantics, weighting, upscale_model=None,
                control_net=None, control_strength=spec_tables.DEFAULT_RESEMBLANCE,
                vae_attention="exact") -> io.NodeOutput:
        require_vae(vae)
        understood = settings_for_node(astria_prompt, steps=steps, cfg=cfg, denoise=denoise,
                                       sampler_name=sampler_name, scheduler=scheduler, seed=seed, scale=scale,
                                       has_upscale_model=upscale_model is not None,
                                       has_control_net=control_net is not None,
                                       weighting=None if weighting == FROM_PROMPT else weighting)
        model, clip, lora_report = apply_prompt_loras(model, clip, astria_prompt)
        positive, negative, encode_notes = encode_prompt(clip, astria_prompt, understood.weighting)
        strength = understood.control_strength
        vae_notes = []
        job = UpscaleJob(image=image, model=model, vae=vae, positive=positive, negative=negative,
                         scale=understood.scale, width=understood.width or width, height=understood.height or height,
                         steps=understood.steps, denoise=understood.denoise, cfg=understood.cfg,
                         sampler_name=understood.sampler_name, scheduler=understood.scheduler,
                         seed=understood.seed, tile_size=tile_size, color_fix=color_fix,
                         step_semantics=step_semantics, upscale_model=upscale_model, control_net=control_net,
                         control_strength=control_strength if strength is None else strength,
                         vae_attention=vae_attention, notes=vae_notes)
        results = [only_upscale(replace(job, seed=run_seed)) for run_seed in understood.seeds]
        summary = understood.summary_lines() + ["LoRAs applied:"] + [f"  {line}" for line in lora_report]
        summary += [f"Encoding: {note}" for note in encode_notes]
        summary += list(dict.fromkeys(vae_notes))  # which way the VAE ran and why (once per distinct line)
        if step_semantics == "comfyui":
            summary.append(f"Step semantics: comfyui (all {understood.steps} steps run on a shortened schedule)")
        return io.NodeOutput(torch.cat(results, dim=0), "\n".join(summary))


UPSCALE_NODES = [AstriaOnlyUpscale, AstriaOnlyUpscaleFromPrompt]
