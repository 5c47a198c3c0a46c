"""The /astria routes on a real server: the preview's parse, LoRA listing and resolution, and the spec tables."""
import json

import pytest

from comfyui_astria.nodes.core import spec_tables
from comfyui_astria.tests.support import paths

DEMO_LORA = "tiny_sd15_lora.safetensors"
EXAMPLE = spec_tables.docs_example(
    text="masterpiece, best quality, <lora:more_details:0.5> <lora:SDXLrender_v2.0:1> --only_upscale",
    num_images=None, negative_prompt="(worst quality:2)", use_lpw=None)


def write_aliases(server, aliases):
    """Merge aliases into the server's alias file (the user dir the server was started with)."""
    path = server.dirs["user"] / "default" / "astria" / "lora_aliases.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    current = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**current, **aliases}))


@pytest.fixture(scope="module")
def server(comfy_server):
    """The shared server with the docs' LoRA names aliased to the demo LoRA."""
    write_aliases(comfy_server, {"more_details": DEMO_LORA, "SDXLrender_v2.0": DEMO_LORA})
    return comfy_server


def parse(server, text, prefix=""):
    """(status, JSON) of POST /astria/parse."""
    status, body = server.request(f"{prefix}/astria/parse", {"text": text})
    return status, json.loads(body)


def test_parse_reports_loras_flags_params_and_the_local_settings(server):
    status, report = parse(server, EXAMPLE)
    assert status == 200 and report["ok"] is True, report
    assert report["positive"] == "masterpiece, best quality,"
    assert report["negative"] == "(worst quality:2)"
    assert [(lora["name"], lora["weight"], lora["ok"], lora["file"], lora["method"]) for lora in report["loras"]] == [
        ("more_details", 0.5, True, DEMO_LORA, "alias"), ("SDXLrender_v2.0", 1.0, True, DEMO_LORA, "alias")]
    assert report["flags"] == {"only_upscale": True}
    assert report["params"] == {"seed": None, "steps": 16, "cfg_scale": 6.0,
                                "denoising_strength": 0.1, "scheduler": "euler_a"}
    settings = report["settings"]
    assert (settings["steps"], settings["steps_to_run"], settings["denoise"], settings["cfg"]) == (16, 2, 0.1, 6.0)
    assert (settings["sampler_name"], settings["scheduler"], settings["seed"]) == ("euler_ancestral", "normal", None)
    assert settings["from_node"] == ["seed", "size"]
    assert {"item": "--only_upscale", "detail": "an only-upscale run, as this node does"} in report["applied"]
    assert report["not_applied"] == [] and report["settings_error"] is None


def test_a_missing_lora_is_reported_with_the_closest_names(server):
    status, report = parse(server, "a photo <lora:tiny_sd15_lor:1> <lora:tiny_sd15_lora:0.3>")
    assert status == 200 and report["ok"] is True
    missing, found = report["loras"]
    assert missing["ok"] is False and missing["name"] == "tiny_sd15_lor"
    assert DEMO_LORA in missing["candidates"]
    assert "tiny_sd15_lor" in missing["error"] and "file" not in missing
    assert (found["ok"], found["file"], found["method"], found["weight"]) == (True, DEMO_LORA, "exact", 0.3)


def test_a_syntax_error_comes_back_with_its_line_and_column(server):
    status, report = parse(server, "a photo\nsteps=abc")
    assert status == 200
    assert report["ok"] is False
    error = report["error"]
    assert (error["line"], error["column"]) == (2, 7)
    assert error["message"].startswith("line 2, column 7: steps=abc is not a whole number")
    assert "steps=16" in error["fix"]


def test_a_syntax_error_keeps_the_missing_loras_of_the_other_lines(server):
    text = "a photo <lora:tiny_sd15_lor:0.5>\n<lora:tiny_sd15_lora:0.3> hills\n<lora:bad --only_upscale\nsteps=16"
    status, report = parse(server, text)
    assert status == 200 and report["ok"] is False
    assert (report["error"]["line"], report["error"]["column"]) == (3, 1)
    missing, found = report["loras"]
    assert (missing["name"], missing["ok"], missing["weight"]) == ("tiny_sd15_lor", False, 0.5)
    assert DEMO_LORA in missing["candidates"]
    assert (found["name"], found["ok"], found["file"]) == ("tiny_sd15_lora", True, DEMO_LORA)


def test_remote_only_unknown_and_local_impossible_items_are_told_apart(server):
    remote_flag, remote_param = spec_tables.REMOTE_ONLY_FLAGS[0], spec_tables.REMOTE_ONLY_PARAMS[0]
    _, report = parse(server, f"a photo --{remote_flag} --no_such_flag\n{remote_param}=true")
    kinds = {note["item"]: note["kind"] for note in report["not_applied"]}
    assert kinds[f"--{remote_flag}"] == "remote_only"
    assert kinds[f"{remote_param}=true"] == "remote_only"
    assert kinds["--no_such_flag"] == "unknown"
    assert any("no_such_flag" in warning for warning in report["warnings"])
    _, cloud_only = parse(server, "a photo\nscheduler=tcd")
    assert cloud_only["ok"] is True and cloud_only["settings"] is None
    assert "scheduler=tcd" in cloud_only["settings_error"] and "remote node" in cloud_only["settings_error"]


def test_the_preview_notes_a_spaced_weight_and_removed_control_characters(server):
    _, report = parse(server, "a cat\x00\x01 (dog: 1.2)")
    assert report["ok"] is True and report["positive"] == "a cat (dog: 1.2)"
    assert report["warnings"][0].startswith("line 1, column 6: 2 control character(s) (U+0000 and the like) were "
                                            "removed")
    assert report["warnings"][1] == ("line 1: (dog: 1.2) is read as text at weight 1.1, as Astria's weighted "
                                     "prompts do (diffusers' long-prompt-weighting parser); write (dog:1.2) for a "
                                     "weight")
    assert report["settings"]["weighting"] == "lpw"


def test_the_routes_answer_under_the_frontends_api_prefix_too(server):
    status, report = parse(server, "a photo --only_upscale", prefix="/api")
    assert status == 200 and report["flags"] == {"only_upscale": True}


def test_bad_requests_get_a_sentence_and_a_4xx(server):
    status, body = server.request("/astria/parse", b"not json", method="POST")
    assert status == 400 and "JSON body" in json.loads(body)["error"]["message"]
    status, body = server.request("/astria/parse", {"prompt": "x"})
    assert status == 400 and '"text"' in json.loads(body)["error"]["message"]
    status, body = server.request("/astria/resolve")
    assert status == 400 and "name=" in json.loads(body)["error"]["message"]


def test_loras_lists_relative_names_and_aliases_only(server):
    listing = server.get("/astria/loras")
    assert DEMO_LORA in listing["loras"]
    assert listing["aliases"]["more_details"] == DEMO_LORA
    assert listing["alias_error"] is None
    assert not any(name.startswith("/") or ":\\" in name for name in listing["loras"])


def test_resolve_answers_for_one_name(server):
    found = server.get("/astria/resolve?name=SDXLrender_v2.0")
    assert (found["ok"], found["file"], found["method"]) == (True, DEMO_LORA, "alias")
    missing = server.get("/astria/resolve?name=no_such_lora")
    assert missing["ok"] is False and "no_such_lora" in missing["error"]


def test_spec_serves_the_core_tables(server):
    assert server.get("/astria/spec") == json.loads(json.dumps(spec_tables.as_json()))


def test_every_locale_path_of_a_nodes_help_answers_with_its_one_page(server):
    pack = paths.PACK_FOLDER_NAME
    node_ids = sorted(name for name, info in server.get("/object_info").items()
                      if info["python_module"] == f"custom_nodes.{pack}")
    assert "AstriaPrompt" in node_ids
    for node_id in node_ids:
        page = (paths.PACK_ROOT / "js" / "docs" / f"{node_id}.md").read_bytes()
        for path in (f"{node_id}/en.md", f"{node_id}/zh.md", f"{node_id}/pt-BR.md", f"{node_id}.md"):
            status, body = server.request(f"/extensions/{pack}/docs/{path}")
            assert (status, body) == (200, page), f"{path} -> {status}"
    assert list((paths.PACK_ROOT / "js" / "docs").glob("*/")) == [], "one page per node: no locale copies"


def test_help_paths_that_are_not_our_pages_are_not_found(server):
    pack = paths.PACK_FOLDER_NAME
    for path in ("NoSuchNode/en.md", "AstriaPrompt/..%2F..%2Fastria.preview.md", "..%2Fastria/en.md"):
        status, _ = server.request(f"/extensions/{pack}/docs/{path}")
        assert status == 404, path
    status, _ = server.request(f"/extensions/{pack}/astria.preview.js")
    assert status == 200, "the pack's static files are still served"
