#!/usr/bin/env python3
"""Parse every example prompt in a checkout of Astria's docs (astriaai/astria-docs) and say how each one fares.

Usage: python3 scripts/check_docs_examples.py PATH
PATH is a docs checkout (a folder holding docs/) or a git directory (bare or not; HEAD is read with `git show`).

Examples taken from docs/**/*.md(x): fenced ```text (or unlabelled) blocks that look like Astria prompts, inline
code spans holding a tag or a flag with a value, the `-F prompt[...]` fields of curl commands (the fields of one
command make one example: `prompt[text]` is the prompt line, the others key=value lines), and the `text`/`prompt`
string fields of JSON, JavaScript and Python snippets. One line per example: page, where, and ok or the error.
Exit status 1 when an example fails unexpectedly, a judged example no longer behaves as judged, or a page check
fails. Nothing from the docs is stored here beyond the short substrings that identify the judged examples.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent


def _load_pack():
    """Import the pack under an alias (never put the repo root on sys.path: ComfyUI owns the name `nodes`)."""
    spec = importlib.util.spec_from_file_location(
        "comfyui_astria", PACK_ROOT / "__init__.py", submodule_search_locations=[str(PACK_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_astria"] = module
    spec.loader.exec_module(module)
    from comfyui_astria.nodes.core import settings, spec_tables, syntax

    return syntax, settings, spec_tables


syntax, settings, spec_tables = _load_pack()

# Judged examples: (page, a substring of the example) -> (what we expect, the reason).
# "error:<words>": the example is a placeholder or broken, and must fail with a message holding <words>.
# "repaired": the example's shell quoting is broken; it is read leniently (see _lenient_fields) and must parse.
JUDGED: dict[tuple[str, str], tuple[str, str]] = {
    ("docs/use-cases/upscale.md", "prompt[text]=very detailed"): (
        "repaired",
        ("the curl line opens no quote before its text but closes one after it (`...<lora:add_detail:1>\" \\`), so "
        "a shell splits the text into words and swallows the next field; the Node.js and Python tabs show the "
        "intended text, which the lenient read recovers"),
    ),
    ("docs/api/05-flux-api.md", "<lora:tune_id:strength>"): (
        "error:strength", "placeholder: `tune_id` and `strength` stand for a tune id and a number"),
    ("docs/api/20-sdxl-api.md", "<lora:tune_id:strength>"): (
        "error:strength", "placeholder: `tune_id` and `strength` stand for a tune id and a number"),
    ("docs/features/faceid.md", "<faceid:tune_id:strength>"): (
        "error:strength", "placeholder: `tune_id` and `strength` stand for a faceid tune id and a number"),
    ("docs/features/faceid-flux.md", "<faceid:tune_id:strength>"): (
        "error:strength", "placeholder: `tune_id` and `strength` stand for a faceid tune id and a number"),
    ("docs/api/0-tune/1-create.md", "<lora...>"): (
        "error:malformed <lora tag", "placeholder: `<lora...>` stands for a LoRA tag"),
    ("docs/features/lora.md", "<lora:name:weight>"): (
        "error:weight", "placeholder in prose: `name` and `weight` stand for a LoRA name and a number"),
    ("docs/0-changes.md", "--duration N"): (
        "error:--duration N is not a whole number", "placeholder in prose: `N` stands for seconds"),
    ("docs/api/1-prompt/1-create.md", "--duration N"): (
        "error:--duration N is not a whole number", "placeholder in prose: `N` stands for seconds"),
}

# What some pages mean, checked on their examples: (page, substring) -> check of the parsed prompt.
MEANINGS: dict[tuple[str, str], Callable] = {
    ("docs/use-cases/upscale.md", "num_images=1"): lambda p: (
        p.loras == (("more_details", 0.5), ("SDXLrender_v2.0", 1.0)) and p.flags == {"only_upscale": True}
        and p.param("steps") == 16 and p.param("denoising_strength") == 0.1 and p.param("use_lpw") is False
        and p.negative_prompt.endswith("JuggernautNegative-neg")),
    ("docs/use-cases/upscale.md", "'prompt[text]', 'very detailed"): lambda p: (
        p.loras == (("add_detail", 1.0),) and p.flags == {"only_upscale": True} and p.positive.endswith("8K")),
    ("docs/use-cases/upscale.md", "prompt[text]=very detailed"): lambda p: (
        p.loras == (("add_detail", 1.0),) and p.flags == {"only_upscale": True} and p.positive.endswith("8K")
        and p.negative_prompt.startswith("lowres")),
    ("docs/use-cases/room-redesign.md", "--controlnets"): lambda p: (
        len(p.loras) == 4 and p.flag("mask_prompt") == "windows door" and p.flag("mask_invert") is True
        and p.flag("controlnets") == "mlsd segroom" and p.flag("controlnet_weights") == "0.5 1"
        and p.param("denoising_strength") == 1.0),
    ("docs/features/outpainting.md", "president Trump"): lambda p: (
        p.loras == (("1533312", 1.0),) and p.flag("outpaint") == "left-center" and p.flag("outpaint_width") == 1792
        and p.flag("outpaint_prompt") == "president Trump the middle of the field"),
    ("docs/features/prompt-masking.md", "--mask_dilate -20"): lambda p: (
        p.flag("mask_dilate") == "-20" and p.flag("mask_negative") == "clothes"
        and p.flag("hires_denoising_strength") == 0.1 and p.positive.endswith("octane rende")),
    ("docs/features/tiled-upscale.md", "--tiled_upscale_v2\nnum_images=2"): lambda p: (
        p.flags == {"tiled_upscale_v2": True} and p.param("seed") == 43 and p.param("num_images") == 2
        and "(CyberRealistic_Negative-neg:0.8)" in p.negative_prompt),
    ("docs/use-cases/35-virtual-try-on.md", "wearing dress"): lambda p: (
        p.faceids == (("1350339", 1.0),) and p.flag("control_guidance_end") == 0.5 and p.param("w") == 768),
    ("docs/api/1-prompt/3-duplicate.md", "--video_prompt"): lambda p: (
        p.flags == {"video": True, "video_prompt": "smiling, put their hands on hips"}),
    ("docs/features/video.md", "--video --video_model seedance"): lambda p: (
        p.flag("video_model") == "seedance_v15_720p" and p.flag("duration") == 5
        and p.flag("video_prompt") == "Woman looking at the camera, smiling, confident"),
}


@dataclass
class Example:
    """One example prompt found on a docs page."""

    page: str
    where: str
    text: str
    source: str  # the raw snippet it came from, for matching the judged list
    repaired: bool = False


# --- reading the docs


def read_pages(path: Path) -> dict[str, str]:
    """Page path -> text, for every docs/**/*.md(x), from a checkout folder or a git directory."""
    if (path / "docs").is_dir():
        return {str(file.relative_to(path)): file.read_text(encoding="utf-8")
                for file in sorted((path / "docs").rglob("*.md*")) if file.suffix in (".md", ".mdx")}
    git = ["git", f"--git-dir={path}"]
    names = subprocess.run([*git, "ls-tree", "-r", "--name-only", "HEAD", "--", "docs"],
                           check=True, capture_output=True, text=True).stdout.split("\n")
    return {name: subprocess.run([*git, "show", f"HEAD:{name}"], check=True, capture_output=True).stdout.decode("utf-8")
            for name in sorted(names) if name.endswith((".md", ".mdx"))}


_FENCE = re.compile(r"^(\s*)(`{3,})(.*)$")
_FLAG_WITH_VALUE = re.compile(r"(?:^|\s)--[a-z_]+[ =](?!--)\S")
_KNOWN_KEY_LINE = re.compile(r"^\s*(" + "|".join(spec_tables.PARAM_TYPES) + r")\s*=", re.MULTILINE)
_TAG = re.compile(r"<(?:lora|faceid)\b", re.IGNORECASE)
_STRING_FIELD = re.compile(
    r"""(?P<q1>['"])(?P<key>[\w\[\]]+)(?P=q1)\s*[:,]\s*(?P<q2>['"])(?P<value>(?:\\.|(?!(?P=q2)).)*)(?P=q2)"""
)
_INLINE_CODE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")


def looks_like_prompt(text: str) -> bool:
    """Whether a text block is an Astria prompt: it holds a tag, a flag, or a known key=value line."""
    return bool(_TAG.search(text) or _FLAG_WITH_VALUE.search(text) or _KNOWN_KEY_LINE.search(text))


def split_blocks(page_text: str) -> tuple[list[tuple[str, str]], str]:
    """Fenced code blocks as (language, body), and the page's prose with the blocks removed."""
    blocks: list[tuple[str, str]] = []
    prose: list[str] = []
    lines = page_text.split("\n")
    index = 0
    while index < len(lines):
        match = _FENCE.match(lines[index])
        if not match:
            prose.append(lines[index])
            index += 1
            continue
        fence, language = match.group(2), (match.group(3).split() or [""])[0].lower()
        body: list[str] = []
        index += 1
        while index < len(lines) and not lines[index].strip().startswith(fence):
            body.append(lines[index])
            index += 1
        blocks.append((language, "\n".join(body)))
        index += 1
    return blocks, "\n".join(prose)


def find_examples(page: str, page_text: str) -> list[Example]:
    """Every example prompt on one page."""
    examples: list[Example] = []
    blocks, prose = split_blocks(page_text)
    for number, (language, body) in enumerate(blocks, 1):
        if language in ("", "text") and looks_like_prompt(body):
            examples.append(Example(page, f"block {number}", body, body))
            continue
        if language in ("bash", "sh", "shell"):
            examples += curl_examples(page, number, body)
        for field_number, field in enumerate(_STRING_FIELD.finditer(body), 1):
            key = field.group("key")
            if key in ("text", "prompt") or (key.endswith("[text]") and language not in ("bash", "sh", "shell")):
                value = _unescape(field.group("value"))
                where = f"block {number} {language} field {field_number} {key!r}"
                examples.append(Example(page, where, value, field.group(0)))
    for number, span in enumerate(_INLINE_CODE.finditer(prose), 1):
        code = span.group(1)
        is_bare_boolean = code.strip().lstrip("-") in spec_tables.BOOLEAN_FLAGS and code.strip().startswith("--")
        if _TAG.search(code) or _FLAG_WITH_VALUE.search(code) or is_bare_boolean:
            examples.append(Example(page, f"inline {number}", code, code))
    return examples


def _unescape(value: str) -> str:
    """Undo the backslash escapes of a JS/Python/JSON string literal."""
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), value)


def curl_examples(page: str, number: int, body: str) -> list[Example]:
    """One example per command with `-F ...prompt...[KEY]=VALUE` fields: the text line, then key=value lines."""
    examples = []
    logical_lines = body.replace("\\\n", " ").split("\n")
    for line_number, line in enumerate(logical_lines, 1):
        if "-F" not in line or "[text]" not in line and "prompt[" not in line:
            continue
        repaired = False
        try:
            words = shlex.split(line, comments=True)
            fields = [words[i + 1] for i, word in enumerate(words[:-1]) if word == "-F"]
        except ValueError:
            fields = _lenient_fields(line)
            repaired = True
        text, params = "", []
        for field_text in fields:
            key, _, value = field_text.partition("=")
            name = re.fullmatch(r"(?:prompt|tune\[prompts_attributes\]\[\d*\])\[(\w+)\]", key)
            if not name or value.startswith("@"):
                continue
            if name.group(1) == "text":
                text = value
            else:
                params.append(f"{name.group(1)}={value}")
        if text or params:
            examples.append(Example(page, f"block {number} curl line {line_number}", "\n".join([text, *params]),
                                    line, repaired))
    return examples


def _lenient_fields(line: str) -> list[str]:
    """Fields of a curl line whose quoting is broken: split at ` -F `, drop one layer of quotes, stray ones too."""
    fields = []
    for chunk in re.split(r"\s-F\s", line)[1:]:
        chunk = chunk.strip()
        key, _, value = chunk.partition("=")
        key, value = key.strip("'\""), value.strip()
        if value.startswith(("'", '"')) and value.endswith(value[0]) and len(value) > 1:
            value = value[1:-1]
        else:
            value = value.strip("'\"")
        fields.append(f"{key}={value}")
    return fields


# --- checking


def judged_for(example: Example) -> tuple[tuple[str, str], tuple[str, str]] | None:
    """The judged-list entry that matches an example, if any."""
    for (page, needle), verdict in JUDGED.items():
        if page == example.page and (needle in example.source or needle in example.text):
            return (page, needle), verdict
    return None


def meaning_for(example: Example) -> tuple[tuple[str, str], Callable] | None:
    """The page check that applies to an example, if any."""
    for (page, needle), meaning in MEANINGS.items():
        if page == example.page and (needle in example.source or needle in example.text):
            return (page, needle), meaning
    return None


def check(example: Example, used: set) -> tuple[bool, str]:
    """Parse one example; return (as expected, the line to print)."""
    judged = judged_for(example)
    if judged:
        used.add(judged[0])
    expectation, reason = judged[1] if judged else ("ok", "")
    try:
        prompt = syntax.parse_prompt(example.text)
        local = settings.sampler_settings(prompt, settings.SamplerDefaults())
    except (syntax.AstriaSyntaxError, settings.AstriaSettingsError) as error:
        if expectation.startswith("error:") and expectation[len("error:"):] in str(error):
            return True, f"expected error ({reason}): {error}"
        return False, f"ERROR: {error}"
    if expectation.startswith("error:"):
        return False, f"UNEXPECTEDLY OK (judged: {reason})"
    if example.repaired != (expectation == "repaired"):
        return False, "REPAIRED WITHOUT A JUDGEMENT" if example.repaired else "JUDGED BROKEN BUT PARSED AS IS"
    meaning = meaning_for(example)
    if meaning is not None:
        used.add(meaning[0])
        if not meaning[1](prompt):
            return False, f"WRONG MEANING: {prompt}"
    summary = (f"ok{' (repaired: ' + reason + ')' if example.repaired else ''}: "
               f"{len(prompt.loras)} lora, {len(prompt.faceids)} faceid, flags {sorted(prompt.flags)}, "
               f"{len(prompt.params)} params, {local.steps_to_run}/{local.steps} steps"
               f"{', page meaning checked' if meaning else ''}")
    return True, summary


def main(argv: list[str]) -> int:
    """Check every docs example; print one line each and a total; non-zero on anything unexpected."""
    if len(argv) != 2:
        print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
        return 2
    pages = read_pages(Path(argv[1]))
    used: set = set()
    failures = total = 0
    for page, page_text in pages.items():
        for example in find_examples(page, page_text):
            total += 1
            good, line = check(example, used)
            failures += not good
            print(f"{page} [{example.where}]: {line}")
    for key in JUDGED:
        if key not in used:
            failures += 1
            print(f"{key[0]}: judged example {key[1]!r} not found (the docs changed? update JUDGED)")
    for page, needle in MEANINGS:
        if (page, needle) not in used:
            failures += 1
            print(f"{page}: page check for {needle!r} matched no example that parsed")
    print(f"{total} examples on {len(pages)} pages, {failures} unexpected")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
