"""Write the example workflows (UI format in workflows/, API format in workflows/api/) from one description each.

The node schemas come from a running ComfyUI's /object_info (so widget order and defaults are the host's own);
nodes the server lacks fall back to ASSUMED_SCHEMAS below, with a warning: rerun against a server that has them.
Usage: python tools/make_workflows.py --url http://127.0.0.1:8188   (or --object-info saved_object_info.json)
"""
import argparse
import importlib.util
import json
import sys
import urllib.request
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = PACK_ROOT / "workflows"
DEMO_CHECKPOINT = "tiny_sd15_demo.safetensors"
DEMO_UPSCALE_MODEL = "tiny_esrgan_x4.safetensors"
EXAMPLE_INPUT = "astria_example_input.png"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY_NODES = {"Note", "MarkdownNote"}  # drawn by the frontend, never sent to the server
NODE_WIDTH = 320
# Astria Prompt's size in the templates: tall enough that the live preview of the docs' example shows whole (no
# scrolling) under the text box at the frontend's default font (measured on frontends 1.32.9 and 1.58.1).
PROMPT_NODE_SIZE = [460, 560]
# The saved view (extra.ds) fits the whole graph into the smallest common window (1280x720 CSS px) below the
# frontend's top bar, its Nodes 2.0 banner and the workflow breadcrumb (about 150 px on 1.32.9), beside its left
# toolbar, so no node title starts hidden under the menus.
FIT_VIEWPORT = (1280, 720)
FIT_MARGINS = {"left": 70, "top": 160, "right": 20, "bottom": 40}
BELOW_PROMPT = 60 + PROMPT_NODE_SIZE[1] + 40  # the y of what sits under Astria Prompt
NODE_TITLE_HEIGHT = 30  # LiteGraph draws the title above a node's pos
# The file stems are what the frontend shows: the server lists stems, the frontend uses them as the card's title
# (as written) and description (with - and _ as spaces). So they are plain words, short enough for the card's one
# title line (about 28 characters at the dialog's default width on 1.32.9).
TEMPLATE_NAMES = {
    "only_upscale": "Astria Only Upscale",
    "only_upscale_advanced": "Astria Advanced Upscale",
    "four_x_large": "Astria 4x Tiled Upscale",
    "remote_upscale": "Astria Remote Upscale",
}



def _docs_example() -> str:
    """The docs' upscale example from the pack's one source (nodes/core/spec_tables.py, a pure module)."""
    spec = importlib.util.spec_from_file_location("astria_spec_tables", PACK_ROOT / "nodes" / "core" / "spec_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DOCS_UPSCALE_EXAMPLE


EXAMPLE_PROMPT = _docs_example()


def _upscale_widgets():
    return {"scale": ["FLOAT", {"default": 2.0}], "width": ["INT", {"default": 0}], "height": ["INT", {"default": 0}],
            "steps": ["INT", {"default": 16}], "denoise": ["FLOAT", {"default": 0.1}],
            "cfg": ["FLOAT", {"default": 6.0}], "sampler_name": ["COMBO", {"default": "euler_ancestral"}],
            "scheduler": ["COMBO", {"default": "normal"}],
            "seed": ["INT", {"default": 0, "control_after_generate": True}],
            "tile_size": ["INT", {"default": 1024}], "color_fix": ["COMBO", {"default": "wavelet"}],
            "step_semantics": ["COMBO", {"default": "astria"}]}


def _schema(required, optional=None, outputs=(), output_names=()):
    optional = optional or {}
    return {"input": {"required": required, "optional": optional},
            "input_order": {"required": list(required), "optional": list(optional)},
            "output": list(outputs), "output_name": list(output_names or outputs)}


_TILED_VAE = {"tile_size": ["INT", {"default": 512}], "overlap": ["INT", {"default": 64}],
              "temporal_size": ["INT", {"default": 64}], "temporal_overlap": ["INT", {"default": 8}]}
_OPTIONAL_MODELS = {"upscale_model": ["UPSCALE_MODEL", {}], "control_net": ["CONTROL_NET", {}],
                    "control_strength": ["FLOAT", {"default": 0.65}]}
ASSUMED_SCHEMAS = {
    "AstriaEncode": _schema({"clip": ["CLIP", {}], "astria_prompt": ["ASTRIA_PROMPT", {}]}, None,
                            ["CONDITIONING", "CONDITIONING"], ["positive", "negative"]),
    "AstriaOnlyUpscaleFromPrompt": _schema(
        {"image": ["IMAGE", {}], "model": ["MODEL", {}], "clip": ["CLIP", {}], "vae": ["VAE", {}],
         "astria_prompt": ["ASTRIA_PROMPT", {}], **_upscale_widgets()}, _OPTIONAL_MODELS,
        ["IMAGE", "STRING"], ["IMAGE", "summary"]),
    "AstriaVAEEncodeTiled": _schema({"pixels": ["IMAGE", {}], "vae": ["VAE", {}], **_TILED_VAE}, None, ["LATENT"]),
    "AstriaVAEDecodeTiled": _schema({"samples": ["LATENT", {}], "vae": ["VAE", {}], **_TILED_VAE}, None, ["IMAGE"]),
    "AstriaTiledDiffusion": _schema({"model": ["MODEL", {}], "tile_size": ["INT", {"default": 1024}],
                                     "overlap": ["INT", {"default": 128}], "tile_batch_size": ["INT", {"default": 1}]},
                                    None, ["MODEL"]),
    "AstriaRemoteUpscale": _schema({"image": ["IMAGE", {}], "astria_prompt": ["ASTRIA_PROMPT", {}],
                                    "tune_id": ["INT", {"default": 690204}],
                                    "seed": ["INT", {"default": 0, "control_after_generate": True}],
                                    "concurrency": ["INT", {"default": 2}], "max_prompts": ["INT", {"default": 8}]},
                                   None, ["IMAGE"]),
}


def spec_type(spec) -> str:
    """The socket or widget type of an input spec ([type, options]); a list of choices is a COMBO."""
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def spec_options(spec) -> dict:
    """The options dict of an input spec (empty when it has none)."""
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def combo_choices(spec) -> list:
    """The choices of a COMBO input (old list form or V3 `options`); empty for other inputs."""
    if isinstance(spec[0], list):
        return spec[0]
    return list(spec_options(spec).get("options", [])) if spec[0] == "COMBO" else []


def is_widget(spec) -> bool:
    """Whether the frontend draws this input as a widget (with a value) rather than a socket."""
    return spec_type(spec) in WIDGET_TYPES and not spec_options(spec).get("forceInput")


def ordered_inputs(schema):
    """(name, spec, optional) of every input, in the schema's order."""
    for section in ("required", "optional"):
        specs = schema["input"].get(section, {})
        for name in schema.get("input_order", {}).get(section, list(specs)):
            yield name, specs[name], section == "optional"


def output_type(schema, index) -> str:
    """The type of an output slot (a list of choices is COMBO)."""
    kind = schema["output"][index]
    return "COMBO" if isinstance(kind, list) else kind


def fit_view(nodes, groups) -> dict:
    """The canvas view (LiteGraph's ds: screen = (canvas + offset) * scale) that shows every node and group whole."""
    boxes = [(n["pos"][0], n["pos"][1] - NODE_TITLE_HEIGHT, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in nodes]
    boxes += [(x, y, x + w, y + h) for x, y, w, h in (group["bounding"] for group in groups)]
    left, top = min(b[0] for b in boxes), min(b[1] for b in boxes)
    right, bottom = max(b[2] for b in boxes), max(b[3] for b in boxes)
    room_w = FIT_VIEWPORT[0] - FIT_MARGINS["left"] - FIT_MARGINS["right"]
    room_h = FIT_VIEWPORT[1] - FIT_MARGINS["top"] - FIT_MARGINS["bottom"]
    scale = min(1.0, room_w / (right - left), room_h / (bottom - top))
    return {"scale": round(scale, 4), "offset": [round(FIT_MARGINS["left"] / scale - left, 1),
                                                 round(FIT_MARGINS["top"] / scale - top, 1)]}


class Graph:
    """One workflow under construction: nodes with widget values, links by input name."""

    def __init__(self, schemas):
        self.schemas = schemas
        self.nodes = {}
        self.links = []  # (from_id, from_slot, to_id, to_input_name)
        self.notes = []
        self.groups = []

    def node(self, node_id, node_type, pos, title=None, size=None, **widgets):
        """Add a node; widgets not given take the schema's default."""
        self.nodes[node_id] = {"type": node_type, "pos": pos, "title": title, "size": size, "widgets": widgets}
        return node_id

    def link(self, from_id, from_slot, to_id, to_input):
        """Connect output slot `from_slot` of `from_id` to the input named `to_input` of `to_id`."""
        self.links.append((from_id, from_slot, to_id, to_input))

    def note(self, node_id, pos, size, text):
        """A MarkdownNote (frontend only) explaining the workflow."""
        self.notes.append({"id": node_id, "pos": pos, "size": size, "text": text})

    def group(self, title, bounding):
        """A titled box around nodes."""
        self.groups.append({"title": title, "bounding": bounding})

    def widget_values(self, node_id):
        """The node's widget values in the frontend's order (seed control and image upload values included)."""
        entry = self.nodes[node_id]
        values = []
        for name, spec, _ in ordered_inputs(self.schemas[entry["type"]]):
            if not is_widget(spec):
                continue
            options = spec_options(spec)
            default = options.get("default", (combo_choices(spec) or [None])[0])
            values.append(entry["widgets"].get(name, default))
            if options.get("control_after_generate"):
                values.append("fixed")  # the demo reruns give the same picture; pick randomize for variety
            if options.get("image_upload"):
                values.append("image")
        return values

    def ui(self):
        """The workflow in the frontend's format (version 0.4)."""
        linked_inputs = {}
        out_links = {}
        ui_links = []
        for link_id, (from_id, from_slot, to_id, to_input) in enumerate(self.links, start=1):
            kind = output_type(self.schemas[self.nodes[from_id]["type"]], from_slot)
            linked_inputs[(to_id, to_input)] = link_id
            out_links.setdefault((from_id, from_slot), []).append(link_id)
            to_slot = self._input_slot(to_id, to_input)
            ui_links.append([link_id, from_id, from_slot, to_id, to_slot, kind])
        nodes = []
        for order, (node_id, entry) in enumerate(self.nodes.items()):
            schema = self.schemas[entry["type"]]
            inputs = []
            for name, spec, _ in ordered_inputs(schema):
                link_id = linked_inputs.get((node_id, name))
                if is_widget(spec):
                    if link_id is not None:
                        inputs.append({"name": name, "type": spec_type(spec), "widget": {"name": name},
                                       "link": link_id})
                else:
                    inputs.append({"name": name, "type": spec_type(spec), "link": link_id})
            outputs = [{"name": schema["output_name"][slot], "type": output_type(schema, slot),
                        "links": out_links.get((node_id, slot), []), "slot_index": slot}
                       for slot in range(len(schema["output"]))]
            node = {"id": node_id, "type": entry["type"], "pos": entry["pos"],
                    "size": entry["size"] or [NODE_WIDTH, 60 + 26 * (len(inputs) + len(outputs))],
                    "flags": {}, "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
                    "properties": {"Node name for S&R": entry["type"]},
                    "widgets_values": self.widget_values(node_id)}
            if entry["title"]:
                node["title"] = entry["title"]
            nodes.append(node)
        for note in self.notes:
            nodes.append({"id": note["id"], "type": "MarkdownNote", "pos": note["pos"], "size": note["size"],
                          "flags": {}, "order": len(nodes), "mode": 0, "inputs": [], "outputs": [],
                          "properties": {}, "widgets_values": [note["text"]], "color": "#432", "bgcolor": "#653"})
        return {"last_node_id": max(node["id"] for node in nodes), "last_link_id": len(ui_links), "nodes": nodes,
                "links": ui_links,
                "groups": [{"id": index, "title": group["title"], "bounding": group["bounding"], "color": "#3f789e",
                            "font_size": 24, "flags": {}} for index, group in enumerate(self.groups, start=1)],
                "config": {}, "extra": {"ds": fit_view(nodes, self.groups)}, "version": 0.4}

    def _input_slot(self, node_id, input_name):
        """Index of the input in the UI node's `inputs` list (sockets, plus widgets that are linked)."""
        slot = 0
        linked = {to_input for (_, _, to_id, to_input) in self.links if to_id == node_id}
        for name, spec, _ in ordered_inputs(self.schemas[self.nodes[node_id]["type"]]):
            if name == input_name:
                return slot
            if not is_widget(spec) or name in linked:
                slot += 1
        raise KeyError(f"node {node_id} has no input {input_name}")

    def api(self):
        """The same graph in the API format POST /prompt takes."""
        graph = {}
        for node_id, entry in self.nodes.items():
            schema = self.schemas[entry["type"]]
            values = iter(self.widget_values(node_id))
            inputs = {}
            for name, spec, _ in ordered_inputs(schema):
                if is_widget(spec):
                    inputs[name] = next(values)
                    options = spec_options(spec)
                    if options.get("control_after_generate") or options.get("image_upload"):
                        next(values)
            for from_id, from_slot, to_id, to_input in self.links:
                if to_id == node_id:
                    inputs[to_input] = [str(from_id), from_slot]
            graph[str(node_id)] = {"class_type": entry["type"], "inputs": inputs,
                                   "_meta": {"title": entry["title"] or schema.get("display_name", entry["type"])}}
        return graph


def only_upscale(schemas) -> Graph:
    """Workflow 1: Load Image -> Astria Prompt -> Astria Only Upscale (from prompt) -> Save Image."""
    g = Graph(schemas)
    g.node(1, "LoadImage", [40, 60], image=EXAMPLE_INPUT, size=[300, 330])
    g.node(2, "CheckpointLoaderSimple", [40, 440], ckpt_name=DEMO_CHECKPOINT)
    g.node(3, "AstriaPrompt", [380, 60], text=EXAMPLE_PROMPT, size=PROMPT_NODE_SIZE)
    g.node(4, "AstriaOnlyUpscaleFromPrompt", [880, 60], size=[340, 520])
    g.node(5, "SaveImage", [1260, 60], filename_prefix="astria_only_upscale", size=[420, 460])
    g.link(1, 0, 4, "image")
    g.link(2, 0, 4, "model")
    g.link(2, 1, 4, "clip")
    g.link(2, 2, 4, "vae")
    g.link(3, 0, 4, "astria_prompt")
    g.link(4, 0, 5, "images")
    g.note(6, [380, BELOW_PROMPT], [460, 230], (
        "## Astria Only Upscale\n\nPaste a prompt copied from Astria's gallery into **Astria Prompt**; the preview "
        "under it shows what will be applied, LoRAs that are missing and syntax errors.\n\n"
        "LoRA names like `more_details` are mapped to your files in `user/default/astria/lora_aliases.json`.\n\n"
        f"The demo checkpoint `{DEMO_CHECKPOINT}` only gives back its input, upscaled (it adds no detail): "
        "pick a real SD1.5 checkpoint for real detail."))
    return g


def only_upscale_advanced(schemas) -> Graph:
    """Workflow 2: the same job from the single nodes, plus the same pass by hand with the tiled VAE nodes."""
    g = Graph(schemas)
    g.node(1, "LoadImage", [40, 60], image=EXAMPLE_INPUT, size=[300, 330])
    g.node(2, "CheckpointLoaderSimple", [40, 440], ckpt_name=DEMO_CHECKPOINT)
    g.node(3, "AstriaPrompt", [380, 60], text=EXAMPLE_PROMPT, size=PROMPT_NODE_SIZE)
    g.node(4, "AstriaLoraLoader", [380, BELOW_PROMPT])
    g.node(5, "AstriaEncode", [380, BELOW_PROMPT + 240])
    g.node(6, "AstriaSettings", [880, 520])
    g.node(7, "AstriaOnlyUpscale", [1240, 60], size=[340, 560])
    g.node(8, "SaveImage", [1620, 60], filename_prefix="astria_only_upscale_advanced", size=[420, 460])
    g.link(2, 0, 4, "model")
    g.link(2, 1, 4, "clip")
    g.link(3, 0, 4, "astria_prompt")
    g.link(4, 1, 5, "clip")
    g.link(3, 0, 5, "astria_prompt")
    g.link(3, 0, 6, "astria_prompt")
    g.link(1, 0, 7, "image")
    g.link(4, 0, 7, "model")
    g.link(2, 2, 7, "vae")
    g.link(5, 0, 7, "positive")
    g.link(5, 1, 7, "negative")
    # sampler_name/scheduler stay widgets here: the host refuses a V1 list-typed output into a V3 COMBO input.
    for slot, name in [(0, "steps"), (1, "seed"), (2, "cfg"), (3, "denoise"), (6, "width"), (7, "height")]:
        g.link(6, slot, 7, name)
    g.link(7, 0, 8, "images")
    # The same pass by hand: resize, tiled encode, KSampler, tiled decode (ComfyUI's step semantics, no colour fix).
    g.node(9, "ImageScaleBy", [880, 1200], upscale_method="lanczos", scale_by=2.0)
    g.node(10, "AstriaVAEEncodeTiled", [1240, 1200])
    g.node(11, "KSampler", [1600, 1200], size=[320, 480])
    g.node(12, "AstriaVAEDecodeTiled", [1960, 1200])
    g.node(13, "SaveImage", [2320, 1200], filename_prefix="astria_by_hand", size=[420, 460])
    g.link(1, 0, 9, "image")
    g.link(9, 0, 10, "pixels")
    g.link(2, 2, 10, "vae")
    g.link(4, 0, 11, "model")
    g.link(5, 0, 11, "positive")
    g.link(5, 1, 11, "negative")
    g.link(10, 0, 11, "latent_image")
    for slot, name in [(1, "seed"), (0, "steps"), (2, "cfg"), (4, "sampler_name"), (5, "scheduler"),
                       (3, "denoise")]:
        g.link(6, slot, 11, name)
    g.link(11, 0, 12, "samples")
    g.link(2, 2, 12, "vae")
    g.link(12, 0, 13, "images")
    g.group("Astria Only Upscale from single nodes", [20, -20, 2060, 1100])
    g.group("The same pass by hand: tiled VAE + KSampler (ComfyUI step semantics, no colour fix)",
            [860, 1130, 1900, 600])
    g.note(14, [40, 700], [300, 300], (
        "## Advanced\n\nAstria Prompt feeds the LoRA loader, the encoder and Astria Settings, whose outputs drive "
        "Astria Only Upscale's widgets.\n\nThe lower group runs the same pass from single nodes; KSampler runs "
        "all steps on a shortened schedule, unlike Astria's A1111 img2img steps."))
    return g


def four_x_large(schemas) -> Graph:
    """Workflow 3: an upscale model first, then tiled diffusion to 4x (for 4K+ outputs)."""
    g = Graph(schemas)
    g.node(1, "LoadImage", [40, 60], image=EXAMPLE_INPUT, size=[300, 330])
    g.node(2, "CheckpointLoaderSimple", [40, 440], ckpt_name=DEMO_CHECKPOINT)
    g.node(3, "UpscaleModelLoader", [40, 600], model_name=DEMO_UPSCALE_MODEL)
    g.node(4, "AstriaPrompt", [380, 60], text=EXAMPLE_PROMPT, size=PROMPT_NODE_SIZE)
    g.node(5, "AstriaTiledDiffusion", [380, BELOW_PROMPT])
    g.node(6, "AstriaOnlyUpscaleFromPrompt", [880, 60], size=[340, 560], scale=4.0)
    g.node(7, "SaveImage", [1260, 60], filename_prefix="astria_4x_large", size=[420, 460])
    g.link(2, 0, 5, "model")
    g.link(1, 0, 6, "image")
    g.link(5, 0, 6, "model")
    g.link(2, 1, 6, "clip")
    g.link(2, 2, 6, "vae")
    g.link(4, 0, 6, "astria_prompt")
    g.link(3, 0, 6, "upscale_model")
    g.link(6, 0, 7, "images")
    g.note(8, [380, BELOW_PROMPT + 220], [460, 220], (
        "## 4x large\n\nThe upscale model enlarges first (4x ESRGAN-type), then the diffusion pass adds detail in "
        "tiles (Astria Tiled Diffusion), and the VAE works in tiles, so 4K+ outputs fit in memory.\n\n"
        f"Pick a real upscale model instead of the demo's `{DEMO_UPSCALE_MODEL}`."))
    return g


def remote_upscale(schemas) -> Graph:
    """Workflow 4: Astria Remote Upscale on a batch of images (through Astria's API)."""
    g = Graph(schemas)
    g.node(1, "LoadImage", [40, 60], image=EXAMPLE_INPUT, size=[300, 330])
    g.node(2, "RepeatImageBatch", [40, 440], amount=2)
    g.node(3, "AstriaPrompt", [380, 60], text=EXAMPLE_PROMPT, size=PROMPT_NODE_SIZE)
    g.node(4, "AstriaRemoteUpscale", [880, 60], size=[340, 300])
    g.node(5, "SaveImage", [1260, 60], filename_prefix="astria_remote_upscale", size=[420, 460])
    g.link(1, 0, 2, "image")
    g.link(2, 0, 4, "image")
    g.link(3, 0, 4, "astria_prompt")
    g.link(4, 0, 5, "images")
    g.note(6, [380, BELOW_PROMPT], [460, 220], (
        "## Astria Remote Upscale\n\nSends each image of the batch with the prompt to Astria's API and returns "
        "the upscaled images. It needs your Astria API key (see the README: never put it in a widget) and "
        "costs Astria credits per image."))
    return g


BUILDERS = {TEMPLATE_NAMES["only_upscale"]: only_upscale,
            TEMPLATE_NAMES["only_upscale_advanced"]: only_upscale_advanced,
            TEMPLATE_NAMES["four_x_large"]: four_x_large, TEMPLATE_NAMES["remote_upscale"]: remote_upscale}


def load_schemas(args) -> dict:
    """The server's node schemas, with ASSUMED_SCHEMAS for the pack's nodes it does not have yet."""
    if args.object_info:
        schemas = json.loads(Path(args.object_info).read_text())
    else:
        with urllib.request.urlopen(args.url.rstrip("/") + "/object_info", timeout=60) as response:
            schemas = json.loads(response.read())
    for name, schema in ASSUMED_SCHEMAS.items():
        if name not in schemas:
            print(f"warning: the server has no {name}; using the assumed schema (rerun once it is merged)",
                  file=sys.stderr)
            schemas[name] = schema
    return schemas


def main() -> None:
    """Write every workflow's UI and API files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8188", help="a running ComfyUI with this pack loaded")
    parser.add_argument("--object-info", help="a saved /object_info JSON instead of --url")
    args = parser.parse_args()
    schemas = load_schemas(args)
    (WORKFLOWS / "api").mkdir(parents=True, exist_ok=True)
    for name, build in BUILDERS.items():
        graph = build(schemas)
        (WORKFLOWS / f"{name}.json").write_text(json.dumps(graph.ui(), indent=1) + "\n")
        (WORKFLOWS / "api" / f"{name}.json").write_text(json.dumps(graph.api(), indent=1) + "\n")
        print(f"wrote workflows/{name}.json and workflows/api/{name}.json")


if __name__ == "__main__":
    main()
