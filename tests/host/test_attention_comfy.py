"""to_comfy against ComfyUI's own prompt parser: every character gets the weight A1111 gives it.

Run with the ComfyUI host venv (torch, transformers):
    ~/.cache/comfyui-astria/host-0.3.75/venv/bin/python -m pytest -q --import-mode=importlib -p no:cacheprovider \
        tests/host/test_attention_comfy.py
"""
import math
import os
import re
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from comfyui_astria.nodes.core.attention import (
    AttentionSyntaxError,
    comfy_literal,
    is_chunk_break,
    parse_attention,
    to_comfy,
)
from comfyui_astria.tests.support import paths

DEFAULT_COMFYUI = Path.home() / ".cache" / "comfyui-astria" / "host-0.3.75" / "ComfyUI"


@pytest.fixture(scope="module")
def sd1_clip():
    """ComfyUI's comfy.sd1_clip, imported from COMFYUI_PATH (default: the cached 0.3.75 host tree)."""
    root = Path(os.environ.get("COMFYUI_PATH", DEFAULT_COMFYUI))
    if not (root / "comfy" / "sd1_clip.py").is_file():
        pytest.skip(f"no ComfyUI tree at {root}; set COMFYUI_PATH or run the host setup")
    pytest.importorskip("torch", reason="ComfyUI needs torch: run with the ComfyUI host venv's python")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.cli_args

    comfy.cli_args.args.cpu = paths.HOST_ON_CPU  # before comfy.model_management is imported
    import comfy.sd1_clip

    return comfy.sd1_clip


def comfy_char_weights(sd1_clip, comfy_text):
    """Each character ComfyUI reads from prompt text, with its weight, exactly as SDTokenizer does it."""
    chars, weights = [], []
    for segment, weight in sd1_clip.token_weights(sd1_clip.escape_important(comfy_text), 1.0):
        segment = sd1_clip.unescape_important(segment)
        chars.append(segment)
        weights.extend([weight] * len(segment))
    return "".join(chars), weights


_NUL_COLLISION = re.compile("\x00+(?=[\x01\x02])")


def a1111_char_weights(text):
    """Each character of parse_attention's pieces with its weight; a chunk BREAK reads as a space of weight 1."""
    chars, weights = [], []
    for piece, weight in parse_attention(text):
        if is_chunk_break(piece, weight):
            piece, weight = " ", 1.0
        piece = _NUL_COLLISION.sub("", piece)
        chars.append(piece)
        weights.extend([weight] * len(piece))
    return "".join(chars), weights


def assert_same_weights(sd1_clip, text):
    """ComfyUI reads to_comfy(text) with A1111's weights, character for character (or both refuse)."""
    try:
        expected_chars, expected_weights = a1111_char_weights(text)
    except AttentionSyntaxError:
        with pytest.raises(AttentionSyntaxError):
            to_comfy(text)
        return
    converted = to_comfy(text)
    chars, weights = comfy_char_weights(sd1_clip, converted.text)
    assert chars == expected_chars
    assert len(weights) == len(expected_weights)
    for got, expected in zip(weights, expected_weights):
        # Within the spec's 1e-9 absolute as well: large weights must not lose digits in the text.
        assert math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-12), (converted.text, got, expected)
        assert abs(got - expected) <= 1e-9, (converted.text, got, expected)


FRAGMENTS = [
    "(", ")", "[", "]", "(", ")", "[", "]", "\\", "\\(", "\\)", "\\[", "\\]", "\\\\", ":", ":1.5)", ":0.5)", ":-1)",
    ":0)", ":-0)", ":1.)", ":2)", "BREAK", " BREAK ", "a", "b c", ", ", "\u00e9", "1", ".", " ", "\n", "\x00", "\x01",
    "\x02", "a:b", "inf", "nan", ":inf)", "1e3",
]
bracket_prompts = st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join)


@pytest.mark.parametrize(
    "text",
    [
        "masterpiece, best quality, highres",
        "(worst quality, low quality, normal quality:2) JuggernautNegative-neg",
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        "((a:1.5):2) [[b]] (c",
        "\\\\(a) b\\\\ [c] d\\\\",
        "stray ) and ] and \\( \\) \\[ \\]",
        "x:1.5) (y:0.5:2) (z:inf) (:3)",
        "a BREAK b (c BREAK d)",
        "nul\x00\x01 and\x00\x00\x02 (kept\x00)",
        "((((((big:1234.5678)))))) (huge:123456789.123456789) ((((((((((((((((tiny:0.000001))))))))))))))))",
    ],
)
def test_hand_written_prompts(sd1_clip, text):
    assert_same_weights(sd1_clip, text)


@settings(max_examples=1500, deadline=None)
@given(bracket_prompts)
def test_generated_bracket_prompts(sd1_clip, text):
    assert_same_weights(sd1_clip, text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=120))
def test_generated_unicode_prompts(sd1_clip, text):
    assert_same_weights(sd1_clip, text)


@settings(max_examples=300, deadline=None)
@given(st.one_of(bracket_prompts, st.text(max_size=80)))
def test_comfy_literal_reads_back_verbatim(sd1_clip, text):
    converted = comfy_literal(text)
    chars, weights = comfy_char_weights(sd1_clip, converted.text)
    assert chars == _NUL_COLLISION.sub("", text)
    assert set(weights) <= {1.0}


@pytest.fixture(scope="module")
def clip_l_tokenizer(sd1_clip):
    """ComfyUI's SD1 (CLIP-L) tokenizer, loaded from the vocabulary files in its tree."""
    return sd1_clip.SD1Tokenizer()


@pytest.mark.parametrize(
    "text",
    [
        "masterpiece, best quality, highres",
        "(worst quality, low quality, normal quality:2) JuggernautNegative-neg",
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        "[soft light] (red:1.2) (blue) hair, \\(parenthesised\\) words",
    ],
)
def test_comfy_tokens_carry_a1111_weights(clip_l_tokenizer, text):
    # A1111 tokenizes each piece on its own and gives its tokens the piece's weight; ComfyUI tokenizes each
    # weighted segment of to_comfy's text on its own: the (token, weight) sequences must be the same.
    tokenizer = clip_l_tokenizer.clip_l.tokenizer
    expected = [
        (token, weight)
        for piece, weight in parse_attention(text)
        for token in tokenizer(piece, add_special_tokens=False)["input_ids"]
    ]
    (batch,) = clip_l_tokenizer.tokenize_with_weights(to_comfy(text).text)["l"]
    start, end = batch[0][0], 49407
    got = [(token, weight) for token, weight in batch if token not in (start, end)]
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-9)
