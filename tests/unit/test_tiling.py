"""Tile plans and MultiDiffusion blending, without ComfyUI (needs torch: run with the host venv's python)."""
import pytest

torch = pytest.importorskip("torch", reason="tiling is torch code; run with the ComfyUI host venv's python")

from hypothesis import given, settings
from hypothesis import strategies as st

from comfyui_astria.nodes.core import multidiffusion as md
from comfyui_astria.nodes.core.cancel import Cancelled
from comfyui_astria.nodes.core.tiling import Tile, latent_tile_plan, tile_plan


def weight_sum(plan):
    total = torch.zeros(plan.height, plan.width)
    coverage = torch.zeros(plan.height, plan.width, dtype=torch.int32)
    for i, tile in enumerate(plan.tiles):
        total[tile.slices()] += plan.weight(i)
        coverage[tile.slices()] += 1
    return total, coverage


def check_plan(plan, tile_size, align):
    tiles = plan.tiles
    total, coverage = weight_sum(plan)
    assert torch.equal(total, torch.ones_like(total)), "weights must sum to exactly 1"
    assert int(coverage.min()) >= 1
    for tile in tiles:
        assert tile.y >= 0 and tile.x >= 0
        assert tile.y + tile.height <= plan.height and tile.x + tile.width <= plan.width
        assert tile.height <= max(tile_size, 1) or tile.height == plan.height
    for axis in (plan.rows, plan.columns):
        if len(axis.sizes) > 1:
            assert all(s % align == 0 and s <= tile_size for s in axis.sizes)
            assert min(axis.sizes) * 2 >= max(axis.sizes), "no tile smaller than half the others"
            assert all(b > a for a, b in zip(axis.starts, axis.starts[1:]))
            assert axis.starts[-1] + axis.sizes[-1] == axis.length
        else:
            assert axis.sizes == (axis.length,)
    for i in range(len(tiles)):
        w = plan.weight(i)
        assert w.shape == (tiles[i].height, tiles[i].width) and float(w.min()) >= 0


@pytest.mark.parametrize("height,width", [(1, 1), (1, 2), (7, 13), (97, 131), (1023, 1023), (8191, 300), (300, 8191), (8191, 5)])
def test_odd_sizes_are_covered_with_exact_weights(height, width):
    plan = tile_plan(height, width, tile_size=1024, overlap=64, align=8)
    check_plan(plan, 1024, 8)


def test_area_no_larger_than_a_tile_is_one_tile():
    plan = latent_tile_plan(128, 128)  # 1024 px with the default 1024 px tiles
    assert len(plan) == 1 and plan.amplification == 1.0


def test_tiles_are_even_and_overlap_at_least_the_asked_overlap():
    plan = tile_plan(256, 256, tile_size=128, overlap=8, align=8)
    assert plan.rows.sizes in ((96, 88, 88), (88, 96, 88), (96, 96, 80)) or set(plan.rows.sizes) <= {88, 96}
    ends = [s + n for s, n in zip(plan.rows.starts, plan.rows.sizes)]
    assert all(end - start >= 8 for end, start in zip(ends, plan.rows.starts[1:]))


@pytest.mark.parametrize("pixels", [1024, 2048, 3072, 4096])
def test_default_unet_work_amplification_is_at_most_1_15(pixels):
    assert latent_tile_plan(pixels // 8, pixels // 8).amplification <= 1.15


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 400), st.integers(1, 400), st.sampled_from([8, 16, 24, 64, 128]), st.integers(0, 80),
       st.sampled_from([1, 8]))
def test_random_plans_cover_and_sum_to_one(height, width, tile_size, overlap, align):
    if tile_size < align:
        return
    check_plan(tile_plan(height, width, tile_size, overlap, align), tile_size, align)


def test_bad_settings_are_explained():
    with pytest.raises(ValueError, match="at least 1"):
        tile_plan(0, 5, 8, 0)
    with pytest.raises(ValueError, match="too small"):
        latent_tile_plan(64, 64, tile_size=32)


def positionwise_model(x):
    """A stand-in for a denoiser whose output at a cell depends only on that cell (exact under tiling)."""
    return torch.tanh(x) * 0.5 + x.pow(2) * 0.1


def run_tiled(x, plan, model_fn, tile_batch_size, **options):
    """One tiled calc_cond_batch call whose executor runs model_fn(crops) on each tile batch (a single cond)."""
    args = {"conds": [None], "input": x, "sigma": torch.ones(x.shape[0]), "model": None, "model_options": {}}
    return md.tiled_calc_cond_batch(args, lambda height, width: plan, lambda model, conds, crops, sigma, opts:
                                    [model_fn(crops)], tile_batch_size, **options)[0]


def test_multidiffusion_is_exact_for_a_positionwise_model():
    x = torch.randn(2, 4, 45, 67, generator=torch.Generator().manual_seed(0))
    plan = tile_plan(45, 67, tile_size=24, overlap=6, align=8)
    calls = []

    def denoise(crops):
        calls.append(crops.shape[0] // 2)
        return positionwise_model(crops)

    out = run_tiled(x, plan, denoise, 3)
    assert torch.allclose(out, positionwise_model(x), atol=1e-5)
    assert sum(calls) == len(plan)
    assert all(n <= 3 for n in calls)


def test_multidiffusion_blends_different_tile_outputs_with_the_weights():
    x = torch.arange(30.0).expand(1, 1, 10, 30).clone()  # each crop's first column is its tile's x
    plan = tile_plan(10, 30, tile_size=16, overlap=6, align=1)
    out = run_tiled(x, plan, lambda crops: crops[..., :1, :1].expand(crops.shape).clone(), 1)
    expected = torch.zeros(10, 30)
    for i, tile in enumerate(plan.tiles):
        expected[tile.slices()] += plan.weight(i) * tile.x
    assert torch.allclose(out[0, 0], expected)
    assert out[0, 0, 0, 0] == 0 and out[0, 0, 0, -1] == plan.tiles[-1].x


def test_progress_per_tile_and_cancel_between_batches():
    x = torch.randn(1, 4, 40, 40)
    plan = tile_plan(40, 40, tile_size=16, overlap=4, align=8)
    seen = []
    run_tiled(x, plan, lambda c: c, 2, progress=lambda d, n: seen.append((d, n)))
    assert seen == [(i + 1, len(plan)) for i in range(len(plan))]

    asked = []

    def cancel_after_two():
        asked.append(1)
        return len(asked) > 2

    with pytest.raises(Cancelled):
        run_tiled(x, plan, lambda c: c, 1, should_cancel=cancel_after_two)
    assert len(asked) == 3


# ---- the ComfyUI hook, against a fake calc_cond_batch that behaves like the host's


class FakeCond:
    """Like the host's CONDRegular: a tensor repeated to the batch, `_copy_with` for copies."""

    def __init__(self, cond):
        self.cond = cond

    def _copy_with(self, cond):
        return FakeCond(cond)


class FakeControl:
    """Like the host's ControlNet: a pixel-space hint resized to the input and cached."""

    compression_ratio = 8

    def __init__(self, hint, previous=None):
        self.cond_hint_original = hint
        self.cond_hint = None
        self.previous_controlnet = previous
        self.extra_concat_orig = []

    def hint_for(self, x):
        if self.cond_hint is None:
            self.cond_hint = md.default_resize(self.cond_hint_original, x.shape[-2] * 8, x.shape[-1] * 8)
        return self.cond_hint


def fake_calc_cond_batch(model, conds, x, sigma, model_options):
    """Position-wise 'model': x * sigma + mean of the cond's spatial tensors at that cell, area and mask aware."""
    outs = []
    for cond_list in conds:
        total = torch.zeros_like(x)
        count = torch.full_like(x, 1e-37)
        for c in cond_list or []:
            sig = sigma.view(-1, 1, 1, 1)
            assert sig.shape[0] == x.shape[0]
            pred = x * sig + c["model_conds"]["c_concat"].cond
            if c.get("control") is not None:
                hint = c["control"].hint_for(x)
                pred = pred + torch.nn.functional.avg_pool2d(hint, 8).mean(1, keepdim=True)
            mult = torch.ones_like(x) if c.get("mask") is None else c["mask"][:, None].expand_as(x)
            if "area" in c:
                h, w, y, x0 = c["area"]
                region = (..., slice(y, y + h), slice(x0, x0 + w))
                total[region] += pred[region] * mult[region]
                count[region] += mult[region]
            else:
                total += pred * mult
                count += mult
        outs.append(total / count)
    return outs


def test_hook_equals_the_untiled_call_with_masks_concat_latents_and_controlnet_hints():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 40, 56, generator=gen)
    sigma = torch.tensor([3.0, 2.0])
    concat = torch.randn(2, 4, 40, 56, generator=gen)
    mask = torch.rand(1, 40, 56, generator=gen) + 0.1
    hint = torch.rand(1, 3, 40 * 8, 56 * 8, generator=gen)

    def conds():
        control = FakeControl(hint)
        return [[{"model_conds": {"c_concat": FakeCond(concat)}, "mask": mask, "control": control}],
                [{"model_conds": {"c_concat": FakeCond(concat * 0.5)}}]]

    args = {"conds": conds(), "input": x, "sigma": sigma, "model": None, "model_options": {}}
    untiled = fake_calc_cond_batch(None, conds(), x, sigma, {})
    plan = tile_plan(40, 56, tile_size=24, overlap=8, align=8)
    tiled = md.tiled_calc_cond_batch(args, lambda h, w: plan, fake_calc_cond_batch, tile_batch_size=4)
    for a, b in zip(tiled, untiled):
        assert torch.allclose(a, b, atol=1e-5)


def test_hook_crops_area_conds_per_tile():
    x = torch.randn(1, 4, 32, 48)
    sigma = torch.tensor([1.5])
    concat = torch.randn(1, 4, 32, 48)
    conds = [[{"model_conds": {"c_concat": FakeCond(concat)}, "area": (10, 20, 5, 17)},
              {"model_conds": {"c_concat": FakeCond(concat * 2)}}], None]
    args = {"conds": conds, "input": x, "sigma": sigma, "model": None, "model_options": {}}
    plan = tile_plan(32, 48, tile_size=16, overlap=4, align=8)
    sizes = []

    def calc(model, c, xs, s, mo):
        sizes.append(xs.shape[0])
        return fake_calc_cond_batch(model, c, xs, s, mo)

    tiled = md.tiled_calc_cond_batch(args, lambda h, w: plan, calc, tile_batch_size=4)
    assert torch.allclose(tiled[0], fake_calc_cond_batch(None, conds, x, sigma, {})[0], atol=1e-5)
    assert set(sizes) == {1}


def test_hook_with_one_tile_calls_the_host_unchanged():
    x = torch.randn(1, 4, 16, 16)
    args = {"conds": [[{"model_conds": {"c_concat": FakeCond(x)}}]], "input": x, "sigma": torch.tensor([1.0]),
            "model": "m", "model_options": {"k": 1}}
    seen = []
    md.tiled_calc_cond_batch(args, lambda h, w: tile_plan(h, w, 64, 8), lambda *a: seen.append(a) or [x])
    assert seen[0][2] is x and seen[0][0] == "m"


def test_crop_control_copies_the_chain_and_leaves_the_original_alone():
    hint = torch.arange(2 * 3 * 16 * 24, dtype=torch.float32).reshape(2, 3, 16, 24)
    first = FakeControl(hint)
    second = FakeControl(hint * 2, previous=first)
    tiles = [Tile(0, 1, 1, 2), Tile(1, 0, 1, 2)]
    clone = md.crop_control(second, tiles, batch=2, latent_size=(2, 3))
    assert clone is not second and second.cond_hint_original is not clone.cond_hint_original
    assert clone.cond_hint_original.shape == (4, 3, 8, 16)
    assert torch.equal(clone.cond_hint_original[0], hint[0, :, 0:8, 8:24] * 2)
    assert torch.equal(clone.previous_controlnet.cond_hint_original[3], hint[1, :, 8:16, 0:16])
    assert first.previous_controlnet is None and clone.previous_controlnet is not first
