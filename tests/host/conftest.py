"""Host tier: a real ComfyUI 0.3.75 imported in this process, with the pack loaded through ComfyUI's own loader.

Every test here is marked `host`. The `comfy_host` fixture (session-wide) prepares ComfyUI once: CPU mode (unless
ASTRIA_TEST_DEVICE=gpu), temp user/input/output/temp folders, the generated test models on the model paths, the
built-in extra nodes and the pack loaded by `nodes.load_custom_node` from a folder holding only a link to this clone.
"""
import asyncio
import logging
import math
import sys
import types

import pytest

from comfyui_astria.tests.support import paths  # noqa: F401  (loaded through the pack alias)


def pytest_collection_modifyitems(items):
    """Mark every test under tests/host as `host`."""
    for item in items:
        if "/tests/host/" in str(item.fspath):
            item.add_marker(pytest.mark.host)


@pytest.fixture(scope="session")
def comfy_host(tmp_path_factory) -> types.SimpleNamespace:
    """ComfyUI imported in-process with the pack loaded; returns handles tests need."""
    comfy_dir = str(paths.COMFY_DIR)
    if not (paths.COMFY_DIR / "main.py").is_file():
        pytest.fail(f"no ComfyUI tree at {comfy_dir}: run ./scripts/test (it sets it up) or set COMFYUI_PATH")
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = paths.HOST_ON_CPU
    base = tmp_path_factory.mktemp("comfy_host")
    import folder_paths

    for name, setter in (("user", folder_paths.set_user_directory), ("input", folder_paths.set_input_directory),
                         ("output", folder_paths.set_output_directory), ("temp", folder_paths.set_temp_directory)):
        (base / name).mkdir()
        setter(str(base / name))
    import utils.extra_config

    utils.extra_config.load_extra_path_config(str(paths.models_yaml(base / "extra_model_paths.yaml")))
    import nodes

    logging.getLogger().setLevel(logging.INFO)
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    before = set(nodes.NODE_CLASS_MAPPINGS)
    pack_path = str(paths.pack_link_folder() / paths.PACK_FOLDER_NAME)
    loaded = asyncio.run(nodes.load_custom_node(pack_path))
    assert loaded, f"ComfyUI could not load the pack from {pack_path} (see the log above)"
    ours = sorted(set(nodes.NODE_CLASS_MAPPINGS) - before)
    return types.SimpleNamespace(nodes=nodes, folder_paths=folder_paths, base=base, pack_path=pack_path,
                                 pack_module=sys.modules[pack_path.replace(".", "_x_")], our_node_ids=ours)


@pytest.fixture
def float32_attention(comfy_host, monkeypatch):
    """The pack's tiled VAE with float32 attention products on every CPU, for tests that compare it with the untiled
    VAE to 1e-4 (on CPUs fast at bfloat16 the default products are ~2e-3 off: tests/host/test_tiled_vae.py)."""
    monkeypatch.setattr(comfy_host.pack_module.nodes.core.tiled_vae, "BF16_ATTENTION_MIN_SPEEDUP", math.inf)


@pytest.fixture(scope="session")
def sd15(comfy_host):
    """(model, clip, vae) of the tiny seeded SD1.5-layout checkpoint, loaded by CheckpointLoaderSimple."""
    loader = comfy_host.nodes.CheckpointLoaderSimple()
    return loader.load_checkpoint("tiny_sd15.safetensors")[:3]


@pytest.fixture(scope="session")
def sd15_pixel(comfy_host):
    """(model, clip, vae) of the tiny checkpoint whose VAE is the exact 8x8 pixel VAE."""
    loader = comfy_host.nodes.CheckpointLoaderSimple()
    return loader.load_checkpoint("tiny_sd15_pixel.safetensors")[:3]


def widget_defaults(cls):
    """The defaults of a node's required widgets, as the frontend writes them into a new node's workflow entry."""
    required = cls.INPUT_TYPES().get("required", {})
    return {name: spec[1]["default"] for name, spec in required.items()
            if len(spec) > 1 and isinstance(spec[1], dict) and "default" in spec[1]}


def run_node(comfy_host, node_id, hidden=None, **inputs):
    """Run one of the pack's V3 nodes the way ComfyUI's executor runs a node added in the UI: every required
    widget the test does not set has its schema default; optional inputs not given stay absent."""
    cls = comfy_host.nodes.NODE_CLASS_MAPPINGS[node_id]
    clone = cls.PREPARE_CLASS_CLONE(hidden or {})
    result = getattr(clone, clone.FUNCTION)(**{**widget_defaults(cls), **inputs})
    if asyncio.iscoroutine(result):
        result = asyncio.run(result)
    return tuple(result.result)
