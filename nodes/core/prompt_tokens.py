"""A1111 prompt text -> CLIP token chunks with weights, and A1111's emphasis applied to their encoding.

The node layer hands in one `Vocabulary` per CLIP text encoder (the host tokenizer's ids, special tokens and
embedding loader); this module does A1111's part: parse the attention syntax, put textual-inversion vectors where
their names are, cut 75-token chunks (attention.a1111_chunks), frame each as start + 75 + end with A1111's padding,
and after the host has encoded every chunk unweighted, apply the "original" emphasis per chunk and per encoder.
Pure: no ComfyUI; torch only through the tensors passed in.
"""
from __future__ import annotations

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
        items: list = []
        for part in embeddings.split_mentions(piece_text, index):
            vectors = vocabulary.vectors(part.filename) if isinstance(part, embeddings.Mention) else None
            if vectors:
                items.append(Unsplit(tuple(vectors), weight))
            else:  # plain text, or an embedding this encoder cannot use: its name stays words
                words = piece_text[part.start:part.end] if isinstance(part, embeddings.Mention) else part
                items.extend((token, weight) for token in vocabulary.tokenize(words))
        pieces.append(items)
    return pieces


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
