"""The example workflows cannot rot: node types exist, links join matching types, widget values fit the schemas,
each UI workflow and its API twin are the same graph, and every API twin runs on the test models at 64 px."""
import json
import shutil
import urllib.parse

import pytest
from PIL import Image

from comfyui_astria.tests.support import paths

from .conftest import output_images

WORKFLOWS = paths.PACK_ROOT / "workflows"
ONLY_UPSCALE, ADVANCED = "Astria Only Upscale", "Astria Advanced Upscale"
FOUR_X, REMOTE = "Astria 4x Tiled Upscale", "Astria Remote Upscale"
CARD_TITLE_CHARS = 28  # what the templates dialog's card shows on one line at its default width (1.32.9)
NAMES = [ONLY_UPSCALE, ADVANCED, FOUR_X, REMOTE]  # REMOTE runs against the fake Astria server in the node's tests
# The view a loaded template opens with must show every node whole in a 1280x720 window: below the top bar, right
# of the left toolbar (both frontends), so no title starts under the menus.
SMALL_WINDOW = (1280, 720)
TOP_BAR_PX, LEFT_TOOLBAR_PX = 150, 60  # 1.32.9: the Nodes 2.0 banner and the breadcrumb below it
EXAMPLE_INPUT = "astria_example_input.png"
TINY_INPUT = "astria_tiny_input.png"
TINY_SIDE_PX = 64  # the only-upscale's minimum input side; the full-size VAE costs seconds per 128 px on CPU
DEMO_LORA = "tiny_sd15_lora.safetensors"
FRONTEND_ONLY = {"Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_CONTROLS = {"fixed", "increment", "decrement", "randomize"}
# Output side for a 64 px square input: scale 2 (docs' default), 4 for the 4x workflow.
EXPECTED_SIDES = {ONLY_UPSCALE: [128], ADVANCED: [128, 128], FOUR_X: [256]}


def load(name, api=False):
    """A workflow's JSON (UI format, or the API twin)."""
    return json.loads((WORKFLOWS / ("api" if api else "") / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def server(comfy_server):
    """The shared server with the example input in its input folder and the docs' LoRA names aliased."""
    shutil.copyfile(WORKFLOWS / EXAMPLE_INPUT, comfy_server.dirs["input"] / EXAMPLE_INPUT)
    Image.new("RGB", (TINY_SIDE_PX, TINY_SIDE_PX), (90, 140, 200)).save(comfy_server.dirs["input"] / TINY_INPUT)
    alias_path = comfy_server.dirs["user"] / "default" / "astria" / "lora_aliases.json"
    alias_path.parent.mkdir(parents=True, exist_ok=True)
    current = json.loads(alias_path.read_text()) if alias_path.exists() else {}
    alias_path.write_text(json.dumps({**current, "more_details": DEMO_LORA, "SDXLrender_v2.0": DEMO_LORA}))
    return comfy_server


@pytest.fixture(scope="module")
def object_info(server):
    """Every node schema the server has."""
    return server.get("/object_info")


def server_nodes(workflow):
    """The UI workflow's nodes that run on the server (notes are drawn by the frontend only)."""
    return [node for node in workflow["nodes"] if node["type"] not in FRONTEND_ONLY]


def assert_known(types, object_info):
    """Every node type the workflow uses is one the server knows: a missing node (the pack's too) is a failure."""
    missing = sorted(set(types) - set(object_info))
    assert not missing, f"node types the server does not know: {missing}"


def ordered_inputs(schema):
    """(name, spec) of every input, in the schema's order (required, then optional)."""
    for section in ("required", "optional"):
        specs = schema["input"].get(section, {})
        for name in schema.get("input_order", {}).get(section, list(specs)):
            yield name, specs[name]


def kind(spec):
    """An input spec's type; a list of choices is a COMBO."""
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def options(spec):
    """An input spec's options dict."""
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def choices(spec):
    """A COMBO's choices in either form (old list, or V3 `options`)."""
    return spec[0] if isinstance(spec[0], list) else options(spec).get("options", [])


def is_widget(spec):
    """Whether the frontend draws the input as a widget."""
    return kind(spec) in WIDGET_TYPES and not options(spec).get("forceInput")


def widget_values_by_name(node, schema):
    """{widget name: value} of a UI node, consuming the extra seed-control and upload values in order."""
    values = list(node.get("widgets_values", []))
    named = {}
    for name, spec in ordered_inputs(schema):
        if not is_widget(spec):
            continue
        assert values, f"node {node['id']} ({node['type']}) has no value for its widget {name}"
        named[name] = values.pop(0)
        if options(spec).get("control_after_generate"):
            assert values and values.pop(0) in SEED_CONTROLS, f"node {node['id']}: bad control for {name}"
        if options(spec).get("image_upload"):
            assert values and values.pop(0) == "image", f"node {node['id']}: bad upload widget value"
    assert values == [], f"node {node['id']} ({node['type']}) has extra widget values {values}"
    return named


def check_value(node, name, spec, value):
    """Fail unless the widget value fits the input's schema (type, range, choices)."""
    where = f"node {node['id']} ({node['type']}) widget {name}={value!r}"
    spec_kind, opts = kind(spec), options(spec)
    if spec_kind == "COMBO":
        assert value in choices(spec), f"{where}: not one of the server's choices"
    elif spec_kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: not a whole number"
    elif spec_kind == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: not a number"
    elif spec_kind == "STRING":
        assert isinstance(value, str), f"{where}: not text"
    elif spec_kind == "BOOLEAN":
        assert isinstance(value, bool), f"{where}: not true/false"
    if spec_kind in ("INT", "FLOAT"):
        assert opts.get("min", value) <= value <= opts.get("max", value), f"{where}: out of range"


def accepts(input_type, output_type):
    """Whether the server links this output type into this input type (comfy_execution.validation's rule)."""
    if input_type == output_type or "*" in (input_type, output_type):
        return True
    if not (isinstance(input_type, str) and isinstance(output_type, str)):
        return False  # choice lists must be identical; a list into a V3 "COMBO" input is refused
    return bool({t.strip() for t in input_type.split(",")} & {t.strip() for t in output_type.split(",")})


def output_kind(schema, slot):
    """The type of an output slot (a list of choices is a COMBO)."""
    return "COMBO" if isinstance(schema["output"][slot], list) else schema["output"][slot]


def ui_to_api(workflow, object_info):
    """The API graph a UI workflow describes, derived independently of the generator."""
    links = {link[0]: link for link in workflow["links"]}
    graph = {}
    for node in server_nodes(workflow):
        inputs = dict(widget_values_by_name(node, object_info[node["type"]]))
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, from_id, from_slot, *_ = links[slot["link"]]
                inputs[slot["name"]] = [str(from_id), from_slot]
        graph[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return graph


@pytest.mark.parametrize("name", NAMES)
def test_the_workflow_ships_with_its_thumbnail_and_api_twin(name):
    assert (WORKFLOWS / f"{name}.jpg").is_file()
    assert (WORKFLOWS / "api" / f"{name}.json").is_file()
    with Image.open(WORKFLOWS / f"{name}.jpg") as thumbnail:
        assert thumbnail.format == "JPEG" and min(thumbnail.size) >= 128


def test_comfyui_lists_the_workflows_as_the_packs_templates(server):
    templates = server.get("/api/workflow_templates")
    assert sorted(templates[paths.PACK_FOLDER_NAME]) == sorted(NAMES)
    quoted = urllib.parse.quote(ONLY_UPSCALE)  # as the browser asks for it
    status, body = server.request(f"/api/workflow_templates/{paths.PACK_FOLDER_NAME}/{quoted}.json")
    assert status == 200 and json.loads(body)["nodes"]
    status, thumbnail = server.request(f"/api/workflow_templates/{paths.PACK_FOLDER_NAME}/{quoted}.jpg")
    assert status == 200 and thumbnail[:3] == b"\xff\xd8\xff"


@pytest.mark.parametrize("name", NAMES)
def test_the_template_name_reads_as_its_title(name):
    # The 0.3.75 server lists file stems; the frontend shows the stem as the title and, with - and _ as spaces,
    # as the description: plain words make both read well.
    assert name.startswith("Astria ") and not set(name) & set("_-.")
    assert len(name) <= CARD_TITLE_CHARS, "the card cuts longer titles with an ellipsis"


@pytest.mark.parametrize("name", NAMES)
def test_the_saved_view_shows_every_node_below_the_menus(name):
    workflow = load(name)
    view = workflow["extra"]["ds"]
    scale, (offset_x, offset_y) = view["scale"], view["offset"]
    for node in workflow["nodes"]:
        left = (node["pos"][0] + offset_x) * scale
        title_top = (node["pos"][1] - 30 + offset_y) * scale
        right = (node["pos"][0] + node["size"][0] + offset_x) * scale
        bottom = (node["pos"][1] + node["size"][1] + offset_y) * scale
        where = f"node {node['id']} ({node['type']}) at screen {left:.0f},{title_top:.0f}-{right:.0f},{bottom:.0f}"
        assert left >= LEFT_TOOLBAR_PX and title_top >= TOP_BAR_PX, f"{where}: under the menus"
        assert right <= SMALL_WINDOW[0] and bottom <= SMALL_WINDOW[1], f"{where}: outside a {SMALL_WINDOW} window"


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_fits_the_servers_node_schemas(name, server, object_info):
    workflow = load(name)
    nodes = {node["id"]: node for node in server_nodes(workflow)}
    assert_known({node["type"] for node in nodes.values()}, object_info)
    for node in nodes.values():
        schema = object_info[node["type"]]
        values = widget_values_by_name(node, schema)
        specs = dict(ordered_inputs(schema))
        for widget, value in values.items():
            check_value(node, widget, specs[widget], value)
        linked = {slot["name"] for slot in node.get("inputs", []) if slot.get("link") is not None}
        for input_name in schema["input"].get("required", {}):
            if not is_widget(specs[input_name]):
                assert input_name in linked, f"node {node['id']} ({node['type']}): required {input_name} unlinked"
    for link_id, from_id, from_slot, to_id, to_slot, link_type in workflow["links"]:
        source, target = nodes[from_id], nodes[to_id]
        target_slot = target["inputs"][to_slot]
        assert target_slot["link"] == link_id and link_id in source["outputs"][from_slot]["links"]
        produced = output_kind(object_info[source["type"]], from_slot)
        wanted_spec = dict(ordered_inputs(object_info[target["type"]]))[target_slot["name"]]
        wanted = kind(wanted_spec)
        where = f"link {link_id}: {source['type']}[{from_slot}] -> {target['type']}.{target_slot['name']}"
        assert produced == link_type or "*" in (produced, wanted), f"{where}: the link says {link_type}"
        offered = object_info[source["type"]]["output"][from_slot]
        assert accepts(wanted_spec[0], offered), f"{where}: the server refuses {produced} into {wanted}"


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_and_api_twin_are_the_same_graph(name, object_info):
    workflow = load(name)
    assert_known({node["type"] for node in server_nodes(workflow)}, object_info)
    twin = {node_id: {"class_type": node["class_type"], "inputs": node["inputs"]}
            for node_id, node in load(name, api=True).items()}
    assert ui_to_api(workflow, object_info) == twin


@pytest.mark.parametrize("name", [name for name in NAMES if name != REMOTE])
def test_api_twin_runs_to_completion_on_a_tiny_input(name, server, object_info):
    graph = load(name, api=True)
    assert_known({node["class_type"] for node in graph.values()}, object_info)
    loaders = [node for node in graph.values() if node["class_type"] == "LoadImage"]
    assert [node["inputs"]["image"] for node in loaders] == [EXAMPLE_INPUT]
    loaders[0]["inputs"]["image"] = TINY_INPUT  # the same graph on a 64 px picture
    entry = server.wait(server.queue(graph), timeout=600)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-3000:]
    sides = []
    for path in output_images(server, entry):
        with Image.open(path) as image:
            assert image.size[0] == image.size[1]
            sides.append(image.size[0])
    assert sorted(sides) == EXPECTED_SIDES[name]
