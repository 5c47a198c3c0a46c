"""Demo fidelity: how close the template `Astria Only Upscale` comes to its input, upscaled, on the demo models.

Runs the template's own graph (workflows/api/Astria Only Upscale.json: the docs' prompt block, the node's widget
values, the LoRA aliases scripts/serve --demo-models writes) in-process in ComfyUI on the example input, once per
checkpoint, and prints side by side:
- floor: the checkpoint's VAE round trip of the clean image (encode, decode, the template's colour fix) against the
  reference, the input Lanczos-upscaled to the output size (mean |difference| on 0-1): what any sampler could reach;
- output: the template's output against the same reference (target: floor + 0.015 at most);
- grid: mean |gradient| across 8 px boundaries over the mean at positions 1, 3 and 5 mod 8 (a clean 2x resize
  reads 1.0; 8 px blocks read far above: target 1.2 at most).
Never asserts (tests/host/test_demo_models.py checks the targets).

Usage: $ASTRIA_CACHE/host-0.3.75/venv/bin/python bench/demo_fidelity.py [--checkpoints A.safetensors B.safetensors]
"""
import argparse
import asyncio
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("ASTRIA_CACHE", Path.home() / ".cache" / "comfyui-astria"))
COMFY_DIR = Path(os.environ.get("COMFYUI_PATH", CACHE / "host-0.3.75" / "ComfyUI"))
MODELS_DIR = Path(os.environ.get("ASTRIA_TEST_MODELS", CACHE / "models-v1"))
TEMPLATE = PACK_ROOT / "workflows" / "api" / "Astria Only Upscale.json"
EXAMPLE_INPUT = PACK_ROOT / "workflows" / "astria_example_input.png"
BLOCK_PX = 8  # the VAE's latent cell
ODD_POSITIONS = (1, 3, 5)  # inside a cell, away from its boundary (7 -> 8)
OUTPUT_TARGET_ABOVE_FLOOR = 0.015
GRID_TARGET = 1.2
PREVIOUS_CHECKPOINT = "tiny_sd15_pixel.safetensors"  # the template's checkpoint before the demo one
PREVIOUS_LORA = "tiny_sd15_lora.safetensors"


def module_from(path: Path):
    """A module loaded from its file: the pack's pure nodes/core modules (they import only torch) and tools."""
    spec = importlib.util.spec_from_file_location(f"astria_bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DEMO_INSTALL = module_from(PACK_ROOT / "tools" / "install_demo.py")  # the aliases scripts/serve --demo-models writes
DEMO_LORA = DEMO_INSTALL.DEMO_LORA


def template_graph() -> dict:
    """The template's API graph, node id -> {class_type, inputs}."""
    return json.loads(TEMPLATE.read_text())


def template_node(graph: dict, class_type: str) -> dict:
    """The inputs of the template's one node of this class."""
    found = [node["inputs"] for node in graph.values() if node["class_type"] == class_type]
    if len(found) != 1:
        raise ValueError(f"{TEMPLATE.name} has {len(found)} {class_type} nodes, expected 1")
    return found[0]


def template_checkpoint() -> str:
    """The checkpoint the template loads."""
    return template_node(template_graph(), "CheckpointLoaderSimple")["ckpt_name"]


def mean_abs(result, reference) -> float:
    """Mean |result - reference| of two (B, H, W, C) images on 0-1."""
    return (result.float() - reference.float()).abs().mean().item()


def grid_ratio(image) -> float:
    """Mean |gradient| across 8 px boundaries over the mean at the odd positions 1, 3, 5 mod 8, both axes."""
    image = image.float()
    across, inside = [], []
    for axis in (1, 2):  # rows, columns of (B, H, W, C)
        gradient = image.diff(dim=axis).abs().movedim(axis, 0)  # gradient[i] lies between pixels i and i + 1
        position = [i % BLOCK_PX for i in range(gradient.shape[0])]
        across.append(gradient[[i for i, p in enumerate(position) if p == BLOCK_PX - 1]].flatten())
        inside.append(gradient[[i for i, p in enumerate(position) if p in ODD_POSITIONS]].flatten())
    import torch

    return (torch.cat(across).mean() / torch.cat(inside).mean().clamp_min(1e-12)).item()


def load_host(work: Path):
    """ComfyUI in this process (CPU unless a GPU is there), the models folder on its paths, the pack loaded."""
    if str(COMFY_DIR) not in sys.path:
        sys.path.insert(0, str(COMFY_DIR))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import torch

    if not torch.cuda.is_available():
        import comfy.cli_args

        comfy.cli_args.args.cpu = True
    import folder_paths

    for name, setter in (("user", folder_paths.set_user_directory), ("output", folder_paths.set_output_directory),
                         ("temp", folder_paths.set_temp_directory), ("input", folder_paths.set_input_directory)):
        (work / name).mkdir()
        setter(str(work / name))
    for kind in ("checkpoints", "loras", "embeddings", "vae"):
        folder_paths.add_model_folder_path(kind, str(MODELS_DIR / kind))
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    (work / "custom_nodes").mkdir()
    link = work / "custom_nodes" / "ComfyUI-Astria"
    link.symlink_to(PACK_ROOT, target_is_directory=True)
    if not asyncio.run(nodes.load_custom_node(str(link))):
        raise RuntimeError("the pack did not load (see the log above)")
    return nodes


def run_node(nodes, node_id, **inputs):
    """Execute one of the pack's V3 nodes as ComfyUI's executor does; returns its outputs."""
    cls = nodes.NODE_CLASS_MAPPINGS[node_id].PREPARE_CLASS_CLONE({})
    return getattr(cls, cls.FUNCTION)(**inputs).result


def write_demo_aliases(user_dir: Path, lora: str = DEMO_LORA) -> Path:
    """The docs' LoRA names -> lora in the default user's alias file, as scripts/serve --demo-models writes them."""
    path = user_dir / "default" / "astria" / "lora_aliases.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(DEMO_INSTALL.merged_aliases({}, target=lora)))
    return path


def example_image():
    """The example input as a (1, H, W, 3) float image."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(EXAMPLE_INPUT) as picture:
        pixels = np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels)[None]


def run_template(nodes, checkpoint: str | None = None, image=None):
    """The template's graph on the example input: (output image, summary, (model, clip, vae) it loaded)."""
    import torch

    graph = template_graph()
    text = template_node(graph, "AstriaPrompt")["text"]
    widgets = {name: value for name, value in template_node(graph, "AstriaOnlyUpscaleFromPrompt").items()
               if not isinstance(value, list)}  # links are lists
    loaded = nodes.CheckpointLoaderSimple().load_checkpoint(checkpoint or template_checkpoint())[:3]
    model, clip, vae = loaded
    prompt = run_node(nodes, "AstriaPrompt", text=text)[0]
    with torch.inference_mode():
        output, summary = run_node(nodes, "AstriaOnlyUpscaleFromPrompt", image=example_image() if image is None
                                   else image, model=model, clip=clip, vae=vae, astria_prompt=prompt, **widgets)
    return output, summary, loaded


def fidelity(nodes, checkpoint: str | None = None, image=None) -> dict:
    """The floor, the template's output error and grid ratio, and the time the template took, for one checkpoint
    (on the example input, or on `image`)."""
    import comfy.utils
    import torch

    core_img2img = module_from(PACK_ROOT / "nodes" / "core" / "img2img.py")
    graph = template_graph()
    color_fix = template_node(graph, "AstriaOnlyUpscaleFromPrompt")["color_fix"]
    started = time.perf_counter()
    image = example_image() if image is None else image
    output, summary, (_, _, vae) = run_template(nodes, checkpoint, image)
    seconds = time.perf_counter() - started
    height, width = output.shape[1], output.shape[2]
    resized = comfy.utils.common_upscale(image.movedim(-1, 1), width, height, "lanczos", "disabled")
    reference = resized.movedim(1, -1).clamp(0, 1)
    with torch.inference_mode():
        round_trip = vae.decode(vae.encode(reference)).clamp(0, 1)
    floor_image = core_img2img.color_fix(round_trip, reference, color_fix)
    return {"checkpoint": checkpoint or template_checkpoint(), "size": f"{width}x{height}",
            "floor": mean_abs(floor_image, reference), "output": mean_abs(output, reference),
            "grid_output": grid_ratio(output), "grid_floor": grid_ratio(floor_image),
            "grid_reference": grid_ratio(reference), "seconds": seconds, "summary": summary, "image": output}


def main():
    """Run the template on each checkpoint and print the figures side by side."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", nargs="+", default=None,
                        help=f"checkpoints to compare (default: {PREVIOUS_CHECKPOINT} with {PREVIOUS_LORA}, "
                             "then the template's own with the demo LoRA)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="astria-demo-fidelity-"))
    nodes = load_host(work)
    runs = [(name, DEMO_LORA) for name in args.checkpoints] if args.checkpoints else [
        (PREVIOUS_CHECKPOINT, PREVIOUS_LORA), (template_checkpoint(), DEMO_LORA)]
    print(f"template {TEMPLATE.relative_to(PACK_ROOT)} on {EXAMPLE_INPUT.name}, models {MODELS_DIR}")
    print(f"{'checkpoint':32s} {'LoRA (docs aliases)':34s} {'size':>8s} {'floor':>7s} {'output':>7s} "
          f"{'out-floor':>9s} {'grid out':>8s} {'grid floor':>10s} {'grid ref':>8s} {'run s':>6s}")
    for checkpoint, lora in runs:
        write_demo_aliases(work / "user", lora)
        figures = fidelity(nodes, checkpoint)
        print(f"{checkpoint:32s} {lora:34s} {figures['size']:>8s} {figures['floor']:7.4f} {figures['output']:7.4f} "
              f"{figures['output'] - figures['floor']:9.4f} {figures['grid_output']:8.2f} {figures['grid_floor']:10.2f} "
              f"{figures['grid_reference']:8.2f} {figures['seconds']:6.1f}")
    print(f"targets: output - floor <= {OUTPUT_TARGET_ABOVE_FLOOR}, grid out <= {GRID_TARGET}")


if __name__ == "__main__":
    main()
