"""Textual-inversion names in prompt text: bare names (`JuggernautNegative-neg`) found by the files that exist.

A1111 and Astria treat a word as an embedding when an embedding of that name is installed, with no prefix; ComfyUI
needs `embedding:NAME`. Given the host's list of embedding files, this module finds such names in prompt text
(bare, or already written `embedding:NAME`), rewrites them in ComfyUI's syntax, and warns about words that look
like an embedding name but have no file. Pure: the node layer passes in the file list.
"""
from __future__ import annotations

import bisect
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

EMBEDDING_PREFIX = "embedding:"
# A name is bounded by characters that cannot be part of one: a word character or `-` next to it means it is part
# of a longer word (`tiny_neg` is not found inside `tiny_neg-v2` or `xtiny_neg`).
_PREFIXED_WORD = re.compile(r"(?<![\w-])" + re.escape(EMBEDDING_PREFIX) + r"([^\s,()\[\]]+)", re.IGNORECASE)
_WORD = re.compile(r"[\w.-]+")


class Mention(NamedTuple):
    """An embedding named in a text: the file to load, and where it is written (prefix included, if any)."""

    filename: str
    start: int
    end: int


def fold_case(char: str) -> str:
    """One character's case-insensitive form: lower case through upper case, so `ſ`/`s`, `ı`/`i`, `ς`/`σ` and
    `K`/`k` fold alike, as the regex engine's IGNORECASE matches them; a character whose case maps to several
    (`ß` -> `SS`) is kept as it is."""
    lower = char.lower()
    if len(lower) != 1:
        lower = char
    upper = lower.upper()
    if len(upper) == 1 and len(upper.lower()) == 1:
        return upper.lower()
    return lower


def _fold_text(text: str) -> str:
    """The text folded one character at a time (same length, same positions)."""
    if text.isascii():
        return text.lower()
    return "".join(map(fold_case, text))


def _is_name_character(char: str) -> bool:
    """A character that may continue a word (`\\w` or `-`): a name cannot begin or end next to one."""
    return char == "-" or char == "_" or char.isalnum()


_FOLDED_PREFIX = _fold_text(EMBEDDING_PREFIX)


@dataclass(frozen=True)
class EmbeddingIndex:
    """The installed embeddings by lower-case name (a file's stem), and their case-folded names by first character
    with the lengths they come in, so finding them in text costs a few dictionary look-ups per word edge of the
    text (one per name length starting with that character), however many files there are."""

    files: dict[str, str]
    by_folded_name: dict[str, str]
    lengths_by_first: dict[str, tuple[int, ...]]  # longest first

    def find(self, text: str, count_step: Callable[[], None] | None = None) -> list[Mention]:
        """Every installed embedding named in text, bare or as `embedding:NAME`, in order, left to right, each the
        longest name that ends at a name edge; `count_step` (for tests) is called once per name look-up."""
        if not self.files:
            return []
        folded = _fold_text(text)
        mentions: list[Mention] = []
        position = 0
        while position < len(text):
            if position > 0 and _is_name_character(text[position - 1]):
                position += 1
                continue
            found = None
            if folded.startswith(_FOLDED_PREFIX, position):
                found = self._longest_name(text, folded, position + len(_FOLDED_PREFIX), count_step)
            if found is None:
                found = self._longest_name(text, folded, position, count_step)
            if found is None:
                position += 1
                continue
            filename, end = found
            mentions.append(Mention(filename, position, end))
            position = end
        return mentions

    def _longest_name(self, text: str, folded: str, start: int, count_step) -> tuple[str, int] | None:
        """(file, end) of the longest name written at `start` that ends at a name edge, or None."""
        if start >= len(folded):
            return None
        for length in self.lengths_by_first.get(folded[start], ()):
            end = start + length
            if end > len(folded) or (end < len(text) and _is_name_character(text[end])):
                continue
            if count_step is not None:
                count_step()
            filename = self.by_folded_name.get(folded[start:end])
            if filename is not None:
                # the file of the written name's lower case where there is one (`ſ.pt` for `ſ`, `S.pt` for `S`)
                return self.files.get(text[start:end].lower(), filename), end
        return None

    def without(self, filenames: Iterable[str]) -> EmbeddingIndex:
        """The same index minus some files (ones the text encoder cannot use), so they stay text."""
        dropped = set(filenames)
        return embedding_index(name for name in self.files.values() if name not in dropped)


def embedding_name(filename: str) -> str:
    """The name a prompt uses for an embedding file: its stem (`sub/EasyNegative.safetensors` -> `EasyNegative`)."""
    return os.path.splitext(os.path.basename(filename.replace("\\", "/")))[0]


def embedding_index(filenames: Iterable[str]) -> EmbeddingIndex:
    """Index the host's embedding files (relative paths); the first file of a name wins, in sorted order.

    Names are matched case-insensitively, as A1111 does (its CLIP tokenizer lower-cases the prompt before it looks
    for embedding names). A name with whitespace cannot be written bare, so it is left out.
    """
    files: dict[str, str] = {}
    for filename in sorted(filenames):
        name = embedding_name(filename)
        if name and not any(char.isspace() for char in name):
            files.setdefault(name.lower(), filename)
    by_folded_name: dict[str, str] = {}
    lengths: dict[str, set[int]] = {}
    for name, filename in files.items():
        folded = _fold_text(name)
        by_folded_name.setdefault(folded, filename)
        lengths.setdefault(folded[0], set()).add(len(folded))
    return EmbeddingIndex(files, by_folded_name,
                          {first: tuple(sorted(found, reverse=True)) for first, found in lengths.items()})


def split_mentions(text: str, index: EmbeddingIndex) -> list[str | Mention]:
    """The text cut into plain runs (str) and embedding mentions, in order; empty runs are left out."""
    parts: list[str | Mention] = []
    position = 0
    for mention in index.find(text):
        if mention.start > position:
            parts.append(text[position:mention.start])
        parts.append(mention)
        position = mention.end
    if position < len(text):
        parts.append(text[position:])
    return parts


def comfy_reference(filename: str) -> str:
    """How `embedding:` names the file in ComfyUI text: the relative path, or the bare file name if it has spaces.

    ComfyUI ends an embedding name at the first whitespace and also searches sub-folders, so a path with spaces
    is written by its file name alone.
    """
    if any(char.isspace() for char in filename):
        return os.path.basename(filename.replace("\\", "/"))
    return filename


def with_embedding_prefix(text: str, index: EmbeddingIndex) -> str:
    """Text with every installed embedding written as ComfyUI's `embedding:FILE`, spaced so ComfyUI finds it.

    ComfyUI recognises `embedding:` only at the start of a piece or after a space or newline, and reads the name
    up to the next whitespace, so a space is added on either side where needed (CLIP's tokens ignore spaces).
    """
    out: list[str] = []
    position = 0
    for mention in index.find(text):
        before = text[position:mention.start]
        out.append(before)
        if mention.start > 0 and not text[mention.start - 1].isspace():
            out.append(" ")
        out.append(EMBEDDING_PREFIX + comfy_reference(mention.filename))
        if mention.end < len(text) and not text[mention.end].isspace():
            out.append(" ")
        position = mention.end
    out.append(text[position:])
    return "".join(out)


def looks_like_embedding_name(word: str) -> bool:
    """Whether a word is shaped like the common negative embeddings' names rather than like an English word.

    EasyNegative, JuggernautNegative-neg, negative_hand-neg, ng_deepnegative_v1_75t, FastNegativeV2: "neg" plus
    CamelCase, a digit, an underscore or a `-neg` ending, which `negative` or `non-negotiable` do not have.
    """
    lower = word.lower()
    if "neg" not in lower:
        return False
    camel_case = any(char.isupper() for char in word[1:]) and any(char.islower() for char in word)
    return camel_case or "_" in word or lower.endswith("-neg") or any(char.isdigit() for char in word)


def missing_embedding_warnings(text: str, index: EmbeddingIndex) -> list[str]:
    """Warnings for `embedding:NAME` with no such file, and bare words shaped like an embedding name with none."""
    mention_spans = [(mention.start, mention.end) for mention in index.find(text)]
    spans = list(mention_spans)
    warnings: list[str] = []
    for match in _PREFIXED_WORD.finditer(text):
        if not _inside(mention_spans, match.start()):
            warnings.append(
                f"'{match.group(0)}': no embedding file named {match.group(1)!r} in ComfyUI's embeddings folder; "
                "it is encoded as text. Put the file in models/embeddings or remove the word."
            )
            spans.append((match.start(), match.end()))
    spans.sort()
    for match in _WORD.finditer(text):
        word = match.group(0).strip(".-")
        if looks_like_embedding_name(word) and not _inside(spans, match.start()):
            warnings.append(
                f"'{word}' looks like a textual-inversion embedding, but no file of that name is in ComfyUI's "
                "embeddings folder; it is encoded as text. Put the file in models/embeddings to use it."
            )
    return list(dict.fromkeys(warnings))


def _inside(spans: list[tuple[int, int]], position: int) -> bool:
    """Whether position falls in one of the sorted, non-overlapping (start, end) spans."""
    at = bisect.bisect_right(spans, (position, math.inf)) - 1
    return at >= 0 and spans[at][0] <= position < spans[at][1]
