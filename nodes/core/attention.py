"""A1111 attention syntax: parse `(x)`, `[x]`, `(x:1.3)` and BREAK into weighted pieces, and write them for ComfyUI.

Three consumers share this module:
- `parse_attention` gives the pieces and weights AUTOMATIC1111's `parse_prompt_attention` gives (same multiplication
  order, so the floats are identical), refusing only input A1111 cannot handle sensibly.
- `to_comfy` writes ComfyUI prompt text that ComfyUI's own parser reads back with the same weights.
- `a1111_chunks` and `a1111_emphasis` are A1111's chunking and "original" emphasis, for the encoder node.

Pure Python; `a1111_emphasis` works on torch tensors without importing torch itself.
"""
from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from .user_errors import shown_as_pack

ROUND_MULTIPLIER = 1.1
# A1111 multiplies by the reciprocal instead of dividing by 1.1; the two differ in the last bit for some weights.
SQUARE_MULTIPLIER = 1 / 1.1
MAX_NESTING = 64
BREAK_TEXT = "BREAK"
BREAK_WEIGHT = -1.0

# The grammar's special tokens, in A1111's order of preference: a backslash before one of `()[]\` is that literal
# character (any other backslash is dropped), an open bracket, `:N)` closing a round bracket with an explicit
# weight, a close bracket, a lone colon. Everything between them is plain text. `split` with this capturing
# pattern gives text and tokens alternately, much faster than a match per token.
_DELIMITER = re.compile(r"(\\[()\[\]\\]?|[(\[]|:[+-]?[.\d]+\)|[)\]]|:)")
_BREAK_WORD = re.compile(r"\bBREAK\b")
# Escapes, round brackets and the `:N)` that A1111 1.6 and ComfyUI also read with spaces around N (`(dog: 1.2)`):
# the tokens `spaced_weights` follows.
_SPACED_SHOWN = 40  # characters of a group shown before its spaced weight
_ROUND_TOKEN = re.compile(r"\\[()\[\]\\]?|\(|:\s*[+-]?[.\d]+\s*\)|\)")


@shown_as_pack
class AttentionSyntaxError(ValueError):
    """A prompt's attention brackets cannot be read; says where (line, column, offset) and how to fix it."""

    def __init__(self, text: str, offset: int, problem: str, fix: str):
        self.offset = offset
        self.line = text.count("\n", 0, offset) + 1
        self.column = offset - (text.rfind("\n", 0, offset) + 1) + 1
        self.problem = problem
        self.fix = fix
        super().__init__(f"line {self.line}, column {self.column}: {problem}; {fix}")


def _split_breaks(run: str) -> list[str]:
    """Split a text run at whole-word BREAK with the whitespace around it, as A1111's `re_break` split does."""
    parts = []
    part_start = 0
    for match in _BREAK_WORD.finditer(run):
        start, end = match.start(), match.end()
        # A1111's pattern is `\s*\bBREAK\b\s*`; scanning the whitespace by hand keeps this linear where the
        # regex backtracks quadratically over long runs of spaces.
        while start > part_start and run[start - 1].isspace():
            start -= 1
        while end < len(run) and run[end].isspace():
            end += 1
        parts.append(run[part_start:start])
        part_start = end
    parts.append(run[part_start:])
    return parts


class _Block:
    """The distinct weights of pieces that share every future multiplication (the same brackets still open)."""

    __slots__ = ("final", "forward", "index", "remap", "values")

    def __init__(self):
        self.values: list[float] = []
        self.index: dict | None = {}
        self.forward: _Block | None = None  # set when merged into a bigger block
        self.remap: list[int] = []  # slot here -> slot in `forward`
        self.final: list[float] | None = None

    def slot(self, weight: float) -> int:
        """The slot holding `weight`, added if new."""
        if self.index is None:
            self.index = {_value_key(value): slot for slot, value in enumerate(self.values)}
        key = _value_key(weight)
        slot = self.index.get(key)
        if slot is None:
            slot = len(self.values)
            self.values.append(weight)
            self.index[key] = slot
        return slot

    def multiply(self, multiplier: float) -> None:
        """Multiply every weight here, as closing a bracket around these pieces does."""
        self.values = [value * multiplier for value in self.values]
        self.index = None

    def merge_into(self, bigger: _Block) -> None:
        """Hand every weight to `bigger`, which from now on stands for this block too."""
        self.remap = [bigger.slot(value) for value in self.values]
        self.forward = bigger
        self.values = []
        self.index = None


def _value_key(weight: float):
    """Dictionary key telling equal weights apart only by sign of zero (0.0 == -0.0, but A1111 keeps the sign)."""
    return weight if weight else repr(weight)


def _final_values(block: _Block) -> list[float]:
    """The final weights of a block's slots, following merges (iteratively, each block resolved once)."""
    chain = []
    while block.final is None and block.forward is not None:
        chain.append(block)
        block = block.forward
    resolved = block.final if block.final is not None else block.values
    for merged in reversed(chain):
        merged.final = [resolved[slot] for slot in merged.remap]
        resolved = merged.final
    return resolved


class _Pieces:
    """A1111's list of weighted pieces and its bracket stacks, kept linear in time.

    A1111 multiplies the weight of every piece since a bracket opened whenever it closes: quadratic, and slow
    even at a nesting depth of 64. Here consecutive pieces with no bracket event between them form one segment,
    and when a bracket closes, the entries since it opened (segments, or blocks of earlier ones) are collapsed
    into one `_Block` of their distinct weights: those pieces now have the same brackets still open around them,
    so they get the same multiplications from here on and each distinct weight is multiplied once. Multiplying
    in A1111's order keeps the floats identical to A1111's.
    """

    def __init__(self, text: str):
        self.text = text
        self.entries: list = []  # per entry: a float (one segment's weight) or a _Block
        self.entry_segment: list[int] = []  # the segment of a float entry, -1 for a block
        self.texts: list[str] = []  # every piece's text, in order
        # Per segment: its first piece in `texts`, its offset in the prompt, and where its weight is: while
        # `segment_block` is None, `segment_where` is the index of its own float entry; once collapsed, the slot in
        # that block. Flat lists of numbers keep the garbage collector out of the way on megabyte prompts.
        self.segment_first: list[int] = []
        self.segment_offset: list[int] = []
        self.segment_where: list[int] = []
        self.segment_block: list[_Block | None] = []
        self.round_starts: list[int] = []  # entry index where each open bracket starts
        self.square_starts: list[int] = []
        self.start_new = True

    def _new_segment(self, text: str, weight: float, offset: int) -> None:
        self.entry_segment.append(len(self.segment_where))
        self.segment_where.append(len(self.entries))
        self.segment_block.append(None)
        self.segment_first.append(len(self.texts))
        self.segment_offset.append(offset)
        self.texts.append(text)
        self.entries.append(weight)

    def add(self, text: str, offset: int) -> None:
        """Append a text piece of weight 1.0 (before the brackets around it are applied)."""
        if self.start_new:
            self._new_segment(text, 1.0, offset)
            self.start_new = False
        else:
            self.texts.append(text)

    def add_run(self, run: str, offset: int, breaks: bool = True) -> None:
        """Append a run of plain text, cutting out whole-word BREAKs (weight -1, multiplied like any piece)."""
        if not breaks or BREAK_TEXT not in run:
            self.add(run, offset)
            return
        for index, part in enumerate(_split_breaks(run)):
            if index:
                self._new_segment(BREAK_TEXT, BREAK_WEIGHT, offset)
                self.start_new = True
            self.add(part, offset)

    def open(self, bracket: str, offset: int) -> None:
        """Open a round or square bracket, refusing nesting deeper than MAX_NESTING."""
        if len(self.round_starts) + len(self.square_starts) >= MAX_NESTING:
            raise AttentionSyntaxError(
                self.text, offset, f"brackets nest deeper than {MAX_NESTING} levels",
                r"close some brackets, or write \( and \[ for literal brackets",
            )
        (self.round_starts if bracket == "(" else self.square_starts).append(len(self.entries))
        self.start_new = True

    def close_round(self, multiplier: float) -> None:
        """Close the innermost open round bracket: multiply the pieces inside it."""
        self._close(self.round_starts.pop(), multiplier, self.square_starts)

    def close_square(self) -> None:
        """Close the innermost open square bracket: divide the pieces inside it by 1.1."""
        self._close(self.square_starts.pop(), SQUARE_MULTIPLIER, self.round_starts)

    def _close(self, start: int, multiplier: float, other_starts: list[int]) -> None:
        self.start_new = True
        entries = self.entries
        if len(entries) == start + 1 and (not other_starts or other_starts[-1] <= start) \
                and entries[start].__class__ is float:
            entries[start] *= multiplier  # the common `(word)`: nothing to collapse
            return
        # Brackets of the other kind opened inside this one and still open split its entries into stretches
        # with different brackets still around them; each stretch collapses on its own.
        inside = len(other_starts)
        while inside and other_starts[inside - 1] > start:
            inside -= 1
        if inside == len(other_starts):
            self._collapse_and_multiply(start, len(self.entries), multiplier)
            return
        bounds = [start, *other_starts[inside:], len(self.entries)]
        new_lengths = [
            self._collapse_and_multiply(bounds[i], bounds[i + 1], multiplier) for i in range(len(bounds) - 2, -1, -1)
        ][::-1]
        position = start
        for i in range(inside, len(other_starts)):
            position += new_lengths[i - inside]
            other_starts[i] = position
        for index in range(start, len(self.entries)):
            if self.entry_segment[index] >= 0:
                self.segment_where[self.entry_segment[index]] = index

    def _collapse_and_multiply(self, low: int, high: int, multiplier: float) -> int:
        """Multiply entries low..high-1, collapsed into one block when there are several; returns how many remain."""
        entries = self.entries
        if high - low == 1:
            entry = entries[low]
            if isinstance(entry, _Block):
                entry.multiply(multiplier)
            else:
                entries[low] = entry * multiplier
            return 1
        if high == low:
            return 0
        block = None
        for entry in entries[low:high]:
            if isinstance(entry, _Block) and (block is None or len(entry.values) > len(block.values)):
                block = entry
        if block is None:
            block = _Block()
        slot = block.slot
        segment_where, segment_block, entry_segment = self.segment_where, self.segment_block, self.entry_segment
        for index in range(low, high):
            entry = entries[index]
            if entry.__class__ is float:
                segment = entry_segment[index]
                segment_where[segment] = slot(entry)
                segment_block[segment] = block
            elif entry is not block:
                entry.merge_into(block)
        entries[low:high] = [block]
        self.entry_segment[low:high] = [-1]
        block.multiply(multiplier)
        return 1

    def close_unclosed(self) -> None:
        """Apply brackets left open, to the end of the text: A1111 applies round ones first, outermost first."""
        bounds = sorted({0, len(self.entries), *self.round_starts, *self.square_starts})
        for low, high in itertools.pairwise(bounds):
            rounds = sum(1 for start in self.round_starts if start <= low)
            squares = sum(1 for start in self.square_starts if start <= low)
            if rounds or squares:
                self._apply_unclosed(low, high, [ROUND_MULTIPLIER] * rounds + [SQUARE_MULTIPLIER] * squares)

    def _apply_unclosed(self, low: int, high: int, multipliers: list[float]) -> None:
        done: dict = {}  # entries in one stretch share the sequence: each distinct weight is computed once
        for index in range(low, high):
            entry = self.entries[index]
            if isinstance(entry, _Block):
                for multiplier in multipliers:
                    entry.multiply(multiplier)
                continue
            key = _value_key(entry)
            result = done.get(key)
            if result is None:
                result = entry
                for multiplier in multipliers:
                    result *= multiplier
                done[key] = result
            self.entries[index] = result

    def weighted(self) -> list[tuple[str, float]]:
        """The pieces with their final weights, neighbours of equal weight joined as A1111 does last."""
        merged: list[tuple[str, float]] = []
        run_first = 0
        run_weight = None
        for first, offset, where, block in zip(
            self.segment_first, self.segment_offset, self.segment_where, self.segment_block
        ):
            weight = self.entries[where] if block is None else _final_values(block)[where]
            if not math.isfinite(weight):
                raise AttentionSyntaxError(
                    self.text, offset, f"the text here gets the weight {weight} after multiplying its brackets' "
                    "weights", "use smaller weights or fewer nested brackets",
                )
            if weight == run_weight and first:
                continue
            if first:
                merged.append(("".join(self.texts[run_first:first]), run_weight))
            run_first = first
            run_weight = weight
        if self.texts:
            merged.append(("".join(self.texts[run_first:]), run_weight))
        return merged or [("", 1.0)]


def parse_attention(text: str, breaks: bool = True) -> list[tuple[str, float]]:
    """Split A1111 prompt text into (text, weight) pieces exactly as A1111's parse_prompt_attention does.

    `breaks=False` keeps BREAK as plain text, as diffusers' SD1.x long-prompt-weighting parser (otherwise the same
    grammar) does.
    """
    pieces = _Pieces(text)
    parts = _DELIMITER.split(text)
    offset = 0
    for index in range(0, len(parts), 2):
        run = parts[index]
        if run:
            pieces.add_run(run, offset, breaks)
            offset += len(run)
        if index + 1 == len(parts):
            break
        token = parts[index + 1]
        first = token[0]
        if first == "\\":
            pieces.add(token[1:], offset)  # an escaped character, or "" for a backslash before anything else
        elif first == "(" or first == "[":
            pieces.open(first, offset)
        elif first == ":" and len(token) > 1 and pieces.round_starts:
            pieces.close_round(_explicit_weight(text, token, offset))
        elif first == ")" and pieces.round_starts:
            pieces.close_round(ROUND_MULTIPLIER)
        elif first == "]" and pieces.square_starts:
            pieces.close_square()
        else:
            # A colon, a stray `)` or `]`, or `:N)` with no `(` open: plain text, as in A1111.
            pieces.add(token, offset)
        offset += len(token)
    pieces.close_unclosed()
    return pieces.weighted()


def _explicit_weight(text: str, token: str, offset: int) -> float:
    """The number in `(text:N)`; A1111 raises a bare ValueError on `1.2.3`, we say where and what to write."""
    written = token[1:-1]
    try:
        return float(written)
    except ValueError:
        raise AttentionSyntaxError(
            text, offset + 1, f"the weight {written!r} in '{token}' is not a number",
            "write a weight like (text:1.2), or \\( and \\) for literal brackets",
        ) from None


class SpacedWeight(NamedTuple):
    """`(dog: 1.2)`: a weight with a space before or after it, which our parser (and Astria's) reads as text."""

    offset: int
    written: str  # from the round bracket to the closing one, as written (a long group: its start ... its end)
    meant: str  # the same without the spaces, which is read as a weight


def spaced_weights(text: str, limit: int | None = None) -> list[SpacedWeight]:
    """Round groups whose weight has spaces around it: text at 1.1 here, as in pre-1.6 A1111 and diffusers' LPW.

    Current A1111 (`:\\s*([+-]?[.\\d]+)\\s*\\)`) and ComfyUI read them as weights; this parser keeps the older
    rule, which Astria's weighted prompts (diffusers' long-prompt-weighting pipelines) follow. At most `limit`.
    """
    found = []
    opened: list[int] = []
    for match in _ROUND_TOKEN.finditer(text):
        token = match.group()
        if token == "(":
            opened.append(match.start())
        elif token[0] == "\\" or not opened:
            continue
        else:
            start = opened.pop()
            if token[0] == ":" and token != re.sub(r"\s", "", token):
                # A long group is shown by its start and its end: a copy of every nested group would be quadratic.
                before = text[start:match.start()]
                if len(before) > _SPACED_SHOWN:
                    before = text[start:start + _SPACED_SHOWN // 2] + "..." + \
                        text[match.start() - _SPACED_SHOWN // 2:match.start()]
                found.append(SpacedWeight(start, before + token, before + re.sub(r"\s", "", token)))
                if len(found) == limit:
                    break
    return found


def is_chunk_break(text: str, weight: float) -> bool:
    """Whether a parsed piece starts a new 75-token chunk: A1111 honours only an unbracketed BREAK (weight -1)."""
    return text == BREAK_TEXT and weight == BREAK_WEIGHT


BRACKETED_BREAK_WARNING = (
    "BREAK inside brackets does not start a new chunk in A1111: it stays the word BREAK with a negative "
    "weight; move it out of the brackets to break the prompt there."
)


def is_bracketed_break(text: str, weight: float) -> bool:
    """Whether a parsed piece is a BREAK that brackets kept from breaking the chunk (encoded as the word)."""
    return text == BREAK_TEXT and weight < 0 and weight != BREAK_WEIGHT


# ---------------------------------------------------------------------------------------------------------------
# ComfyUI prompt text

class ComfyText(NamedTuple):
    """ComfyUI prompt text and the warnings about what had to change to write it."""

    text: str
    warnings: list[str]


# ComfyUI turns `\)` and `\(` into these pairs before parsing and back afterwards, so a NUL written before \x01 or
# \x02 in the prompt would come out as a bracket.
_NUL_COLLISION = re.compile("\x00+(?=[\x01\x02])")


def _comfy_literal_text(text: str) -> str:
    """Text that ComfyUI reads back character for character: round brackets escaped, other characters as is."""
    return text.replace("(", "\\(").replace(")", "\\)")


def _comfy_weight(weight: float) -> str:
    """A weight as ComfyUI text, read back within 1e-12: 1.2100000000000002 as 1.21, 1988.2837875780008 in full."""
    # 12 significant digits drop the float noise of multiplying by 1.1, but are too few for large weights.
    short = f"{weight:.12g}"
    return short if abs(float(short) - weight) <= 1e-12 else repr(weight)


def _strip_nul_collisions(text: str, warnings: list[str]) -> str:
    """Drop NULs that ComfyUI would read as part of its bracket escapes, with a warning."""
    cleaned = _NUL_COLLISION.sub("", text)
    if cleaned != text:
        warnings.append(
            "NUL characters before \\x01 or \\x02 were removed: ComfyUI would have read them as brackets."
        )
    return cleaned


def pieces_to_comfy(pieces: Sequence[tuple[str, float]]) -> ComfyText:
    """Write (text, weight) pieces as ComfyUI prompt text whose ComfyUI token weights are the pieces' weights."""
    warnings: list[str] = []
    out: list[str] = []
    breaks = 0
    bracketed_break = False
    written_weights: dict[float, str] = {}
    for text, weight in pieces:
        if is_chunk_break(text, weight):
            # ComfyUI's text has no chunk break; a space keeps the words on both sides apart.
            breaks += 1
            text, weight = " ", 1.0
        elif is_bracketed_break(text, weight):
            bracketed_break = True
        if "\x00" in text:
            text = _strip_nul_collisions(text, warnings)
        if not text:
            continue  # no characters, no weights; `(:w)` would even read as literal text in ComfyUI
        if "(" in text or ")" in text:
            text = _comfy_literal_text(text)
        if weight == 1.0 and not text.endswith("\\"):
            out.append(text)
            continue
        # A trailing backslash before a following `(` would turn it into ComfyUI's `\(` escape; inside a group
        # the backslash is followed by `:` and stays literal, so weight-1 text ending in `\` is grouped too.
        written = written_weights.get(weight)
        if written is None:
            written = written_weights[weight] = _comfy_weight(weight)
        out.append(f"({text}:{written})")
    if breaks:
        warnings.append(
            f"BREAK ({breaks}x) has no equivalent in ComfyUI prompt text and was replaced by a space; "
            "Astria Encode honours it (in plain ComfyUI, encode the parts separately and use Conditioning Concat)."
        )
    if bracketed_break:
        warnings.append(BRACKETED_BREAK_WARNING)
    return ComfyText("".join(out), list(dict.fromkeys(warnings)))


def to_comfy(text: str) -> ComfyText:
    """Rewrite A1111 prompt text as ComfyUI prompt text with the same weights; raises AttentionSyntaxError."""
    return pieces_to_comfy(parse_attention(text))


def comfy_literal(text: str) -> ComfyText:
    """ComfyUI prompt text that reads `text` verbatim at weight 1.0 (brackets and all), for unweighted prompts."""
    warnings: list[str] = []
    return ComfyText(_comfy_literal_text(_strip_nul_collisions(text, warnings)), warnings)


# ---------------------------------------------------------------------------------------------------------------
# A1111 chunking and emphasis, for the encoder

CHUNK_LENGTH = 75
# A1111's default `comma_padding_backtrack`: an overflowing chunk breaks after a comma among its last 20 tokens.
COMMA_BACKTRACK = 20


class ChunkBreak:
    """The marker for a BREAK piece in `a1111_chunks`' input; use the `CHUNK_BREAK` instance."""

    def __repr__(self) -> str:
        return "CHUNK_BREAK"


CHUNK_BREAK = ChunkBreak()


@dataclass(frozen=True)
class Unsplit:
    """Tokens that stay together in one chunk, all with one weight: a textual-inversion embedding's vectors."""

    tokens: tuple
    weight: float


class Chunk(NamedTuple):
    """One chunk of exactly CHUNK_LENGTH tokens and their weights, without start and end tokens."""

    tokens: list
    weights: list[float]


def a1111_chunks(
    pieces: Sequence[Sequence[tuple[Any, float] | Unsplit] | ChunkBreak],
    comma_token: int,
    pad_token: Any,
    comma_backtrack: int = COMMA_BACKTRACK,
) -> list[Chunk]:
    """Cut weighted tokens into 75-token chunks as A1111's tokenize_line does (comma backtrack, BREAK, padding)."""
    chunks: list[Chunk] = []
    tokens: list = []
    weights: list[float] = []
    last_comma = -1

    def finish_chunk() -> None:
        nonlocal tokens, weights, last_comma
        padding = CHUNK_LENGTH - len(tokens)
        chunks.append(Chunk(tokens + [pad_token] * padding, weights + [1.0] * padding))
        tokens, weights, last_comma = [], [], -1

    def make_room() -> None:
        # A full chunk moves the words after its last comma (if within `comma_backtrack` tokens) to the next one.
        nonlocal tokens, weights
        if comma_backtrack and len(tokens) == CHUNK_LENGTH and last_comma != -1 \
                and len(tokens) - last_comma <= comma_backtrack:
            cut = last_comma + 1
            moved_tokens, moved_weights = tokens[cut:], weights[cut:]
            tokens, weights = tokens[:cut], weights[:cut]
            finish_chunk()
            tokens, weights = moved_tokens, moved_weights
        if len(tokens) == CHUNK_LENGTH:
            finish_chunk()

    for piece in pieces:
        if isinstance(piece, ChunkBreak):
            finish_chunk()
            continue
        for item in piece:
            if isinstance(item, Unsplit):
                if len(item.tokens) > CHUNK_LENGTH:
                    raise ValueError(
                        f"an embedding of {len(item.tokens)} vectors cannot fit in one {CHUNK_LENGTH}-token chunk; "
                        "use a smaller embedding"
                    )
                make_room()
                if len(tokens) + len(item.tokens) > CHUNK_LENGTH:
                    finish_chunk()
                tokens.extend(item.tokens)
                weights.extend([item.weight] * len(item.tokens))
                continue
            token, weight = item
            if isinstance(token, int) and token == comma_token:
                # A comma records its place; on a full chunk A1111 then starts a new chunk without backtracking.
                last_comma = len(tokens)
                if len(tokens) == CHUNK_LENGTH:
                    finish_chunk()
            else:
                make_room()
            tokens.append(token)
            weights.append(weight)
    if tokens or not chunks:
        finish_chunk()
    return chunks


def a1111_emphasis(z, weights):
    """A1111's "original" emphasis: z x per-token weights, rescaled so the mean is the unweighted z's mean.

    `z` is a tensor (..., tokens, channels) of encoder outputs; `weights` a tensor or nested list (..., tokens).
    The mean is taken over the whole tensor, as A1111 does for a batch of one chunk. Where the weighted mean is
    exactly 0 (A1111 would divide by zero), the weighted z is returned unscaled.
    """
    if hasattr(weights, "to"):
        weights = weights.to(device=z.device, dtype=z.dtype)
    else:
        weights = z.new_tensor(weights)
    original_mean = z.mean()
    weighted = z * weights.unsqueeze(-1).expand(z.shape)
    new_mean = weighted.mean()
    if new_mean.item() == 0.0:
        return weighted
    return weighted * (original_mean / new_mean)
