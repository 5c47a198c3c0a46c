"""Astria Tiled Diffusion composes with other packs: a `calc_cond_batch` wrapper among the host's other wrappers,
a node that writes the single `sampler_calc_cond_batch_function` slot, and ComfyUI's EasyCache in both orders."""
import contextlib

import pytest
import torch

from .conftest import run_node

LATENT = (1, 4, 24, 24)  # 192 px: 2 x 2 tiles of 128 px, all one shape (EasyCache would not reset between them)
SMALL_LATENT = (1, 4, 16, 16)  # 128 px: one tile, sampled untouched
TILE, OVERLAP, TILE_BATCH = 128, 32, 2
STEPS = 3  # EasyCache can skip from the third step on


def sample(comfy_host, model, clip, shape=LATENT, steps=STEPS):
    """KSampler (euler, cfg 5: cond and uncond) on a zero latent; returns the samples."""
    nodes = comfy_host.nodes
    positive = nodes.CLIPTextEncode().encode(clip, "a photo of a cat")[0]
    negative = nodes.CLIPTextEncode().encode(clip, "blurry")[0]
    with torch.inference_mode():
        return nodes.KSampler().sample(model, 11, steps, 5.0, "euler", "normal", positive, negative,
                                       {"samples": torch.zeros(shape)})[0]["samples"]


def tiled(comfy_host, model):
    host_diffusion = comfy_host.pack_module.nodes.comfy.host_diffusion
    return host_diffusion.with_tiled_diffusion(model, TILE, OVERLAP, TILE_BATCH)


def with_counter(model, name, events):
    """A clone with a `calc_cond_batch` wrapper that logs its entry (with the latent size it is given) and exit."""
    import comfy.patcher_extension

    def counter(executor, model_, conds, x, sigma, model_options):
        events.append((name, tuple(x.shape[-2:]), x.shape[0]))
        out = executor(model_, conds, x, sigma, model_options)
        events.append((name + " done", tuple(x.shape[-2:]), x.shape[0]))
        return out

    clone = model.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, name, counter)
    return clone


def tile_batches(comfy_host):
    core = comfy_host.pack_module.nodes.core
    plan = core.tiling.latent_tile_plan(LATENT[2], LATENT[3], TILE, OVERLAP)
    return [[plan.tiles[i] for i in batch] for batch in core.multidiffusion.tile_batches(plan, TILE_BATCH)]


@pytest.fixture(scope="module")
def tiled_alone(comfy_host, sd15_pixel):
    """Samples of tiled diffusion alone, by step count (each sampled once per module)."""
    model, clip, _ = sd15_pixel
    return {steps: sample(comfy_host, tiled(comfy_host, model), clip, steps=steps) for steps in (1, STEPS)}


def test_wrappers_before_run_once_per_step_around_it_and_after_once_per_tile_batch(comfy_host, sd15_pixel,
                                                                                      tiled_alone):
    model, clip, _ = sd15_pixel
    events = []
    stacked = with_counter(tiled(comfy_host, with_counter(model, "before", events)), "after", events)
    out = sample(comfy_host, stacked, clip, steps=1)
    batches = tile_batches(comfy_host)
    assert len(batches) == 2
    one_step = [("before", LATENT[2:], 1)]
    for batch in batches:
        shape = (batch[0].height, batch[0].width)
        one_step += [("after", shape, len(batch)), ("after done", shape, len(batch))]
    one_step += [("before done", LATENT[2:], 1)]
    assert events == one_step, events  # cond and uncond go through one call per step, in the order installed
    assert out.shape == LATENT
    assert torch.equal(out, tiled_alone[1])  # the counters change nothing


def test_a_node_that_writes_the_single_slot_keeps_tiled_diffusion(comfy_host, sd15_pixel, tiled_alone):
    import comfy.samplers

    model, clip, _ = sd15_pixel
    calls = []

    def slot_writer(args):  # what SkipLayerGuidanceDiTSimple's slot does outside its skipping range
        calls.append(tuple(args["input"].shape[-2:]))
        return comfy.samplers.calc_cond_batch(args["model"], args["conds"], args["input"], args["sigma"],
                                              args["model_options"])

    for order in ("slot after", "slot before"):
        if order == "slot after":
            stacked = tiled(comfy_host, model).clone()
            stacked.set_model_sampler_calc_cond_batch_function(slot_writer)
        else:
            slotted = model.clone()
            slotted.set_model_sampler_calc_cond_batch_function(slot_writer)
            stacked = tiled(comfy_host, slotted)
        seen = []
        stacked = with_counter(stacked, "inside", seen)
        calls.clear()
        out = sample(comfy_host, stacked, clip, steps=1)
        assert calls == [LATENT[2:]], order  # the slot's function ran, on the whole latent
        shapes = [(batch[0].height, batch[0].width) for batch in tile_batches(comfy_host)]
        assert [shape for name, shape, _ in seen if name == "inside"] == shapes, order  # every tile batch
        assert torch.equal(out, tiled_alone[1]), order


def easycache(comfy_host, model, threshold):
    return run_node(comfy_host, "EasyCache", model=model, reuse_threshold=threshold, start_percent=0.0,
                    end_percent=1.0, verbose=False)[0]


@pytest.mark.parametrize("order", ["easycache then tiled", "tiled then easycache"])
def test_easycache_stacked_with_tiled_diffusion_never_blends_a_wrong_image(comfy_host, sd15_pixel, tiled_alone,
                                                                          caplog, order):
    model, clip, _ = sd15_pixel

    def stack(threshold):
        if order == "easycache then tiled":
            return tiled(comfy_host, easycache(comfy_host, model, threshold))
        return easycache(comfy_host, tiled(comfy_host, model), threshold)

    alone = tiled_alone[STEPS]
    assert torch.equal(sample(comfy_host, stack(0.0), clip), alone)
    caplog.clear()
    skipping = sample(comfy_host, stack(3.0), clip)
    # per-tile calls would skip steps with one tile's cache applied to every tile: a wrong image, so no skipping
    assert torch.equal(skipping, alone)
    assert "EasyCache is off for this tiled run" in caplog.text
    assert caplog.text.count("EasyCache is off") == 1  # once per sampling run, not per step
    assert "EasyCache - skipped 0/" in caplog.text


def test_easycache_still_skips_steps_in_runs_that_fit_one_tile(comfy_host, sd15_pixel, caplog):
    model, clip, _ = sd15_pixel
    cached = sample(comfy_host, easycache(comfy_host, tiled(comfy_host, model), 3.0), clip, shape=SMALL_LATENT)
    assert "EasyCache is off" not in caplog.text
    assert "EasyCache - skipped 1/" in caplog.text  # the third step was skipped
    assert torch.equal(cached, sample(comfy_host, easycache(comfy_host, model, 3.0), clip, shape=SMALL_LATENT))


def with_attention_recorder(model, seen):
    """A clone whose transformer_options carry another pack's attention override: it records the function it is
    handed and runs it."""
    clone = model.clone()

    def recorder(function, *args, **kwargs):
        seen.append(function.__name__)
        return function(*args, **kwargs)

    clone.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = recorder
    return clone


def test_tiled_sampling_on_the_cpu_runs_the_unet_attention_through_sdpa_and_keeps_other_overrides(
        comfy_host, sd15_pixel, tiled_alone, monkeypatch):
    import comfy.cli_args

    from comfyui_astria.tests.support import paths

    if not paths.HOST_ON_CPU:
        pytest.skip("the swap is for the CPU only (the host already uses SDPA on a GPU)")
    model, clip, _ = sd15_pixel
    seen = []
    sample(comfy_host, with_attention_recorder(model, seen), clip, steps=1)
    assert seen and set(seen) == {"attention_sub_quad"}  # the host's own choice on the CPU, untiled
    seen.clear()
    swapped = sample(comfy_host, tiled(comfy_host, with_attention_recorder(model, seen)), clip, steps=1)
    assert seen and set(seen) == {"attention_pytorch"}  # every attention call of every tile, passed to the other
    assert torch.equal(swapped, tiled_alone[1])  # the other override changed nothing
    seen.clear()
    monkeypatch.setattr(comfy.cli_args.args, "use_quad_cross_attention", True)  # the user's explicit choice
    kept = sample(comfy_host, tiled(comfy_host, with_attention_recorder(model, seen)), clip, steps=1)
    assert seen and set(seen) == {"attention_sub_quad"}
    difference = (kept - swapped).abs().max().item() / swapped.abs().max().item()
    assert 0 < difference < 1e-5, difference  # another function, the same result to float rounding
    seen.clear()
    monkeypatch.setattr(comfy.cli_args.args, "use_quad_cross_attention", False)
    sample(comfy_host, tiled(comfy_host, with_attention_recorder(model, seen)), clip, shape=SMALL_LATENT, steps=1)
    assert seen and set(seen) == {"attention_sub_quad"}  # one tile runs untouched, the host's own sampling


def with_layout_recorder(model, layouts, fail_on_call=None):
    """A clone whose diffusion-model wrapper records, per UNet call, whether every 3x3 convolution weight is
    channels_last (and raises on call number `fail_on_call`, counting from 1)."""
    import comfy.patcher_extension

    def recorder(executor, *args, **kwargs):
        unet = executor.class_obj
        layouts.append(all(p.is_contiguous(memory_format=torch.channels_last)
                           for p in unet.parameters() if p.ndim == 4 and p.shape[-1] > 1))
        if len(layouts) == fail_on_call:
            raise RuntimeError("stopped by the test")
        return executor(*args, **kwargs)

    clone = model.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test-layout", recorder)
    return clone


def test_tiled_sampling_on_the_cpu_runs_the_unet_convolutions_channels_last_then_restores_the_weights(
        comfy_host, sd15_pixel, tiled_alone, monkeypatch):
    from comfyui_astria.tests.support import paths

    if not paths.HOST_ON_CPU:
        pytest.skip("the layout change is for the CPU only")
    model, clip, _ = sd15_pixel
    unet = model.model.diffusion_model
    before = {name: p.detach().clone() for name, p in unet.named_parameters() if p.ndim == 4}
    layouts = []
    tiled_result = sample(comfy_host, tiled(comfy_host, with_layout_recorder(model, layouts)), clip, steps=1)
    assert layouts and all(layouts), layouts  # every tile's UNet call ran on channels_last weights
    for name, p in unet.named_parameters():
        if p.ndim == 4:  # afterwards the weights are as they were: layout and values
            assert p.is_contiguous() and torch.equal(p, before[name]), name
    layouts.clear()
    sample(comfy_host, with_layout_recorder(model, layouts), clip, steps=1)
    assert layouts and not any(layouts)  # the host's own (untiled) sampling: the model's own layout
    layouts.clear()
    sample(comfy_host, tiled(comfy_host, with_layout_recorder(model, layouts)), clip, shape=SMALL_LATENT, steps=1)
    assert layouts and not any(layouts)  # one tile runs untouched
    layouts.clear()
    with pytest.raises(Exception, match="stopped by the test"):
        sample(comfy_host, tiled(comfy_host, with_layout_recorder(model, layouts, fail_on_call=2)), clip, steps=1)
    assert all(p.is_contiguous() for p in unet.parameters())  # restored when a step stops half way
    host_diffusion = comfy_host.pack_module.nodes.comfy.host_diffusion
    monkeypatch.setattr(host_diffusion, "channels_last_convolutions", lambda _: contextlib.nullcontext())
    default_layout = sample(comfy_host, tiled(comfy_host, model), clip, steps=1)
    difference = (default_layout - tiled_result).abs().max().item() / tiled_result.abs().max().item()
    assert difference < 1e-5, difference  # the same result to float rounding
