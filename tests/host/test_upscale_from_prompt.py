"""Astria Only Upscale (from prompt): the docs' example block end to end, LoRAs, seeds, the summary."""
import json

import torch

from comfyui_astria.nodes.core.spec_tables import DOCS_UPSCALE_EXAMPLE as DOCS_EXAMPLE

from .conftest import run_node
from .test_only_upscale import lanczos, picture
from .test_tiling_nodes import counting_unet


def write_aliases(comfy_host, aliases):
    folder = comfy_host.base / "user" / "default" / "astria"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lora_aliases.json").write_text(json.dumps(aliases))


def from_prompt(comfy_host, models, text, image, **widgets):
    model, clip, vae = models
    prompt = run_node(comfy_host, "AstriaPrompt", text=text)[0]
    with torch.inference_mode():
        return run_node(comfy_host, "AstriaOnlyUpscaleFromPrompt", image=image, model=model, clip=clip, vae=vae,
                        astria_prompt=prompt, **widgets)


def test_docs_example_upscales_twice_and_reports_what_it_did(comfy_host, sd15_pixel):
    write_aliases(comfy_host, {"more_details": "tiny_sd15_lora.safetensors",
                               "SDXLrender_v2.0": "tiny_sd15_lora.safetensors"})
    text = DOCS_EXAMPLE + "\nface_correct=true\nar=1:1"  # two items a local only-upscale cannot apply
    image, summary = from_prompt(comfy_host, sd15_pixel, text, picture(64, 64), seed=4242)
    assert image.shape == (1, 128, 128, 3)
    assert "more_details" in summary and "tiny_sd15_lora.safetensors" in summary
    assert "4242" in summary  # the seed widget filled the empty seed=
    assert "2 run" in summary  # A1111 step semantics: 16 steps at 0.1
    not_applied = [line for line in summary.splitlines() if line.startswith("Not applied")]
    assert any("face_correct" in line for line in not_applied) and any("ar=1:1" in line for line in not_applied)
    assert "weighting none" in summary  # use_lpw=false


def test_num_images_gives_one_image_per_seed(comfy_host, sd15_pixel):
    text = "a photo --only_upscale\nnum_images=3\nseed=10\ndenoising_strength=0.4\nsteps=4"
    images, summary = from_prompt(comfy_host, sd15_pixel, text, picture(64, 64, seed=2), scale=1.0)
    assert images.shape == (3, 64, 64, 3)
    assert not torch.equal(images[0], images[1]) and not torch.equal(images[1], images[2])
    assert "10, 11, 12" in summary


def test_prompt_settings_win_over_widgets(comfy_host, sd15_pixel):
    text = "a photo --only_upscale\ndenoising_strength=0\nw=96\nh=80"
    image = picture(64, 64)
    images, summary = from_prompt(comfy_host, sd15_pixel, text, image, denoise=0.9, scale=3.0)
    assert images.shape == (1, 80, 96, 3)
    # denoise 0 from the prompt: nothing is sampled, the output is the Lanczos resize (the widget's 0.9 would repaint)
    assert torch.allclose(images, lanczos(image, 96, 80).clamp(0, 1), atol=1e-6)


def test_the_prompts_steps_and_denoise_decide_the_steps_that_run(comfy_host, sd15_pixel):
    model, clip, vae = sd15_pixel
    calls = {}
    for name, text in (("prompt", "a photo --only_upscale\nsteps=4\ndenoising_strength=0.5"),
                       ("widgets", "a photo --only_upscale")):
        counted, calls[name] = counting_unet(model)
        _, summary = from_prompt(comfy_host, (counted, clip, vae), text, picture(64, 64), steps=16, denoise=0.1,
                                 scale=1.0)
    assert len(calls["prompt"]) == 3  # A1111: int(0.5 x 4) + 1 steps of a 4-step schedule, one UNet call each
    assert len(calls["widgets"]) == 2  # the widgets' 16 steps at 0.1: int(1.6) + 1


def test_local_vae_attention_is_named_in_the_summary_as_not_exact(comfy_host, sd15_pixel):
    text = "a photo --only_upscale\nsteps=4\ndenoising_strength=0.3"
    _, summary = from_prompt(comfy_host, sd15_pixel, text, picture(64, 64, seed=3), vae_attention="local")
    assert "VAE encode: attention local to 1024 px windows (vae_attention=local: not exact)" in summary
    assert "VAE decode: attention local to 1024 px windows (vae_attention=local: not exact)" in summary
    _, summary = from_prompt(comfy_host, sd15_pixel, text, picture(64, 64, seed=3))
    assert "VAE decode: exact" in summary and "not exact" not in summary
