"""A1111 attention syntax: parse `(x)`, `[x]`, `(x:1.3)` and BREAK into weighted pieces, and write them for ComfyUI.

Three consumers share this module:
- `parse_attention` gives the pieces and weights AUTOMATIC1111's `parse_prompt_attention` gives (same multiplication
  order, so the floats are identical), refusing only input A1111 cannot handle sensibly.
- `to_comfy` writes ComfyUI prompt text that ComfyUI's own parser reads back with the same weights.
- `a1111_chunks` and `a1111_emphasis` are A1111's chunking and "original" emphasis, for the encoder node.

Pure Python; `a1111_emphasis` works on torch tensors without importing torch itself.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

ROUND_MULTIPLIER = 1.1
# A1111 multiplies by the reciprocal instead of dividing by 1.1; the two differ in the last bit for some weights.
SQUARE_MULTIPLIER = 1 / 1.1
MAX_NESTING = 64
BREAK_TEXT = "BREAK"
BREAK_WEIGHT = -1.0

# One token of the attention grammar. The alternatives and their order follow A1111's tokenizer: a backslash
# before one of `()[]\` is that literal character, any other backslash is dropped, `:N)` closes a round bracket
# with an explicit weight, `:` on its own is text.
_TOKEN = re.compile(
    r"""
    \\(?P<escaped>[()\[\]\\])
    | (?P<backslash>\\)
    | (?P<open>[(\[])
    | :(?P<weight>[+-]?[.\d]+)\)
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+)
    | (?P<colon>:)
    """,
    re.VERBOSE,
)
_BREAK_WORD = re.compile(r"\bBREAK\b")


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


class _Pieces:
    """Pieces grouped in segments: pieces added with no bracket event between them always share one weight."""

    def __init__(self):
        self.texts: list[list[str]] = []
        self.weights: list[float] = []
        self.offsets: list[int] = []
        self.start_new = True

    def add(self, text: str, offset: int) -> None:
        """Append a text piece of weight 1.0 (before the brackets around it are applied)."""
        if self.start_new:
            self.texts.append([text])
            self.weights.append(1.0)
            self.offsets.append(offset)
            self.start_new = False
        else:
            self.texts[-1].append(text)

    def add_break(self, offset: int) -> None:
        """Append a BREAK marker; the brackets around it multiply its weight of -1 like any other piece."""
        self.texts.append([BREAK_TEXT])
        self.weights.append(BREAK_WEIGHT)
        self.offsets.append(offset)
        self.start_new = True

    def add_run(self, run: str, offset: int) -> None:
        """Append a run of plain text, cutting out whole-word BREAKs."""
        if BREAK_TEXT not in run:
            self.add(run, offset)
            return
        for index, part in enumerate(_split_breaks(run)):
            if index:
                self.add_break(offset)
            self.add(part, offset)

    def mark(self) -> int:
        """Where a bracket opened now starts: it covers every piece added from here on until it closes."""
        self.start_new = True
        return len(self.weights)

    def multiply_from(self, start: int, multiplier: float) -> None:
        """Multiply the weight of every segment from `start` on, as closing a bracket does in A1111."""
        self.start_new = True
        if start < len(self.weights):
            self.weights[start:] = [weight * multiplier for weight in self.weights[start:]]


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Split A1111 prompt text into (text, weight) pieces exactly as A1111's parse_prompt_attention does."""
    pieces = _Pieces()
    round_starts: list[int] = []
    square_starts: list[int] = []
    for match in _TOKEN.finditer(text):
        kind = match.lastgroup
        offset = match.start()
        if kind == "text":
            pieces.add_run(match.group(), offset)
        elif kind == "escaped":
            pieces.add(match.group(kind), offset)
        elif kind == "backslash":
            pieces.add("", offset)
        elif kind == "open":
            if len(round_starts) + len(square_starts) >= MAX_NESTING:
                raise AttentionSyntaxError(
                    text, offset, f"brackets nest deeper than {MAX_NESTING} levels",
                    r"close some brackets, or write \( and \[ for literal brackets",
                )
            starts = round_starts if match.group() == "(" else square_starts
            starts.append(pieces.mark())
        elif kind == "weight" and round_starts:
            pieces.multiply_from(round_starts.pop(), _explicit_weight(text, match))
        elif kind == "close" and match.group() == ")" and round_starts:
            pieces.multiply_from(round_starts.pop(), ROUND_MULTIPLIER)
        elif kind == "close" and match.group() == "]" and square_starts:
            pieces.multiply_from(square_starts.pop(), SQUARE_MULTIPLIER)
        else:
            # A colon, a stray `)` or `]`, or `:N)` with no `(` open: plain text, as in A1111.
            pieces.add_run(match.group(), offset)
    # Unclosed brackets apply to the end of the text, outermost first, round ones before square ones.
    for start in round_starts:
        pieces.multiply_from(start, ROUND_MULTIPLIER)
    for start in square_starts:
        pieces.multiply_from(start, SQUARE_MULTIPLIER)
    _check_finite(text, pieces)
    return _merge_equal_weights(pieces)


def _explicit_weight(text: str, match: re.Match) -> float:
    """The number in `(text:N)`; A1111 raises a bare ValueError on `1.2.3`, we say where and what to write."""
    written = match.group("weight")
    try:
        return float(written)
    except ValueError:
        raise AttentionSyntaxError(
            text, match.start("weight"), f"the weight {written!r} in '{match.group()}' is not a number",
            "write a weight like (text:1.2), or \\: for a literal colon",
        ) from None


def _check_finite(text: str, pieces: _Pieces) -> None:
    """Refuse a piece whose multiplied weight overflowed to infinity (or became NaN from inf x 0)."""
    for weight, offset in zip(pieces.weights, pieces.offsets):
        if not math.isfinite(weight):
            raise AttentionSyntaxError(
                text, offset, f"the text here gets the weight {weight} after multiplying its brackets' weights",
                "use smaller weights or fewer nested brackets",
            )


def _merge_equal_weights(pieces: _Pieces) -> list[tuple[str, float]]:
    """Join neighbouring pieces of equal weight, as A1111 does last; no pieces at all gives [("", 1.0)]."""
    merged: list[tuple[str, float]] = []
    run_texts: list[str] = []
    run_weight = None
    for texts, weight in zip(pieces.texts, pieces.weights):
        if run_texts and weight == run_weight:
            run_texts.extend(texts)
            continue
        if run_texts:
            merged.append(("".join(run_texts), run_weight))
        run_texts = list(texts)
        run_weight = weight
    if run_texts:
        merged.append(("".join(run_texts), run_weight))
    return merged or [("", 1.0)]


def is_chunk_break(text: str, weight: float) -> bool:
    """Whether a parsed piece starts a new 75-token chunk: A1111 honours only an unbracketed BREAK (weight -1)."""
    return text == BREAK_TEXT and weight == BREAK_WEIGHT


# ---------------------------------------------------------------------------------------------------------------
# ComfyUI prompt text

class ComfyText(NamedTuple):
    """ComfyUI prompt text and the warnings about what had to change to write it."""

    text: str
    warnings: list[str]


# ComfyUI turns `\)` and `\(` into these pairs before parsing and back afterwards, so a NUL written before \x01 or
# \x02 in the prompt would come out as a bracket.
_NUL_COLLISION = re.compile("\x00+(?=[\x01\x02])")
_COMFY_BRACKET = re.compile(r"([()])")


def _comfy_literal_text(text: str) -> str:
    """Text that ComfyUI reads back character for character: round brackets escaped, other characters as is."""
    return _COMFY_BRACKET.sub(r"\\\1", text)


def _comfy_weight(weight: float) -> str:
    """A weight as ComfyUI text: 12 significant digits, so 1.2100000000000002 reads 1.21 (within 1e-12)."""
    return "%.12g" % weight


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
    for text, weight in pieces:
        if is_chunk_break(text, weight):
            # ComfyUI's text has no chunk break; a space keeps the words on both sides apart.
            breaks += 1
            text, weight = " ", 1.0
        elif text == BREAK_TEXT and weight < 0:
            warnings.append(
                "BREAK inside brackets does not start a new chunk in A1111: it stays the word BREAK with a "
                "negative weight; move it out of the brackets to break the prompt there."
            )
        text = _strip_nul_collisions(text, warnings)
        if not text:
            continue  # no characters, no weights; `(:w)` would even read as literal text in ComfyUI
        literal = _comfy_literal_text(text)
        if weight == 1.0 and not literal.endswith("\\"):
            out.append(literal)
        else:
            # A trailing backslash before a following `(` would turn it into ComfyUI's `\(` escape; inside a group
            # the backslash is followed by `:` and stays literal, so weight-1 text ending in `\` is grouped too.
            out.append(f"({literal}:{_comfy_weight(weight)})")
    if breaks:
        warnings.append(
            f"BREAK ({breaks}x) has no equivalent in ComfyUI prompt text and was replaced by a space; "
            "Astria Encode honours it (in plain ComfyUI, encode the parts separately and use Conditioning Concat)."
        )
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
