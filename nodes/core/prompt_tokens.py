"""A1111 prompt text -> CLIP token chunks with weights, and A1111's or diffusers' LPW weighting of their encoding.

The node layer hands in one `Vocabulary` per CLIP text encoder (the host tokenizer's ids, special tokens and
embedding loader); this module does A1111's part: parse the attention syntax, put textual-inversion vectors where
their names are, cut 75-token chunks (attention.a1111_chunks), frame each as start + 75 + end with A1111's padding,
and after the host has encoded every chunk unweighted, apply the "original" emphasis per chunk and per encoder.

The `lpw_*` functions do the same for diffusers' long-prompt-weighting community pipelines, which Astria's
`use_lpw` runs (examples/community/lpw_stable_diffusion.py and lpw_stable_diffusion_xl.py, read at diffusers
commit 2843b3d37ad7c83b44cdcd098b9c064e1569457d): the same parser, but plain 75-token splits (no comma backtrack),
the positive and negative prompt padded to the same length, and
- SD1.x: BREAK is text, at most 3 chunks (225 tokens; the rest is cut), the mean restored over all chunks at once;
- SDXL: BREAK is the word "BREAK" at weight -1, no length limit, the last chunk not padded, each token of weight
  w != 1 moved to `e_last + (e - e_last) * w` (e_last: its chunk's last token, the end token; w rounded to
  float16), and the pooled output taken from the last chunk.
Pure: no ComfyUI; torch only through the tensors passed in.
"""
from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from . import attention, embeddings
from .attention import CHUNK_BREAK, Unsplit

FRAMED_LENGTH = attention.CHUNK_LENGTH + 2  # start token, 75 tokens, end token


class Vocabulary(NamedTuple):
    """One CLIP tokenizer, as A1111's chunking needs it."""

    tokenize: Callable[[str], list[int]]  # token ids of a text, without start and end tokens
    start: int
    end: int
    pad: int  # what follows the end token: the end token again for CLIP-L, 0 for OpenCLIP (CLIP-G, CLIP-H)
    comma: int | None  # the id of `,</w>`, where an overflowing chunk prefers to break
    vectors: Callable[[str], Sequence[Any] | None]  # an embedding file's vectors (one per token), None if unusable


class TokenChunk(NamedTuple):
    """One framed chunk: FRAMED_LENGTH tokens (ids, or embedding vectors) and a weight per token."""

    tokens: list
    weights: list[float]


def weighted_pieces(text: str, vocabulary: Vocabulary, index: embeddings.EmbeddingIndex) -> list:
    """The input of a1111_chunks: per parsed piece its (token, weight) pairs and Unsplit embeddings, or a BREAK."""
    pieces: list = []
    for piece_text, weight in attention.parse_attention(text):
        if attention.is_chunk_break(piece_text, weight):
            pieces.append(CHUNK_BREAK)
            continue
        pieces.append(_piece_items(piece_text, weight, vocabulary, index))
    return pieces


def _piece_items(piece_text: str, weight: float, vocabulary: Vocabulary, index: embeddings.EmbeddingIndex) -> list:
    """One parsed piece's (token, weight) pairs, and an Unsplit for each embedding this encoder can use."""
    items: list = []
    for part in embeddings.split_mentions(piece_text, index):
        vectors = vocabulary.vectors(part.filename) if isinstance(part, embeddings.Mention) else None
        if vectors:
            items.append(Unsplit(tuple(vectors), weight))
        else:  # plain text, or an embedding this encoder cannot use: its name stays words
            words = piece_text[part.start:part.end] if isinstance(part, embeddings.Mention) else part
            items.extend((token, weight) for token in vocabulary.tokenize(words))
    return items


def frame_chunk(chunk: attention.Chunk, vocabulary: Vocabulary) -> TokenChunk:
    """Start + the chunk's 75 tokens + end, every token after the first end token made the pad token (as A1111)."""
    tokens = [vocabulary.start, *chunk.tokens, vocabulary.end]
    weights = [1.0, *chunk.weights, 1.0]
    if vocabulary.pad != vocabulary.end:
        first_end = next(i for i, token in enumerate(tokens) if isinstance(token, int) and token == vocabulary.end)
        tokens[first_end + 1:] = [vocabulary.pad] * (len(tokens) - first_end - 1)
    return TokenChunk(tokens, weights)


def a1111_token_chunks(text: str, vocabulary: Vocabulary, index: embeddings.EmbeddingIndex) -> list[TokenChunk]:
    """A1111 prompt text as framed 77-token chunks with A1111's weights; raises AttentionSyntaxError."""
    comma = -1 if vocabulary.comma is None else vocabulary.comma  # no comma token: never backtrack
    chunks = attention.a1111_chunks(weighted_pieces(text, vocabulary, index), comma, vocabulary.end)
    return [frame_chunk(chunk, vocabulary) for chunk in chunks]


def a1111_weighted(z, encoders: Sequence[tuple[int, Sequence[TokenChunk]]]):
    """A1111's emphasis on one unweighted encoding of framed chunks, chunk by chunk and encoder by encoder.

    `z` is (batch, FRAMED_LENGTH x chunks, channels): the encoders' outputs side by side along channels, as the
    host concatenates CLIP-L and CLIP-G. `encoders` gives each encoder's channel width and chunks, in that order.
    A1111 rescales every chunk of every encoder to its own unweighted mean; so does this.
    """
    out = z.clone()
    channel = 0
    for width, chunks in encoders:
        if len(chunks) * FRAMED_LENGTH != z.shape[-2]:
            raise ValueError(
                f"the encoding has {z.shape[-2]} tokens but the text encoders' chunks give "
                f"{len(chunks) * FRAMED_LENGTH}: an embedding with a different number of vectors per text encoder "
                "moved a chunk break; use weighting comfy for this prompt"
            )
        for number, chunk in enumerate(chunks):
            if all(weight == 1.0 for weight in chunk.weights):
                continue  # the rescale of an unweighted chunk is exactly 1
            tokens = slice(number * FRAMED_LENGTH, (number + 1) * FRAMED_LENGTH)
            out[..., tokens, channel:channel + width] = attention.a1111_emphasis(
                z[..., tokens, channel:channel + width], chunk.weights
            )
        channel += width
    if channel != z.shape[-1]:
        raise ValueError(f"the encoding has {z.shape[-1]} channels, the text encoders {channel}")
    return out


def unweighted_text(text: str) -> str:
    """The prompt's words without attention syntax (brackets and weights dropped, BREAK a space)."""
    return "".join(" " if attention.is_chunk_break(piece, weight) else piece
                   for piece, weight in attention.parse_attention(text))


# ---------------------------------------------------------------------------------------------------------------
# diffusers' long-prompt-weighting pipelines (Astria's use_lpw)

LPW_MAX_CHUNKS = 3  # lpw_stable_diffusion.py's max_embeddings_multiples: SD1.x prompts are cut at 3 x 75 tokens


class LpwChunks(NamedTuple):
    """The positive and negative prompt as framed chunks, equally many; how long the last one is; what was cut."""

    positive: list[TokenChunk]
    negative: list[TokenChunk]
    last_length: int  # tokens of the last chunk that are kept: FRAMED_LENGTH, or fewer where SDXL does not pad it
    cut: tuple[int, int]  # tokens of the positive and negative prompt beyond the SD1.x limit, dropped


def lpw_tokens(text: str, vocabulary: Vocabulary, index: embeddings.EmbeddingIndex, breaks: bool) -> list:
    """(token, weight) for every token, as the LPW pipelines tokenize: piece by piece, embedding vectors in place.

    `breaks` reads BREAK as a piece of weight -1 (SDXL's parser: it is then encoded as the word, at that weight);
    without it BREAK is plain text (SD1.x's parser).
    """
    items: list = []
    for piece_text, weight in attention.parse_attention(text, breaks=breaks):
        for item in _piece_items(piece_text, weight, vocabulary, index):
            if isinstance(item, Unsplit):
                items.extend((vector, item.weight) for vector in item.tokens)
            else:
                items.append(item)
    return items


def _framed(items: Sequence, vocabulary: Vocabulary) -> TokenChunk:
    """Start + up to 75 (token, weight) items + end; weight 1.0 for the start and end tokens."""
    return TokenChunk([vocabulary.start, *(token for token, _ in items), vocabulary.end],
                      [1.0, *(weight for _, weight in items), 1.0])


def lpw_sd1_chunks(positive: str, negative: str, vocabulary: Vocabulary,
                   index: embeddings.EmbeddingIndex) -> LpwChunks:
    """lpw_stable_diffusion.py's chunks: both prompts cut at 225 tokens, padded with the pad token to equally many."""
    length = attention.CHUNK_LENGTH
    limit = length * LPW_MAX_CHUNKS
    texts = [lpw_tokens(text, vocabulary, index, breaks=False) for text in (positive, negative)]
    cut = tuple(max(0, len(items) - limit) for items in texts)
    texts = [items[:limit] for items in texts]
    count = max(1, (max(len(items) for items in texts) - 1) // length + 1)
    padded = [items + [(vocabulary.pad, 1.0)] * (count * length - len(items)) for items in texts]
    positive_chunks, negative_chunks = (
        [_framed(items[number * length:(number + 1) * length], vocabulary) for number in range(count)]
        for items in padded
    )
    return LpwChunks(positive_chunks, negative_chunks, FRAMED_LENGTH, cut)


def lpw_sdxl_chunks(positive: str, negative: str, vocabulary: Vocabulary,
                    index: embeddings.EmbeddingIndex) -> LpwChunks:
    """lpw_stable_diffusion_xl.py's chunks: the shorter prompt padded with end tokens, no limit, last chunk unpadded.

    For the host, which encodes 77 tokens at a time, the last chunk is padded with end tokens all the same;
    `last_length` says how many of its tokens count (CLIP's causal attention keeps them equal to the unpadded
    encoding). Both prompts empty, where diffusers fails, give one chunk of the start and end token.
    """
    length = attention.CHUNK_LENGTH
    texts = [lpw_tokens(text, vocabulary, index, breaks=True) for text in (positive, negative)]
    longest = max(len(items) for items in texts)
    padded = [items + [(vocabulary.end, 1.0)] * (longest - len(items)) for items in texts]
    count = max(1, -(-longest // length))
    rest = longest - (count - 1) * length
    chunks = []
    for items in padded:
        framed = [_framed(items[number * length:(number + 1) * length], vocabulary) for number in range(count)]
        last = framed[-1]
        framed[-1] = TokenChunk(last.tokens + [vocabulary.end] * (FRAMED_LENGTH - len(last.tokens)),
                                last.weights + [1.0] * (FRAMED_LENGTH - len(last.weights)))
        chunks.append(framed)
    return LpwChunks(chunks[0], chunks[1], rest + 2, (0, 0))


def lpw_sd1_weighted(z, chunks: Sequence[TokenChunk]):
    """lpw_stable_diffusion.py's weighting: z x per-token weights, rescaled to the unweighted mean of all chunks.

    `z` is (batch, FRAMED_LENGTH x chunks, channels), the unweighted encoding of `chunks`. The means are taken in
    float32 over all tokens and channels, as diffusers does; where the weighted mean is exactly 0 (diffusers would
    divide by zero) the weighted z is returned unscaled.
    """
    weights = z.new_tensor([weight for chunk in chunks for weight in chunk.weights])
    if weights.shape[0] != z.shape[-2]:
        raise ValueError(f"the encoding has {z.shape[-2]} tokens, the chunks {weights.shape[0]}")
    previous_mean = z.float().mean(dim=[-2, -1]).to(z.dtype)
    weighted = z * weights.unsqueeze(-1)
    current_mean = weighted.float().mean(dim=[-2, -1]).to(z.dtype)
    if bool((current_mean == 0).any()):
        return weighted
    return weighted * (previous_mean / current_mean).unsqueeze(-1).unsqueeze(-1)


def float16_weight(weight: float) -> float:
    """A weight rounded to float16, as lpw_stable_diffusion_xl.py stores weights; refuses what float16 cannot hold."""
    try:
        return struct.unpack("<e", struct.pack("<e", weight))[0]
    except OverflowError:
        raise ValueError(
            f"the weight {weight} is beyond float16's range (65504), to which diffusers' SDXL long-prompt-weighting "
            "rounds weights; use a smaller weight"
        ) from None


def lpw_sdxl_weighted(z, chunks: Sequence[TokenChunk], last_length: int):
    """lpw_stable_diffusion_xl.py's weighting: per chunk, every token of weight w != 1 becomes e_last + (e - e_last) * w.

    `z` is (batch, FRAMED_LENGTH x chunks, channels), the unweighted encoding of `chunks` (the last one padded);
    e_last is each chunk's last kept token (its end token). The last chunk is cut to `last_length` tokens, so the
    result has FRAMED_LENGTH x (chunks - 1) + last_length tokens, as diffusers' has.
    """
    if len(chunks) * FRAMED_LENGTH != z.shape[-2]:
        raise ValueError(f"the encoding has {z.shape[-2]} tokens, the chunks {len(chunks) * FRAMED_LENGTH}")
    total = FRAMED_LENGTH * (len(chunks) - 1) + last_length
    out = z[..., :total, :].clone()
    for number, chunk in enumerate(chunks):
        length = last_length if number == len(chunks) - 1 else FRAMED_LENGTH
        weights = [float16_weight(weight) for weight in chunk.weights[:length]]
        if all(weight == 1.0 for weight in weights):
            continue
        start = number * FRAMED_LENGTH
        part = z[..., start:start + length, :]
        last = part[..., length - 1:length, :]
        factors = z.new_tensor(weights).unsqueeze(-1)
        moved = last + (part - last) * factors
        keep = factors == 1.0
        out[..., start:start + length, :] = part.where(keep, moved)
    return out
