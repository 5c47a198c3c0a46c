"""A1111 attention syntax: pieces and weights equal A1111's, ComfyUI text, chunking and emphasis."""
import math
import random
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comfyui_astria.nodes.core import attention
from comfyui_astria.nodes.core.attention import (
    CHUNK_BREAK,
    AttentionSyntaxError,
    Unsplit,
    a1111_chunks,
    comfy_literal,
    is_chunk_break,
    parse_attention,
    to_comfy,
)

# ---------------------------------------------------------------------------------------------------------------
# TEST ORACLE (not product code): a plain re-statement of AUTOMATIC1111's `parse_prompt_attention`
# (modules/prompt_parser.py): the same tokenizer regex, the same multiply-a-range-on-close loop, the same BREAK
# split and the same final merge. Quadratic and unbounded, so it only ever sees small generated prompts.

_ORACLE_TOKEN = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:([+-]?[.\d]+)\)|\)|]|[^\\()\[\]:]+|:")
_ORACLE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)


def a1111_oracle(text):
    """A1111's algorithm, restated for comparison; raises ValueError where A1111 does (float('1.2.3'))."""
    res = []
    rounds, squares = [], []

    def multiply_range(start, multiplier):
        for p in range(start, len(res)):
            res[p][1] *= multiplier

    for m in _ORACLE_TOKEN.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            res.append([token[1:], 1.0])
        elif token == "(":
            rounds.append(len(res))
        elif token == "[":
            squares.append(len(res))
        elif weight is not None and rounds:
            multiply_range(rounds.pop(), float(weight))
        elif token == ")" and rounds:
            multiply_range(rounds.pop(), 1.1)
        elif token == "]" and squares:
            multiply_range(squares.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(_ORACLE_BREAK.split(token)):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])
    for start in rounds:
        multiply_range(start, 1.1)
    for start in squares:
        multiply_range(start, 1 / 1.1)
    if not res:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return [(t, w) for t, w in res]


def _max_open_brackets(text):
    """How many brackets are open at once at most, by the oracle's tokenizer (to know when ours must refuse)."""
    rounds = squares = deepest = 0
    for m in _ORACLE_TOKEN.finditer(text):
        token = m.group(0)
        if token == "(":
            rounds += 1
        elif token == "[":
            squares += 1
        elif (m.group(1) is not None or token == ")") and rounds:
            rounds -= 1
        elif token == "]" and squares:
            squares -= 1
        deepest = max(deepest, rounds + squares)
    return deepest


def assert_matches_a1111(text):
    """parse_attention(text) gives the oracle's pieces (weights bit for bit), or refuses where it should."""
    try:
        expected = a1111_oracle(text)
    except ValueError:
        with pytest.raises(AttentionSyntaxError, match="is not a number"):
            parse_attention(text)
        return
    if _max_open_brackets(text) > attention.MAX_NESTING:
        with pytest.raises(AttentionSyntaxError, match="nest deeper"):
            parse_attention(text)
        return
    if not all(math.isfinite(w) for _, w in expected):
        with pytest.raises(AttentionSyntaxError, match="weight"):
            parse_attention(text)
        return
    got = parse_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    # Bit for bit (the sign of zero included): the same multiplications in the same order.
    assert [w.hex() for _, w in got] == [float(w).hex() for _, w in expected]


# Fragments that exercise every branch of the grammar: brackets, escapes, weights good and bad, BREAK at word
# boundaries and not, Unicode whitespace and digits, ComfyUI's escape bytes.
FRAGMENTS = [
    "(", ")", "[", "]", "(", ")", "[", "]", "\\", "\\(", "\\)", "\\[", "\\]", "\\\\", ":", ":1.5)", ":0.5)", ":-1)",
    ":0)", ":+2)", ":1.2.3)", ":.)", ":1.)", ":\u0661.\u0665)", ":" + "9" * 320 + ")", "BREAK", " BREAK ", "BREAKx",
    "xBREAK", "_BREAK", "\u00e9BREAK", "  BREAK\n", "a", "b c", ", ", "\u00e9", "1", ".", "_", " ", "\t", "\u00a0",
    "\x1c", "\u2028", "\x00", "\x01", "\x02", "embedding:x", "a:b",
]
bracket_prompts = st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join)
# Mostly brackets, crossing and nesting, with weights that collide (0 and -0, 2 then 0.5): the merging paths.
DENSE = ["(", ")", "[", "]", "(", ")", "[", "]", "a", "b", " ", ":2)", ":0.5)", ":0)", ":-0)", ":-1)", "BREAK", " BREAK "]
dense_prompts = st.lists(st.sampled_from(DENSE), max_size=80).map("".join)
char_prompts = st.text(alphabet=st.sampled_from(list("()[]\\:.,1 aBREK\n")), max_size=60)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
                ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1),
            ],
        ),
    ],
)
def test_a1111_docstring_examples(text, expected):
    assert parse_attention(text) == expected
    assert a1111_oracle(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", [("", 1.0)]),
        ("((a:1.5):2)", [("a", 3.0)]),
        ("[a]", [("a", 1 / 1.1)]),
        ("[[a]", [("a", 1 / 1.1 / 1.1)]),
        ("a) b] c", [("a) b] c", 1.0)]),
        ("x:1.5) y", [("x:1.5) y", 1.0)]),
        ("(a [b) c]", [("a ", 1.1), ("b", 1.1 / 1.1), (" c", 1 / 1.1)]),
        ("\\\\(a)", [("\\", 1.0), ("a", 1.1)]),
        ("a\\b\\", [("ab", 1.0)]),
        ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("aBREAK b_BREAK", [("aBREAK b_BREAK", 1.0)]),
        ("a,BREAK,b", [("a,", 1.0), ("BREAK", -1.0), (",b", 1.0)]),
        ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
        ("(BREAK:0)", [("BREAK", 0.0)]),
    ],
)
def test_hand_cases(text, expected):
    got = parse_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], abs=1e-12)
    assert_matches_a1111(text)


def test_break_markers_are_only_unbracketed_breaks():
    pieces = parse_attention("a BREAK (b BREAK c)")
    assert pieces == [("a", 1.0), ("BREAK", -1.0), ("", 1.0), ("b", 1.1), ("BREAK", -1.1), ("c", 1.1)]
    assert [is_chunk_break(t, w) for t, w in pieces] == [False, True, False, False, False, False]
    assert [attention.is_bracketed_break(t, w) for t, w in pieces] == [False] * 4 + [True, False]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bracket_prompts)
def test_matches_a1111_on_bracket_heavy_prompts(text):
    assert_matches_a1111(text)


@settings(max_examples=600, deadline=None)
@given(dense_prompts)
def test_matches_a1111_on_dense_brackets(text):
    assert_matches_a1111(text)


@pytest.mark.parametrize("seed", range(4))
def test_matches_a1111_on_long_deeply_nested_prompts(seed):
    # A random walk that hovers near the nesting limit: long stretches under many open brackets, crossing ones.
    rng = random.Random(seed)
    fragments, rounds, squares = [], 0, 0
    for _ in range(4000):
        fragment = rng.choice(DENSE)
        if fragment in ("(", "[") and rounds + squares >= 60 or rounds + squares < 40 and rng.random() < 0.3:
            fragment = rng.choice(["(", "["]) if rounds + squares < 60 else "a"
        if fragment == "(":
            rounds += 1
        elif fragment == "[":
            squares += 1
        elif fragment.endswith(")") and rounds:
            rounds -= 1
        elif fragment == "]" and squares:
            squares -= 1
        fragments.append(fragment)
    text = "".join(fragments)
    assert 55 <= _max_open_brackets(text) <= 64
    assert_matches_a1111(text)


@settings(max_examples=400, deadline=None)
@given(char_prompts)
def test_matches_a1111_on_character_soup(text):
    assert_matches_a1111(text)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_matches_a1111_on_any_unicode(text):
    assert_matches_a1111(text)


def test_malformed_weight_is_refused_with_its_position():
    with pytest.raises(AttentionSyntaxError) as caught:
        parse_attention("a\nbb (c:1.2.3) d")
    err = caught.value
    assert isinstance(err, ValueError)
    assert (err.line, err.column, err.offset) == (2, 7, 8)
    assert str(err).startswith("line 2, column 7: the weight '1.2.3' in ':1.2.3)' is not a number;")


def test_malformed_weight_without_open_bracket_is_text():
    assert parse_attention("a:1.2.3) b") == [("a:1.2.3) b", 1.0)]


def test_nesting_64_is_accepted_and_65_refused_at_the_bracket():
    assert parse_attention("(" * 64 + "a") == [("a", pytest.approx(1.1**64, rel=1e-12))]
    with pytest.raises(AttentionSyntaxError, match="nest deeper than 64") as caught:
        parse_attention("x\n" + "[" * 30 + "(" * 35 + "a")
    assert (caught.value.line, caught.value.column) == (2, 65)


def test_nesting_counts_open_brackets_not_total_brackets():
    assert parse_attention("(a)" * 1000) == [("a" * 1000, 1.1)]


def test_overflowing_weight_is_refused_with_its_position():
    with pytest.raises(AttentionSyntaxError, match="weight inf") as caught:
        parse_attention("ok ((big:" + "9" * 200 + "):" + "9" * 200 + ")")
    assert caught.value.column == 6
    with pytest.raises(AttentionSyntaxError, match="weight nan"):
        parse_attention("((a:" + "9" * 400 + "):0)")


def test_overflowing_weight_on_nothing_is_harmless():
    assert parse_attention("a (:" + "9" * 400 + ") b") == [("a  b", 1.0)]


def test_one_megabyte_inputs_are_parsed_or_refused():
    with pytest.raises(AttentionSyntaxError, match="column 193"):
        parse_attention("(a " * 200000)
    # A1111's BREAK regex backtracks quadratically here; ours must finish.
    assert parse_attention(" " * 1_000_000 + "xBREAK") == [(" " * 1_000_000 + "xBREAK", 1.0)]
    assert parse_attention("a" + " " * 1_000_000 + "BREAK b")[1] == ("BREAK", -1.0)
    many = parse_attention("(" * 60 + "(a) b " * 150_000)
    assert len(many) == 2 * 150_000
    rng = random.Random(3)
    for _ in range(3):
        blob = rng.randbytes(1_000_000).decode("latin-1")
        try:
            parse_attention(blob)
            to_comfy(blob)
        except AttentionSyntaxError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=200), bracket_prompts))
def test_fuzz_raises_nothing_but_attention_syntax_errors(text):
    try:
        pieces = parse_attention(text)
        converted = to_comfy(text)
    except AttentionSyntaxError:
        return
    assert pieces and all(isinstance(t, str) and math.isfinite(w) for t, w in pieces)
    assert isinstance(converted.text, str)


# ---------------------------------------------------------------------------------------------------------------
# ComfyUI text (the real ComfyUI parser checks these in tests/host/test_attention_comfy.py)

@pytest.mark.parametrize(
    "text, comfy",
    [
        ("plain words", "plain words"),
        ("an (important) word", "an (important:1.1) word"),
        ("((a:1.5):2) [b]", "(a:3) (b:0.909090909091)"),
        ("\\(literal\\) \\[x\\]", "\\(literal\\) [x]"),
        ("a) stray", "a\\) stray"),
        ("\\\\(a)", "(\\:1)(a:1.1)"),
        ("(a\\\\)", "(a\\:1.1)"),
        ("(a:b:1.2)", "(a:b:1.2)"),
        ("", ""),
    ],
)
def test_to_comfy_text(text, comfy):
    assert to_comfy(text) == (comfy, [])


@pytest.mark.parametrize(
    "text",
    ["((((((a:1234.5678))))))", "(((((a:12345.6789)))))", "(a:123456789.123456789)", "[[[[(a:0.000123456789)]]]]"],
)
def test_to_comfy_large_weights_stay_within_1e_12(text):
    # 12 significant digits alone wrote 1988.2837875780008 as 1988.28378758 (2e-9 off): past the 1e-9 the
    # spec allows. The weight written must read back within 1e-12 of A1111's, absolute as well as relative.
    ((piece, weight),) = parse_attention(text)
    written = re.fullmatch(r"\((.*):([^:]*)\)", to_comfy(text).text)
    assert written.group(1) == piece
    assert abs(float(written.group(2)) - weight) <= 1e-12


def test_to_comfy_keeps_short_weights_short():
    assert to_comfy("(((a:1.2)))").text == "(a:1.452)"  # not 1.4520000000000002


def test_to_comfy_replaces_break_with_a_space_and_warns():
    converted = to_comfy("a BREAK (b)")
    assert converted.text == "a (b:1.1)"
    assert len(converted.warnings) == 1 and "BREAK" in converted.warnings[0]


def test_to_comfy_warns_about_bracketed_break():
    converted = to_comfy("(a BREAK b)")
    assert converted.text == "(a:1.1)(BREAK:-1.1)(b:1.1)"
    assert "does not start a new chunk" in converted.warnings[0]


def test_to_comfy_drops_only_nuls_that_collide_with_comfy_escapes():
    converted = to_comfy("a\x00\x00\x01 b\x00c (d\x00\x02)")
    assert converted.text == "a\x01 b\x00c (d\x02:1.1)"
    assert len(converted.warnings) == 1 and "NUL" in converted.warnings[0]


def test_comfy_literal_escapes_round_brackets_only():
    assert comfy_literal("(worst quality:2) [x] \\") == ("\\(worst quality:2\\) [x] \\", [])


def test_to_comfy_refuses_what_parse_attention_refuses():
    with pytest.raises(AttentionSyntaxError):
        to_comfy("(a:1.2.3)")


# ---------------------------------------------------------------------------------------------------------------
# TEST ORACLE (not product code): A1111's chunking loop (`tokenize_line` in modules/sd_hijack_clip.py), restated
# with its PromptChunk bookkeeping; embeddings are Unsplit items standing where A1111 finds an embedding.

COMMA, PAD = 267, 49407


class _OracleChunk:
    def __init__(self):
        self.tokens, self.multipliers = [], []


def a1111_chunk_oracle(pieces, comma_backtrack=20):
    chunks = []
    chunk = _OracleChunk()
    last_comma = -1

    def next_chunk():
        nonlocal chunk, last_comma
        to_add = 75 - len(chunk.tokens)
        if to_add > 0:
            chunk.tokens += [PAD] * to_add
            chunk.multipliers += [1.0] * to_add
        last_comma = -1
        chunks.append(chunk)
        chunk = _OracleChunk()

    for piece in pieces:
        if piece is CHUNK_BREAK:
            next_chunk()
            continue
        for item in piece:
            token = item.tokens[0] if isinstance(item, Unsplit) else item[0]
            if token == COMMA and not isinstance(item, Unsplit):
                last_comma = len(chunk.tokens)
            elif comma_backtrack != 0 and len(chunk.tokens) == 75 and last_comma != -1 \
                    and len(chunk.tokens) - last_comma <= comma_backtrack:
                reloc_tokens = chunk.tokens[last_comma + 1:]
                reloc_mults = chunk.multipliers[last_comma + 1:]
                chunk.tokens = chunk.tokens[:last_comma + 1]
                chunk.multipliers = chunk.multipliers[:last_comma + 1]
                next_chunk()
                chunk.tokens, chunk.multipliers = reloc_tokens, reloc_mults
            if len(chunk.tokens) == 75:
                next_chunk()
            if not isinstance(item, Unsplit):
                chunk.tokens.append(item[0])
                chunk.multipliers.append(item[1])
                continue
            if len(chunk.tokens) + len(item.tokens) > 75:
                next_chunk()
            chunk.tokens += list(item.tokens)
            chunk.multipliers += [item.weight] * len(item.tokens)
    if chunk.tokens or not chunks:
        next_chunk()
    return [(c.tokens, c.multipliers) for c in chunks]


def _words(n, start=1000, weight=1.0):
    return [(start + i, weight) for i in range(n)]


def test_short_prompt_is_one_padded_chunk():
    (chunk,) = a1111_chunks([_words(3, weight=1.1)], COMMA, PAD)
    assert chunk.tokens == [1000, 1001, 1002] + [PAD] * 72
    assert chunk.weights == [1.1] * 3 + [1.0] * 72


def test_empty_prompt_is_one_chunk_of_padding():
    assert a1111_chunks([], COMMA, PAD) == [([PAD] * 75, [1.0] * 75)]


def test_overflow_breaks_after_the_last_comma_within_20_tokens():
    piece = _words(60) + [(COMMA, 1.0)] + _words(20, start=2000)
    first, second = a1111_chunks([piece], COMMA, PAD)
    assert first.tokens == [t for t, _ in piece[:61]] + [PAD] * 14
    assert second.tokens[:20] == list(range(2000, 2020))


def test_overflow_with_a_comma_too_far_back_cuts_at_75():
    piece = _words(50) + [(COMMA, 1.0)] + _words(30, start=2000)
    first, second = a1111_chunks([piece], COMMA, PAD)
    assert first.tokens == [t for t, _ in piece[:75]]
    assert second.tokens[:6] == list(range(2024, 2030))


def test_break_starts_a_new_chunk_even_at_the_start():
    chunks = a1111_chunks([CHUNK_BREAK, _words(2), CHUNK_BREAK], COMMA, PAD)
    assert [c.tokens[:2] for c in chunks] == [[PAD, PAD], [1000, 1001]]


def test_embedding_vectors_stay_in_one_chunk():
    chunks = a1111_chunks([_words(70), [Unsplit(("v1", "v2", "v3", "v4", "v5", "v6"), 1.2)]], COMMA, PAD)
    assert chunks[0].tokens[70:] == [PAD] * 5
    assert chunks[1].tokens[:6] == ["v1", "v2", "v3", "v4", "v5", "v6"]
    assert chunks[1].weights[:6] == [1.2] * 6
    with pytest.raises(ValueError, match="76 vectors"):
        a1111_chunks([[Unsplit(tuple(range(76)), 1.0)]], COMMA, PAD)


def test_comma_backtrack_moves_an_embedding_whole_with_its_vectors():
    # A1111's tokenize_line moves the tokens after the comma but leaves the embedding's fix at its old offset, so
    # its vectors land in the first chunk's padding and the next chunk gets bare placeholder tokens. Ours moves the
    # vectors with their place (a deliberate difference: A1111's result is a bug, not a format).
    piece = _words(60) + [(COMMA, 1.0)] + _words(5, start=2000) + [Unsplit(("v1", "v2", "v3"), 0.8)] + _words(20)
    first, second = a1111_chunks([piece], COMMA, PAD)
    assert first.tokens == [t for t, _ in piece[:61]] + [PAD] * 14
    assert second.tokens[:8] == [2000, 2001, 2002, 2003, 2004, "v1", "v2", "v3"]
    assert second.weights[5:8] == [0.8] * 3


token_items = st.one_of(
    st.tuples(st.sampled_from([COMMA, COMMA, 5, 6, 7]), st.sampled_from([1.0, 1.1, 0.5])),
    st.builds(Unsplit, st.lists(st.just("v"), min_size=1, max_size=8).map(tuple), st.just(1.3)),
)
chunk_pieces = st.lists(
    st.one_of(st.just(CHUNK_BREAK), st.lists(token_items, max_size=60)), max_size=8
)


@settings(max_examples=150, deadline=None)
@given(chunk_pieces, st.sampled_from([20, 0, 5]))
def test_chunks_match_a1111(pieces, backtrack):
    got = a1111_chunks(pieces, COMMA, PAD, comma_backtrack=backtrack)
    assert [(c.tokens, c.weights) for c in got] == a1111_chunk_oracle(pieces, backtrack)
    assert all(len(c.tokens) == len(c.weights) == 75 for c in got)


# ---------------------------------------------------------------------------------------------------------------
# A1111's "original" emphasis (needs torch: the host venv has it, the system python does not)

def _torch():
    try:
        import torch
    except ImportError:
        pytest.skip("torch is not installed in this python; run with the ComfyUI host venv")
    return torch


def test_emphasis_is_weighting_then_mean_restored():
    torch = _torch()
    z = torch.randn(1, 77, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weights = [1.0] + [1.1] * 10 + [0.5] * 5 + [1.0] * 61
    out = attention.a1111_emphasis(z, weights)
    w = torch.tensor(weights, dtype=torch.float64)[None, :, None]
    expected = z * w * (z.mean() / (z * w).mean())
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.mean(), z.mean(), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out, z)


def test_emphasis_with_unit_weights_changes_nothing():
    torch = _torch()
    z = torch.randn(2, 77, 8, generator=torch.Generator().manual_seed(1))
    out = attention.a1111_emphasis(z, torch.ones(2, 77))
    torch.testing.assert_close(out, z)


def test_emphasis_with_zero_weighted_mean_is_not_divided_by_zero():
    torch = _torch()
    z = torch.ones(1, 4, 2)
    out = attention.a1111_emphasis(z, [0.0, 0.0, 0.0, 0.0])
    assert torch.equal(out, torch.zeros(1, 4, 2))
