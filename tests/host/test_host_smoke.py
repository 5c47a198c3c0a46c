"""The pack loads into a real ComfyUI through its own loader, declares every node fully, and a graph of its nodes
runs on the test models."""
import asyncio
import inspect

import torch

from .conftest import run_node


def test_pack_registers_exactly_the_nodes_its_extension_declares(comfy_host):
    extension = asyncio.run(comfy_host.pack_module.comfy_entrypoint())
    declared = sorted(cls.GET_SCHEMA().node_id for cls in asyncio.run(extension.get_node_list()))
    assert declared == comfy_host.our_node_ids
    assert all(node_id.startswith("Astria") for node_id in declared)


def test_every_input_of_every_node_has_a_tooltip(comfy_host):
    missing = []
    for node_id in comfy_host.our_node_ids:
        schema = comfy_host.nodes.NODE_CLASS_MAPPINGS[node_id].GET_SCHEMA()
        missing += [f"{node_id}.{item.id}" for item in schema.inputs if not item.tooltip]
        assert schema.display_name and schema.category.startswith("Astria"), node_id
    assert missing == []


def test_every_output_has_a_tooltip_and_the_description_is_the_class_docstring(comfy_host):
    missing, outputs = [], 0
    for node_id in comfy_host.our_node_ids:
        cls = comfy_host.nodes.NODE_CLASS_MAPPINGS[node_id]
        schema = cls.GET_SCHEMA()
        outputs += len(schema.outputs)
        missing += [f"{node_id}.{item.display_name}" for item in schema.outputs if not item.tooltip]
        assert schema.description and schema.description == inspect.getdoc(cls), node_id
    assert missing == [] and outputs == 25


def test_execute_gives_defaults_to_optional_inputs_only(comfy_host):
    """The host always passes required inputs; only an optional one can be absent, so only those have a default."""
    for node_id in comfy_host.our_node_ids:
        cls = comfy_host.nodes.NODE_CLASS_MAPPINGS[node_id]
        schema = cls.GET_SCHEMA()
        parameters = inspect.signature(cls.execute).parameters
        assert set(parameters) == {item.id for item in schema.inputs}, node_id
        defaulted = {name for name, parameter in parameters.items() if parameter.default is not parameter.empty}
        assert defaulted == {item.id for item in schema.inputs if item.optional}, node_id


def test_a_graph_of_pack_nodes_matches_the_same_graph_of_host_nodes(comfy_host, sd15, float32_attention):
    """Astria Prompt -> Settings -> Encode -> tiled VAE encode -> KSampler -> tiled VAE decode on the tiny
    checkpoint, beside CLIPTextEncode -> VAEEncode -> KSampler -> VAEDecode with the numbers the prompt gives."""
    nodes = comfy_host.nodes
    model, clip, vae = sd15
    text = "a red apple --only_upscale\nnegative_prompt=blurry\nsteps=3\ncfg_scale=5\ndenoising_strength=0.5\nseed=7"
    picture = torch.rand((1, 64, 96, 3), generator=torch.Generator().manual_seed(0))
    prompt = run_node(comfy_host, "AstriaPrompt", text=text)[0]
    steps, seed, cfg, denoise, sampler, scheduler, _, _ = run_node(comfy_host, "AstriaSettings", astria_prompt=prompt)
    assert (steps, seed, cfg, denoise, sampler, scheduler) == (3, 7, 5.0, 0.5, "euler_ancestral", "normal")
    with torch.inference_mode():
        positive, negative, _ = run_node(comfy_host, "AstriaEncode", clip=clip, astria_prompt=prompt)
        latent = run_node(comfy_host, "AstriaVAEEncodeTiled", pixels=picture, vae=vae, tile_size=64)[0]
        sampled = nodes.KSampler().sample(model, seed, steps, cfg, sampler, scheduler, positive, negative, latent,
                                          denoise=denoise)[0]
        image = run_node(comfy_host, "AstriaVAEDecodeTiled", samples=sampled, vae=vae, tile_size=64)[0]

        host_positive = nodes.CLIPTextEncode().encode(clip, "a red apple")[0]
        host_negative = nodes.CLIPTextEncode().encode(clip, "blurry")[0]
        host_latent = nodes.VAEEncode().encode(vae, picture)[0]
        host_sampled = nodes.KSampler().sample(model, 7, 3, 5.0, "euler_ancestral", "normal", host_positive,
                                               host_negative, host_latent, denoise=0.5)[0]
        host_image = nodes.VAEDecode().decode(vae, host_sampled)[0]
    assert torch.allclose(positive[0][0], host_positive[0][0], atol=1e-4)
    assert torch.allclose(latent["samples"], host_latent["samples"], atol=1e-3)
    assert image.shape == host_image.shape == (1, 64, 96, 3)
    assert not torch.equal(sampled["samples"], latent["samples"]), "sampling changed nothing"
    assert (image - host_image).abs().max().item() < 0.02
