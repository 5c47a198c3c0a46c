"""Make the README's before/after picture from what is true: the example input beside the pack's real output.

Runs Astria Only Upscale (from prompt) in-process in ComfyUI on the example input with the demo checkpoint whose VAE
is the exact pixel VAE and whose UNet has random weights. Random weights cannot add real detail, so the run uses
denoise 0 (the upscale path alone: Lanczos + colour fix) and the picture says so; with a real checkpoint at hand
(`--checkpoint NAME --denoise 0.1`), the after side is a real detail pass and the caption names the model.

Usage: $ASTRIA_CACHE/host-0.3.75/venv/bin/python tools/make_readme_images.py [--checkpoint tiny_sd15_pixel.safetensors]
"""
import argparse
import asyncio
import importlib.util
import sys
import tempfile
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("astria_test_paths", PACK_ROOT / "tests" / "support" / "paths.py")
paths = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(paths)  # where the host and the generated models are, as the tests find them
COMFY_DIR, MODELS_DIR = paths.COMFY_DIR, paths.MODELS_DIR
EXAMPLE_INPUT = PACK_ROOT / "workflows" / "astria_example_input.png"
OUTPUT = PACK_ROOT / "docs" / "img" / "before_after.png"
# The docs' example without its LoRA tags (the demo has no such files) and without its denoise (--denoise decides).
PROMPT = paths.pack_module("nodes/core/spec_tables.py").docs_example(
    text="masterpiece, best quality, highres --only_upscale", seed="42", denoising_strength=None)


def load_host(work: Path):
    """ComfyUI in this process (CPU unless a GPU is there), the test models on its paths, the pack loaded."""
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
    assert asyncio.run(nodes.load_custom_node(str(link))), "the pack did not load"
    return nodes


def run(nodes, cls_name, **inputs):
    """Execute one of the pack's V3 nodes, its required widgets at their defaults unless given; returns its outputs."""
    cls = nodes.NODE_CLASS_MAPPINGS[cls_name].PREPARE_CLASS_CLONE({})
    required = cls.INPUT_TYPES().get("required", {})
    defaults = {name: spec[1]["default"] for name, spec in required.items()
                if len(spec) > 1 and isinstance(spec[1], dict) and "default" in spec[1]}
    return getattr(cls, cls.FUNCTION)(**{**defaults, **inputs}).result


def side_by_side(before, after, caption):
    """The input (shown at the output's size, nearest) beside the output, with a caption strip."""
    from PIL import Image, ImageDraw

    width, height = after.size
    canvas = Image.new("RGB", (width * 2 + 12, height + 44), (24, 24, 24))
    canvas.paste(before.resize((width, height), Image.NEAREST), (0, 0))
    canvas.paste(after, (width + 12, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((8, height + 8), f"before: {before.size[0]}x{before.size[1]} input", fill=(230, 230, 230))
    draw.text((width + 20, height + 8), f"after: {width}x{height}", fill=(230, 230, 230))
    draw.text((8, height + 24), caption, fill=(170, 170, 170))
    return canvas


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="tiny_sd15_pixel.safetensors")
    parser.add_argument("--denoise", type=float, default=0.0)
    args = parser.parse_args()
    import numpy as np
    import torch
    from PIL import Image

    nodes = load_host(Path(tempfile.mkdtemp(prefix="astria-readme-")))
    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(args.checkpoint)[:3]
    before = Image.open(EXAMPLE_INPUT).convert("RGB")
    image = torch.from_numpy(np.asarray(before, dtype=np.float32) / 255.0)[None]
    prompt = run(nodes, "AstriaPrompt", text=PROMPT)[0]
    with torch.inference_mode():
        out = run(nodes, "AstriaOnlyUpscaleFromPrompt", image=image, model=model, clip=clip, vae=vae,
                  astria_prompt=prompt, denoise=args.denoise, scale=2.0)[0]
    after = Image.fromarray((out[0].clamp(0, 1).numpy() * 255).round().astype(np.uint8))
    if args.checkpoint.startswith("tiny_"):
        caption = (f"demo models ({args.checkpoint}, random weights): resize + colour fix only, denoise "
                   f"{args.denoise:g}; a real checkpoint adds detail")
    else:
        caption = f"{args.checkpoint}, denoise {args.denoise:g}, Astria Only Upscale (from prompt)"
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    side_by_side(before, after, caption).save(OUTPUT, optimize=True)
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    if importlib.util.find_spec("torch") is None:
        sys.exit("run this with the ComfyUI host's python (it needs torch)")
    main()
