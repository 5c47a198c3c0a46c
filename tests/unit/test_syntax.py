"""Tests of the Astria prompt parser (docs/astria-syntax.md sections 1-5): every rule, the round trip, and fuzzing."""

import math
import pickle

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from comfyui_astria.nodes.core import spec_tables
from comfyui_astria.nodes.core.syntax import AstriaPrompt, AstriaSyntaxError, FrozenMap, format_prompt, parse_prompt

# Astria's docs, use-cases/upscale.md, every line as the page shows it (also docs/astria-syntax.md section 1).
UPSCALE_EXAMPLE = spec_tables.DOCS_UPSCALE_BLOCK


def error_of(text):
    with pytest.raises(AstriaSyntaxError) as caught:
        parse_prompt(text)
    return caught.value


# --- the docs' upscale example


def test_upscale_example_gives_what_the_page_means():
    prompt = parse_prompt(UPSCALE_EXAMPLE)
    assert prompt.positive == "masterpiece, best quality, highres,"
    assert prompt.loras == (("more_details", 0.5), ("SDXLrender_v2.0", 1.0))
    assert prompt.faceids == ()
    assert prompt.flags == {"only_upscale": True}
    assert prompt.negative_prompt == "(worst quality, low quality, normal quality:2) JuggernautNegative-neg"
    assert prompt.params["num_images"] == 1
    assert prompt.params["seed"] is None and "seed" in prompt.params
    assert prompt.params["steps"] == 16
    assert prompt.params["cfg_scale"] == 6.0 and isinstance(prompt.params["cfg_scale"], float)
    assert prompt.params["denoising_strength"] == 0.1
    assert prompt.params["super_resolution"] is False
    assert prompt.params["backend_version"] == 1
    assert prompt.params["prompt_expansion"] is None
    assert prompt.params["ar"] == "1:1"
    assert prompt.params["scheduler"] == "euler_a"
    assert prompt.params["use_lpw"] is False
    assert prompt.params["w"] is None
    assert "negative_prompt" not in prompt.params
    assert prompt.warnings == ()


def test_upscale_example_round_trips():
    prompt = parse_prompt(UPSCALE_EXAMPLE)
    assert parse_prompt(format_prompt(prompt)) == prompt


def test_upscale_curl_text_keeps_text_after_a_boolean_flag():
    prompt = parse_prompt("very detailed, masterpiece, intricate details, UHD, 8K --only_upscale <lora:add_detail:1>")
    assert prompt.positive == "very detailed, masterpiece, intricate details, UHD, 8K"
    assert prompt.loras == (("add_detail", 1.0),)
    assert prompt.flags == {"only_upscale": True}


# --- lines, BOM, prompt section


def test_bom_and_crlf_are_normalised():
    text = "\ufeffcat, <lora:a:0.5>\r\nwearing a hat\rsteps=10\r\nseed=3"
    prompt = parse_prompt(text)
    assert prompt.positive == "cat, wearing a hat"
    assert prompt.params == {"steps": 10, "seed": 3}
    assert prompt == parse_prompt(text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff"))


def test_prompt_is_every_line_before_the_first_key_value_line():
    prompt = parse_prompt("a photo of a cat,\nsitting on a mat\n(best quality:1.2)\nsteps=20")
    assert prompt.positive == "a photo of a cat, sitting on a mat (best quality:1.2)"
    assert prompt.params == {"steps": 20}


def test_first_line_is_always_prompt_even_with_equals():
    prompt = parse_prompt("style=anime, girl\nseed=5")
    assert prompt.positive == "style=anime, girl"
    assert prompt.params == {"seed": 5}


def test_a_typed_param_on_the_first_line_is_prompt_text_with_a_warning():
    prompt = parse_prompt("steps=16\nseed=1")
    assert prompt.positive == "steps=16" and prompt.params == {"seed": 1}
    assert prompt.warnings == (
        "line 1: steps=16 is read as prompt text (the first line always is); put the prompt on line 1 and the "
        "parameters below it",
    )
    assert parse_prompt("style=anime, girl\nseed=5").warnings == ()


def test_a_known_key_written_with_spaces_says_how_to_write_it():
    prompt = parse_prompt("cat\nCFG Scale=7\nsteps=16\nDenoising strength = 0.2\nmy key=1\n=v")
    assert prompt.positive == "cat CFG Scale=7" and prompt.params == {"steps": 16}
    assert prompt.warnings == (
        "line 2: CFG Scale=7 is read as prompt text (a key is letters, digits and _ only); write cfg_scale=7 for "
        "the parameter",
        "line 4: Denoising strength = 0.2 was ignored: a key has no spaces or other marks; write "
        "denoising_strength=0.2",
        "line 5: my key=1 was ignored: a key is letters, digits and _ only (prompt text belongs before the first "
        "key=value line)",
        "line 6: =v has no key before '=' and was ignored; write key=value",
    )
    assert parse_prompt("portrait\na cat = a dog\nsteps=4").warnings == ()


def test_line_with_non_identifier_key_stays_prompt_text():
    prompt = parse_prompt("portrait\na cat = a dog\n(x:1.2)=y\nsteps=4")
    assert prompt.positive == "portrait a cat = a dog (x:1.2)=y"
    assert prompt.params == {"steps": 4}


@pytest.mark.parametrize("invisible", ["\u200b", "\u2060", "\ufeff"])
def test_zero_width_characters_are_removed_with_a_warning(invisible):
    text = f"cat, <lora:a{invisible}:1> --only_upscale{invisible}\n{invisible}steps=16\nseed{invisible}=3"
    prompt = parse_prompt(text)
    assert prompt.positive == "cat," and prompt.loras == (("a", 1.0),)
    assert prompt.flags == {"only_upscale": True} and prompt.params == {"steps": 16, "seed": 3}
    assert prompt.warnings == (
        f"line 1, column 13: 4 invisible zero-width character(s) (U+{ord(invisible):04X} and the like, usually "
        "copied from a web page) were removed; delete them from the text to silence this",
    )
    assert parse_prompt(format_prompt(prompt)) == prompt


def test_zero_width_joiners_stay_and_a_lone_inner_bom_round_trips():
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"
    assert parse_prompt(f"a {family} photo").positive == f"a {family} photo"
    prompt = parse_prompt("\u3000\ufeff")
    assert prompt == AstriaPrompt() and parse_prompt(format_prompt(prompt)) == prompt


def test_whitespace_is_tidied():
    assert parse_prompt("  a \t  b   \n\n   c  ").positive == "a b c"


def test_empty_and_blank_texts():
    assert parse_prompt("") == AstriaPrompt()
    assert parse_prompt("\n\n  \n") == AstriaPrompt()


# --- tags


@pytest.mark.parametrize(
    ("tag", "expected"),
    [
        ("<lora:more_details:0.5>", ("more_details", 0.5)),
        ("<lora:SDXLrender_v2.0:1>", ("SDXLrender_v2.0", 1.0)),
        ("<lora:1795721:1>", ("1795721", 1.0)),
        ("<lora:detail/more_details.safetensors:0.7>", ("detail/more_details.safetensors", 0.7)),
        ("<lora:detail\\more_details.safetensors:0.7>", ("detail\\more_details.safetensors", 0.7)),
        ("<lora:epi_noiseoffset2>", ("epi_noiseoffset2", 1.0)),
        ("<lora:odd:name:-0.25>", ("odd:name", -0.25)),
        ("<lora:x:.5>", ("x", 0.5)),
        ("<lora:x:1e-1>", ("x", 0.1)),
        ("<lora: spaced name : 0.5 >", ("spaced name", 0.5)),
        ("<LoRA:Case:2>", ("Case", 2.0)),
    ],
)
def test_lora_tags(tag, expected):
    prompt = parse_prompt(f"a {tag} b")
    assert prompt.loras == (expected,)
    assert prompt.positive == "a b"


def test_faceid_tags_and_missing_weight():
    prompt = parse_prompt("ohwx man <faceid:123> <faceid:1350339:0.8>")
    assert prompt.faceids == (("123", 1.0), ("1350339", 0.8))
    assert prompt.positive == "ohwx man"


def test_adjacent_tags_are_all_taken_and_leave_separate_words():
    prompt = parse_prompt(
        "cover <lora:epi_noiseoffset2:0.5><lora:FilmVelvia2:0.5><lora:add_detail:0.5><lora:epiCRealismHelper:0.2>"
    )
    assert [name for name, _ in prompt.loras] == ["epi_noiseoffset2", "FilmVelvia2", "add_detail", "epiCRealismHelper"]
    assert parse_prompt("a<lora:x:1>b").positive == "a b"


@pytest.mark.parametrize("text", ["<x-neg> cat", "<cyberrealistic-neg>", "<lora-neg> a", "<loras> a", "<faceidx> a", "a < b"])
def test_neg_style_tags_are_text(text):
    prompt = parse_prompt(text)
    assert prompt.loras == () and prompt.faceids == ()
    assert prompt.positive == text


@pytest.mark.parametrize(
    ("text", "column", "words"),
    [
        ("a <lora:x:nan>", 3, "not a number"),
        ("a <lora:x:inf>", 3, "not a number"),
        ("a <lora:x:abc>", 3, "<lora:x:abc>"),
        ("a <lora:x:1e999>", 3, "not a finite number"),
        ("a <lora:x:>", 3, "not a number"),
        ("a <lora::1>", 3, "has no name"),
        ("a <lora:>", 3, "has no name"),
        ("a <lora", 3, "unterminated"),
        ("a <lora:x:1 b", 3, "unterminated"),
        ("a <lora:x <lora:y:1>", 3, "unterminated"),
        ("a <lora>", 3, "malformed"),
        ("a <faceid:tune_id:strength>", 3, "strength"),
        ("<lora:../evil:1>", 1, "'..' component"),
        ("<lora:sub/../../evil:1>", 1, "'..' component"),
        ("<lora:sub\\..\\evil:1>", 1, "'..' component"),
        ("<lora:/etc/passwd:1>", 1, "slash"),
        ("<lora:\\\\server\\share:1>", 1, "slash"),
        ("<lora:C:\\loras\\x:1>", 1, "drive letter"),
        ("<lora:c:x.safetensors:1>", 1, "drive letter"),
    ],
)
def test_bad_tags_are_errors_naming_the_tag(text, column, words):
    error = error_of(text)
    assert words in str(error)
    assert (error.line, error.column) == (1, column)


@pytest.mark.parametrize(
    ("text", "fix"),
    [
        ("<lora:a:0,5>", "write 0.5 (a decimal dot, not a comma)"),
        ("x\ncfg_scale=6,5", "write cfg_scale=6.5 (a decimal dot, not a comma)"),
        ("x --resemblance 0,65", "write --resemblance 0.65 (a decimal dot, not a comma)"),
        ("x --resemblance 1,2,3", "write e.g. --resemblance 0.65"),
    ],
)
def test_a_decimal_comma_is_an_error_whose_fix_is_the_dotted_number(text, fix):
    error = error_of(text)
    assert error.fix == fix and "is not a number" in error.problem


def test_tag_error_reports_its_line():
    error = error_of("first line\nsecond <lora:x:zz>\nsteps=1")
    assert error.line == 2 and error.column == 8
    assert str(error).startswith("line 2, column 8: ")


def test_tags_in_negative_prompt_are_plain_text_with_a_warning():
    prompt = parse_prompt("cat\nnegative_prompt=blurry <lora:bad:1> <cyberrealistic-neg>")
    assert prompt.loras == ()
    assert prompt.negative_prompt == "blurry <lora:bad:1> <cyberrealistic-neg>"
    assert any("negative prompt holds" in warning for warning in prompt.warnings)


def test_flags_in_negative_prompt_are_plain_text():
    prompt = parse_prompt("cat\nnegative_prompt=blurry --only_upscale")
    assert prompt.flags == {} and prompt.negative_prompt == "blurry --only_upscale"


def test_broken_tag_in_negative_prompt_is_not_an_error():
    assert parse_prompt("cat\nnegative_prompt=<lora").negative_prompt == "<lora"


@pytest.mark.parametrize("name", ["sub/.. /evil", ".../evil", "\uff0e\uff0e/evil", "\u2025/evil", "sub\\ ..\\evil"])
def test_names_windows_or_nfkc_read_as_parent_are_refused(name):
    error = error_of(f"<lora:{name}:1>")
    assert "'..' component" in str(error) and (error.line, error.column) == (1, 1)


def test_a_tag_inside_a_tag_names_where_the_inner_one_starts():
    error = error_of("x <lora:a<lora:b:1>:1>")
    assert (error.line, error.column) == (1, 3)
    assert "column 10" in error.problem and "<lora:a:1> <lora:b:1>" in error.fix


def test_a_tag_left_open_at_the_end_of_a_line_does_not_reach_into_the_next():
    error = error_of("x <lora:a:1\n>\nsteps=1")
    assert (error.line, error.column) == (1, 3) and "cannot span lines" in error.fix


def test_repeated_lora_is_kept_twice_with_a_warning():
    prompt = parse_prompt("<lora:a:0.5> <lora:a:0.3>")
    assert prompt.loras == (("a", 0.5), ("a", 0.3))
    assert any("more than once" in warning for warning in prompt.warnings)


# --- flags


def test_three_flag_kinds():
    prompt = parse_prompt(
        "painting --mask_prompt foreground --mask_negative clothes hat --mask_invert --mask_dilate -20 "
        "--hires_denoising_strength 0.1"
    )
    assert prompt.positive == "painting"
    assert prompt.flags == {
        "mask_prompt": "foreground",
        "mask_negative": "clothes hat",
        "mask_invert": True,
        "mask_dilate": "-20",
        "hires_denoising_strength": 0.1,
    }


def test_words_after_a_boolean_flag_stay_prompt_text():
    prompt = parse_prompt("--tiled_upscale a cat --only_upscale on a mat")
    assert prompt.positive == "a cat on a mat"
    assert prompt.flags == {"tiled_upscale": True, "only_upscale": True}


def test_text_after_a_one_value_flag_stays_prompt_text():
    prompt = parse_prompt("--resemblance 0.7 portrait of a cat")
    assert prompt.flags == {"resemblance": 0.7}
    assert prompt.positive == "portrait of a cat"


def test_flag_with_equals_value():
    prompt = parse_prompt("x --resemblance=0.5 --mask_prompt=windows door --outpaint=top-center")
    assert prompt.flags == {"resemblance": 0.5, "mask_prompt": "windows door", "outpaint": "top-center"}


def test_quotes_group_multi_word_values_and_are_removed():
    prompt = parse_prompt(
        'woman --outpaint top-center --outpaint_width 1792 --outpaint_height 1024 '
        '--outpaint_prompt "president Trump the middle of the field"'
    )
    assert prompt.flags == {
        "outpaint": "top-center",
        "outpaint_width": 1792,
        "outpaint_height": 1024,
        "outpaint_prompt": "president Trump the middle of the field",
    }


def test_a_flag_inside_quotes_is_text():
    prompt = parse_prompt('x --video_prompt "smile --only_upscale then wave" --video')
    assert prompt.flags == {"video_prompt": "smile --only_upscale then wave", "video": True}


def test_quoted_one_value():
    assert parse_prompt('--outpaint "top center"').flags == {"outpaint": "top center"}


@pytest.mark.parametrize("value", ["-20", "-20%", "20%", "3.5"])
def test_negative_and_percent_values(value):
    assert parse_prompt(f"x --mask_dilate {value}").flags == {"mask_dilate": value}


def test_negative_value_of_a_float_flag():
    assert parse_prompt("x --resemblance -0.5").flags == {"resemblance": -0.5}


@pytest.mark.parametrize("text", ["a--b", "a -- b", "--", "x --9", "x --_y", "x ---", "x --only_upscale,"])
def test_dashes_that_are_not_flags_are_text(text):
    prompt = parse_prompt(text)
    assert prompt.flags == {}
    assert prompt.positive == text


@pytest.mark.parametrize(
    ("text", "column", "shown"),
    [
        ("cat \u2014only_upscale", 5, "U+2014"),
        ("cat \u2013only_upscale", 5, "U+2013"),
        ("cat \u2013\u2013Only_Upscale", 5, "U+2013"),
        ("cat \u2212\u2212only_upscale", 5, "U+2212"),
        ("\u2014only_upscale cat", 1, "U+2014"),
        ("cat -only_upscale", 5, "one hyphen"),
        ("cat ---only_upscale", 5, "3 hyphens"),
    ],
)
def test_typographic_or_miscounted_dashes_before_a_flag_name_warn_with_the_fix(text, column, shown):
    prompt = parse_prompt(text)
    assert prompt.flags == {} and "only_upscale" in prompt.positive.lower()
    assert len(prompt.warnings) == 1
    warning = prompt.warnings[0]
    assert warning.startswith(f"line 1, column {column}: ") and shown in warning
    assert warning.endswith("write --only_upscale")


def test_typographic_dash_before_a_value_flag_warns_and_words_are_not_flags():
    prompt = parse_prompt("cat \u2014resemblance 0.65\nsteps=1")
    assert prompt.flags == {} and prompt.positive == "cat \u2014resemblance 0.65"
    assert prompt.warnings[0].endswith("write --resemblance")
    assert parse_prompt("a cat\u2014only_upscale, a \u2014great day -x").warnings == ()


def test_unknown_flag_takes_words_with_a_warning():
    prompt = parse_prompt("x --multi two people --only_upscale")
    assert prompt.flags == {"multi": "two people", "only_upscale": True}
    assert any("unknown flag --multi" in warning for warning in prompt.warnings)


def test_unknown_flag_without_value_is_true():
    assert parse_prompt("x --newthing").flags == {"newthing": True}


def test_known_flag_name_in_other_case_is_normalised():
    assert parse_prompt("x --Only_Upscale cat").flags == {"only_upscale": True}


def test_boolean_flag_with_equals():
    assert parse_prompt("x --only_upscale=true").flags == {"only_upscale": True}
    assert parse_prompt("x --only_upscale=FALSE").flags == {}
    assert "not true or false" in str(error_of("x --only_upscale=maybe"))


def test_repeated_flag_later_wins_with_warning():
    prompt = parse_prompt("x --resemblance 0.5 --resemblance 0.8")
    assert prompt.flags == {"resemblance": 0.8}
    assert any("--resemblance given again" in warning for warning in prompt.warnings)


def test_flags_on_later_prompt_lines():
    prompt = parse_prompt("a cat\n--only_upscale\nsteps=3")
    assert prompt.flags == {"only_upscale": True} and prompt.positive == "a cat"


@pytest.mark.parametrize(
    ("text", "column", "words"),
    [
        ("x --resemblance", 3, "has no value"),
        ("x --resemblance --only_upscale", 3, "has no value"),
        ("x --resemblance O.65", 3, "not a number"),
        ("x --outpaint_width 12.5", 3, "not a whole number"),
        ("x --mask_dilate 20px", 3, "not a number or a percentage"),
        ("x --mask_prompt", 3, "has no value"),
        ('x --mask_prompt "open', 17, "never closed"),
        ('x --outpaint "open', 14, "never closed"),
        ("x --hires_cfg_scale nan", 3, "not a number"),
    ],
)
def test_bad_flags_are_errors(text, column, words):
    error = error_of(text)
    assert words in str(error)
    assert (error.line, error.column) == (1, column)


def test_every_spec_flag_has_a_kind():
    assert set(spec_tables.FLAG_KINDS) == set(
        spec_tables.BOOLEAN_FLAGS + spec_tables.ONE_VALUE_FLAGS + spec_tables.WORDS_FLAGS
    )
    assert set(spec_tables.FLAG_VALUE_TYPES) == set(spec_tables.ONE_VALUE_FLAGS)


# --- params


def test_param_types():
    prompt = parse_prompt(
        "x\nnum_images=2\nseed=0\nsteps=0\nw=512\nh=768\nbackend_version=0\ncfg_scale=7\n"
        "denoising_strength=0\ncontrolnet_conditioning_scale=0.5\nsuper_resolution=TRUE\nuse_lpw=False\n"
        "scheduler=dpm++2m_karras\ncontrolnet=tile\nstyle=Digital Art"
    )
    assert prompt.params == {
        "num_images": 2, "seed": 0, "steps": 0, "w": 512, "h": 768, "backend_version": 0, "cfg_scale": 7.0,
        "denoising_strength": 0.0, "controlnet_conditioning_scale": 0.5, "super_resolution": True,
        "use_lpw": False, "scheduler": "dpm++2m_karras", "controlnet": "tile", "style": "Digital Art",
    }
    assert type(prompt.params["seed"]) is int and type(prompt.params["cfg_scale"]) is float


def test_zero_is_a_value_and_empty_or_undefined_is_unset():
    prompt = parse_prompt("x\nseed=0\nsteps=\ncfg_scale=undefined\nstyle=UNDEFINED")
    assert prompt.params == {"seed": 0, "steps": None, "cfg_scale": None, "style": None}
    assert prompt.is_set("seed") and not prompt.is_set("steps")
    assert prompt.param("seed", 99) == 0 and prompt.param("steps", 20) == 20 and prompt.param("absent", 5) == 5


def test_keys_and_values_are_trimmed():
    assert parse_prompt("x\n  steps  =  12  \n\tar = 16:9").params == {"steps": 12, "ar": "16:9"}


def test_value_splits_at_the_first_equals():
    assert parse_prompt("x\ninput_image_url=https://h/a?b=c&d=e").params == {"input_image_url": "https://h/a?b=c&d=e"}


def test_known_key_in_other_case_is_normalised():
    assert parse_prompt("x\nSteps=12").params == {"steps": 12}


def test_unknown_key_is_kept_with_a_warning():
    prompt = parse_prompt("x\nvideo_duration=5\nsteps=3")
    assert prompt.params == {"video_duration": "5", "steps": 3}
    assert any("unknown parameter 'video_duration'" in warning for warning in prompt.warnings)


def test_duplicate_key_later_wins_with_a_warning():
    prompt = parse_prompt("x\nsteps=10\nseed=1\nsteps=20")
    assert prompt.params == {"steps": 20, "seed": 1}
    assert any("line 4: steps given again (first on line 2)" in warning for warning in prompt.warnings)


def test_negative_prompt_continuation_lines():
    prompt = parse_prompt(
        "cat\nnegative_prompt=lowres, blurry,\n(worst quality:2),\n\n  jpeg artifacts\nsteps=3\nnot a param"
    )
    assert prompt.negative_prompt == "lowres, blurry, (worst quality:2), jpeg artifacts"
    assert prompt.params == {"steps": 3}
    assert any("'not a param'" in warning or "not a param" in warning for warning in prompt.warnings)


def test_later_negative_prompt_wins_with_its_own_continuation():
    prompt = parse_prompt("cat\nnegative_prompt=a\nb\nnegative_prompt=c\nd")
    assert prompt.negative_prompt == "c d"


def test_stray_line_after_params_is_ignored_with_a_warning():
    prompt = parse_prompt("cat\nsteps=3\n...")
    assert prompt.positive == "cat" and prompt.params == {"steps": 3}
    assert any("line 3" in warning and "ignored" in warning for warning in prompt.warnings)


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("num_images=0", "num_images=0 is out of range 1-8"),
        ("num_images=9", "out of range 1-8"),
        ("steps=51", "steps=51 is out of range 0-50"),
        ("steps=-1", "out of range 0-50"),
        ("cfg_scale=15.5", "out of range 0-15"),
        ("denoising_strength=1.5", "denoising_strength=1.5 is out of range 0-1"),
        ("denoising_strength=-0.1", "out of range 0-1"),
        ("seed=4294967296", "out of range 0-2^32-1"),
        ("seed=-1", "out of range 0-2^32-1"),
        ("seed=" + "9" * 5000, "out of range 0-2^32-1"),
        ("w=500", "not a positive multiple of 8"),
        ("h=0", "not a positive multiple of 8"),
        ("w=-8", "not a positive multiple of 8"),
        ("steps=16.0", "not a whole number"),
        ("seed=abc", "not a whole number"),
        ("cfg_scale=nan", "not a number"),
        ("cfg_scale=inf", "not a number"),
        ("denoising_strength=1e400", "not a number"),
        ("use_lpw=yes", "not true or false"),
        ("super_resolution=1", "not true or false"),
    ],
)
def test_bad_params_are_errors_at_their_value(line, words):
    error = error_of(f"prompt\nnum_images=1\n{line}")
    assert words in str(error)
    assert error.line == 3 and error.column == line.index("=") + 2
    assert str(error).startswith(f"line 3, column {error.column}: ")


def test_leading_zeros_do_not_make_a_number_too_long():
    prompt = parse_prompt("x --duration " + "0" * 40 + "5\nseed=" + "0" * 40 + "7\nsteps=+0016")
    assert prompt.flags == {"duration": 5} and prompt.params == {"seed": 7, "steps": 16}
    assert "out of range" in str(error_of("x\nseed=" + "0" * 40 + "4294967296"))


def test_seed_bounds_are_accepted():
    assert parse_prompt("x\nseed=4294967295").params["seed"] == 2**32 - 1


def test_range_error_message_names_the_fix():
    assert str(error_of("x\n\ndenoising_strength=1.5")) == (
        "line 3, column 20: denoising_strength=1.5 is out of range 0-1; "
        "give a value from 0 to 1, or leave it empty for the default"
    )


def test_syntax_error_survives_pickling():
    error = error_of("x\nsteps=99")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.line, copy.column, str(copy)) == (error.line, error.column, str(error))
    assert isinstance(copy, ValueError)


def test_long_values_are_cut_in_messages():
    error = error_of("x\nsteps=" + "x" * 100_000)
    assert len(str(error)) < 300


# --- the dataclass


def test_prompt_is_hashable_and_equality_ignores_warnings():
    a = parse_prompt("x\nsteps=1\nsteps=2")
    b = parse_prompt("x\nsteps=2")
    assert a.warnings and not b.warnings
    assert a == b and hash(a) == hash(b)
    assert len({a, b, parse_prompt("y")}) == 2


def test_frozen_map_behaves_like_a_read_only_dict():
    mapping = FrozenMap({"a": 1, "b": None})
    assert mapping == {"b": None, "a": 1} and mapping["a"] == 1 and list(mapping) == ["a", "b"]
    assert mapping.get("c", 3) == 3 and len(mapping) == 2
    with pytest.raises(TypeError):
        mapping["a"] = 2  # type: ignore[index]


def test_astria_text_is_the_prompt_line():
    prompt = parse_prompt(UPSCALE_EXAMPLE)
    assert prompt.astria_text() == (
        "masterpiece, best quality, highres, <lora:more_details:0.5> <lora:SDXLrender_v2.0:1.0> --only_upscale"
    )


def test_format_quotes_values_that_need_it():
    prompt = parse_prompt('x --mask_prompt "a --b" --outpaint "top center" --outpaint_prompt fields')
    text = format_prompt(prompt)
    assert '--mask_prompt "a --b"' in text and '--outpaint "top center"' in text and "--outpaint_prompt fields" in text
    assert parse_prompt(text) == prompt


def test_non_text_input_is_a_syntax_error():
    with pytest.raises(AstriaSyntaxError):
        parse_prompt(None)  # type: ignore[arg-type]


# --- generated texts: round trip and fuzz

_ALPHABET = "abcXYZ019 ,.()[]:<>-=_/\\'%\t\u00e9\u4e2d\x00"
_words = st.text(alphabet=st.sampled_from(list(_ALPHABET)), max_size=12)
_quoted_words = st.text(alphabet=st.sampled_from(list(_ALPHABET + '"')), max_size=12)
_names = st.builds(
    lambda head, tail, sub: head + tail + sub,
    st.sampled_from(list("aZ09_")), st.sampled_from(["", "x.y", "a b", "v2.0", "-neg"]),
    st.sampled_from(["", "/m.safetensors", "\\n"]),
)
_weights = st.one_of(
    st.floats(min_value=-5, max_value=5, allow_nan=False).map(repr),
    st.integers(-3, 3).map(str),
    st.sampled_from([".5", "1.", "+2", "1e-3"]),
)
_tags = st.builds(
    lambda kind, name, weight: f"<{kind}:{name}{':' + weight if weight is not None else ''}>",
    st.sampled_from(["lora", "faceid", "LORA"]), _names, st.none() | _weights,
)
_VALUES_BY_TYPE = {
    "float": st.floats(min_value=-2, max_value=20, allow_nan=False).map(repr),
    "int": st.integers(0, 4096).map(str),
    "number_or_percent": st.sampled_from(["-20", "-20%", "5", "1.5%"]),
    "string": st.sampled_from(["top-center", '"two words"', "a=b", "--9", '"--x"', '""']),
}
_word_values = st.sampled_from(["foreground", "windows door", '"a --b" c', '"fields"', "=x", "clothes  hat", "<x-neg>"])


def _flag_strategy(name):
    kind = spec_tables.FLAG_KINDS.get(name.lower(), spec_tables.WORDS)
    if kind == spec_tables.BOOLEAN:
        return st.sampled_from([f"--{name}", f"--{name}=true", f"--{name}=false"])
    values = _VALUES_BY_TYPE[spec_tables.FLAG_VALUE_TYPES[name.lower()]] if kind == spec_tables.ONE_VALUE else _word_values
    return st.builds(lambda sep, value: f"--{name}{sep}{value}", st.sampled_from([" ", "="]), values)


_flags = st.sampled_from([*spec_tables.FLAG_KINDS, "multi", "Only_Upscale"]).flatmap(_flag_strategy)
_prompt_piece = st.one_of(_words, _tags, _flags, st.sampled_from(["a--b", " -- ", "<x-neg>", "masterpiece,", "--"]))
_prompt_line = st.lists(_prompt_piece, max_size=6).map(" ".join)
_PARAM_VALUES = {
    "int": st.sampled_from(["1", "8", "0", "16", "512", "4294967295", "+2"]),
    "float": st.sampled_from(["0", "0.5", "1", "6.0", ".25", "1e-1"]),
    "bool": st.sampled_from(["true", "False", "TRUE"]),
    "string": st.one_of(st.sampled_from(["euler_a", "1:1", "Digital Art", "a=b"]), _words),
}


def _param_strategy(key):
    known = spec_tables.PARAM_TYPES.get(key.lower())
    values = _PARAM_VALUES[known or "string"]
    if key.lower() in ("w", "h"):
        values = st.sampled_from(["512", "8", "1024"])
    if key.lower() == "num_images":
        values = st.sampled_from(["1", "8", "+3"])
    if key.lower() == "steps":
        values = st.sampled_from(["0", "16", "50"])
    if key.lower() == "cfg_scale":
        values = st.sampled_from(["0", "7.5", "15"])
    unset = st.sampled_from(["", "undefined", "  "])
    return st.builds(lambda value, spaces: f"{key}{spaces}={spaces}{value}", st.one_of(values, unset),
                     st.sampled_from(["", " "]))


_param_line = st.sampled_from([*spec_tables.PARAM_TYPES, "unknown_key", "Steps"]).flatmap(_param_strategy)
_block = st.builds(
    lambda first, more, params, newline: newline.join([first, *more, *params]),
    _prompt_line,
    st.lists(_prompt_line.map(lambda line: line.replace("=", " ")), max_size=2),
    st.lists(st.one_of(_param_line, _words), max_size=8),
    st.sampled_from(["\n", "\r\n", "\r"]),
)
_fuzz_block = st.builds(
    lambda first, more, newline: newline.join([first, *more]),
    st.lists(st.one_of(_prompt_piece, _quoted_words), max_size=6).map(" ".join),
    st.lists(st.one_of(_param_line, _quoted_words, _prompt_line), max_size=6),
    st.sampled_from(["\n", "\r\n"]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@example("x <lora:a:1>--b")
@example('--outpaint "--x" a\nnegative_prompt=n\nmore')
@example("a\t--mask_prompt  b  c --only_upscale=false")
@given(_block)
def test_round_trip_on_generated_prompts(text):
    try:
        prompt = parse_prompt(text)
    except AstriaSyntaxError:
        assume(False)
        return
    assert parse_prompt(format_prompt(prompt)) == prompt


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_fuzz_block)
def test_generated_prompts_parse_or_raise_only_syntax_errors(text):
    try:
        parse_prompt(text)
    except AstriaSyntaxError as error:
        assert error.line >= 1 and error.column >= 1


@settings(max_examples=500, deadline=None)
@given(st.text())
def test_random_unicode_raises_only_syntax_errors(text):
    try:
        prompt = parse_prompt(text)
    except AstriaSyntaxError as error:
        assert str(error).startswith(f"line {error.line}, column {error.column}: ")
        return
    assert parse_prompt(format_prompt(prompt)) == prompt


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_syntax_errors(data):
    try:
        parse_prompt(data.decode("latin-1"))
    except AstriaSyntaxError:
        pass


# --- megabyte inputs: must finish (timings live in bench/, not here)

MEGABYTE = 1_000_000


@pytest.mark.parametrize(
    "text",
    [
        "(a " * (MEGABYTE // 3),
        "a " + "-" * MEGABYTE,
        "x --mask_prompt " + '"a" ' * (MEGABYTE // 4),
        "x " + "--mask_prompt a " * (MEGABYTE // 16),
        "<lora:a:1>" * (MEGABYTE // 10),
        "<loras" * (MEGABYTE // 6),
        "x\n" + "seed=1\n" * (MEGABYTE // 7),
        "x\nnegative_prompt=a\n" + "b\n" * (MEGABYTE // 2),
        "x\nsteps=" + "1" * MEGABYTE,
        "x\ncfg_scale=" + "1" * MEGABYTE + "x",
        "x <lora:a:" + "1" * MEGABYTE + "x>",
        "x\n" + "a" * MEGABYTE + "=",
        "x\n" + " " * MEGABYTE + "x",
        "\n" * MEGABYTE,
    ],
    ids=lambda text: repr(text[:16]),
)
def test_megabyte_inputs_finish(text):
    try:
        prompt = parse_prompt(text)
    except AstriaSyntaxError as error:
        assert len(str(error)) < 400
        return
    assert len(prompt.warnings) <= 51
    assert math.isfinite(sum(weight for _, weight in prompt.loras))


# ---------------------------------------------------------------------------------------------------------------
# Characters a text encoder must never see, digits Astria's API does not read, weights written with a space

@pytest.mark.parametrize("control", ["\x00", "\x01", "\x02", "\x07", "\x0b", "\x0c", "\x1b", "\x1f", "\x7f", "\x85",
                                     "\x9f"])
def test_control_characters_are_removed_with_a_warning(control):
    prompt = parse_prompt(f"a cat{control}\x01 (dog:1.2)\nnegative_prompt=ugly{control}\nsteps=1{control}6")
    assert prompt.positive == "a cat (dog:1.2)" and prompt.negative_prompt == "ugly"
    assert prompt.params["steps"] == 16
    assert prompt.warnings == (
        f"line 1, column 6: 4 control character(s) (U+{ord(control):04X} and the like) were removed: a text "
        "encoder must not see them, and ComfyUI uses some as internal markers; delete them from the text to "
        "silence this",
    )
    assert parse_prompt(format_prompt(prompt)) == prompt


def test_a_nul_in_a_lora_tag_is_removed_before_the_name_is_read():
    prompt = parse_prompt("<lora:a\x00b:1> cat")
    assert prompt.loras == (("ab", 1.0),) and prompt.positive == "cat"
    assert prompt.warnings[0].startswith("line 1, column 8: 1 control character(s) (U+0000 and the like) were removed")


def test_tab_and_line_breaks_are_not_control_characters_to_remove():
    prompt = parse_prompt("a\tcat\r\nsteps=16")
    assert prompt.positive == "a cat" and prompt.params == {"steps": 16} and prompt.warnings == ()


@pytest.mark.parametrize(
    ("text", "fix"),
    [
        ("x\nsteps=\uff11\uff16", "write steps=16 (the digits 0-9: Astria does not read \uff11\uff16 as a number)"),
        ("x\ncfg_scale=\u0666.\u0665", "write cfg_scale=6.5 (the digits 0-9: Astria does not read \u0666.\u0665 "
                                        "as a number)"),
        ("<lora:a:\u0660.\u0665>", "write 0.5 (the digits 0-9: Astria does not read \u0660.\u0665 as a number)"),
        ("x --resemblance \u09e6.\u09ec", "write --resemblance 0.6 (the digits 0-9: Astria does not read "
                                          "\u09e6.\u09ec as a number)"),
        ("x --duration \uff12", "write --duration 2 (the digits 0-9: Astria does not read \uff12 as a number)"),
    ],
)
def test_digits_other_than_ascii_are_refused_with_the_ascii_number(text, fix):
    with pytest.raises(AstriaSyntaxError) as caught:
        parse_prompt(text)
    assert caught.value.fix == fix


@pytest.mark.parametrize(
    ("text", "excerpt", "written"),
    [
        ("a (dog: 1.2) cat", "(dog: 1.2)", "(dog:1.2)"),
        ("a ((dog:0.5 )) cat", "(dog:0.5 )", "(dog:0.5)"),
        ("(red, blue:1.3 ) sky", "(red, blue:1.3 )", "(red, blue:1.3)"),
    ],
)
def test_a_space_before_a_weight_is_text_with_a_note(text, excerpt, written):
    prompt = parse_prompt(text)
    assert prompt.positive == text
    (warning,) = prompt.warnings
    assert warning == (f"line 1: {excerpt} is read as text at weight 1.1, as Astria's weighted prompts do "
                       f"(diffusers' long-prompt-weighting parser); write {written} for a weight")


def test_no_weight_space_note_without_an_open_bracket_or_with_use_lpw_false():
    assert parse_prompt("a dog: 1.2) cat").warnings == ()
    assert parse_prompt("a \\(dog: 1.2) cat").warnings == ()
    assert parse_prompt("a (dog:1.2) cat").warnings == ()
    assert parse_prompt("a (dog :1.2) cat").warnings == ()  # a weight in both rules
    assert parse_prompt("a (dog: 1.2) cat\nuse_lpw=false").warnings == ()
    negative = parse_prompt("a cat\nnegative_prompt=(ugly: 1.4)")
    assert negative.warnings == ("negative_prompt: (ugly: 1.4) is read as text at weight 1.1, as Astria's weighted "
                                 "prompts do (diffusers' long-prompt-weighting parser); write (ugly:1.4) for a weight",)


def test_a_long_group_with_a_spaced_weight_is_shown_by_its_start_and_end():
    (warning,) = parse_prompt("(" + "word " * 30 + ": 1.2)").warnings
    assert warning == ("line 1: (word word word word...word word word word : 1.2) is read as text at weight 1.1, as "
                       "Astria's weighted prompts do (diffusers' long-prompt-weighting parser); write (word word "
                       "word word...word word word word :1.2) for a weight")
    many = parse_prompt("(" * 1000 + ": 1)" * 1000).warnings
    assert len(many) == 50  # collected up to the warnings' limit, not one per nested group
