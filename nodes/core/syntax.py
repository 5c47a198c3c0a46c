"""Astria prompt text -> AstriaPrompt (tags, flags, key=value params) and back; pure, linear time, no ComfyUI.

The whole grammar (the full spec, with the reasons, is docs/astria-syntax.md sections 1-5; the tables named here
live in spec_tables.py):

    block       = line ("\n" line)*          CRLF/CR -> LF; a leading BOM and inner zero-width characters
                                              (U+200B, U+2060, U+FEFF) are dropped, with a warning
    prompt      = the lines before the first param line; line 1 is always prompt text
    param line  = KEY "=" VALUE               KEY = [A-Za-z_][A-Za-z0-9_]*, split at the first "=", both trimmed

  In the prompt lines:
    tag         = "<" ("lora" | "faceid") ":" NAME [":" WEIGHT] ">"
                  tag word in any case; the weight is split at the LAST colon, absent = 1.0, a finite number;
                  NAME as written, checked by names.unsafe_name_reason (no "..", leading slash, drive, NUL);
                  "<lora" + letter/digit/_/- is text ("<lora-neg>"); "<lora" + anything but ":" is an error;
                  a tag ends on its own line; tags are cut out of the positive text
    flag        = "--" NAME   at the start of a line or after whitespace ("a--b" and a lone "--" are text),
                  then "=" or whitespace, then a value by its kind (FLAG_KINDS; unknown flags are WORDS):
        BOOLEAN    no value ("--name=true|false" too; =false removes it); text after it stays prompt text
        ONE_VALUE  one token, or one "quoted string"; typed by FLAG_VALUE_TYPES (float, int, number_or_percent,
                   string); "-20" and "-20%" are values; a missing value is an error
        WORDS      words up to the next flag or the end of the line; "quotes" group (a --x inside is text) and
                   are removed; a known WORDS flag without words is an error, an unknown one is True
    positive    = what remains, every whitespace run collapsed to one space; written_text keeps the lines as
                  pasted (what the remote node sends)

  In the param lines:
    VALUE       = empty or "undefined" (any case): unset (None); "0" and "false" are values
                  typed by PARAM_TYPES: int, float, bool (true/false, any case), else string;
                  ranges are PARAM_RANGES (inclusive, errors, never clamped); w/h positive multiples of 8
    negative_prompt=...   continues over the following lines that hold no KEY=; its tags are plain text
    known keys match in any case; unknown keys are kept with a warning; a later duplicate wins (warned);
    blank lines are skipped; any other line without a key is ignored with a warning saying why

  Errors and warnings:
    every refusal is AstriaSyntaxError(line, column, problem, fix) (a ValueError), 1-based; nothing else is raised
    for text input; a decimal comma ("0,5") gets the dotted number as its fix; lookalike dashes ("\u2014only_upscale")
    stay text with a warning; at most MAX_WARNINGS warnings are kept, the rest are counted

  Formatting (format_prompt) writes the canonical block: positive text, tags, flags on line 1 (format_flag),
  then negative_prompt= and the params (format_param_line); parse_prompt(format_prompt(p)) == p.

Where the spec is silent, the rule chosen is written in the docstring of the function that applies it ("Ours").
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import spec_tables as tables
from .attention import spaced_weights
from .names import unsafe_name_reason
from .user_errors import shown_as_pack

MAX_WARNINGS = 50  # a pasted megabyte of duplicates must not turn the summary into a megabyte of warnings
_SHOWN_VALUE_CHARS = 40  # values quoted in messages are cut to this length

_BOM = "\ufeff"
# Invisible characters that web pages and chat apps slip into copied text (zero-width space, word joiner, a BOM in
# the middle). They carry no meaning, but a key (`\u200bsteps=16`) or a flag (`--only_upscale\u200b`) holding one
# would silently turn into prompt text, so they are removed before parsing (with a warning). Joiners (U+200C,
# U+200D) stay: emoji sequences and Persian words need them.
_ZERO_WIDTH = re.compile("[\u200b\u2060\ufeff]")
# Control characters (C0 but tab and line breaks, DEL, C1) mean nothing in a prompt, and ComfyUI uses \x00\x01 and
# \x00\x02 as its own bracket markers: removed before parsing, with a warning, so no text encoder sees them.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_KEY_LINE = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=(.*)", re.DOTALL)
# A flag starts at the beginning of a line or after whitespace, and its name ends at whitespace, `=` or the end.
_FLAG_START = re.compile(r"(?:^|(?<=\s))--([A-Za-z][A-Za-z0-9_]*)(?=[\s=]|$)")
# A known flag name after dashes that are not exactly `--` (an en or em dash, a minus sign, one hyphen): what a web
# page or a word processor makes of `--only_upscale`. Kept as text, as Astria reads it, but warned with the fix.
_LOOKALIKE_FLAG = re.compile(
    r"(?:^|(?<=\s))([-\u2010-\u2015\u2212\ufe58\ufe63\uff0d]{1,3})([A-Za-z][A-Za-z0-9_]*)(?=[\s=]|$)"
)
_TAG_START = re.compile(r"<(lora|faceid)", re.IGNORECASE)
# Unambiguous alternatives (no `\d+\.?\d*`), so a megabyte of digits is matched in linear time. ASCII digits only:
# Python reads `１６` or `١٦` as 16, Astria's API does not, so they are refused with the ASCII number as the fix.
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_INTEGER = re.compile(r"[+-]?\d+", re.ASCII)
_NUMBER_OR_PERCENT = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)%?", re.ASCII)
_UNICODE_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?%?")
_WHITESPACE = re.compile(r"\s+")
_DECIMAL_COMMA = re.compile(r"[+-]?[0-9]*,[0-9]+")
_MAX_INT_DIGITS = 30  # longer integers are out of every range; also keeps int() away from its digit limit


@shown_as_pack
class AstriaSyntaxError(ValueError):
    """A prompt the parser refuses; the message names the problem, the line and column (1-based) and the fix."""

    def __init__(self, line: int, column: int, problem: str, fix: str):
        self.line = line
        self.column = column
        self.problem = problem
        self.fix = fix
        super().__init__(f"line {line}, column {column}: {problem}; {fix}")

    def __reduce__(self):
        # by a function of this module: the class's shown module name is not importable
        return _rebuild_syntax_error, (self.line, self.column, self.problem, self.fix)


def _rebuild_syntax_error(line: int, column: int, problem: str, fix: str) -> AstriaSyntaxError:
    """An AstriaSyntaxError from its parts (what unpickling calls)."""
    return AstriaSyntaxError(line, column, problem, fix)


class FrozenMap(Mapping):
    """An immutable, hashable mapping that keeps insertion order (equality ignores order, like dict)."""

    __slots__ = ("_hash", "_items")

    def __init__(self, items: Mapping | Any = ()):
        self._items = dict(items)
        self._hash = None

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self) -> Iterator:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._items.items()))
        return self._hash

    def __eq__(self, other) -> bool:
        if isinstance(other, FrozenMap):
            return self._items == other._items
        if isinstance(other, Mapping):
            return self._items == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"FrozenMap({self._items!r})"


@dataclass(frozen=True)
class AstriaPrompt:
    """A parsed Astria prompt: texts, tags, flags and params. Equality and hash ignore `warnings`."""

    positive: str = ""
    negative_prompt: str = ""
    loras: tuple[tuple[str, float], ...] = ()
    faceids: tuple[tuple[str, float], ...] = ()
    flags: FrozenMap = field(default_factory=FrozenMap)
    params: FrozenMap = field(default_factory=FrozenMap)
    warnings: tuple[str, ...] = field(default=(), compare=False)
    # The prompt lines as pasted (before the first key=value line): what the remote node sends as prompt[text].
    written_text: str = field(default="", compare=False)

    def has_flag(self, name: str) -> bool:
        """Whether the prompt carries `--name`."""
        return name in self.flags

    def flag(self, name: str, default: Any = None) -> Any:
        """The flag's value (True for a flag without value), or `default` when the prompt lacks it."""
        return self.flags.get(name, default)

    def param(self, key: str, default: Any = None) -> Any:
        """The param's typed value; `default` when the key is absent or unset (empty or `undefined`)."""
        value = self.params.get(key)
        return default if value is None else value

    def is_set(self, key: str) -> bool:
        """Whether `key=` is given with a value (a given `0` or `false` counts as set)."""
        return self.params.get(key) is not None

    def astria_text(self) -> str:
        """The prompt line in canonical form: positive text, then tags, then flags."""
        return format_prompt(self).split("\n", 1)[0]

    def text_as_written(self) -> str:
        """The prompt text as pasted, tags and flags in place (what `prompt[text]` sends); canonical if not parsed."""
        return self.written_text or self.astria_text()


# ---------------------------------------------------------------------------------------------------------------
# Parsing


def parse_prompt(text: str) -> AstriaPrompt:
    """Parse a pasted Astria prompt block; raise AstriaSyntaxError for anything the spec refuses."""
    if not isinstance(text, str):
        raise AstriaSyntaxError(0, 0, f"the prompt must be text, not {type(text).__name__}", "pass a string")
    if text.startswith(_BOM):
        text = text[1:]
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    warnings = _Warnings()
    lines = _remove_zero_width(lines, warnings)
    lines = _remove_controls(lines, warnings)
    first_param_line = _first_param_line(lines)

    prompt_parts: list[str] = []
    loras: list[tuple[str, float]] = []
    faceids: list[tuple[str, float]] = []
    flags: dict[str, Any] = {}
    flag_lines: dict[str, int] = {}
    spaced: list[tuple[str, str, str]] = []
    for index in range(first_param_line):
        line_number = index + 1
        line, tags = _extract_tags(lines[index], line_number)
        for kind, name, weight in tags:
            (loras if kind == "lora" else faceids).append((name, weight))
        _warn_lookalike_flags(line, line_number, warnings)
        if not index and "=" in line:
            _warn_param_on_the_first_line(line, warnings)
        elif "=" in line:
            meant = _meant_param(line)
            if meant:
                warnings.add(
                    f"line {line_number}: {_show(line.strip())} is read as prompt text (a key is letters, digits "
                    f"and _ only); write {meant} for the parameter"
                )
        prompt_parts.append(_extract_flags(line, line_number, flags, flag_lines, warnings))
        spaced += [(f"line {line_number}", found.written, found.meant) for found in spaced_weights(line, MAX_WARNINGS)]
    _warn_repeated_tags(loras, "LoRA", warnings)
    _warn_repeated_tags(faceids, "faceid", warnings)

    negative, params = _parse_params(lines, first_param_line, warnings)
    if params.get("use_lpw") is not False:  # with use_lpw=false every bracket is text anyway
        spaced += [("negative_prompt", found.written, found.meant) for found in spaced_weights(negative, MAX_WARNINGS)]
        for where, written, meant in spaced:
            warnings.add(f"{where}: {_show_group(written)} is read as text at weight 1.1, as Astria's weighted "
                         f"prompts do (diffusers' long-prompt-weighting parser); write {_show_group(meant)} for a weight")
    return AstriaPrompt(
        positive=_tidy(" ".join(prompt_parts)),
        negative_prompt=negative,
        loras=tuple(loras),
        faceids=tuple(faceids),
        flags=FrozenMap(flags),
        params=FrozenMap(params),
        warnings=warnings.as_tuple(),
        written_text="\n".join(lines[:first_param_line]).strip(),
    )


class _Warnings:
    """Collects warnings, keeping the first MAX_WARNINGS and counting the rest."""

    def __init__(self):
        self.items: list[str] = []
        self.dropped = 0

    def add(self, message: str) -> None:
        if len(self.items) < MAX_WARNINGS:
            self.items.append(message)
        else:
            self.dropped += 1

    def as_tuple(self) -> tuple[str, ...]:
        if self.dropped:
            return (*self.items, f"... and {self.dropped} more warnings like these")
        return tuple(self.items)


def _remove_unseen(lines: list[str], pattern: re.Pattern, what: str, why: str, warnings: _Warnings) -> list[str]:
    """Drop every match of `pattern` from `lines`, warning once where the first one was and how many there were."""
    for index, line in enumerate(lines):
        found = pattern.search(line)
        if found:
            count = sum(len(pattern.findall(rest)) for rest in lines[index:])
            warnings.add(f"line {index + 1}, column {found.start() + 1}: {count} {what} (U+{ord(found.group()):04X} "
                         f"and the like{why}; delete them from the text to silence this")
            return lines[:index] + [pattern.sub("", rest) for rest in lines[index:]]
    return lines


def _remove_zero_width(lines: list[str], warnings: _Warnings) -> list[str]:
    """Drop zero-width spaces, word joiners and inner BOMs, warning once where the first one was."""
    return _remove_unseen(lines, _ZERO_WIDTH, "invisible zero-width character(s)",
                          ", usually copied from a web page) were removed", warnings)


def _remove_controls(lines: list[str], warnings: _Warnings) -> list[str]:
    """Drop control characters (C0 but tab and line breaks, DEL, C1), warning once where the first one was."""
    return _remove_unseen(lines, _CONTROL, "control character(s)",
                          ") were removed: a text encoder must not see them, and ComfyUI uses some as internal "
                          "markers", warnings)


def _first_param_line(lines: list[str]) -> int:
    """Index of the first key=value line; line 1 is always prompt text, even when it holds `=`.

    Ours where the spec is silent: a key is an identifier (letters, digits, `_`), so `a cat = dog` on line 2 is
    prompt text, not a param.
    """
    for index in range(1, len(lines)):
        if _KEY_LINE.match(lines[index]):
            return index
    return len(lines)


def _show(value: str) -> str:
    """A value cut short for an error message."""
    if len(value) > _SHOWN_VALUE_CHARS:
        value = value[:_SHOWN_VALUE_CHARS] + "..."
    return value if value.isprintable() and value.strip() == value and value else repr(value)


def _show_group(group: str) -> str:
    """A bracket group for a message: as written (attention.spaced_weights already shortened it), unless huge."""
    return group if len(group) <= 2 * _SHOWN_VALUE_CHARS else _show(group)


def _tidy(text: str) -> str:
    """Collapse every run of whitespace into one space and trim the ends."""
    return _WHITESPACE.sub(" ", text).strip()


# --- tags


def _extract_tags(line: str, line_number: int) -> tuple[str, list[tuple[str, str, float]]]:
    """Take `<lora:..>`/`<faceid:..>` tags out of a prompt line, each replaced by spaces of the same length.

    Keeping the length keeps every later column right; the spaces also keep `a<lora:x:1>b` two words. Ours where
    the spec is silent: the tag word is matched in any case; `<lora` followed by a letter, digit, `_` or `-` is
    text (`<lora-neg>`, `<loras>`), while `<lora` followed by anything else that is not `:` (`<lora>`,
    `<lora...>`, the end of the line) is a malformed tag, an error.
    """
    tags: list[tuple[str, str, float]] = []
    if "<" not in line:
        return line, tags
    pieces: list[str] = []
    position = 0
    search_from = 0
    while True:
        match = _TAG_START.search(line, search_from)
        if match is None:
            break
        kind = match.group(1).lower()
        after = match.end()
        next_char = line[after] if after < len(line) else ""
        if next_char and (next_char.isalnum() or next_char in "_-"):
            search_from = after
            continue
        column = match.start() + 1
        if not next_char:
            raise AstriaSyntaxError(
                line_number, column, f"unterminated <{kind} tag at the end of the line",
                f"write <{kind}:NAME:WEIGHT>, e.g. <{kind}:more_details:0.5>",
            )
        if next_char != ":":
            raise AstriaSyntaxError(
                line_number, column, f"malformed <{kind} tag {_show(_tag_excerpt(line, match.start()))}",
                f"write <{kind}:NAME:WEIGHT>, e.g. <{kind}:more_details:0.5>",
            )
        close = line.find(">", after)
        if close < 0:
            raise AstriaSyntaxError(
                line_number, column, f"unterminated <{kind}: tag", "close it with > on the same line (a tag cannot span lines)"
            )
        inner = line.find("<", after, close)
        if inner >= 0:
            raise AstriaSyntaxError(
                line_number, column, f"unterminated <{kind}: tag: a '<' at column {inner + 1} comes before its '>'",
                f"close each tag with > before the next starts, e.g. <{kind}:a:1> <{kind}:b:1>",
            )
        body = line[after + 1:close]
        name, weight = _split_tag_body(body, kind, line_number, column)
        tags.append((kind, name, weight))
        pieces.append(line[position:match.start()])
        pieces.append(" " * (close + 1 - match.start()))
        position = search_from = close + 1
    if not tags:
        return line, tags
    pieces.append(line[position:])
    return "".join(pieces), tags


def _tag_excerpt(line: str, start: int) -> str:
    """The tag-like text at `start` for a message: up to its `>` or a few words."""
    close = line.find(">", start, start + _SHOWN_VALUE_CHARS)
    return line[start:close + 1] if close >= 0 else line[start:start + 20]


def _split_tag_body(body: str, kind: str, line_number: int, column: int) -> tuple[str, float]:
    """Split NAME and WEIGHT at the last colon (no colon: weight 1.0) and check both."""
    tag = f"<{kind}:{body}>"
    name, colon, weight_text = body.rpartition(":")
    if not colon:
        name, weight_text = body, ""
    name = name.strip()
    weight_text = weight_text.strip()
    if colon:
        if not _NUMBER.fullmatch(weight_text):
            raise AstriaSyntaxError(
                line_number, column, f"the weight {_show(weight_text)} of {_show(tag)} is not a number",
                _number_fix(weight_text) or "give a number such as 0.5, or leave out ':WEIGHT' for 1.0",
            )
        weight = float(weight_text)
        if not math.isfinite(weight):
            raise AstriaSyntaxError(
                line_number, column, f"the weight of {_show(tag)} is not a finite number", "give a number such as 0.5"
            )
    else:
        weight = 1.0
    _check_tag_name(name, tag, kind, line_number, column)
    return name, weight


def _check_tag_name(name: str, tag: str, kind: str, line_number: int, column: int) -> None:
    """Refuse empty names and names that could leave the loras folder (`..`, absolute paths, drives, NUL)."""
    if not name:
        raise AstriaSyntaxError(line_number, column, f"{_show(tag)} has no name", f"write <{kind}:NAME:WEIGHT>")
    reason = unsafe_name_reason(name)  # the loader's own rule, so parser and loader refuse the same names
    if reason:
        raise AstriaSyntaxError(
            line_number, column, f"the name in {_show(tag)} is refused: {reason}",
            "name the file relative to the loras folder, e.g. detail/more_details.safetensors",
        )


def _warn_repeated_tags(tags: list[tuple[str, float]], label: str, warnings: _Warnings) -> None:
    """Warn once per name given more than once (both stay: A1111 applies each)."""
    seen: set[str] = set()
    reported: set[str] = set()
    for name, _weight in tags:
        if name in seen and name not in reported:
            warnings.add(f"{label} {name!r} is given more than once; each tag applies")
            reported.add(name)
        seen.add(name)


# --- flags


def _extract_flags(line: str, line_number: int, flags: dict, flag_lines: dict, warnings: _Warnings) -> str:
    """Take the `--flags` out of one prompt line, store them in `flags`, and return the remaining text."""
    if "--" not in line:
        return line
    text_parts: list[str] = []
    position = 0
    while True:
        match = _FLAG_START.search(line, position)
        if match is None:
            text_parts.append(line[position:])
            break
        text_parts.append(line[position:match.start()])
        written_name = match.group(1)
        name = written_name.lower() if written_name.lower() in tables.FLAG_KINDS else written_name
        kind = tables.FLAG_KINDS.get(name, tables.UNKNOWN_FLAG_KIND)
        column = match.start() + 1
        after = match.end()
        has_equals = after < len(line) and line[after] == "="
        if has_equals:
            after += 1
        if kind == tables.BOOLEAN:
            value, position = _boolean_flag_value(line, after, has_equals, name, line_number, column)
        elif kind == tables.ONE_VALUE:
            value, position = _one_flag_value(line, after, has_equals, name, line_number, column)
        else:
            value, position = _words_flag_value(line, after, name, line_number, column)
            if value == "":
                if name in tables.FLAG_KINDS:
                    raise AstriaSyntaxError(
                        line_number, column, f"--{name} has no value", f"write --{name} followed by words"
                    )
                value = True
        _store_flag(name, value, line_number, flags, flag_lines, warnings)
    return " ".join(text_parts)


def _warn_lookalike_flags(line: str, line_number: int, warnings: _Warnings) -> None:
    """Warn about `—only_upscale`, `–resemblance`, `-only_upscale`: a known flag not written with two hyphens."""
    if "-" not in line and not any(ord(char) > 0x2000 for char in line):
        return
    for match in _LOOKALIKE_FLAG.finditer(line):
        dashes, name = match.groups()
        if dashes != "--" and name.lower() in tables.FLAG_KINDS:
            typographic = [f"U+{ord(char):04X}" for char in dict.fromkeys(dashes) if char != "-"]
            shown = " and ".join(typographic) or ("one hyphen" if len(dashes) == 1 else f"{len(dashes)} hyphens")
            warnings.add(
                f"line {line_number}, column {match.start() + 1}: {dashes}{name} is not a flag ({shown} instead of "
                f"two hyphens), so it stays prompt text; write --{name.lower()}"
            )


def _store_flag(name: str, value: Any, line_number: int, flags: dict, flag_lines: dict, warnings: _Warnings) -> None:
    """Record a flag: a repeat wins over the earlier one (warned); `--flag=false` removes a boolean flag."""
    if name in flag_lines:
        warnings.add(f"line {line_number}: --{name} given again (first on line {flag_lines[name]}); the later one wins")
    elif name not in tables.FLAG_KINDS:
        warnings.add(f"line {line_number}: unknown flag --{name}: kept and sent to Astria as written")
    flag_lines[name] = line_number
    flags.pop(name, None)
    if value is not False:
        flags[name] = value


def _boolean_flag_value(line, start, has_equals, name, line_number, column) -> tuple[bool, int]:
    """`--name` is True; `--name=true|false` (any case) is accepted too. Text after the flag stays prompt text."""
    if not has_equals:
        return True, start
    token, end = _read_token(line, start, line_number, column, name)
    if token.lower() in ("true", "false"):
        return token.lower() == "true", end
    raise AstriaSyntaxError(
        line_number, column, f"--{name}={_show(token)} is not true or false", f"write --{name} alone to turn it on"
    )


def _one_flag_value(line, start, has_equals, name, line_number, column) -> tuple[Any, int]:
    """One token (`-20` and `-20%` are values, `"quoted words"` one token); numeric flags are checked and typed."""
    if not has_equals:
        while start < len(line) and line[start].isspace():
            start += 1
    if start >= len(line) or line[start].isspace() or _FLAG_START.match(line, start):
        raise AstriaSyntaxError(
            line_number, column, f"--{name} has no value", f"write --{name} VALUE, e.g. {_flag_example(name)}"
        )
    token, end = _read_token(line, start, line_number, column, name)
    return _typed_flag_value(name, token, line_number, column), end


def _read_token(line: str, start: int, line_number: int, column: int, name: str) -> tuple[str, int]:
    """A double-quoted string (quotes removed) or a run of non-space characters, starting at `start`."""
    if start < len(line) and line[start] == '"':
        close = line.find('"', start + 1)
        if close < 0:
            raise _unclosed_quote(line_number, start + 1, name)
        return _tidy(line[start + 1:close]), close + 1
    end = start
    while end < len(line) and not line[end].isspace():
        end += 1
    return line[start:end], end


def _unclosed_quote(line_number: int, column: int, name: str) -> AstriaSyntaxError:
    """The error for a `"` in a flag's value that its line never closes."""
    return AstriaSyntaxError(
        line_number, column, f"the quote opened in the value of --{name} is never closed", 'close it with " on the same line'
    )


def _typed_flag_value(name: str, token: str, line_number: int, column: int) -> Any:
    """Check a one-value flag's token against its type; numbers become int or float."""
    value_type = tables.FLAG_VALUE_TYPES.get(name, "string")
    if value_type == "float" and _NUMBER.fullmatch(token) and math.isfinite(float(token)):
        return float(token)
    if value_type == "int" and _INTEGER.fullmatch(token) and _digit_count(token) <= _MAX_INT_DIGITS:
        return int(token)
    if value_type == "number_or_percent" and _NUMBER_OR_PERCENT.fullmatch(token):
        return token
    if value_type == "string":
        return token
    wanted = {"float": "a number", "int": "a whole number", "number_or_percent": "a number or a percentage"}
    raise AstriaSyntaxError(
        line_number, column, f"--{name} {_show(token)} is not {wanted[value_type]}",
        _number_fix(token, f"--{name} ", value_type == "float") or f"write e.g. {_flag_example(name)}",
    )


def _flag_example(name: str) -> str:
    """An example of the flag with a value, for error messages."""
    examples = {"mask_dilate": "-20%", "outpaint": "top-center", "video_model": "seedance_v15_720p", "duration": "5"}
    default = tables.FLAG_DEFAULTS.get(name)
    if default is not None:
        return f"--{name} {default}"
    value_type = tables.FLAG_VALUE_TYPES.get(name, "string")
    sample = examples.get(name, {"float": "0.5", "int": "1024"}.get(value_type, "value"))
    return f"--{name} {sample}"


def _words_flag_value(line: str, start: int, name: str, line_number: int, column: int) -> tuple[str, int]:
    """Words up to the next flag or the end of the line; double quotes group (a `--x` inside is text) and go.

    Whitespace inside the value is tidied like the prompt's. An unclosed quote is an error.
    """
    parts: list[str] = []
    position = start
    next_flag = _FLAG_START.search(line, position)
    while True:
        flag_at = next_flag.start() if next_flag else len(line)
        quote = line.find('"', position, flag_at)
        if quote < 0:
            parts.append(line[position:flag_at])
            return _tidy("".join(parts)), flag_at
        close = line.find('"', quote + 1)
        if close < 0:
            raise _unclosed_quote(line_number, quote + 1, name)
        parts.append(line[position:quote])
        parts.append(line[quote + 1:close])
        position = close + 1
        if next_flag and next_flag.start() < position:
            next_flag = _FLAG_START.search(line, position)


# --- params


def _parse_params(lines: list[str], first: int, warnings: _Warnings) -> tuple[str, dict[str, Any]]:
    """Read the key=value lines; a line without a key right after `negative_prompt=` continues it.

    Ours where the spec is silent: blank lines are skipped; any other line without a key that does not continue
    the negative prompt is ignored with a warning; known keys match in any case (`Steps=` is `steps=`).
    """
    params: dict[str, Any] = {}
    key_lines: dict[str, int] = {}
    negative_parts: list[str] = []
    continuing_negative = False
    for index in range(first, len(lines)):
        line_number = index + 1
        line = lines[index]
        match = _KEY_LINE.match(line)
        if match is None:
            if not line.strip():
                continue
            if continuing_negative:
                negative_parts.append(line)
            else:
                warnings.add(f"line {line_number}: {_show(line.strip())} {_why_not_a_param(line)}")
            continue
        written_key = match.group(1)
        key = written_key.lower() if written_key.lower() in tables.PARAM_TYPES else written_key
        raw_value = match.group(2).strip()
        value_column = match.start(2) + 1 + (len(match.group(2)) - len(match.group(2).lstrip()))
        if key in key_lines:
            warnings.add(
                f"line {line_number}: {key} given again (first on line {key_lines[key]}); the later value wins"
            )
        elif key not in tables.PARAM_TYPES:
            warnings.add(
                f"line {line_number}: unknown parameter {key!r}: kept, and sent to Astria as written by the remote node"
            )
        key_lines[key] = line_number
        continuing_negative = key == "negative_prompt"
        if continuing_negative:
            negative_parts = [raw_value]
            params.pop(key, None)
            continue
        params.pop(key, None)  # a later duplicate also moves to its own place in the order
        params[key] = _typed_param(key, raw_value, line_number, value_column)
    negative = _tidy(" ".join(negative_parts))
    _warn_tags_in_negative(negative, key_lines.get("negative_prompt"), warnings)
    return negative, params


def _warn_param_on_the_first_line(line: str, warnings: _Warnings) -> None:
    """Line 1 is always prompt text (spec); say so when it looks like a typed param, e.g. a block without a prompt."""
    match = _KEY_LINE.match(line)
    key = match.group(1).lower() if match else ""
    # String keys stay quiet: `style=anime, girl` is a plausible prompt; `steps=16` is not.
    if key == "negative_prompt" or tables.PARAM_TYPES.get(key, "string") != "string":
        warnings.add(
            f"line 1: {_show(line.strip())} is read as prompt text (the first line always is); put the prompt on "
            "line 1 and the parameters below it"
        )


def _why_not_a_param(line: str) -> str:
    """Why a line among the params was ignored, and what to write instead."""
    if "=" not in line:
        return "is not key=value and was ignored (prompt text belongs before the first key=value line)"
    if not line.partition("=")[0].strip():
        return "has no key before '=' and was ignored; write key=value"
    meant = _meant_param(line)
    if meant:
        return f"was ignored: a key has no spaces or other marks; write {meant}"
    return "was ignored: a key is letters, digits and _ only (prompt text belongs before the first key=value line)"


def _meant_param(line: str) -> str | None:
    """`CFG Scale=7` -> `cfg_scale=7`: the known param a line with a misspelt key means, or None."""
    key, _equals, value = line.partition("=")
    known = re.sub(r"\W+", "_", key, flags=re.ASCII).strip("_").lower()
    if known not in tables.PARAM_TYPES:
        return None
    value = value.strip()
    return f"{known}={_show(value) if value else ''}"


def _warn_tags_in_negative(negative: str, line_number: int | None, warnings: _Warnings) -> None:
    """Tags in the negative prompt are plain text (spec); say so, since a user may have expected a LoRA."""
    if _TAG_START.search(negative) and re.search(r"<(?i:lora|faceid):[^>]*>", negative):
        warnings.add(
            f"line {line_number}: the negative prompt holds a <lora:..> or <faceid:..> tag; tags apply only in the "
            "prompt, so it stays plain text there"
        )


def _typed_param(key: str, raw: str, line_number: int, column: int) -> Any:
    """Convert a param's text to its type and check its range; empty and `undefined` are None (unset)."""
    if raw.lower() in tables.UNSET_WORDS:
        return None
    value_type = tables.PARAM_TYPES.get(key, "string")
    if value_type == "string":
        return raw
    if value_type == "bool":
        if raw.lower() in ("true", "false"):
            return raw.lower() == "true"
        raise AstriaSyntaxError(line_number, column, f"{key}={_show(raw)} is not true or false", f"write {key}=true or {key}=false")
    if value_type == "int":
        if not _INTEGER.fullmatch(raw):
            raise AstriaSyntaxError(
                line_number, column, f"{key}={_show(raw)} is not a whole number",
                _number_fix(raw, f"{key}=", False) or f"write e.g. {_param_example(key)}",
            )
        value = int(raw) if _digit_count(raw) <= _MAX_INT_DIGITS else math.inf
    else:
        if not _NUMBER.fullmatch(raw) or not math.isfinite(float(raw)):
            raise AstriaSyntaxError(
                line_number, column, f"{key}={_show(raw)} is not a number",
                _number_fix(raw, f"{key}=") or f"write e.g. {_param_example(key)}",
            )
        value = float(raw)
    _check_range(key, raw, value, line_number, column)
    return value


def _number_fix(text: str, prefix: str = "", decimal_comma: bool = True) -> str | None:
    """The fix for a number Astria cannot read: non-ASCII digits, or (where a fraction is allowed) a decimal comma."""
    if len(text) <= _SHOWN_VALUE_CHARS and not text.isascii() and _UNICODE_NUMBER.fullmatch(text):
        ascii_text = "".join(str(unicodedata.digit(c)) if c.isdigit() else c for c in text)
        return f"write {prefix}{ascii_text} (the digits 0-9: Astria does not read {text} as a number)"
    return _decimal_comma_fix(text, prefix) if decimal_comma else None


def _decimal_comma_fix(text: str, prefix: str = "") -> str | None:
    """`1,5` -> the fix `write 1.5 (a dot, not a comma)`; None when the text is not a number with a decimal comma."""
    if len(text) <= _SHOWN_VALUE_CHARS and _DECIMAL_COMMA.fullmatch(text):
        return f"write {prefix}{text.replace(',', '.')} (a decimal dot, not a comma)"
    return None


def _digit_count(integer_text: str) -> int:
    """How many digits an integer's text has once its sign and leading zeros are set aside (`007` has 1)."""
    return len(integer_text.lstrip("+-").lstrip("0"))


def _check_range(key: str, raw: str, value: float, line_number: int, column: int) -> None:
    """Ranges are errors, never clamped (spec)."""
    bounds = tables.PARAM_RANGES.get(key)
    if bounds is not None and not bounds[0] <= value <= bounds[1]:
        low, high = bounds
        shown_high = "2^32-1" if high == tables.SEED_MAX else _plain_number(high)
        raise AstriaSyntaxError(
            line_number, column, f"{key}={_show(raw)} is out of range {_plain_number(low)}-{shown_high}",
            f"give a value from {_plain_number(low)} to {shown_high}, or leave it empty for the default",
        )
    if key in tables.MULTIPLE_OF_8_PARAMS and (value <= 0 or value % 8):
        raise AstriaSyntaxError(
            line_number, column, f"{key}={_show(raw)} is not a positive multiple of 8",
            f"use a multiple of 8 such as {max(8, int(value // 8 * 8)) if value != math.inf else 1024}, "
            "or leave it empty for 2x the input",
        )


def _plain_number(number: float) -> str:
    """1 not 1.0, 0.5 as is."""
    return str(int(number)) if float(number).is_integer() else str(number)


def _param_example(key: str) -> str:
    """An example line for a key, for error messages."""
    examples = {"seed": "seed=42", "steps": "steps=16", "num_images": "num_images=1", "w": "w=1024", "h": "h=1024",
                "cfg_scale": "cfg_scale=6.0", "denoising_strength": "denoising_strength=0.1",
                "controlnet_conditioning_scale": "controlnet_conditioning_scale=0.5"}
    return examples.get(key, f"{key}=1")


# ---------------------------------------------------------------------------------------------------------------
# Formatting


def format_prompt(prompt: AstriaPrompt) -> str:
    """Write the canonical block: prompt, tags and flags on line 1, then negative_prompt= and the params."""
    first_line = [prompt.positive] if prompt.positive else []
    first_line += [f"<lora:{name}:{_format_number(weight)}>" for name, weight in prompt.loras]
    first_line += [f"<faceid:{name}:{_format_number(weight)}>" for name, weight in prompt.faceids]
    first_line += [format_flag(name, value) for name, value in prompt.flags.items()]
    lines = [" ".join(first_line)]
    if prompt.negative_prompt:
        lines.append(f"negative_prompt={prompt.negative_prompt}")
    lines += [format_param_line(key, value) for key, value in prompt.params.items()]
    return "\n".join(lines)


def _format_number(number: float) -> str:
    """The shortest text that reads back as the same float."""
    return repr(float(number))


def format_flag(name: str, value: Any) -> str:
    """One flag as the canonical block writes it: `--name` for True, `--name VALUE` otherwise, quoted when the value would not read back alone."""
    if value is True:
        return f"--{name}"
    if isinstance(value, float):
        return f"--{name} {_format_number(value)}"
    if isinstance(value, int):
        return f"--{name} {value}"
    kind = tables.FLAG_KINDS.get(name, tables.UNKNOWN_FLAG_KIND)
    needs_quotes = not value or _FLAG_START.search(value) or (kind == tables.ONE_VALUE and _WHITESPACE.search(value))
    if kind == tables.WORDS and '"' in value:
        needs_quotes = False  # parsed words never hold a quote; kept for hand-built prompts
    return f'--{name} "{value}"' if needs_quotes else f"--{name} {value}"


def format_param_line(key: str, value: Any) -> str:
    """One param as the canonical block writes it, e.g. `steps=16`, `seed=` (unset)."""
    return f"{key}={_format_param(value)}"


def _format_param(value: Any) -> str:
    """Params as Astria writes them: true/false, numbers, text; None as empty."""
    if value is None:
        return ""
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, float):
        return _format_number(value)
    return str(value)


def loras_beside_error(text: str, error: AstriaSyntaxError) -> list[tuple[str, float]]:
    """The `<lora:..>` tags of the prompt lines other than the refused one, so a preview can show both problems.

    Only lines that hold prompt text are read (as parse_prompt reads them); a line whose own tags do not parse is
    skipped, like the refused line.
    """
    lines = _ZERO_WIDTH.sub("", text.removeprefix(_BOM)).replace("\r\n", "\n").replace("\r", "\n").split("\n")
    found: list[tuple[str, float]] = []
    for index in range(_first_param_line(lines)):
        if index + 1 == error.line:
            continue
        try:
            _, tags = _extract_tags(lines[index], index + 1)
        except AstriaSyntaxError:
            continue
        found += [(name, weight) for kind, name, weight in tags if kind == "lora"]
    return found
