"""Make the README's before/after picture from what is true: the example input beside the template's real output.

Runs the template `Astria Only Upscale` (workflows/api/Astria Only Upscale.json: the docs' prompt block, its widget
values, the demo LoRA aliases) in-process in ComfyUI on the example input, through bench/demo_fidelity.py's runner,
on the template's demo checkpoint (or `--checkpoint NAME`, e.g. a real SD1.5 checkpoint, named in the caption).

Usage: $ASTRIA_CACHE/host-0.3.75/venv/bin/python tools/make_readme_images.py [--checkpoint NAME.safetensors]
"""
import argparse
import importlib.util
import re
import sys
import tempfile
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
OUTPUT = PACK_ROOT / "docs" / "img" / "before_after.png"
CAPTION_KEYS = ("denoising_strength", "steps", "scheduler", "cfg_scale")


def demo_fidelity():
    """bench/demo_fidelity.py (the template runner), loaded from its file."""
    spec = importlib.util.spec_from_file_location("astria_demo_fidelity", PACK_ROOT / "bench" / "demo_fidelity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def settings_caption(prompt_text: str) -> str:
    """The template prompt's sampling settings and LoRA weights, as the caption shows them."""
    values = [f"{key}={match[1]}" for key in CAPTION_KEYS
              for match in [re.search(rf"^{key}=(.*)$", prompt_text, re.M)] if match]
    loras = ", ".join(f"{name} {weight}" for name, weight in re.findall(r"<lora:([^:>]+):([^>]+)>", prompt_text))
    return f"{', '.join(values)}, LoRAs {loras}"


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
    """Run the template and write docs/img/before_after.png."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="default: the template's own (the demo checkpoint)")
    args = parser.parse_args()
    import numpy as np
    from PIL import Image

    bench = demo_fidelity()
    work = Path(tempfile.mkdtemp(prefix="astria-readme-"))
    nodes = bench.load_host(work)
    bench.write_demo_aliases(work / "user")
    checkpoint = args.checkpoint or bench.template_checkpoint()
    out = bench.run_template(nodes, checkpoint)[0]
    before = Image.open(bench.EXAMPLE_INPUT).convert("RGB")
    after = Image.fromarray((out[0].clamp(0, 1).numpy() * 255).round().astype(np.uint8))
    text = bench.template_node(bench.template_graph(), "AstriaPrompt")["text"]
    caption = (f"tools/make_readme_images.py: template Astria Only Upscale on {checkpoint} "
               f"({settings_caption(text)})")
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    side_by_side(before, after, caption).save(OUTPUT, optimize=True)
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    if importlib.util.find_spec("torch") is None:
        sys.exit("run this with the ComfyUI host's python (it needs torch)")
    main()
