"""Make the honest pictures: the procedural example input, and each workflow's .jpg thumbnail as a diagram.

The test models have random weights, so their outputs are noise; a thumbnail that showed "added detail" would lie.
Each thumbnail is therefore a drawing of the workflow itself (its nodes and links, from the UI JSON), with the
example input in the Load Image box. Needs Pillow and numpy (the ComfyUI venv has both).
Usage: python tools/make_thumbnails.py [--input-only]
"""
import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PACK_ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = PACK_ROOT / "workflows"
EXAMPLE_INPUT = WORKFLOWS / "astria_example_input.png"
INPUT_SIZE = (384, 256)  # 2x -> 768x512: a demo run on CPU finishes in about a minute
THUMB_SIZE = (512, 384)
THUMB_MARGIN = 16
BACKGROUND = (32, 34, 38)
NODE_FILL = (53, 56, 62)
ASTRIA_FILL = (58, 78, 110)
TEXT = (230, 230, 230)
LINK_COLOURS = {"IMAGE": (100, 181, 246), "MODEL": (180, 160, 255), "CLIP": (255, 210, 80), "VAE": (255, 110, 110),
                "ASTRIA_PROMPT": (120, 220, 140), "CONDITIONING": (255, 160, 90)}


def example_input(size=INPUT_SIZE, seed=7) -> Image.Image:
    """A procedural landscape: sky gradient, sun, layered hills, a few trees, fine noise (no copyrighted content)."""
    width, height = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    sky_top, sky_bottom = np.array([70, 120, 200], np.float32), np.array([250, 200, 150], np.float32)
    t = (y / height)[..., None]
    image = sky_top * (1 - t) + sky_bottom * t
    sun = ((x - width * 0.72) ** 2 + (y - height * 0.3) ** 2) < (height * 0.11) ** 2
    image[sun] = [255, 236, 170]
    for depth, (base, amp, freq, colour) in enumerate([(0.55, 0.08, 2.1, (90, 120, 110)),
                                                       (0.68, 0.07, 3.3, (60, 110, 70)),
                                                       (0.8, 0.05, 5.0, (40, 85, 45))]):
        phase = rng.uniform(0, 6.28)
        ridge = height * (base + amp * np.sin(x[0] / width * freq * 6.28 + phase)
                          + amp * 0.4 * np.sin(x[0] / width * freq * 17 + phase * 2))
        below = y >= ridge[None, :]
        shade = (1 - 0.25 * (y - ridge[None, :]) / height)[..., None]
        image = np.where(below[..., None], np.array(colour, np.float32) * shade, image)
    for _ in range(9):
        cx, base_y = rng.uniform(0, width), height * rng.uniform(0.82, 0.97)
        tree_h, tree_w = height * rng.uniform(0.12, 0.2), width * rng.uniform(0.025, 0.04)
        inside = (y < base_y) & (y > base_y - tree_h) & (np.abs(x - cx) < tree_w * (y - base_y + tree_h) / tree_h)
        image[inside] = [25, 60, 35]
    image += rng.normal(0, 6, image.shape).astype(np.float32)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "RGB")


def _font(size):
    """DejaVu Sans where installed (Debian's fonts-dejavu-core), else Pillow's built-in font."""
    for path in ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            continue
    return ImageFont.load_default()


def workflow_diagram(workflow: dict, display_names: dict, picture: Image.Image, size=THUMB_SIZE) -> Image.Image:
    """The workflow's nodes as boxes at their canvas positions, links as coloured lines, the input picture shown."""
    nodes = [node for node in workflow["nodes"] if node["type"] not in ("MarkdownNote", "Note")]
    left = min(node["pos"][0] for node in nodes)
    top = min(node["pos"][1] for node in nodes)
    right = max(node["pos"][0] + node["size"][0] for node in nodes)
    bottom = max(node["pos"][1] + node["size"][1] for node in nodes)
    scale = min((size[0] - 2 * THUMB_MARGIN) / (right - left), (size[1] - 2 * THUMB_MARGIN) / (bottom - top))
    canvas = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font(max(9, int(22 * scale)))

    def box(node):
        x0 = THUMB_MARGIN + (node["pos"][0] - left) * scale
        y0 = THUMB_MARGIN + (node["pos"][1] - top) * scale
        return x0, y0, x0 + node["size"][0] * scale, y0 + node["size"][1] * scale

    by_id = {node["id"]: node for node in nodes}
    for _, from_id, _, to_id, _, kind in workflow["links"]:
        a, b = box(by_id[from_id]), box(by_id[to_id])
        draw.line([(a[2], a[1] + 12), (b[0], b[1] + 12)], fill=LINK_COLOURS.get(kind, (160, 160, 160)), width=2)
    for node in nodes:
        x0, y0, x1, y1 = box(node)
        astria = node["type"].startswith("Astria")
        draw.rounded_rectangle([x0, y0, x1, y1], radius=4, fill=ASTRIA_FILL if astria else NODE_FILL,
                               outline=(90, 94, 100))
        title = node.get("title") or display_names.get(node["type"], node["type"])
        draw.text((x0 + 4, y0 + 3), title, fill=TEXT, font=font)
        if node["type"] == "LoadImage":
            room = (int(x1 - x0 - 8), int(y1 - y0 - 30))
            if room[0] > 8 and room[1] > 8:
                shown = picture.copy()
                shown.thumbnail(room)
                canvas.paste(shown, (int(x0 + 4), int(y0 + 26)))
    return canvas


def display_names_of(workflow_names) -> dict:
    """Plain-English titles for node types (the pack's own, then the core nodes the workflows use)."""
    names = {"LoadImage": "Load Image", "SaveImage": "Save Image", "CheckpointLoaderSimple": "Load Checkpoint",
             "UpscaleModelLoader": "Load Upscale Model", "RepeatImageBatch": "Repeat Image Batch",
             "ImageScaleBy": "Upscale Image By", "KSampler": "KSampler"}
    for node_id in ("AstriaPrompt", "AstriaSettings", "AstriaLoraLoader", "AstriaEncode", "AstriaOnlyUpscale",
                    "AstriaOnlyUpscaleFromPrompt", "AstriaVAEEncodeTiled", "AstriaVAEDecodeTiled",
                    "AstriaTiledDiffusion", "AstriaRemoteUpscale"):
        spaced = "".join(f" {c}" if c.isupper() and i and not node_id[i - 1].isupper() else c
                         for i, c in enumerate(node_id))
        names[node_id] = spaced.replace("VAEEncode", "VAE Encode").replace("VAEDecode", "VAE Decode")
    return names


def main() -> None:
    """Write the example input (when missing) and every workflow's thumbnail."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input-only", action="store_true", help="only (re)write the example input image")
    args = parser.parse_args()
    if args.input_only or not EXAMPLE_INPUT.exists():
        example_input().save(EXAMPLE_INPUT, optimize=True)
        print(f"wrote {EXAMPLE_INPUT.relative_to(PACK_ROOT)}")
    if args.input_only:
        return
    picture = Image.open(EXAMPLE_INPUT).convert("RGB")
    paths = sorted(WORKFLOWS.glob("*.json"))
    names = display_names_of(paths)
    for path in paths:
        diagram = workflow_diagram(json.loads(path.read_text()), names, picture)
        target = path.with_suffix(".jpg")
        diagram.save(target, quality=85, optimize=True)
        print(f"wrote {target.relative_to(PACK_ROOT)}")


if __name__ == "__main__":
    main()
