"""A new user's first minutes in a real browser: load workflow 1, type prompts, read the preview, queue, see the image.

Screenshots go to tests/browser/screenshots/ (git-ignored); with ASTRIA_README_IMAGES=1 the preview shots are
also written, small, to docs/img/ for the README.
"""
import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from comfyui_astria.tests.support import paths

WORKFLOW = paths.PACK_ROOT / "workflows" / "astria_only_upscale.json"
EXAMPLE_INPUT = "astria_example_input.png"
TINY_INPUT = "astria_tiny_input.png"
SHOTS = Path(__file__).resolve().parent / "screenshots"
README_IMAGES = paths.PACK_ROOT / "docs" / "img"
DEMO_LORA = "tiny_sd15_lora.safetensors"
TIMEOUT_MS = 60_000
RUN_TIMEOUT_MS = 300_000
GOOD_PROMPT = "a quiet valley, <lora:more_details:0.5> --only_upscale\nsteps=16\ndenoising_strength=0.1\nseed=7"
MISSING_LORA_PROMPT = "a quiet valley, <lora:tiny_sd15_lor:0.5> --only_upscale\nsteps=16"
SYNTAX_ERROR_PROMPT = "a quiet valley --only_upscale\nsteps=abc"

QUIET_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingModelsWarning": False}
FIND_TEXTAREA = """() => {
  const node = window.app.graph._nodes.find((n) => n.type === "AstriaPrompt");
  return node.widgets.find((w) => w.name === "text").inputEl;
}"""


@pytest.fixture(scope="module")
def page(browser, browser_server):
    """The ComfyUI page with workflow 1 loaded; fails on any error our extension logs."""
    shutil.copyfile(paths.PACK_ROOT / "workflows" / EXAMPLE_INPUT, browser_server.dirs["input"] / EXAMPLE_INPUT)
    Image.new("RGB", (64, 64), (90, 140, 200)).save(browser_server.dirs["input"] / TINY_INPUT)
    alias_path = browser_server.dirs["user"] / "default" / "astria" / "lora_aliases.json"
    alias_path.parent.mkdir(parents=True, exist_ok=True)
    alias_path.write_text(json.dumps({"more_details": DEMO_LORA, "SDXLrender_v2.0": DEMO_LORA}))
    for setting, value in QUIET_SETTINGS.items():  # no first-run tour or missing-model dialogs over the canvas
        status, _ = browser_server.request(f"/settings/{setting}", json.dumps(value).encode(), method="POST")
        assert status == 200, f"could not set {setting}"
    SHOTS.mkdir(exist_ok=True)
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    tab = context.new_page()
    tab.astria_errors = []
    tab.on("console", lambda message: message.type == "error" and "astria" in message.text.lower()
           and tab.astria_errors.append(message.text))
    tab.on("pageerror", lambda error: tab.astria_errors.append(str(error)))
    tab.goto(browser_server.url, timeout=TIMEOUT_MS)
    tab.wait_for_function("() => window.app && window.app.graph && window.app.extensionManager", timeout=TIMEOUT_MS)
    workflow = json.loads(WORKFLOW.read_text())
    tab.evaluate("async (workflow) => { await window.app.loadGraphData(workflow); }", workflow)
    tab.wait_for_selector(".astria-preview[data-state=ok]", timeout=TIMEOUT_MS)
    close_dialogs(tab)
    yield tab
    context.close()


def close_dialogs(page):
    """Dismiss dialogs the frontend opens over the canvas (e.g. nodes not merged yet), as a user would."""
    for _ in range(5):
        if page.locator(".p-dialog-mask").count() == 0:
            return
        page.keyboard.press("Escape")
        page.wait_for_timeout(300)
    assert page.locator(".p-dialog-mask").count() == 0, "a dialog stays open over the canvas"


def type_prompt(page, text):
    """Replace the Astria Prompt text as a user would (select all, type), then wait for the preview to settle."""
    textarea = page.evaluate_handle(FIND_TEXTAREA).as_element()
    textarea.click()
    textarea.press("Control+a")
    textarea.press("Delete")
    textarea.type(text, delay=5)
    page.wait_for_function("""() => {
      const node = window.app.graph._nodes.find((n) => n.type === "AstriaPrompt");
      const text = node.widgets.find((w) => w.name === "text").value;
      const state = document.querySelector(".astria-preview").dataset.state;
      return node.astriaPreview.lastText === text && node.astriaPreview.timer === null && state !== "pending";
    }""", timeout=TIMEOUT_MS)


def preview_text(page):
    """Everything the preview shows, as text."""
    return page.inner_text(".astria-preview")


def shoot(page, name, readme_width=None):
    """A screenshot of the page; with ASTRIA_README_IMAGES=1 also the prompt box and its preview, small, for the README."""
    page.screenshot(path=str(SHOTS / f"{name}.png"))
    if readme_width and os.environ.get("ASTRIA_README_IMAGES") == "1":
        textarea = page.evaluate_handle(FIND_TEXTAREA).as_element().bounding_box()
        preview = page.locator(".astria-preview").bounding_box()
        left, top = min(textarea["x"], preview["x"]) - 8, textarea["y"] - 8
        right = max(textarea["x"] + textarea["width"], preview["x"] + preview["width"]) + 8
        bottom = preview["y"] + preview["height"] + 8
        README_IMAGES.mkdir(parents=True, exist_ok=True)
        target = README_IMAGES / f"{name}.png"
        page.screenshot(path=str(target), clip={"x": left, "y": top, "width": right - left, "height": bottom - top})
        with Image.open(target) as crop:
            crop.thumbnail((readme_width, readme_width))
            crop.save(target, optimize=True)


def test_the_example_prompt_previews_its_loras_settings_and_flags(page):
    text = preview_text(page)
    assert f"<lora:more_details:0.5> → {DEMO_LORA} (alias)" in text
    assert f"<lora:SDXLrender_v2.0:1> → {DEMO_LORA} (alias)" in text
    assert "--only_upscale" in text
    assert "16 steps (2 run) at denoise 0.1" in text
    assert "unset here, so the upscale node's widgets decide (defaults shown): seed, size" in text
    assert page.astria_errors == []


def test_a_missing_lora_shows_in_red_with_the_closest_names(page):
    type_prompt(page, MISSING_LORA_PROMPT)
    missing = page.locator(".astria-lora-missing")
    assert missing.count() == 1
    assert f"<lora:tiny_sd15_lor:0.5> MISSING. Closest: {DEMO_LORA}" in missing.inner_text()
    colour = missing.locator(".astria-missing").evaluate("(el) => getComputedStyle(el).color")
    assert colour == "rgb(255, 85, 85)"
    shoot(page, "preview_missing_lora", readme_width=900)


def test_a_syntax_error_shows_its_line_and_column(page):
    type_prompt(page, SYNTAX_ERROR_PROMPT)
    assert page.get_attribute(".astria-preview", "data-state") == "error"
    text = preview_text(page)
    assert "Syntax error at line 2, column 7: steps=abc is not a whole number" in text
    assert "steps=abc\n      ^" in text
    shoot(page, "preview_syntax_error", readme_width=900)


def test_user_text_is_never_parsed_as_html(page):
    type_prompt(page, 'a <img src=x onerror="window.astriaInjected=1"> photo --only_upscale')
    assert page.evaluate("() => window.astriaInjected") is None
    assert page.locator(".astria-preview img").count() == 0


def test_queueing_workflow_one_shows_the_output_image(page, browser_server):
    object_info = browser_server.get("/object_info")
    types = {node["type"] for node in json.loads(WORKFLOW.read_text())["nodes"] if node["type"] != "MarkdownNote"}
    assert types <= set(object_info), f"workflow 1 uses nodes the server lacks: {sorted(types - set(object_info))}"
    type_prompt(page, GOOD_PROMPT)
    assert page.get_attribute(".astria-preview", "data-state") == "ok"
    page.evaluate(f"""() => {{
      const loader = window.app.graph._nodes.find((n) => n.type === "LoadImage");
      loader.widgets.find((w) => w.name === "image").value = "{TINY_INPUT}";
    }}""")
    page.evaluate("() => window.app.queuePrompt(0, 1)")
    page.wait_for_function("""() => {
      const save = window.app.graph._nodes.find((n) => n.type === "SaveImage");
      return save && save.imgs && save.imgs.length > 0 && save.imgs[0].complete && save.imgs[0].naturalWidth > 0;
    }""", timeout=RUN_TIMEOUT_MS)
    size = page.evaluate("""() => {
      const image = window.app.graph._nodes.find((n) => n.type === "SaveImage").imgs[0];
      return [image.naturalWidth, image.naturalHeight];
    }""")
    assert size == [128, 128]
    shoot(page, "queued_output", readme_width=900)
    assert page.astria_errors == []
