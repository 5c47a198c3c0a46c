"""The pack loads into a real ComfyUI through its own loader, and the host runs a graph on the test models."""
import asyncio

import torch

from .conftest import run_node  # noqa: F401  (re-exported helper, keeps the import path checked)


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


def test_smoke_graph_on_the_tiny_checkpoint_returns_an_image_of_the_right_size(comfy_host, sd15):
    nodes = comfy_host.nodes
    model, clip, vae = sd15
    positive = nodes.CLIPTextEncode().encode(clip, "a red apple")[0]
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    picture = torch.rand((1, 64, 96, 3), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        latent = nodes.VAEEncode().encode(vae, picture)[0]
        assert latent["samples"].shape == (1, 4, 8, 12)
        sampled = nodes.KSampler().sample(model, 1, 2, 5.0, "euler", "normal", positive, negative, latent,
                                          denoise=0.5)[0]
        image = nodes.VAEDecode().decode(vae, sampled)[0]
    assert image.shape == (1, 64, 96, 3)
    assert torch.isfinite(image).all()
    assert not torch.equal(sampled["samples"], latent["samples"]), "sampling changed nothing"
