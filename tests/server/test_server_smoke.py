"""ComfyUI as a real server process: the pack shows in /object_info, imports cleanly, and a graph completes."""
import re

from PIL import Image

from .conftest import output_images


def test_object_info_lists_every_astria_node(comfy_server):
    info = comfy_server.get("/object_info")
    ours = sorted(name for name in info if name.startswith("Astria"))
    assert {"AstriaPrompt", "AstriaLoraLoader", "AstriaOnlyUpscale"} <= set(ours), ours
    for name in ours:
        assert info[name]["category"].startswith("Astria"), name


def test_startup_log_lists_the_pack_without_import_errors(comfy_server):
    log = comfy_server.log()
    import_lines = [line for line in log.splitlines() if "ComfyUI-Astria" in line and "seconds" in line]
    assert import_lines, "the import-times list does not show the pack:\n" + log[-3000:]
    assert not any("IMPORT FAILED" in line for line in import_lines), import_lines
    cannot_import = [line for line in log.splitlines() if re.search(r"Cannot import .*ComfyUI-Astria", line)]
    assert cannot_import == [], cannot_import


def test_a_small_graph_runs_to_completion_and_history_shows_its_image(comfy_server):
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15_pixel.safetensors"}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 1}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red apple"}},
        "4": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["3", 0], "negative": ["3", 0],
                                                   "latent_image": ["2", 0], "seed": 1, "steps": 2, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "smoke"}},
    }
    entry = comfy_server.wait(comfy_server.queue(graph))
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = output_images(comfy_server, entry)
    assert len(images) == 1
    with Image.open(images[0]) as saved:
        assert saved.size == (64, 48)
