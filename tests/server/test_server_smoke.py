"""ComfyUI as a real server process: every node of the pack shows in /object_info, fully described, the pack imports
cleanly, and a graph of its nodes completes."""
import re

from PIL import Image

from .conftest import output_images

PACK_NODES = {  # every node of the pack, by the node_id it is released under
    "AstriaPrompt", "AstriaSettings", "AstriaLoraLoader", "AstriaEncode", "AstriaVAEEncodeTiled",
    "AstriaVAEDecodeTiled", "AstriaTiledDiffusion", "AstriaOnlyUpscale", "AstriaOnlyUpscaleFromPrompt",
    "AstriaRemoteUpscale",
}


def test_object_info_lists_every_astria_node_with_its_description_and_tooltips(comfy_server):
    info = comfy_server.get("/object_info")
    assert {name for name in info if name.startswith("Astria")} == PACK_NODES
    for name in PACK_NODES:
        node = info[name]
        assert node["category"].startswith("Astria") and node["display_name"] and node["description"], name
        assert node["output_tooltips"] and all(node["output_tooltips"]), name
        inputs = {**node["input"].get("required", {}), **node["input"].get("optional", {})}
        assert all(spec[1].get("tooltip") for spec in inputs.values()), name


def test_startup_log_lists_the_pack_without_import_errors(comfy_server):
    log = comfy_server.log()
    import_lines = [line for line in log.splitlines() if "ComfyUI-Astria" in line and "seconds" in line]
    assert import_lines, "the import-times list does not show the pack:\n" + log[-3000:]
    assert not any("IMPORT FAILED" in line for line in import_lines), import_lines
    cannot_import = [line for line in log.splitlines() if re.search(r"Cannot import .*ComfyUI-Astria", line)]
    assert cannot_import == [], cannot_import


def test_a_graph_of_pack_nodes_runs_to_completion_and_history_shows_its_image(comfy_server):
    """EmptyImage -> Astria Prompt -> Astria Only Upscale (from prompt) -> SaveImage: the prompt's w/h decide."""
    widgets = {"scale": 2.0, "width": 0, "height": 0, "steps": 16, "denoise": 0.1, "cfg": 6.0,
               "sampler_name": "euler_ancestral", "scheduler": "normal", "seed": 0, "tile_size": 768,
               "color_fix": "wavelet", "step_semantics": "astria", "weighting": "from prompt"}
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15_pixel.safetensors"}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0x3366CC}},
        "3": {"class_type": "AstriaPrompt", "inputs": {"text": "a red apple --only_upscale\nw=96\nh=80\nsteps=2"}},
        "4": {"class_type": "AstriaOnlyUpscaleFromPrompt", "inputs": {
            "image": ["2", 0], "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "astria_prompt": ["3", 0],
            **widgets}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "smoke"}},
    }
    entry = comfy_server.wait(comfy_server.queue(graph))
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = output_images(comfy_server, entry)
    assert len(images) == 1
    with Image.open(images[0]) as saved:
        assert saved.size == (96, 80)
