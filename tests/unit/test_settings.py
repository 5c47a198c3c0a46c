"""Tests of the local only-upscale settings (docs/astria-syntax.md section 7): values, A1111 step semantics, the applied account."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from comfyui_astria.nodes.core import spec_tables
from comfyui_astria.nodes.core.settings import (
    OFF,
    UNSET,
    AstriaSettingsError,
    SamplerDefaults,
    img2img_steps,
    sampler_settings,
)
from comfyui_astria.nodes.core.syntax import parse_prompt
from comfyui_astria.tests.unit.test_syntax import UPSCALE_EXAMPLE  # the docs' full upscale block, one copy

DEFAULTS = SamplerDefaults(steps=20, cfg=7.0, denoise=0.3, sampler_name="dpmpp_2m", scheduler="karras", seed=1234)


def settings_of(text, **overrides):
    defaults = SamplerDefaults(**{**DEFAULTS.__dict__, **overrides})
    return sampler_settings(parse_prompt(text), defaults)


def detail(notes, item):
    (match,) = [note.detail for note in notes if note.item == item]
    return match


def test_upscale_example_settings():
    result = settings_of(UPSCALE_EXAMPLE)
    assert (result.steps, result.denoise, result.cfg) == (16, 0.1, 6.0)
    assert (result.sampler_name, result.scheduler) == ("euler_ancestral", "normal")
    assert result.seed == 1234 and result.seeds == (1234,) and result.num_images == 1
    assert (result.start_step, result.steps_to_run) == (14, 2)
    assert result.weighting == "none"
    assert (result.width, result.height) == (None, None)
    assert result.loras == (("more_details", 0.5), ("SDXLrender_v2.0", 1.0))
    assert detail(result.not_applied, "ar=1:1") == spec_tables.ASPECT_REASON
    assert detail(result.not_applied, "backend_version=1") == spec_tables.REMOTE_ONLY_REASON
    assert detail(result.not_applied, "input_image_url=https://sdbooth2-production.s3.amazonaws.com/"
                  "cvrx6g5wx5tbiuz9ivoah1j19why") == spec_tables.URL_REASON
    assert detail(result.applied, "face_swap=false") == OFF
    assert detail(result.applied, "prompt_expansion=") == UNSET
    assert detail(result.applied, "seed=") == "unset: the node's seed 1234"
    assert result.notices == ()


def test_every_flag_and_param_is_accounted_for_exactly_once():
    text = UPSCALE_EXAMPLE.replace("--only_upscale", "--only_upscale --resemblance 0.6 --hires_cfg_scale 5.5 "
                                   "--tiled_upscale --mask_prompt face --multi two") + "video_duration=5\naspect_ratio=16:9\n"
    prompt = parse_prompt(text)
    result = sampler_settings(prompt, DEFAULTS)
    items = [note.item for note in result.applied + result.not_applied]
    assert len(items) == len(set(items))
    expected = {f"--{name}" for name in prompt.flags}
    found = {item.split(" ")[0].split("=")[0] for item in items if item.startswith("--")}
    assert found == expected
    params = {item.split("=")[0] for item in items if not item.startswith(("--", "<")) and item != "negative_prompt"}
    assert params == set(prompt.params)
    assert "negative_prompt" in items


@given(st.sampled_from(list(spec_tables.PARAM_TYPES) + ["some_unknown"]), st.booleans(), st.booleans())
@settings(max_examples=150, deadline=None)
def test_each_param_lands_in_exactly_one_list(key, model, control_net):
    if key == "negative_prompt":
        return
    value = {"int": "8", "float": "0.5", "bool": "true", "string": "euler"}[spec_tables.PARAM_TYPES.get(key, "string")]
    prompt = parse_prompt(f"x\n{key}={value}")
    result = sampler_settings(prompt, SamplerDefaults(has_upscale_model=model, has_control_net=control_net))
    assert [note.item for note in result.applied + result.not_applied] == [f"{key}={value}"]


@pytest.mark.parametrize(("steps", "denoise", "start", "run"), [
    (16, 0.1, 14, 2), (20, 0.5, 9, 11), (20, 1.0, 0, 20), (16, 0.0, 16, 0), (10, 0.05, 9, 1), (50, 0.999, 0, 50),
    (1, 0.5, 0, 1),
])
def test_a1111_img2img_steps(steps, denoise, start, run):
    assert img2img_steps(steps, denoise) == (start, run)


def test_steps_zero_or_unset_take_the_node_widget_and_are_reported():
    zero = settings_of("x\nsteps=0\ndenoising_strength=0.5")
    assert zero.steps == 20 and zero.steps_to_run == 11
    assert detail(zero.applied, "steps=0") == "Astria's default: the node's 20 steps"
    unset = settings_of("x\nsteps=")
    assert unset.steps == 20 and detail(unset.applied, "steps=") == "unset: the node's 20 steps"
    absent = settings_of("x")
    assert absent.steps == 20 and absent.denoise == 0.3 and absent.cfg == 7.0


def test_denoise_zero_runs_nothing():
    result = settings_of("x\ndenoising_strength=0\nsteps=16")
    assert result.denoise == 0.0 and result.steps_to_run == 0


@pytest.mark.parametrize(("name", "pair"), list(spec_tables.SCHEDULER_MAP.items()))
def test_scheduler_map(name, pair):
    result = settings_of(f"x\nscheduler={name}")
    assert (result.sampler_name, result.scheduler) == pair


def test_scheduler_unset_takes_the_node_widgets():
    assert (settings_of("x\nscheduler=").sampler_name, settings_of("x").scheduler) == ("dpmpp_2m", "karras")


@pytest.mark.parametrize(("name", "why"), [("tcd", "no local equivalent"), ("ddim", "is unknown")])
def test_tcd_and_unknown_schedulers_are_errors_listing_the_known(name, why):
    with pytest.raises(AstriaSettingsError) as caught:
        settings_of(f"x\nscheduler={name}")
    message = str(caught.value)
    assert why in message and f"scheduler={name}" in message
    assert all(known in message for known in spec_tables.SCHEDULER_MAP)


def test_scheduler_names_are_matched_in_any_case_and_a_huge_unknown_one_is_cut_in_the_message():
    assert settings_of("x\nscheduler=EULER_A").sampler_name == "euler_ancestral"
    with pytest.raises(AstriaSettingsError) as caught:
        settings_of("x\nscheduler=" + "z" * 100_000)
    assert len(str(caught.value)) < 400 and "(100000 characters) is unknown" in str(caught.value)


def test_seed_from_prompt_and_seeds_wrap_modulo_2_32():
    result = settings_of("x\nseed=4294967294\nnum_images=4")
    assert result.seed == 4294967294
    assert result.seeds == (4294967294, 4294967295, 0, 1)


def test_unset_seed_uses_the_node_seed_every_time():
    first, second = settings_of("x\nseed=\nnum_images=2"), settings_of("x\nseed=\nnum_images=2")
    assert first.seeds == second.seeds == (1234, 1235)


def test_target_size():
    assert settings_of("x\nw=1024\nh=768").target_size(300, 300) == (1024, 768)
    assert settings_of("x\nw=1024").target_size(512, 256) == (1024, 512)
    assert settings_of("x\nh=1000").target_size(333, 500) == (666, 1000)
    assert settings_of("x").target_size(512, 768) == (1024, 1536)
    assert settings_of("x", scale=1.5).target_size(333, 333) == (500, 500)
    with pytest.raises(AstriaSettingsError):
        settings_of("x").target_size(0, 10)


@pytest.mark.parametrize(("line", "mode"), [("use_lpw=true", "lpw"), ("use_lpw=", "lpw"), ("", "lpw"),
                                             ("use_lpw=false", "none")])
def test_weighting_from_use_lpw(line, mode):
    assert settings_of(f"x\n{line}").weighting == mode


def test_weighting_override_reports_use_lpw_as_not_applied():
    result = settings_of("x\nuse_lpw=false", weighting="comfy")
    assert result.weighting == "comfy"
    assert "overridden" in detail(result.not_applied, "use_lpw=false")


@pytest.mark.parametrize(("value", "model", "where", "words"), [
    ("true", True, "applied", "runs first"),
    ("true", False, "not_applied", "no UPSCALE_MODEL"),
    ("false", True, "not_applied", "runs anyway"),
    ("false", False, "applied", OFF),
    ("", True, "applied", "runs first"),
])
def test_super_resolution_depends_on_the_upscale_model(value, model, where, words):
    result = settings_of(f"x\nsuper_resolution={value}", has_upscale_model=model)
    assert words in detail(getattr(result, where), f"super_resolution={value}")


def test_control_net_items_apply_only_with_a_control_net():
    text = "x --resemblance 0.6\ncontrolnet=tile\ncontrolnet_conditioning_scale=0.4"
    connected = settings_of(text, has_control_net=True)
    assert connected.control_strength == 0.6
    assert "strength 0.6" in detail(connected.applied, "--resemblance 0.6")
    assert "--resemblance" in detail(connected.not_applied, "controlnet_conditioning_scale=0.4")
    assert "tile" in detail(connected.applied, "controlnet=tile")
    alone = settings_of("x\ncontrolnet_conditioning_scale=0.4", has_control_net=True)
    assert alone.control_strength == 0.4
    missing = settings_of(text)
    assert missing.control_strength is None
    assert {note.detail for note in missing.not_applied} == {spec_tables.NO_CONTROL_NET_REASON}


def test_hires_items_belong_to_tiled_upscale():
    result = settings_of("x --hires_cfg_scale 5.5 --hires_denoising_strength 0.4 --only_upscale\nhires_fix=true")
    for item in ("--hires_cfg_scale 5.5", "--hires_denoising_strength 0.4", "hires_fix=true"):
        assert detail(result.not_applied, item) == spec_tables.HIRES_REASON


def test_remote_only_items_and_faceids_are_reported():
    result = settings_of("x <faceid:123:0.8> --tiled_upscale_v2 --remove_background --only_upscale\nface_correct=true"
                         "\nstyle=Cinematic\nbackend_version=0")
    for item in ("<faceid:123:0.8>", "--tiled_upscale_v2", "--remove_background", "face_correct=true",
                 "style=Cinematic", "backend_version=0"):
        assert detail(result.not_applied, item) == spec_tables.REMOTE_ONLY_REASON


def test_unknown_flag_and_key_are_not_applied():
    result = settings_of("x --multi two\nvideo_duration=5")
    assert detail(result.not_applied, "--multi two") == spec_tables.UNKNOWN_FLAG_REASON
    assert detail(result.not_applied, "video_duration=5") == spec_tables.UNKNOWN_PARAM_REASON


def test_missing_only_upscale_gives_a_notice():
    assert any("--only_upscale" in notice for notice in settings_of("x").notices)
    assert settings_of("x --only_upscale").notices == ()


def test_summary_lines():
    lines = settings_of(UPSCALE_EXAMPLE + "steps=16\n").summary_lines()
    assert "Sampler: euler_ancestral / normal" in lines
    assert "Steps: 16 scheduled, 2 run from step 14 at denoise 0.1 (A1111 img2img)" in lines
    assert "Weighting: none" in lines
    assert "LoRAs: more_details (0.5), SDXLrender_v2.0 (1)" in lines
    assert any(line.startswith("Off or unset, nothing to do: ") and "face_swap=false" in line for line in lines)
    assert any(line.startswith("Not applied: ar=1:1: ") for line in lines)
    assert any(line.startswith("Warning: line ") and "steps given again" in line for line in lines)


@pytest.mark.parametrize("bad", [{"steps": 0}, {"denoise": 1.5}, {"seed": -1}, {"seed": 2**32}, {"scale": 0},
                                 {"weighting": "fancy"}, {"cfg": float("nan")}])
def test_bad_node_defaults_are_errors(bad):
    with pytest.raises(AstriaSettingsError):
        settings_of("x", **bad)


def test_settings_the_prompt_leaves_unset_are_named_as_the_nodes():
    """steps=0 (Astria's default), an empty seed and missing keys leave the value to the node's widgets."""
    result = settings_of("a cat --only_upscale\nsteps=0\nseed=\ncfg_scale=5\nw=1024")
    assert result.from_node == ("steps", "denoise", "sampler", "seed")
    assert "Unset in the prompt, so from the node's widgets: steps, denoise, sampler, seed" in result.summary_lines()
    everything = settings_of("a cat\nsteps=20\ndenoising_strength=0.2\ncfg_scale=5\nscheduler=euler\nseed=3\nh=512")
    assert everything.from_node == ()
    assert not any(line.startswith("Unset in the prompt") for line in everything.summary_lines())
