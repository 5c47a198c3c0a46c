"""LoRA name resolution, alias files and the apply plan: pure, no ComfyUI."""

import json

import pytest

from comfyui_astria.nodes.core.loras import (
    AliasFileError,
    LoraAmbiguousError,
    LoraNotFoundError,
    LoraResolutionError,
    default_alias_file_text,
    parse_alias_file,
    plan_loras,
    resolve,
)

AVAILABLE = [
    "detail/more_details.safetensors",
    "SDXLrender_v2.0.safetensors",
    "styles/Anime_Style.safetensors",
    "people/my_face.safetensors",
    "foobar.safetensors",
    "twins/a/same.safetensors",
    "twins/b/same.safetensors",
    "old/legacy.ckpt",
    "both/dual.ckpt",
    "both/dual.safetensors",
]


def test_exact_relative_path_without_and_with_extension():
    assert resolve("detail/more_details", AVAILABLE).filename == "detail/more_details.safetensors"
    found = resolve("detail/more_details.safetensors", AVAILABLE)
    assert (found.filename, found.method) == ("detail/more_details.safetensors", "exact")


def test_dots_in_the_name_are_not_an_extension():
    found = resolve("SDXLrender_v2.0", AVAILABLE)
    assert (found.filename, found.method) == ("SDXLrender_v2.0.safetensors", "exact")


def test_backslashes_in_the_tag_read_as_slashes():
    found = resolve("detail\\more_details.safetensors", AVAILABLE)
    assert (found.filename, found.method) == ("detail/more_details.safetensors", "exact")


def test_windows_available_names_are_returned_as_the_host_wrote_them():
    windows = ["detail\\more_details.safetensors", "people\\my_face.safetensors"]
    assert resolve("detail/more_details.safetensors", windows).filename == "detail\\more_details.safetensors"
    assert resolve("detail\\more_details", windows).filename == "detail\\more_details.safetensors"
    found = resolve("my_face", windows)
    assert (found.filename, found.method) == ("people\\my_face.safetensors", "stem")


def test_case_insensitive_path_after_exact():
    found = resolve("STYLES/anime_style", AVAILABLE)
    assert (found.filename, found.method) == ("styles/Anime_Style.safetensors", "case")


def test_exact_case_wins_over_case_insensitive():
    available = ["Foo.safetensors", "foo.safetensors"]
    assert resolve("foo", available).filename == "foo.safetensors"
    assert resolve("Foo", available).filename == "Foo.safetensors"


def test_unique_stem_in_a_subfolder():
    found = resolve("more_details", AVAILABLE)
    assert (found.filename, found.method) == ("detail/more_details.safetensors", "stem")
    assert resolve("anime_style", AVAILABLE).filename == "styles/Anime_Style.safetensors"
    assert resolve("more_details.safetensors", AVAILABLE).filename == "detail/more_details.safetensors"


def test_root_file_beats_stem_in_subfolder():
    available = ["sub/x.safetensors", "x.safetensors"]
    assert resolve("x", available).method == "exact"
    assert resolve("x", available).filename == "x.safetensors"


def test_never_prefix_or_suffix_match():
    with pytest.raises(LoraNotFoundError):
        resolve("foo", AVAILABLE)  # foobar exists
    with pytest.raises(LoraNotFoundError):
        resolve("bar", AVAILABLE)
    with pytest.raises(LoraNotFoundError):
        resolve("a/same", AVAILABLE)  # twins/a/same exists: a path is not matched by its tail
    with pytest.raises(LoraNotFoundError):
        resolve("more", AVAILABLE)


def test_alias_comes_first_and_is_recorded():
    aliases = {"more_details": "people/my_face.safetensors", "1533312": "people/my_face.safetensors"}
    found = resolve("more_details", AVAILABLE, aliases)
    assert (found.filename, found.method, found.alias_target) == (
        "people/my_face.safetensors",
        "alias",
        "people/my_face.safetensors",
    )
    assert resolve("1533312", AVAILABLE, aliases).describe() == "1533312 -> people/my_face.safetensors (alias)"


def test_alias_target_may_use_backslashes_or_omit_extension():
    found = resolve("face", AVAILABLE, {"face": "people\\my_face"})
    assert found.filename == "people/my_face.safetensors"
    assert found.describe() == "face -> people/my_face.safetensors (alias to people\\my_face)"


def test_ambiguous_stem_lists_candidates_and_how_to_pick():
    with pytest.raises(LoraResolutionError) as caught:
        resolve("same", AVAILABLE, alias_file="my/aliases.json")
    assert caught.value.candidates == ("twins/a/same.safetensors", "twins/b/same.safetensors")
    message = str(caught.value)
    assert "twins/a/same.safetensors, twins/b/same.safetensors" in message
    assert "writing its subfolder and extension in the tag, e.g. <lora:twins/a/same.safetensors:1>" in message
    assert "or add an alias for 'same' to my/aliases.json" in message
    assert isinstance(caught.value, LoraAmbiguousError)


def test_ambiguous_extension_at_exact_level():
    with pytest.raises(LoraResolutionError) as caught:
        resolve("x", ["x.safetensors", "x.sft"])
    assert caught.value.candidates == ("x.safetensors", "x.sft")
    assert resolve("x.sft", ["x.safetensors", "x.sft"]).filename == "x.sft"


def test_ambiguity_resolved_by_writing_the_subfolder():
    assert resolve("twins/b/same", AVAILABLE).filename == "twins/b/same.safetensors"


def test_ambiguous_case_insensitive_match():
    with pytest.raises(LoraResolutionError) as caught:
        resolve("FOO", ["Foo.safetensors", "foo.safetensors"])
    assert set(caught.value.candidates) == {"Foo.safetensors", "foo.safetensors"}


def test_not_found_lists_three_closest_names():
    with pytest.raises(LoraNotFoundError) as caught:
        resolve("more_detail", AVAILABLE)
    assert len(caught.value.candidates) == 3
    assert caught.value.candidates[0] == "detail/more_details.safetensors"
    assert "Closest names: detail/more_details.safetensors" in str(caught.value)
    assert "'more_detail'" in str(caught.value)


def test_not_found_in_an_empty_folder_says_so():
    with pytest.raises(LoraNotFoundError) as caught:
        resolve("anything", [])
    assert caught.value.candidates == ()
    assert "no LoRA files" in str(caught.value)


def test_tune_id_without_alias_says_what_to_do():
    with pytest.raises(LoraNotFoundError) as caught:
        resolve("1533312", AVAILABLE, {}, alias_file="/home/u/ComfyUI/user/default/astria/lora_aliases.json")
    message = str(caught.value)
    assert message.startswith("LoRA 1533312 is an Astria tune id: download its .safetensors from Astria")
    assert "add an alias to /home/u/ComfyUI/user/default/astria/lora_aliases.json" in message


def test_tune_id_message_uses_the_alias_table_path():
    table = parse_alias_file("{}", "/data/lora_aliases.json")
    with pytest.raises(LoraNotFoundError, match="add an alias to /data/lora_aliases.json"):
        resolve("1533312", AVAILABLE, table)


def test_numeric_file_name_resolves_without_alias():
    assert resolve("1533312", ["astria/1533312.safetensors"]).filename == "astria/1533312.safetensors"


UNSAFE_NAMES = [
    "../x",
    "..",
    "sub/../../x.safetensors",
    "sub\\..\\..\\x",
    "..\\x",
    "/etc/passwd",
    "\\x",
    "\\\\server\\share\\x.safetensors",
    "C:x.safetensors",
    "c:/loras/x.safetensors",
    "D:\\x",
    "x\0.safetensors",
    "",
    "   ",
    # What Windows may read as `..` (it drops trailing dots and spaces), and `..` under NFKC (fullwidth, leader).
    "sub/.. /x",
    ".../x",
    "sub\\. .\\x",
    "\uff0e\uff0e/x",
    "\u2025/x",
    "sub\uff0f\uff0e\uff0e\uff0fx",
]


@pytest.mark.parametrize("name", UNSAFE_NAMES)
def test_names_that_could_leave_the_folder_are_refused_even_when_listed(name):
    available = AVAILABLE + [name, name + ".safetensors"]
    with pytest.raises(LoraResolutionError, match="refused") as caught:
        resolve(name, available)
    assert not isinstance(caught.value, LoraNotFoundError)


@pytest.mark.parametrize("name", UNSAFE_NAMES)
def test_alias_to_a_name_that_could_leave_the_folder_is_refused(name):
    available = AVAILABLE + [name, name + ".safetensors"]
    with pytest.raises(LoraResolutionError, match="refused"):
        resolve("nice", available, {"nice": name})
    text = json.dumps({"nice": name})
    with pytest.raises(AliasFileError, match="'nice' in a.json line 1 .*refused"):
        parse_alias_file(text, "a.json")


def test_unsafe_names_in_available_are_never_candidates():
    available = ["../outside/evil.safetensors", "C:evil.safetensors"]
    with pytest.raises(LoraNotFoundError) as caught:
        resolve("evil", available)
    assert caught.value.candidates == ()


def test_dots_inside_a_component_are_not_traversal():
    assert resolve("v1..2/x", ["v1..2/x.safetensors"]).filename == "v1..2/x.safetensors"
    assert resolve("x..", ["x...safetensors"]).filename == "x...safetensors"
    with pytest.raises(LoraNotFoundError):
        resolve("./x", ["x.safetensors"])


@pytest.mark.parametrize("extension", [".ckpt", ".pt", ".bin", ".pth", ".pkl", ".pt2"])
def test_pickle_files_are_refused_with_the_reason(extension):
    with pytest.raises(LoraResolutionError) as caught:
        resolve("legacy", [f"old/legacy{extension}"])
    message = str(caught.value)
    assert f"old/legacy{extension}" in message and "pickle" in message and "run code" in message
    assert ".safetensors" in message
    assert caught.value.candidates == (f"old/legacy{extension}",)
    assert not isinstance(caught.value, LoraNotFoundError)


def test_pickle_refused_at_exact_level_too():
    with pytest.raises(LoraResolutionError, match="pickle"):
        resolve("old/legacy.ckpt", AVAILABLE)


def test_loadable_file_preferred_when_both_forms_exist():
    found = resolve("dual", AVAILABLE)
    assert (found.filename, found.method) == ("both/dual.safetensors", "stem")
    assert resolve("both/dual", AVAILABLE).filename == "both/dual.safetensors"
    with pytest.raises(LoraResolutionError, match="pickle"):
        resolve("both/dual.ckpt", AVAILABLE)  # named explicitly: refused, not swapped


def test_sft_is_loadable():
    assert resolve("fast", ["x/fast.sft"]).filename == "x/fast.sft"


# ---------------------------------------------------------------- alias files


def test_parse_alias_file_skips_underscore_keys():
    text = (
        '{\n  "_comment": "hi",\n  "_example": {"a": 1},\n  "more_details": "detail/add_detail.safetensors",\n'
        '  "1533312": "people/my_face.safetensors"\n}\n'
    )
    table = parse_alias_file(text, "aliases.json")
    assert dict(table) == {"more_details": "detail/add_detail.safetensors", "1533312": "people/my_face.safetensors"}
    assert table.path == "aliases.json"
    assert table.where("1533312") == "aliases.json line 5"


def test_default_alias_file_parses_to_no_aliases_and_explains_the_format():
    text = default_alias_file_text()
    assert parse_alias_file(text, "a.json") == {}
    data = json.loads(text)
    assert "loras folder" in data["_comment"] and "tune id" in data["_comment"]
    assert all(isinstance(v, str) for v in data["_example"].values())


def test_empty_alias_file_means_no_aliases():
    assert parse_alias_file("  \n", "a.json") == {}
    assert parse_alias_file('\ufeff{"a": "b.safetensors"}', "a.json") == {"a": "b.safetensors"}


@pytest.mark.parametrize(
    ("text", "line", "column", "hint"),
    [
        ('{\n  "a": "x.safetensors",\n}\n', 3, 1, "comma just before a closing }"),
        ('{\n  "a": "x.safetensors"\n  "b": "y.safetensors"\n}', 3, 3, "Separate entries with commas"),
        ("{\n  a: 'x'\n}", 2, 3, "double quotes"),
        ('{\n  "a": "sub\\x.safetensors"\n}', 2, 12, "forward slashes"),
        ('{"a": "x"}\n{"b": "y"}', 2, 1, "single {...} object"),
    ],
)
def test_bad_json_names_file_line_column_and_fix(text, line, column, hint):
    with pytest.raises(AliasFileError) as caught:
        parse_alias_file(text, "/u/astria/lora_aliases.json")
    message = str(caught.value)
    assert f"/u/astria/lora_aliases.json is not valid JSON at line {line}, column {column}" in message
    assert hint in message


def test_alias_file_must_be_an_object():
    with pytest.raises(AliasFileError, match="one JSON object.*not a list"):
        parse_alias_file('["a"]', "a.json")


def test_non_string_alias_value_names_the_key_and_line():
    with pytest.raises(AliasFileError) as caught:
        parse_alias_file('{\n  "ok": "x.safetensors",\n  "bad": 1.5\n}', "a.json")
    assert "Alias 'bad' in a.json line 3 must be a string" in str(caught.value)


def test_alias_written_twice_is_an_error():
    with pytest.raises(AliasFileError, match=r"'a' is written twice in a.json \(lines 2 and 3\)"):
        parse_alias_file('{\n "a": "x.safetensors",\n "a": "y.safetensors"\n}', "a.json")


def test_broken_aliases_are_refused_with_their_line_and_the_fix():
    text = (
        '{\n  "good": "people/my_face.safetensors",\n  "gone": "detail/more_detail.safetensors",\n'
        '  "twin": "same",\n  "old": "old/legacy.ckpt"\n}'
    )
    table = parse_alias_file(text, "/u/lora_aliases.json")
    assert resolve("good", AVAILABLE, table).filename == "people/my_face.safetensors"
    with pytest.raises(LoraResolutionError) as gone:
        resolve("gone", AVAILABLE, table)
    assert str(gone.value).startswith(
        "Alias 'gone' in /u/lora_aliases.json line 3 points at 'detail/more_detail.safetensors'")
    assert "not in the loras folder" in str(gone.value)
    assert "Closest names: detail/more_details.safetensors" in str(gone.value)
    with pytest.raises(LoraResolutionError) as twin:
        resolve("twin", AVAILABLE, table)
    assert str(twin.value) == (
        "Alias 'twin' in /u/lora_aliases.json line 4 points at 'same', which matches several files: "
        "twins/a/same.safetensors, twins/b/same.safetensors. Write the full relative path of one of them in the alias."
    )
    with pytest.raises(LoraResolutionError, match=r"line 5.*pickle|pickle.*line 5"):
        resolve("old", AVAILABLE, table)


def test_resolve_through_a_broken_alias_raises_not_found():
    table = parse_alias_file('{\n "more_details": "gone.safetensors"\n}', "a.json")
    with pytest.raises(LoraNotFoundError, match="Alias 'more_details' in a.json line 2"):
        resolve("more_details", AVAILABLE, table)


# ---------------------------------------------------------------- plan


def test_plan_report_lines_and_order():
    plan = plan_loras([("more_details", 0.5), ("SDXLrender_v2.0", 1.0)], AVAILABLE)
    assert [(p.filename, p.weight) for p in plan.loras] == [
        ("detail/more_details.safetensors", 0.5),
        ("SDXLrender_v2.0.safetensors", 1.0),
    ]
    assert plan.report_lines() == [
        "more_details -> detail/more_details.safetensors (stem match) x0.5",
        "SDXLrender_v2.0 -> SDXLrender_v2.0.safetensors (exact match) x1",
    ]
    assert plan.errors == [] and plan.warnings == []


def test_plan_adds_weights_of_the_same_file_with_a_warning():
    plan = plan_loras(
        [("more_details", 0.5), ("x", 0.3), ("detail/more_details.safetensors", 0.25)],
        AVAILABLE,
        {"x": "detail/more_details"},
    )
    assert len(plan.loras) == 1
    only = plan.loras[0]
    assert only.filename == "detail/more_details.safetensors"
    assert only.weight == pytest.approx(1.05)
    assert [r.method for r in only.resolutions] == ["stem", "alias", "exact"]
    assert plan.warnings == [
        (
            "LoRA detail/more_details.safetensors is named 3 times in the prompt; it is applied once with the "
            "weights added (0.5 + 0.3 + 0.25 = 1.05)."
        )
    ]
    assert plan.report_lines() == [
        (
            "more_details -> detail/more_details.safetensors (stem match) x1.05 (named 3 times as "
            "detail/more_details.safetensors, more_details, x: x0.5 + x0.3 + x0.25, weights added)"
        )
    ]


def test_plan_collects_errors_and_reports_them():
    plan = plan_loras([("more_details", 1.0), ("1533312", 0.7), ("../x", 1.0)], AVAILABLE)
    assert [p.filename for p in plan.loras] == ["detail/more_details.safetensors"]
    assert [name for name, _ in plan.errors] == ["1533312", "../x"]
    assert isinstance(plan.errors[0][1], LoraNotFoundError)
    assert not isinstance(plan.errors[1][1], LoraNotFoundError)
    lines = plan.report_lines()
    assert lines[1].startswith("1533312: not applied: LoRA 1533312 is an Astria tune id")
    assert lines[2].startswith("../x: not applied: LoRA name '../x' is refused")


def test_plan_weights_that_cancel_stay_in_the_plan():
    plan = plan_loras([("more_details", 0.5), ("more_details", -0.5)], AVAILABLE)
    assert plan.loras[0].weight == 0.0


@pytest.mark.parametrize("name", ["%2e%2e/x", "~/x", "a/./x", "x. ", "x\u200b", "C", "CON", "http://host/x"])
def test_odd_names_are_literal_and_only_ever_match_listed_files(name):
    # Never decoded, expanded or normalised into a path: such a name matches only a file listed under that name.
    with pytest.raises(LoraNotFoundError):
        resolve(name, AVAILABLE + ["x.safetensors", "host/x.safetensors"])
    assert resolve(name, AVAILABLE + [name + ".safetensors"]).filename == name + ".safetensors"


def test_a_very_long_name_fails_quickly_with_a_short_message():
    name = "lora_1_v" * 2500  # 20,000 characters: likeness used to be computed on all of it (minutes)
    with pytest.raises(LoraNotFoundError) as caught:
        resolve(name, [f"dir{i % 10}/lora_{i}_v{i % 7}.safetensors" for i in range(300)])
    assert len(str(caught.value)) < 600
    assert "(20000 characters)" in str(caught.value)
    with pytest.raises(LoraResolutionError, match=r"\(20003 characters\) is refused"):
        resolve("../" + "a" * 20000, AVAILABLE)


def test_plan_resolves_a_repeated_name_once(monkeypatch):
    from comfyui_astria.nodes.core import loras

    calls = []
    real_resolve = loras.resolve
    monkeypatch.setattr(loras, "resolve", lambda name, *args: calls.append(name) or real_resolve(name, *args))
    plan = plan_loras([("foobar", 0.25)] * 40 + [("missing", 1.0)] * 40, AVAILABLE)
    assert calls == ["foobar", "missing"]
    assert [(lora.filename, lora.weight) for lora in plan.loras] == [("foobar.safetensors", 10.0)]
    assert [name for name, _error in plan.errors] == ["missing"] * 40
