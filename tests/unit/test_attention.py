"""A1111 attention syntax: pieces and weights equal A1111's, ComfyUI text, chunking and emphasis."""
import json
import math
import random
import re
from pathlib import Path

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
# Golden data: AUTOMATIC1111's own parse_prompt_attention and tokenize_line, run outside this repository on the
# prompts and piece lists in tests/unit/data (see the "about" line of each file and data/README.md).

DATA = Path(__file__).parent / "data"
ATTENTION_GOLDEN = json.loads((DATA / "a1111_attention_golden.json").read_text(encoding="ascii"))["cases"]
CHUNKS_GOLDEN = json.loads((DATA / "a1111_chunks_golden.json").read_text(encoding="ascii"))["cases"]


def a1111_mismatch(case):
    """How parse_attention differs from A1111's recorded result for one golden case; None when it agrees.

    Agreeing means: A1111's pieces exactly, weights bit for bit (the sign of zero included: the same multiplications
    in the same order). Where A1111 raises (float('1.2.3')) ours refuses the weight; where brackets nest deeper
    than 64 or a weight is not finite, ours refuses with its own error (spec differences, A1111 goes on)."""
    text = case["text"]
    try:
        got = parse_attention(text)
    except AttentionSyntaxError as e:
        got = e
    if "error" in case:
        expected_error = "is not a number"
    elif case.get("nesting_over_64"):
        expected_error = "nest deeper"
    elif not all(math.isfinite(float(w)) for _, w in case["pieces"]):
        expected_error = "weight"
    else:
        expected = [(t, float(w)) for t, w in case["pieces"]]
        if isinstance(got, Exception):
            return f"{text!r}: raised {got}, A1111 gives {expected}"
        if [t for t, _ in got] != [t for t, _ in expected] or \
                [w.hex() for _, w in got] != [w.hex() for _, w in expected]:
            return f"{text!r}: got {got}, A1111 gives {expected}"
        return None
    if not isinstance(got, AttentionSyntaxError) or expected_error not in str(got):
        return f"{text!r}: expected an AttentionSyntaxError saying {expected_error!r}, got {got!r}"
    return None


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


def test_break_markers_are_only_unbracketed_breaks():
    pieces = parse_attention("a BREAK (b BREAK c)")
    assert pieces == [("a", 1.0), ("BREAK", -1.0), ("", 1.0), ("b", 1.1), ("BREAK", -1.1), ("c", 1.1)]
    assert [is_chunk_break(t, w) for t, w in pieces] == [False, True, False, False, False, False]
    assert [attention.is_bracketed_break(t, w) for t, w in pieces] == [False] * 4 + [True, False]


def test_golden_file_holds_every_input_set():
    # The sets the generator wrote (hand cases, then fixed-seed prompts shaped like this file's strategies).
    sizes = {name: len(cases) for name, cases in ATTENTION_GOLDEN.items()}
    assert set(sizes) == {"hand", "bracket_heavy", "dense", "nested", "soup", "breakish", "unicode"}
    assert sum(sizes.values()) >= 1900 and min(sizes.values()) >= 4
    every = [c for cases in ATTENTION_GOLDEN.values() for c in cases]
    # Each kind of outcome is present, so each branch of a1111_mismatch is exercised.
    assert sum("error" in c for c in every) >= 20
    assert sum(bool(c.get("nesting_over_64")) for c in every) >= 4
    assert sum(any(isinstance(w, str) for _, w in c.get("pieces", [])) for c in every) >= 5


@pytest.mark.parametrize("input_set", ["hand", "bracket_heavy", "dense", "nested", "soup", "breakish", "unicode"])
def test_matches_a1111_golden(input_set):
    mismatches = [m for m in map(a1111_mismatch, ATTENTION_GOLDEN[input_set]) if m]
    assert not mismatches, f"{len(mismatches)} of {len(ATTENTION_GOLDEN[input_set])} differ, e.g. " + \
        "; ".join(m[:300] for m in mismatches[:3])


def test_long_deeply_nested_golden_prompts_stay_within_the_limit():
    # Random walks hovering near the nesting limit: long stretches under 55-64 open brackets, crossing ones.
    nested = ATTENTION_GOLDEN["nested"]
    assert len(nested) == 4 and all(len(c["text"]) > 3000 and "pieces" in c for c in nested)
    assert not any(c.get("nesting_over_64") for c in nested)
    assert all(len(parse_attention(c["text"])) == len(c["pieces"]) > 100 for c in nested)


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


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=200), bracket_prompts, dense_prompts))
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
# Chunking (A1111's tokenize_line): hand cases here, A1111's own results in data/a1111_chunks_golden.json

COMMA, PAD = 267, 49407


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


def golden_chunk_pieces(case):
    """A golden case's pieces as a1111_chunks takes them; embedding vector i of e0 is the token ("e0", i)."""
    pieces = []
    for piece in case["pieces"]:
        if piece == "BREAK":
            pieces.append(CHUNK_BREAK)
            continue
        weight = piece["weight"]
        pieces.append([
            Unsplit(tuple((item, i) for i in range(case["embeddings"][item])), weight) if isinstance(item, str)
            else (item, weight)
            for item in piece["items"]
        ])
    return pieces


def golden_chunks(case, group):
    """A1111's chunks for one golden result: 75 tokens (embedding vectors where A1111 put their placeholder
    tokens) and 75 weights each."""
    vectors = iter([(name, i) for chunk in group["chunks"] for _, name in chunk["fixes"]
                    for i in range(case["embeddings"][name])])
    chunks = []
    for chunk in group["chunks"]:
        tokens = [next(vectors) if t == 0 else t for t in chunk["tokens"]] + [PAD] * chunk["padding"]
        weights = [w for w, run in chunk["multipliers"] for _ in range(run)]
        chunks.append((tokens, weights))
    assert next(vectors, None) is None
    return chunks


def test_chunks_golden_file_holds_every_backtrack():
    assert len(CHUNKS_GOLDEN) >= 200
    for case in CHUNKS_GOLDEN:
        assert sorted(bt for group in case["a1111"] for bt in group["backtracks"]) == [0, 5, 20, 75]
    assert sum(len(group["chunks"]) > 1 for case in CHUNKS_GOLDEN for group in case["a1111"]) >= 200
    assert sum(bool(group.get("fixes_left_behind")) for case in CHUNKS_GOLDEN for group in case["a1111"]) >= 5


def test_chunks_match_a1111_golden():
    mismatches = []
    for number, case in enumerate(CHUNKS_GOLDEN):
        pieces = golden_chunk_pieces(case)
        for group in case["a1111"]:
            expected = golden_chunks(case, group)
            for backtrack in group["backtracks"]:
                got = [(c.tokens, c.weights) for c in a1111_chunks(pieces, COMMA, PAD, comma_backtrack=backtrack)]
                if got != expected:
                    mismatches.append(f"case {number} ({case['set']}), backtrack {backtrack}")
                    continue
                # A1111's fixes say where each embedding's vectors go: where ours put them, except where A1111's
                # comma backtrack moved the placeholders and left the fixes at their old offsets (a deliberate
                # difference, see test_comma_backtrack_moves_an_embedding_whole_with_its_vectors).
                fixes_agree = all(
                    tokens[offset:offset + case["embeddings"][name]]
                    == [(name, i) for i in range(case["embeddings"][name])]
                    for (tokens, _), chunk in zip(got, group["chunks"]) for offset, name in chunk["fixes"]
                )
                if fixes_agree == bool(group.get("fixes_left_behind")):
                    mismatches.append(f"case {number} ({case['set']}), backtrack {backtrack}: embedding places")
    assert not mismatches, f"{len(mismatches)} differ from A1111: " + "; ".join(mismatches[:5])


def test_golden_embedding_left_behind_by_a1111_is_moved_whole_by_ours():
    # The hand case of test_comma_backtrack_moves_an_embedding_whole_with_its_vectors, as A1111 really chunks it.
    (case,) = [c for c in CHUNKS_GOLDEN if c["set"] == "hand"]
    group = next(g for g in case["a1111"] if 20 in g["backtracks"])
    assert group["fixes_left_behind"]
    first, second = group["chunks"]
    assert first["fixes"] == [[66, "e0"]] and first["tokens"][61:] == [] and second["fixes"] == []
    assert second["tokens"][5:8] == [0, 0, 0]
    got = a1111_chunks(golden_chunk_pieces(case), COMMA, PAD)
    assert got[1].tokens[5:8] == [("e0", 0), ("e0", 1), ("e0", 2)]


token_items = st.one_of(
    st.tuples(st.sampled_from([COMMA, COMMA, 5, 6, 7]), st.sampled_from([1.0, 1.1, 0.5])),
    st.builds(Unsplit, st.lists(st.just("v"), min_size=1, max_size=8).map(tuple), st.just(1.3)),
)
chunk_pieces = st.lists(
    st.one_of(st.just(CHUNK_BREAK), st.lists(token_items, max_size=60)), max_size=8
)


@settings(max_examples=150, deadline=None)
@given(chunk_pieces, st.sampled_from([20, 0, 5]))
def test_chunks_are_75_tokens_and_keep_every_token_in_order(pieces, backtrack):
    got = a1111_chunks(pieces, COMMA, PAD, comma_backtrack=backtrack)
    assert all(len(c.tokens) == len(c.weights) == 75 for c in got)
    given_tokens = [t for p in pieces if p is not CHUNK_BREAK for item in p
                    for t in (item.tokens if isinstance(item, Unsplit) else [item[0]])]
    assert [t for c in got for t in c.tokens if t != PAD] == given_tokens


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
