"""Resolve `<lora:NAME:W>` tags to files among the loras folder's names, read alias files, and plan what to apply.

Pure: works on the list of relative names the host reports (`folder_paths.get_filename_list("loras")`) and never
touches the filesystem, so the node and the route only fetch the list, call these functions and use the answer.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .names import SHOWN_NAME_CHARS, unsafe_name_reason
from .user_errors import shown_as_pack

ALIAS_FILE_SUBPATH = "astria/lora_aliases.json"
"""Where the alias file lives, relative to the default user's data folder (`<user dir>/default/`)."""

ALIAS_FILE_HINT = "astria/lora_aliases.json in your ComfyUI user folder (user/default/)"
"""How messages name the alias file when the caller does not pass its real path."""

LOADABLE_EXTENSIONS = (".safetensors", ".sft")
# These formats are Python pickles: unpickling runs whatever code the file's author put in it.
PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pt2", ".bin", ".pth", ".pkl")
KNOWN_EXTENSIONS = LOADABLE_EXTENSIONS + PICKLE_EXTENSIONS

METHOD_LABELS = {"alias": "alias", "exact": "exact match", "case": "case-insensitive match", "stem": "stem match"}
"""How a tag matched -> the words the report uses."""

CLOSEST_NAMES_SHOWN = 3
# Longer than any file path a loras folder lists. Names are compared for likeness up to this length only, and
# quoted in messages up to SHOWN_NAME_CHARS: difflib is quadratic, and a pasted megabyte must not take minutes.
_COMPARED_NAME_CHARS = 255


@shown_as_pack
class LoraResolutionError(ValueError):
    """A LoRA name that cannot be used: unsafe, ambiguous, not loadable, or not found; the message says what to do."""

    def __init__(self, message: str, candidates: Sequence[str] = ()):
        super().__init__(message)
        self.candidates = tuple(candidates)


@shown_as_pack
class LoraAmbiguousError(LoraResolutionError):
    """Several files answer to the name; `.candidates` lists them."""


@shown_as_pack
class LoraNotFoundError(LoraResolutionError):
    """No file answers to the name (the case `on_missing = skip` may pass over); `.candidates` holds the closest."""


@shown_as_pack
class AliasFileError(ValueError):
    """The alias file cannot be read as aliases; the message names the file, the line and what to fix."""


@dataclass(frozen=True)
class Resolution:
    """Which file a tag name resolved to, and how (`alias`, `exact`, `case` or `stem`) for the node's report."""

    tag_name: str
    filename: str  # exactly as in `available`, ready for folder_paths.get_full_path("loras", filename)
    method: str
    alias_target: str | None = None  # what the alias file says, when method == "alias"

    def describe(self) -> str:
        """`more_details -> detail/more_details.safetensors (stem match)`."""
        how = METHOD_LABELS[self.method]
        if self.alias_target is not None and self.alias_target != self.filename:
            how = f"alias to {self.alias_target}"
        return f"{self.tag_name} -> {self.filename} ({how})"


class AliasTable(dict):
    """Aliases read from a file (name -> relative lora path) that remember the file's path and each key's line."""

    def __init__(self, entries: Mapping[str, str], path: str, key_lines: Mapping[str, int]):
        super().__init__(entries)
        self.path = path
        self.key_lines = dict(key_lines)

    def where(self, key: str) -> str:
        """`<path> line N` for a key, for messages."""
        line = self.key_lines.get(key)
        return f"{self.path} line {line}" if line else self.path


# ---------------------------------------------------------------- names


def _shown(name: str) -> str:
    """A name quoted for a message, cut short when it is longer than any real file name."""
    if len(name) > SHOWN_NAME_CHARS:
        return repr(name[:SHOWN_NAME_CHARS]) + f"... ({len(name)} characters)"
    return repr(name)


def _normal(name: str) -> str:
    """A name with `\\` read as `/`, so Windows and POSIX spellings compare equal."""
    return name.replace("\\", "/")


def _strip_extension(path: str) -> str:
    """`detail/x.v2.safetensors` -> `detail/x.v2` (names in `available` always end in an extension)."""
    slash = path.rfind("/")
    dot = path.rfind(".")
    return path[:dot] if dot > slash + 1 else path


def _strip_known_extension(name: str) -> str:
    """A tag name without a lora extension, keeping dots that belong to the name (`SDXLrender_v2.0`)."""
    lowered = name.lower()
    for ext in KNOWN_EXTENSIONS:
        if lowered.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return name


def _basename(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _extension(name: str) -> str:
    base = _basename(_normal(name))
    dot = base.rfind(".")
    return base[dot:].lower() if dot > 0 else ""


def is_loadable(filename: str) -> bool:
    """True for formats loaded without running code (`.safetensors`, `.sft`)."""
    return _extension(filename) in LOADABLE_EXTENSIONS


def _refuse_unsafe(name: str, what: str) -> None:
    reason = unsafe_name_reason(name)
    if reason:
        raise LoraResolutionError(
            f"{what} {_shown(name)} is refused: {reason}. Name a file inside the loras folder by its relative path, "
            "e.g. <lora:detail/more_details.safetensors:1>."
        )


# ---------------------------------------------------------------- resolution


def resolve(
    tag_name: str,
    available: Sequence[str],
    aliases: Mapping[str, str] | None = None,
    alias_file: str | None = None,
) -> Resolution:
    """Resolve a `<lora:NAME>` name: alias, exact relative path, same ignoring case, unique stem; else raise."""
    alias_file = alias_file or getattr(aliases, "path", None) or ALIAS_FILE_HINT
    _refuse_unsafe(tag_name, "LoRA name")
    aliases = aliases or {}
    if tag_name in aliases:
        target = aliases[tag_name]
        where = aliases.where(tag_name) if isinstance(aliases, AliasTable) else alias_file
        filename = _resolve_alias_target(tag_name, target, available, where)
        return Resolution(tag_name, filename, "alias", alias_target=target)
    try:
        filename, method = _lookup(tag_name, available, alias_file)
    except LoraNotFoundError as missing:
        if tag_name.isdigit() and len(tag_name) <= SHOWN_NAME_CHARS:
            raise LoraNotFoundError(
                f"LoRA {tag_name} is an Astria tune id: download its .safetensors from Astria, put it in the loras "
                f'folder and add an alias to {alias_file}, e.g. "{tag_name}": "astria/{tag_name}.safetensors".',
                missing.candidates,
            ) from None
        raise
    return Resolution(tag_name, filename, method)


def _resolve_alias_target(key: str, target: str, available: Sequence[str], where: str) -> str:
    """The file an alias points at; errors name the alias and where it is written."""
    if not isinstance(target, str):
        raise LoraResolutionError(f"Alias {key!r} in {where} must be a string (a relative lora path).")
    _refuse_unsafe(target, f"Alias {key!r} in {where} points at")
    try:
        filename, _method = _lookup(target, available, where)
    except LoraNotFoundError as missing:
        raise LoraNotFoundError(
            f"Alias {key!r} in {where} points at {target!r}, which is not in the loras folder. "
            f"{_closest_sentence(missing.candidates, available)} Fix the path in the alias file.",
            missing.candidates,
        ) from None
    except LoraAmbiguousError as error:
        raise LoraAmbiguousError(
            f"Alias {key!r} in {where} points at {target!r}, which matches several files: "
            f"{', '.join(error.candidates)}. Write the full relative path of one of them in the alias.",
            error.candidates,
        ) from None
    except LoraResolutionError as error:
        raise LoraResolutionError(f"Alias {key!r} in {where}: {error}", error.candidates) from None
    return filename


def _lookup(name: str, available: Sequence[str], alias_file: str) -> tuple[str, str]:
    """(filename, method) for a name among the files, trying exact, case-insensitive, then stem; else raise."""
    usable = [f for f in available if unsafe_name_reason(f) is None]
    wanted = _normal(name)
    levels = (
        ("exact", lambda f: wanted in (_normal(f), _strip_extension(_normal(f)))),
        ("case", lambda f: wanted.casefold() in (_normal(f).casefold(), _strip_extension(_normal(f)).casefold())),
        ("stem", _stem_matcher(wanted)),
    )
    for method, matches in levels:
        candidates = [f for f in usable if matches(f)]
        if candidates:
            return _pick(name, candidates, alias_file), method
    closest = closest_names(name, usable)
    raise LoraNotFoundError(
        f"LoRA {_shown(name)} was not found in the loras folder. {_closest_sentence(closest, usable)}", closest
    )


def _stem_matcher(wanted: str):
    """A test for files in any subfolder whose file name (with or without extension) is the name, ignoring case."""
    if "/" in wanted:
        return lambda f: False  # a path is never matched by its suffix: `a/b` must not find `x/a/b`
    key = wanted.casefold()
    has_extension = _strip_known_extension(wanted) != wanted

    def matches(filename: str) -> bool:
        base = _basename(_normal(filename)).casefold()
        return key == base if has_extension else key == _strip_extension(base)

    return matches


def _pick(name: str, candidates: list[str], alias_file: str) -> str:
    """The one candidate, preferring loadable files; raise when several remain or only pickles do."""
    if len(candidates) > 1 and any(_normal(c) == _normal(name) for c in candidates):
        candidates = [c for c in candidates if _normal(c) == _normal(name)]  # the full name, extension included
    loadable = [c for c in candidates if is_loadable(c)]
    if len(loadable) == 1:
        return loadable[0]
    if len(loadable) > 1:
        listed = ", ".join(sorted(loadable))
        raise LoraAmbiguousError(
            f"LoRA {name!r} matches several files: {listed}. Pick one by writing its subfolder and extension in the "
            f"tag, e.g. <lora:{_normal(min(loadable))}:1>, or add an alias for {name!r} to {alias_file}.",
            sorted(loadable),
        )
    raise LoraResolutionError(_not_loadable_message(name, sorted(candidates)), sorted(candidates))


def _not_loadable_message(name: str, files: list[str]) -> str:
    listed = ", ".join(files)
    if all(_extension(f) in PICKLE_EXTENSIONS for f in files):
        return (
            f"LoRA {name!r} is {listed}, a pickle file: loading it could run code hidden in the file, so it is "
            "refused. Get the .safetensors version of this LoRA (or convert it to .safetensors) and put it in the "
            "loras folder."
        )
    return f"LoRA {name!r} is {listed}: only .safetensors and .sft files are loaded. Convert it to .safetensors."


def closest_names(name: str, available: Sequence[str], count: int = CLOSEST_NAMES_SHOWN) -> list[str]:
    """The `count` names most like `name`, comparing both the relative path and the file stem, ignoring case."""
    key = _strip_known_extension(_normal(name)).casefold()[:_COMPARED_NAME_CHARS]
    key_base = _basename(key)

    def likeness(filename: str) -> float:
        path = _strip_extension(_normal(filename)).casefold()
        return max(
            difflib.SequenceMatcher(None, key, path).ratio(),
            difflib.SequenceMatcher(None, key_base, _basename(path)).ratio(),
        )

    return sorted(available, key=lambda f: (-likeness(f), f))[:count]


def _closest_sentence(closest: Sequence[str], available: Sequence[str]) -> str:
    if not available:
        return "The loras folder has no LoRA files (models/loras, or a folder in extra_model_paths.yaml)."
    return "Closest names: " + ", ".join(closest) + "."


# ---------------------------------------------------------------- alias files


def default_alias_file_text() -> str:
    """The text written when the alias file is first needed: an explanation and an example, no active aliases."""
    content = {
        "_comment": (
            "LoRA aliases for ComfyUI-Astria. Each entry maps a name used in Astria prompts, <lora:NAME:weight>, "
            "to a file in ComfyUI's loras folder, written as its relative path with forward slashes, e.g. "
            '"more_details": "detail/add_detail.safetensors". Numeric names are Astria tune ids: download the '
            "tune's .safetensors from Astria and map its id to it. Keys starting with _ are ignored; copy entries "
            "from _example to the top level to use them. JSON: double quotes, no trailing comma."
        ),
        "_example": {
            "more_details": "detail/add_detail.safetensors",
            "1533312": "people/my_face.safetensors",
        },
    }
    return json.dumps(content, indent=2) + "\n"


def parse_alias_file(text: str, path: str) -> AliasTable:
    """Read an alias file's text into name -> relative lora path; keys starting with `_` are skipped."""
    text = text.removeprefix("\ufeff")  # editors on Windows may save a byte-order mark
    if not text.strip():
        return AliasTable({}, path, {})
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise AliasFileError(
            f"The LoRA alias file {path} is not valid JSON at line {error.lineno}, column {error.colno}: "
            f"{error.msg}. {_json_fix_hint(error.msg)}"
        ) from None
    if not isinstance(data, dict):
        raise AliasFileError(
            f'The LoRA alias file {path} must hold one JSON object, {{"name": "sub/file.safetensors"}}, '
            f"not a {type(data).__name__}."
        )
    key_lines = _top_level_key_lines(text, path)
    entries: dict[str, str] = {}
    for key, value in data.items():
        if key.startswith("_"):
            continue
        where = f"{path} line {key_lines[key]}"
        if not isinstance(value, str):
            raise AliasFileError(
                f"Alias {key!r} in {where} must be a string, the relative path of a LoRA file "
                f'(e.g. "{key}": "detail/{key}.safetensors"), not {json.dumps(value)}.'
            )
        reason = unsafe_name_reason(value)
        if reason:
            raise AliasFileError(
                f"Alias {key!r} in {where} points at {value!r}, which is refused: {reason}. "
                "Write the path relative to the loras folder."
            )
        entries[key] = value
    return AliasTable(entries, path, key_lines)


def _json_fix_hint(message: str) -> str:
    if "property name" in message:
        return "Write keys in double quotes, and remove any comma just before a closing }."
    if "delimiter" in message:
        return "Separate entries with commas, and keys from values with a colon."
    if "Extra data" in message:
        return "The file must hold a single {...} object; remove what follows it."
    if "Invalid control character" in message or "Unterminated string" in message:
        return "Close each string with a double quote on the same line."
    if "Invalid \\escape" in message:
        return "Write paths with forward slashes (sub/file.safetensors), or double each backslash."
    return "Check the quotes, commas and braces there."


def _top_level_key_lines(text: str, path: str) -> dict[str, int]:
    """The line of each key of the (already valid) top-level object; a key written twice is an error."""
    decoder = json.JSONDecoder()
    whitespace = re.compile(r"\s*")
    position = whitespace.match(text).end() + 1  # past the opening brace
    lines: dict[str, int] = {}
    while True:
        position = whitespace.match(text, position).end()
        if text[position] == "}":
            return lines
        key, position = json.decoder.scanstring(text, position + 1)
        line = text.count("\n", 0, position) + 1
        if key in lines:
            raise AliasFileError(
                f"Alias {key!r} is written twice in {path} (lines {lines[key]} and {line}); keep one of them."
            )
        lines[key] = line
        position = whitespace.match(text, position).end() + 1  # past the colon
        position = whitespace.match(text, position).end()
        _value, position = decoder.raw_decode(text, position)
        position = whitespace.match(text, position).end()
        if text[position] == ",":
            position += 1


# ---------------------------------------------------------------- plan


@dataclass
class PlannedLora:
    """One file to apply, with the summed weight of every tag that named it."""

    filename: str
    weight: float
    resolutions: list[Resolution] = field(default_factory=list)
    tag_weights: list[float] = field(default_factory=list)

    def report_line(self) -> str:
        """`more_details -> detail/more_details.safetensors (stem match) x0.5`, plus the sum when named twice."""
        line = f"{self.resolutions[0].describe()} x{self.weight:g}"
        if len(self.tag_weights) > 1:
            added = " + ".join(f"x{w:g}" for w in self.tag_weights)
            names = ", ".join(sorted({r.tag_name for r in self.resolutions}))
            line += f" (named {len(self.tag_weights)} times as {names}: {added}, weights added)"
        return line


@dataclass
class LoraPlan:
    """What to apply, in prompt order, and what could not be resolved; the node decides to raise or skip."""

    loras: list[PlannedLora]
    errors: list[tuple[str, LoraResolutionError]]  # (tag name, why)
    warnings: list[str]

    def report_lines(self) -> list[str]:
        """What a user reads to see what happened: one line per file applied, then one per tag not applied."""
        lines = [lora.report_line() for lora in self.loras]
        lines += [f"{name}: not applied: {error}" for name, error in self.errors]
        return lines


def plan_loras(
    tags: Iterable[tuple[str, float]],
    available: Sequence[str],
    aliases: Mapping[str, str] | None = None,
    alias_file: str | None = None,
) -> LoraPlan:
    """Resolve every (name, weight) tag; the same file named twice is applied once with the weights added."""
    by_file: dict[str, PlannedLora] = {}
    errors: list[tuple[str, LoraResolutionError]] = []
    answers: dict[str, Resolution | LoraResolutionError] = {}  # a name repeated a thousand times is resolved once
    for name, weight in tags:
        if name not in answers:
            try:
                answers[name] = resolve(name, available, aliases, alias_file)
            except LoraResolutionError as error:
                answers[name] = error
        resolution = answers[name]
        if isinstance(resolution, LoraResolutionError):
            errors.append((name, resolution))
            continue
        planned = by_file.setdefault(resolution.filename, PlannedLora(resolution.filename, 0.0))
        planned.weight += weight
        planned.resolutions.append(resolution)
        planned.tag_weights.append(weight)
    warnings = [
        f"LoRA {p.filename} is named {len(p.tag_weights)} times in the prompt; it is applied once with the weights "
        f"added ({' + '.join(f'{w:g}' for w in p.tag_weights)} = {p.weight:g})."
        for p in by_file.values()
        if len(p.tag_weights) > 1
    ]
    return LoraPlan(list(by_file.values()), errors, warnings)
