"""A size that cannot fit is refused before anything big is allocated, in our words, and the server lives on."""
import numpy as np
from PIL import Image

from .conftest import ComfyServer

BUDGET_MB = 1400
"""The RAM budget the test server plans with (ASTRIA_MEMORY_BUDGET_MB): a 4096 px result's largest single
allocation (a float32 image, 0.2 GB), its four images (0.8 GB) and the tiled VAE's spilled working memory alone
(1.1 GB: tiles, one block of the attention's keys and values, result and resident pages) are each below it; their
total (1.9 GB) is not."""


def test_a_result_whose_total_memory_exceeds_the_budget_is_refused_and_the_server_still_answers(tmp_path):
    server = ComfyServer(tmp_path, env_extra={"ASTRIA_MEMORY_BUDGET_MB": str(BUDGET_MB)})
    try:
        Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(server.dirs["input"] / "small.png")
        graph = {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
            "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo"}},
            "3": {"class_type": "LoadImage", "inputs": {"image": "small.png"}},
            "4": {"class_type": "AstriaOnlyUpscale", "inputs": {
                "image": ["3", 0], "model": ["1", 0], "vae": ["1", 2], "positive": ["2", 0], "negative": ["2", 0],
                "scale": 1.0, "width": 4096, "height": 4096, "steps": 16, "denoise": 0.1, "cfg": 6.0,
                "sampler_name": "euler_ancestral", "scheduler": "normal", "seed": 1, "tile_size": 768,
                "color_fix": "wavelet", "step_semantics": "astria"}},
            "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
        }
        entry = server.wait(server.queue(graph), timeout=240)
        assert entry["status"]["status_str"] == "error"
        errors = [data for kind, data in entry["status"]["messages"] if kind == "execution_error"]
        message = errors[0]["exception_message"]
        assert "a 4096x4096 px result (batch 1)" in message and "needs about" in message, message
        assert f"{BUDGET_MB / 1024:.1f} GB is free" in message and "lower the scale or the batch size" in message
        assert "DefaultCPUAllocator" not in server.log() and "Traceback (most recent call last)" not in message
        assert server.process.poll() is None
        assert "system" in server.get("/system_stats")  # the server still answers
        assert server.get("/queue")["queue_running"] == []
    finally:
        server.stop()
