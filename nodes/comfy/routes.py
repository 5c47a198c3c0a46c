"""Server routes under /astria/...: what the frontend's live preview asks the Python side.

The preview parses with the same Python parser, settings mapper and LoRA resolver the nodes run, so what the
preview shows and what a run does can never disagree. Answers carry relative LoRA names only, never paths.
"""
import asyncio
import logging
import math
import re
from pathlib import Path

import folder_paths
from aiohttp import web

from ..core import loras as lora_core
from ..core import settings, spec_tables, syntax
from . import lora

_registered = False
MAX_PROMPT_CHARS = 1_000_000  # the parser is linear; this only stops a runaway client from sending gigabytes
MAX_NAME_CHARS = 1_000
# The folder ComfyUI loaded the pack from (its name is the pack's id in /extensions/<name>/ and in python_module);
# __file__ is not resolved, so a linked clone keeps the link's name.
PACK_FOLDER = Path(__file__).parents[2]
HELP_PAGES = PACK_FOLDER / "js" / "docs"
_HELP_NODE = re.compile(r"[A-Za-z][A-Za-z0-9]{0,99}")
_HELP_LOCALE = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8}){0,2}")


def register() -> None:
    """Add the pack's routes to ComfyUI's running server once; a no-op without a server."""
    global _registered
    if _registered:
        return
    try:
        from server import PromptServer
    except ImportError:
        return
    if getattr(PromptServer, "instance", None) is None:
        return
    routes = PromptServer.instance.routes
    for method, path, handler in ROUTES:
        routes.route(method, path)(handler)
    # Registered with the API routes, which ComfyUI adds before its static /extensions/<pack> folders, so this
    # answers first: both frontends ask docs/<Node>/<locale>.md before docs/<Node>.md (the static file).
    routes.get(f"/extensions/{PACK_FOLDER.name}/docs/{{node}}/{{locale}}.md")(help_page_route)
    _registered = True
    logging.getLogger("astria").debug("registered %d /astria routes", len(ROUTES))


def json_safe(value):
    """The value with non-finite floats as text, so browsers' JSON.parse accepts the answer."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def syntax_error_report(error: syntax.AstriaSyntaxError) -> dict:
    """The parse answer for a refused prompt: the message with its line and column (1-based) and the fix."""
    return {"ok": False, "error": {"message": str(error), "line": error.line, "column": error.column,
                                   "problem": error.problem, "fix": error.fix}}


def note_kind(detail: str) -> str:
    """Which group a not-applied note belongs to in the preview: `remote_only`, `unknown` or `not_applied`."""
    if detail == spec_tables.REMOTE_ONLY_REASON:
        return "remote_only"
    if detail in (spec_tables.UNKNOWN_PARAM_REASON, spec_tables.UNKNOWN_FLAG_REASON):
        return "unknown"
    return "not_applied"


def settings_report(prompt: syntax.AstriaPrompt) -> dict:
    """The local run's settings and the applied / not-applied account, or why it cannot run locally."""
    try:
        understood = settings.sampler_settings(prompt, settings.SamplerDefaults())
    except settings.AstriaSettingsError as error:
        return {"settings_error": str(error), "settings": None, "applied": [], "not_applied": [], "notices": []}
    return {
        "settings_error": None,
        "settings": {
            "steps": understood.steps, "steps_to_run": understood.steps_to_run, "denoise": understood.denoise,
            "cfg": understood.cfg, "sampler_name": understood.sampler_name, "scheduler": understood.scheduler,
            "seed": understood.seed if prompt.is_set("seed") else None, "num_images": understood.num_images,
            "width": understood.width, "height": understood.height, "weighting": understood.weighting,
            "control_strength": understood.control_strength, "from_node": list(understood.from_node),
        },
        "applied": [{"item": note.item, "detail": note.detail} for note in understood.applied],
        "not_applied": [{"item": note.item, "detail": note.detail, "kind": note_kind(note.detail)}
                        for note in understood.not_applied],
        "notices": list(understood.notices),
    }


def parse_report(text: str) -> dict:
    """What POST /astria/parse answers for a prompt block: the parse, each LoRA's resolution, the settings.

    A refused prompt answers ok false with the error and the LoRAs of its other lines.
    """
    try:
        prompt = syntax.parse_prompt(text)
    except syntax.AstriaSyntaxError as error:
        # The other lines' LoRAs still resolve: a missing file stays visible while the syntax error is fixed.
        beside = syntax.loras_beside_error(text, error)
        return json_safe({**syntax_error_report(error), "loras": resolved_loras(beside)})
    loras = resolved_loras(prompt.loras)
    report = {
        "ok": True,
        "positive": prompt.positive,
        "negative": prompt.negative_prompt,
        "loras": loras,
        "faceids": [{"name": name, "weight": weight} for name, weight in prompt.faceids],
        "flags": dict(prompt.flags),
        "params": dict(prompt.params),
        "warnings": list(prompt.warnings),
        **settings_report(prompt),
    }
    return json_safe(report)


def resolved_loras(loras) -> list:
    """Each (name, weight) LoRA tag with its resolution, as the preview lists it."""
    return [{**resolve_for_route(name), "weight": weight} for name, weight in loras]


def loras_listing() -> dict:
    """What GET /astria/loras answers: relative names and aliases, never absolute paths or file contents."""
    try:
        aliases = dict(lora.load_aliases(create=False))
        alias_error = None
    except (ValueError, OSError) as error:
        aliases, alias_error = {}, str(error)
    return {"loras": folder_paths.get_filename_list("loras"), "aliases": aliases, "alias_error": alias_error}


def resolve_for_route(name: str) -> dict:
    """What GET /astria/resolve answers for one tag name: the file and how it matched, or the error text."""
    try:
        resolution = lora_core.resolve(name, folder_paths.get_filename_list("loras"), lora.load_aliases(create=False))
    except ValueError as error:
        return {"name": name, "ok": False, "error": str(error),
                "candidates": list(getattr(error, "candidates", ()))}
    return {"name": name, "ok": True, "file": resolution.filename, "method": resolution.method,
            "description": resolution.describe()}


def bad_request(message: str, status: int = 400) -> web.Response:
    """A JSON error answer the frontend shows as it is."""
    return web.json_response({"ok": False, "error": {"message": message}}, status=status)


async def parse_route(request: web.Request) -> web.Response:
    """POST /astria/parse with {"text": "..."}: the parse report (a syntax error is a 200 answer with ok false)."""
    try:
        body = await request.json()
    except ValueError:
        return bad_request('send a JSON body like {"text": "a prompt"}')
    text = body.get("text") if isinstance(body, dict) else None
    if not isinstance(text, str):
        return bad_request('the JSON body needs a "text" string: {"text": "a prompt"}')
    if len(text) > MAX_PROMPT_CHARS:
        return bad_request(f"the prompt is {len(text)} characters; the preview parses at most {MAX_PROMPT_CHARS}",
                           status=413)
    # A long paste must not stall the server's event loop (it also carries the progress websocket).
    return web.json_response(await asyncio.to_thread(parse_report, text))


async def loras_route(request: web.Request) -> web.Response:
    """GET /astria/loras: the loras folder's relative names and the user's aliases."""
    return web.json_response(await asyncio.to_thread(loras_listing))


async def resolve_route(request: web.Request) -> web.Response:
    """GET /astria/resolve?name=NAME: which file a `<lora:NAME>` tag loads, or why none, with the closest names."""
    name = request.query.get("name", "")
    if not name:
        return bad_request("add the LoRA name to resolve: /astria/resolve?name=more_details")
    if len(name) > MAX_NAME_CHARS:
        return bad_request(f"the LoRA name is {len(name)} characters; at most {MAX_NAME_CHARS} are resolved")
    return web.json_response(await asyncio.to_thread(resolve_for_route, name))


def help_page(node: str, locale: str) -> Path | None:
    """The one help page of a node for every locale (js/docs/<Node>.md), or None for names that are not ours."""
    if not _HELP_NODE.fullmatch(node) or not _HELP_LOCALE.fullmatch(locale):
        return None
    page = HELP_PAGES / f"{node}.md"
    return page if page.is_file() else None


async def help_page_route(request: web.Request) -> web.Response:
    """GET /extensions/<pack>/docs/<Node>/<locale>.md: the node's page (English for now), as Markdown."""
    page = help_page(request.match_info["node"], request.match_info["locale"])
    if page is None:
        raise web.HTTPNotFound(text="no help page of this pack has that name")
    return web.Response(text=page.read_text(encoding="utf-8"), content_type="text/markdown", charset="utf-8")


async def spec_route(request: web.Request) -> web.Response:
    """GET /astria/spec: the spec's tables (flag kinds, parameter types, scheduler map) from nodes/core."""
    return web.json_response(spec_tables.as_json())


ROUTES: list = [
    ("POST", "/astria/parse", parse_route),
    ("GET", "/astria/loras", loras_route),
    ("GET", "/astria/resolve", resolve_route),
    ("GET", "/astria/spec", spec_route),
]
"""(method, path, handler) of every route; register() adds each to PromptServer (also served under /api)."""
