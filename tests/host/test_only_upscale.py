"""Astria Only Upscale on the generated models: sizes, A1111 step counts, seeds, upscale model, ControlNet, Cancel."""
import pytest
import torch

from .conftest import run_node


def picture(height, width, seed=0, batch=1):
    """A smooth test picture (gradients plus a few blobs) the pixel VAE can carry."""
    generator = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0, 1, height).view(1, height, 1, 1)
    xs = torch.linspace(0, 1, width).view(1, 1, width, 1)
    base = torch.cat([ys.expand(1, height, width, 1), xs.expand(1, height, width, 1),
                      (ys * xs).expand(1, height, width, 1)], dim=-1)
    noise = torch.rand((batch, height // 8 + 1, width // 8 + 1, 3), generator=generator)
    blobs = torch.nn.functional.interpolate(noise.movedim(-1, 1), size=(height, width), mode="bilinear")
    return (0.6 * base + 0.4 * blobs.movedim(1, -1)).clamp(0, 1)


_CONDITIONING = {}


def conditioning(comfy_host, clip, text):
    """CLIPTextEncode of text, encoded once per clip for the whole module (the full-size CLIP-L costs seconds)."""
    key = (id(clip), text)
    if key not in _CONDITIONING:
        _CONDITIONING[key] = comfy_host.nodes.CLIPTextEncode().encode(clip, text)[0]
    return _CONDITIONING[key]


def lanczos(image, width, height):
    import comfy.utils

    return comfy.utils.common_upscale(image.movedim(-1, 1), width, height, "lanczos", "disabled").movedim(1, -1)


def upscale(comfy_host, model, clip, vae, image, **widgets):
    positive = conditioning(comfy_host, clip, "masterpiece, best quality, highres")
    negative = conditioning(comfy_host, clip, "worst quality")
    with torch.inference_mode():
        return run_node(comfy_host, "AstriaOnlyUpscale", image=image, model=model, vae=vae, positive=positive,
                        negative=negative, **widgets)[0]


class StepCounter:
    """Counts sampler steps through the sampler callback (not model calls: dpmpp_sde calls twice per step)."""

    def __init__(self):
        self.steps = []

    def __call__(self, step, x0, x, total_steps):
        self.steps.append(step)


@pytest.mark.parametrize(("height", "width"), [(64, 64), (333, 500)])
def test_denoise_zero_returns_the_lanczos_upscale(comfy_host, sd15_pixel, height, width):
    model, clip, vae = sd15_pixel
    image = picture(height, width)
    out = upscale(comfy_host, model, clip, vae, image, scale=2.0, denoise=0.0, color_fix="none")
    assert out.shape == (1, height * 2, width * 2, 3)
    assert (out - lanczos(image, width * 2, height * 2).clamp(0, 1)).abs().max().item() < 1e-3


def test_low_denoise_adds_change_but_keeps_the_picture(comfy_host, sd15_pixel):
    # random UNet weights: "detail" is noise, but how much changes must grow with denoise and stay modest at 0.1
    model, clip, vae = sd15_pixel
    image = picture(64, 64, seed=3)
    reference = lanczos(image, 128, 128).clamp(0, 1)
    low = upscale(comfy_host, model, clip, vae, image, denoise=0.1, seed=5, color_fix="none")
    high = upscale(comfy_host, model, clip, vae, image, denoise=0.5, seed=5, color_fix="none")
    assert low.shape == reference.shape == (1, 128, 128, 3)
    low_change, high_change = (low - reference).abs().mean().item(), (high - reference).abs().mean().item()
    assert 1e-3 < low_change < 0.25, low_change
    assert low_change < high_change, (low_change, high_change)


def test_odd_target_size_is_exact(comfy_host, sd15_pixel):
    model, clip, vae = sd15_pixel
    out = upscale(comfy_host, model, clip, vae, picture(70, 90), width=203, height=157, denoise=0.1)
    assert out.shape == (1, 157, 203, 3)


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "dpmpp_sde"])
@pytest.mark.parametrize(("semantics", "expected_steps"), [("astria", 2), ("comfyui", 16)])
def test_sampler_steps_follow_the_step_semantics(comfy_host, sd15_pixel, monkeypatch, sampler, semantics,
                                                 expected_steps):
    import latent_preview

    counter = StepCounter()
    monkeypatch.setattr(latent_preview, "prepare_callback", lambda model, steps, x0=None: counter)
    model, clip, vae = sd15_pixel
    upscale(comfy_host, model, clip, vae, picture(64, 64), scale=1.0, steps=16, denoise=0.1,
            sampler_name=sampler, step_semantics=semantics)
    assert len(counter.steps) == expected_steps, counter.steps


def test_same_seed_same_image_other_seed_other_image(comfy_host, sd15_pixel):
    model, clip, vae = sd15_pixel
    image = picture(64, 64, seed=9)
    first = upscale(comfy_host, model, clip, vae, image, scale=1.0, denoise=0.3, seed=11)
    again = upscale(comfy_host, model, clip, vae, image, scale=1.0, denoise=0.3, seed=11)
    other = upscale(comfy_host, model, clip, vae, image, scale=1.0, denoise=0.3, seed=12)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_upscale_model_and_control_net_paths_run(comfy_host, sd15_pixel):
    from comfy_extras.nodes_upscale_model import UpscaleModelLoader

    nodes = comfy_host.nodes
    model, clip, vae = sd15_pixel
    upscale_model = UpscaleModelLoader.execute("tiny_esrgan_x4.safetensors")[0]
    control_net = nodes.ControlNetLoader().load_controlnet("tiny_sd15_controlnet.safetensors")[0]
    image = picture(64, 64, seed=4)
    plain = upscale(comfy_host, model, clip, vae, image, denoise=0.2, seed=1, color_fix="none")
    with_model = upscale(comfy_host, model, clip, vae, image, denoise=0.0, color_fix="none",
                         upscale_model=upscale_model)
    assert with_model.shape == (1, 128, 128, 3)
    assert (with_model - lanczos(image, 128, 128)).abs().max().item() > 1e-3, "the upscale model did not run"
    with_control = upscale(comfy_host, model, clip, vae, image, denoise=0.2, seed=1, color_fix="none",
                           control_net=control_net, control_strength=1.0)
    assert with_control.shape == plain.shape
    assert not torch.equal(with_control, plain), "the ControlNet changed nothing"


def test_bad_inputs_fail_with_clear_errors(comfy_host, sd15_pixel):
    model, clip, vae = sd15_pixel
    with pytest.raises(ValueError, match="at least 64 px"):
        upscale(comfy_host, model, clip, vae, picture(32, 80))
    with pytest.raises(ValueError, match="16384"):
        upscale(comfy_host, model, clip, vae, picture(64, 64), scale=300.0)
    with pytest.raises(ValueError, match="needs a VAE"):
        upscale(comfy_host, model, clip, None, picture(64, 64))


def test_cancel_mid_run_raises_the_host_interrupt_and_leaves_no_state(comfy_host, sd15_pixel, monkeypatch):
    import comfy.model_management as mm
    import latent_preview

    def interrupt_at_first_step(model, steps, x0=None):
        def callback(step, x0, x, total):
            mm.interrupt_current_processing(True)
        return callback

    monkeypatch.setattr(latent_preview, "prepare_callback", interrupt_at_first_step)
    model, clip, vae = sd15_pixel
    with pytest.raises(mm.InterruptProcessingException):
        upscale(comfy_host, model, clip, vae, picture(64, 64), scale=1.0, steps=16, denoise=0.5)
    assert not mm.processing_interrupted()
    monkeypatch.undo()
    out = upscale(comfy_host, model, clip, vae, picture(64, 64), scale=1.0, denoise=0.1)
    assert out.shape == (1, 64, 64, 3)


@pytest.mark.parametrize(("in_side", "out_side"), [(80, 160), (40, 160)])  # resized after the model / the model's size
def test_the_upscale_model_runs_in_row_bands_that_equal_the_whole_image_pass(comfy_host, monkeypatch, in_side,
                                                                             out_side):
    """With a band budget small enough for several bands, every host ImageUpscaleWithModel call gets a band (plus
    its halo), never the whole image, and the result equals the whole image through the host's node, then Lanczos
    (to float rounding, which the 8-bit step before Lanczos can turn into one level here and there)."""
    from comfy_extras import nodes_upscale_model
    from comfy_extras.nodes_upscale_model import ImageUpscaleWithModel, UpscaleModelLoader

    upscale_node = comfy_host.pack_module.nodes.comfy.upscale
    img2img = comfy_host.pack_module.nodes.core.img2img
    upscale_model = UpscaleModelLoader.execute("tiny_esrgan_x4.safetensors")[0]
    image = picture(in_side, in_side + 8, seed=9)
    out_width = (in_side + 8) * out_side // in_side
    with torch.inference_mode():
        whole = ImageUpscaleWithModel.execute(upscale_model, image)[0]
        expected = whole if whole.shape[1] == out_side else img2img.lanczos_resize(whole, out_width, out_side)
    heights = []
    real_execute = ImageUpscaleWithModel.execute.__func__

    def spied(cls, model, band):
        heights.append(band.shape[1])
        return real_execute(cls, model, band)

    monkeypatch.setattr(nodes_upscale_model.ImageUpscaleWithModel, "execute", classmethod(spied))
    band_rows = 16
    monkeypatch.setattr(upscale_node, "UPSCALE_MODEL_BAND_BYTES", (in_side + 8) * 16 * 12 * band_rows)
    monkeypatch.setattr(upscale_node, "UPSCALE_MODEL_HALO_ROWS", 8)
    with torch.inference_mode():
        got = upscale_node.upscale_pixels(image, out_width, out_side, upscale_model)
    assert len(heights) == -(-in_side // band_rows) and max(heights) <= band_rows + 2 * 8
    assert got.shape == expected.shape
    difference = (got - expected).abs()
    # float model output: the same to rounding; resized: through 8 bits, where that rounding can flip one level
    assert difference.max().item() < (1e-4 if whole.shape[1] == out_side else 1 / 255 + 1e-6)
    assert difference.mean().item() < 1e-4


def test_on_the_cpu_every_unet_call_gets_one_tile(comfy_host, sd15_pixel):
    """A tiled only-upscale on the CPU calls the UNet once per tile (cond and uncond rows of one tile), the faster and
    smaller way there (host_diffusion.CPU_TILE_BATCH); the tiles still cover the latent every step."""
    model, clip, vae = sd15_pixel
    calls = []

    def record(apply_model, args):
        calls.append(tuple(args["input"].shape))
        return apply_model(args["input"], args["timestep"], **args["c"])

    watched = model.clone()
    watched.set_model_unet_function_wrapper(record)
    out = upscale(comfy_host, watched, clip, vae, picture(160, 160, seed=3), scale=2.0, denoise=0.3, steps=10,
                  tile_size=256, color_fix="none")
    assert out.shape == (1, 320, 320, 3)
    assert calls and all(rows <= 2 for rows, *_ in calls), calls
    assert len({shape[2:] for shape in calls}) >= 1 and max(shape[2] for shape in calls) < 40  # tiles, not the latent
    steps = 4  # A1111 semantics at denoise 0.3 of 10 steps
    assert len(calls) == steps * 4, "one call per tile of the 2x2 plan per step (cond and uncond batched together)"
