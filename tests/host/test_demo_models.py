"""The demo models (scripts/serve --demo-models, the templates' checkpoint): the template Astria Only Upscale, at its
own settings and through the real loaders, gives back its input upscaled (bench/demo_fidelity.py's targets), and the
demo LoRA is really applied while leaving the demo denoiser's output as it is."""
import sys

import pytest
import torch

from comfyui_astria.bench import demo_fidelity

from .conftest import run_node

CROP = (slice(64, 160), slice(96, 224))  # 96x128 px of the example input: the template's 2x costs little here


@pytest.fixture(scope="module")
def demo_aliases(comfy_host):
    """The docs' LoRA names -> the demo LoRA, as scripts/serve --demo-models writes them; the old file restored."""
    path = comfy_host.base / "user" / "default" / "astria" / "lora_aliases.json"
    before = path.read_bytes() if path.exists() else None
    demo_fidelity.write_demo_aliases(comfy_host.base / "user")
    yield path
    if before is None:
        path.unlink()
    else:
        path.write_bytes(before)


def crop():
    rows, columns = CROP
    return demo_fidelity.example_image()[:, rows, columns, :].contiguous()


def test_the_template_uses_the_demo_checkpoint():
    assert demo_fidelity.template_checkpoint() == "tiny_sd15_demo.safetensors"


def test_the_templates_output_is_its_input_upscaled(comfy_host, demo_aliases):
    figures = demo_fidelity.fidelity(comfy_host.nodes, image=crop())
    assert figures["size"] == "256x192"
    assert "tiny_sd15_demo_lora.safetensors" in figures["summary"] and "2 run" in figures["summary"]
    assert figures["output"] - figures["floor"] <= demo_fidelity.OUTPUT_TARGET_ABOVE_FLOOR, figures
    assert figures["grid_output"] <= demo_fidelity.GRID_TARGET, figures
    assert figures["floor"] < 0.06, figures  # the VAE round trip itself keeps the picture


def test_the_demo_lora_changes_weights_but_not_the_denoisers_output(comfy_host, demo_aliases):
    model, clip, _ = comfy_host.nodes.CheckpointLoaderSimple().load_checkpoint("tiny_sd15_demo.safetensors")[:3]
    lora = sys.modules[comfy_host.pack_module.__name__ + ".nodes.comfy.lora"]
    prompt = run_node(comfy_host, "AstriaPrompt", text=demo_fidelity.template_node(
        demo_fidelity.template_graph(), "AstriaPrompt")["text"])[0]
    patched, patched_clip, _ = lora.apply_prompt_loras(model, clip, prompt)
    assert len(patched.patches) > 0 and len(patched_clip.patcher.patches) > 0
    key = sorted(patched.patches)[0]
    import comfy.utils

    before = comfy.utils.get_attr(model.model, key).detach().float().clone()
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 3
    sigma = torch.tensor([0.2667])
    context = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        plain = model.model.apply_model(latent, sigma, c_crossattn=context)
        patched.patch_model()
        try:
            changed = (comfy.utils.get_attr(patched.model, key).detach().float() - before).abs().max().item()
            with_lora = patched.model.apply_model(latent, sigma, c_crossattn=context)
        finally:
            patched.unpatch_model()
    assert changed > 1e-4  # the LoRA is applied
    assert torch.equal(with_lora, plain) and torch.equal(plain, latent)  # x - sigma * eps with eps = 0
