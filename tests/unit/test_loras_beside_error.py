"""syntax.loras_beside_error: the LoRA tags a preview still lists while another line holds a syntax error."""
import pytest

from comfyui_astria.nodes.core import syntax


def refused(text):
    """The AstriaSyntaxError the parser raises for `text`."""
    with pytest.raises(syntax.AstriaSyntaxError) as error:
        syntax.parse_prompt(text)
    return error.value


def test_the_tags_of_every_other_prompt_line_are_listed_in_order():
    text = "a <lora:one:0.5> photo\r\n<lora:two:1> <faceid:face:1>\n<lora:broken\n<lora:three:0.25>\nsteps=abc"
    error = refused(text)
    assert error.line == 3
    assert syntax.loras_beside_error(text, error) == [("one", 0.5), ("two", 1.0), ("three", 0.25)]


def test_a_param_line_error_keeps_all_prompt_line_tags_and_reads_no_negative_text():
    text = "a <lora:one:0.5> photo --only_upscale\nnegative_prompt=<lora:neg:1>\nsteps=abc"
    assert syntax.loras_beside_error(text, refused(text)) == [("one", 0.5)]


def test_another_broken_tag_line_is_skipped_too():
    text = "<lora:ok:1>\n<lora:first_broken\n<lora:second_broken"
    assert syntax.loras_beside_error(text, refused(text)) == [("ok", 1.0)]
