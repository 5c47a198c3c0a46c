"""A1111 token chunks for the encoder: pieces with embeddings, framing and padding, emphasis per chunk and encoder."""
import re

import pytest

from comfyui_astria.nodes.core import prompt_tokens
from comfyui_astria.nodes.core.attention import CHUNK_BREAK, Unsplit
from comfyui_astria.nodes.core.embeddings import embedding_index
from comfyui_astria.nodes.core.prompt_tokens import (
    FRAMED_LENGTH,
    Vocabulary,
    a1111_token_chunks,
    a1111_weighted,
    unweighted_text,
    weighted_pieces,
)

START, END, COMMA = 49406, 49407, 267
WORDS = {",": COMMA, "a": 320, "b": 321, "c": 322}
INDEX = embedding_index(["tiny_neg.safetensors"])
VECTORS = ("v1", "v2")  # stand-ins for an embedding's vectors: chunking never looks inside them


def vocabulary(pad=END):
    """A CLIP-like vocabulary: one token per word or punctuation mark, ids from WORDS (else 1000 + length)."""
    def tokenize(text):
        return [WORDS.get(word, 1000 + len(word)) for word in re.findall(r"[\w-]+|[^\w\s]", text)]
    return Vocabulary(tokenize=tokenize, start=START, end=END, pad=pad, comma=COMMA,
                      vectors=lambda filename: VECTORS if filename == "tiny_neg.safetensors" else None)


def test_pieces_carry_weights_embeddings_and_breaks():
    pieces = weighted_pieces("a (b tiny_neg:1.5), BREAK c", vocabulary(), INDEX)
    assert pieces == [[(320, 1.0)], [(321, 1.5), Unsplit(VECTORS, 1.5)], [(COMMA, 1.0)], CHUNK_BREAK, [(322, 1.0)]]


def test_an_embedding_the_encoder_cannot_use_stays_words():
    index = embedding_index(["tiny_neg.safetensors", "other_neg.pt"])
    assert weighted_pieces("other_neg", vocabulary(), index) == [[(1000 + len("other_neg"), 1.0)]]


def test_a_chunk_is_framed_and_padded_as_a1111_pads_clip_l_and_open_clip():
    chunks = a1111_token_chunks("a b", vocabulary(), INDEX)
    assert chunks[0].tokens == [START, 320, 321, END] + [END] * 73
    assert chunks[0].weights == [1.0] * FRAMED_LENGTH
    open_clip = a1111_token_chunks("a b", vocabulary(pad=0), INDEX)
    assert open_clip[0].tokens == [START, 320, 321, END] + [0] * 73  # pad after the first end token


def test_a_full_chunk_has_its_end_token_last():
    chunk = a1111_token_chunks("a " * 75, vocabulary(pad=0), INDEX)
    assert len(chunk) == 1 and chunk[0].tokens == [START] + [320] * 75 + [END]


def test_an_embedding_is_placed_whole_with_its_weight():
    chunks = a1111_token_chunks("a " * 74 + "[tiny_neg]", vocabulary(pad=0), INDEX)
    assert len(chunks) == 2  # 74 + 2 vectors overflow: the embedding moves to the next chunk whole
    assert chunks[1].tokens[:4] == [START, "v1", "v2", END]
    assert chunks[1].weights[:4] == [1.0, 1 / 1.1, 1 / 1.1, 1.0]


def test_break_and_an_empty_prompt():
    assert len(a1111_token_chunks("a BREAK b", vocabulary(), INDEX)) == 2
    assert a1111_token_chunks("", vocabulary(), INDEX)[0].tokens == [START] + [END] * 76


def test_unweighted_text_drops_the_syntax():
    assert unweighted_text("a (b:1.2) [c] BREAK d \\(e\\)") == "a b c d (e)"


def test_emphasis_is_applied_per_chunk_and_per_encoder_channels():
    torch = pytest.importorskip("torch", reason="a1111_weighted works on tensors; run with the ComfyUI host venv")
    generator = torch.Generator().manual_seed(0)
    z = torch.rand(1, 2 * FRAMED_LENGTH, 5, generator=generator) + 0.5
    weighted = prompt_tokens.TokenChunk([0] * FRAMED_LENGTH, [1.0, 2.0] + [1.0] * 75)
    plain = prompt_tokens.TokenChunk([0] * FRAMED_LENGTH, [1.0] * FRAMED_LENGTH)
    other = prompt_tokens.TokenChunk([0] * FRAMED_LENGTH, [1.0, 1.0, 0.5] + [1.0] * 74)
    out = a1111_weighted(z, [(2, [weighted, plain]), (3, [plain, other])])

    def formula(part, weights):
        scaled = part * torch.tensor(weights)[:, None]
        return scaled * (part.mean() / scaled.mean())

    assert torch.allclose(out[0, :FRAMED_LENGTH, :2], formula(z[0, :FRAMED_LENGTH, :2], weighted.weights))
    assert torch.equal(out[0, FRAMED_LENGTH:, :2], z[0, FRAMED_LENGTH:, :2])
    assert torch.equal(out[0, :FRAMED_LENGTH, 2:], z[0, :FRAMED_LENGTH, 2:])
    assert torch.allclose(out[0, FRAMED_LENGTH:, 2:], formula(z[0, FRAMED_LENGTH:, 2:], other.weights))
    with pytest.raises(ValueError, match="tokens"):
        a1111_weighted(z, [(5, [plain])])
    with pytest.raises(ValueError, match="channels"):
        a1111_weighted(z, [(4, [plain, plain])])
