"""Bare textual-inversion names: found only where a file exists, written for ComfyUI, warned about when missing."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from comfyui_astria.nodes.core.embeddings import (
    Mention,
    embedding_index,
    embedding_name,
    looks_like_embedding_name,
    missing_embedding_warnings,
    split_mentions,
    with_embedding_prefix,
)

FILES = ["tiny_neg.safetensors", "sub/JuggernautNegative-neg.pt", "bad-hands.pt", "bad-hands-5.safetensors",
         "my folder/spaced_neg.bin", "two words.safetensors"]
INDEX = embedding_index(FILES)


def found(text, index=INDEX):
    return [(m.filename, text[m.start:m.end]) for m in index.find(text)]


def test_names_are_file_stems_matched_case_insensitively():
    assert embedding_name("sub\\dir/EasyNegative.v2.safetensors") == "EasyNegative.v2"
    assert found("juggernautnegative-neg, TINY_NEG") == [
        ("sub/JuggernautNegative-neg.pt", "juggernautnegative-neg"), ("tiny_neg.safetensors", "TINY_NEG")]
    assert "two words" not in INDEX.files  # cannot be written bare


def test_a_name_is_a_whole_word_and_the_longest_name_wins():
    assert found("xtiny_neg tiny_negx tiny_neg-v2 tiny_neg_2") == []
    assert found("(tiny_neg:1.2), [tiny_neg].tiny_neg,tiny_neg") == [("tiny_neg.safetensors", "tiny_neg")] * 4
    assert found("bad-hands-5 bad-hands") == [("bad-hands-5.safetensors", "bad-hands-5"), ("bad-hands.pt", "bad-hands")]


def test_the_comfy_prefix_is_part_of_the_mention():
    assert found("a embedding:tiny_neg b") == [("tiny_neg.safetensors", "embedding:tiny_neg")]


def test_first_file_of_a_name_in_sorted_order_wins_and_files_can_be_left_out():
    index = embedding_index(["z/tiny_neg.pt", "a/tiny_neg.safetensors"])
    assert found("tiny_neg", index) == [("a/tiny_neg.safetensors", "tiny_neg")]
    assert found("tiny_neg bad-hands", INDEX.without(["tiny_neg.safetensors"])) == [("bad-hands.pt", "bad-hands")]
    assert found("tiny_neg", embedding_index([])) == []


def test_split_mentions_keeps_every_character_in_order():
    parts = split_mentions("a tiny_neg, b", INDEX)
    assert parts == ["a ", Mention("tiny_neg.safetensors", 2, 10), ", b"]
    assert split_mentions("tiny_neg", INDEX) == [Mention("tiny_neg.safetensors", 0, 8)]
    assert split_mentions("", INDEX) == []


@pytest.mark.parametrize("text, expected", [
    ("a tiny_neg", "a embedding:tiny_neg.safetensors"),
    ("tiny_neg b", "embedding:tiny_neg.safetensors b"),
    ("(tiny_neg:1.2)", "( embedding:tiny_neg.safetensors :1.2)"),
    ("x,tiny_neg,y", "x, embedding:tiny_neg.safetensors ,y"),
    ("a\nembedding:TINY_NEG", "a\nembedding:tiny_neg.safetensors"),
    ("spaced_neg", "embedding:spaced_neg.bin"),  # a folder with a space: ComfyUI finds the file by its name
    ("no names here", "no names here"),
])
def test_with_embedding_prefix_writes_what_comfyui_reads_as_an_embedding(text, expected):
    assert with_embedding_prefix(text, INDEX) == expected


@pytest.mark.parametrize("word, expected", [
    ("EasyNegative", True), ("JuggernautNegative-neg", True), ("negative_hand-neg", True),
    ("ng_deepnegative_v1_75t", True), ("FastNegativeV2", True),
    ("negative", False), ("Negative", False), ("NEGATIVE", False), ("non-negotiable", False), ("cat", False),
])
def test_looks_like_embedding_name(word, expected):
    assert looks_like_embedding_name(word) is expected


def test_missing_embeddings_are_warned_about_and_installed_ones_are_not():
    warnings = missing_embedding_warnings(
        "EasyNegative, tiny_neg, JuggernautNegative-neg, embedding:nothere, embedding:tiny_neg, negative", INDEX)
    assert len(warnings) == 2
    assert warnings[0].startswith("'embedding:nothere': no embedding file named 'nothere'")
    assert warnings[1].startswith("'EasyNegative' looks like a textual-inversion embedding")
    assert missing_embedding_warnings("EasyNegative EasyNegative", INDEX) == missing_embedding_warnings(
        "EasyNegative", INDEX)  # once per word
    assert missing_embedding_warnings("EasyNegative", embedding_index(["EasyNegative.pt"])) == []


# ---- the matching rules, pinned before the index became linear (each held by the regex alternation on main) -----
RULES = embedding_index(["neg.pt", "neg.v2.pt", "bad-hands.pt", "bad-hands-5.pt", "neg(1).pt", ".hidden.pt",
                         "NégatifV2.pt", "a/Style.pt", "b/style.pt", "hands.pt"])


@pytest.mark.parametrize("text, expected", [
    ("neg.v2 neg.v3 neg.", [("neg.v2.pt", "neg.v2"), ("neg.pt", "neg"), ("neg.pt", "neg")]),  # longest whole name
    ("bad-hands-55 bad-hands-", []),  # neither the longer nor the shorter name ends at a name edge
    ("bad-hands", [("bad-hands.pt", "bad-hands")]),  # `hands` inside it is not at a name edge
    ("x-hands _hands hands_ hands2 2hands", []),
    ("neg(1) neg(1)x (neg(1))", [("neg(1).pt", "neg(1)"), ("neg.pt", "neg"), ("neg(1).pt", "neg(1)")]),
    ("x.hidden .hidden", [(".hidden.pt", ".hidden")]),
    ("NÉGATIFV2, négatifv2", [("NégatifV2.pt", "NÉGATIFV2"), ("NégatifV2.pt", "négatifv2")]),
    ("STYLE style", [("a/Style.pt", "STYLE"), ("a/Style.pt", "style")]),
    ("EMBEDDING:neg Embedding:NEG.V2", [("neg.pt", "EMBEDDING:neg"), ("neg.v2.pt", "Embedding:NEG.V2")]),
    ("xembedding:neg", [("neg.pt", "neg")]),  # the prefix is inside a word: the bare name after `:` is found
    ("embedding:nothere neg", [("neg.pt", "neg")]),
    ("embedding:neg.v2x", [("neg.pt", "embedding:neg")]),
    ("embedding:neg-x", []),
    ("neg,neg;neg\nneg\tneg", [("neg.pt", "neg")] * 5),
    ("", []),
])
def test_matching_rules(text, expected):
    assert found(text, RULES) == expected


def test_mention_positions_cover_the_prefix():
    assert RULES.find("a Embedding:NEG b") == [Mention("neg.pt", 2, 15)]
    assert RULES.find("(neg.v2:1.1)") == [Mention("neg.v2.pt", 1, 7)]


def test_matching_work_is_linear_in_the_text_whatever_the_number_of_files():
    text = "a photo of a cat, neg_42, (style:1.1), neg_4999 neg_49999, embedding:neg_7 bad-hands, masterpiece " * 10
    for count in (50, 5000, 50000):
        index = embedding_index([f"neg_{i}.pt" for i in range(count)] + ["style.pt", "bad-hands.pt"])
        steps = []
        mentions = index.find(text, count_step=lambda: steps.append(1))
        assert len(mentions) == 10 * (4 + (count >= 5000) + (count >= 50000)), count
        assert len(steps) <= 2 * len(text), (count, len(steps))  # a few look-ups per word edge, not one per file


def regex_find(files, text):
    """The rule as one regex (how main matched): an optional prefix, the longest name, word edges either side."""
    import re

    index = embedding_index(files)
    if not index.files:
        return []
    alternatives = "|".join(re.escape(name) for name in sorted(index.files, key=len, reverse=True))
    pattern = re.compile(f"(?<![\\w-])(?:{re.escape('embedding:')})?({alternatives})(?![\\w-])", re.IGNORECASE)
    return [(index.files[m.group(1).lower()], m.start(), m.end()) for m in pattern.finditer(text)]


NAME_CHARS = "abAB-_.:(é1ſsSKkı"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(NAME_CHARS, min_size=1, max_size=5), max_size=6),
       st.lists(st.one_of(st.text(NAME_CHARS + " ,", max_size=4), st.sampled_from(["embedding:", "EMBEDDING:"])),
                max_size=8))
def test_the_index_finds_what_the_regex_found(names, pieces):
    files = [f"d{i}/{name}.pt" for i, name in enumerate(names)]
    text = "".join(pieces) + " ".join(names)
    try:
        expected = regex_find(files, text)
    except KeyError:  # main crashed where a name's lower case differs from its regex case match (`ſ` names)
        return
    assert [(m.filename, m.start, m.end) for m in embedding_index(files).find(text)] == expected
