"""Exact tiled VAE against the host's own VAE classes (ComfyUI's AutoencoderKL) with seeded random weights."""
import copy
import dataclasses
import math
import os
import sys
import time
from pathlib import Path

import pytest

from comfyui_astria.tests.support import paths

torch = pytest.importorskip("torch", reason="needs the ComfyUI host venv's python")

COMFY = Path(os.environ.get("COMFYUI_PATH", Path.home() / ".cache/comfyui-astria/host-0.3.75/ComfyUI"))
if not (COMFY / "comfy" / "sd.py").is_file():
    pytest.skip(f"no ComfyUI tree at {COMFY} (set COMFYUI_PATH)", allow_module_level=True)
if str(COMFY) not in sys.path:
    sys.path.insert(0, str(COMFY))
import comfy.cli_args

comfy.cli_args.args.cpu = paths.HOST_ON_CPU  # before comfy.model_management is imported

from comfyui_astria.nodes.core import tiled_vae  # noqa: E402
from comfyui_astria.nodes.core.cancel import Cancelled  # noqa: E402
from comfyui_astria.tests.support.random_vae import random_vae  # noqa: E402

SMALL = {"ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1}


@pytest.fixture(autouse=True)
def float32_attention(monkeypatch):
    """The tests below check the tiling's float32 arithmetic against untiled to 1e-4, so the attention's products
    stay float32 on every CPU; the bfloat16 products (the default on CPUs fast at them) have their own tests."""
    monkeypatch.setattr(tiled_vae, "BF16_ATTENTION_MIN_SPEEDUP", math.inf)


@pytest.mark.parametrize("size", [(40, 56), (37, 23)])
def test_small_vae_decode_equals_untiled(size):
    vae = random_vae(0, **SMALL)
    latent = torch.randn(2, 4, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = vae.decode(latent)
    got = tiled_vae.tiled_decode(vae, latent, tile_size=24, storage_dtype=torch.float32)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("size", [(96, 128), (75, 41)])
def test_small_vae_encode_equals_untiled(size):
    vae = random_vae(0, **SMALL)
    pixels = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        expected = vae.encode(pixels)
    got = tiled_vae.tiled_encode(vae, pixels, tile_size=24, storage_dtype=torch.float32)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4


def test_attention_queries_in_several_chunks_per_tile_equal_untiled(monkeypatch):
    vae = random_vae(0, **SMALL)
    latent = torch.randn(1, 4, 40, 56, generator=torch.Generator().manual_seed(1))
    calls = []
    real_sdpa = tiled_vae.F.scaled_dot_product_attention
    monkeypatch.setattr(tiled_vae.F, "scaled_dot_product_attention",
                        lambda q, k, v: calls.append(q.shape[2]) or real_sdpa(q, k, v))
    monkeypatch.setattr(tiled_vae, "ATTENTION_SCORE_ELEMENTS", 7 * 40 * 56)  # 7 queries per call
    with torch.no_grad():
        expected = vae.decode(latent)
    seen = []
    got = tiled_vae.tiled_decode(vae, latent, tile_size=24, storage_dtype=torch.float32,
                                 progress=lambda done, total: seen.append((done, total)))
    assert calls and max(calls) == 7 and min(calls) < 7  # chunks that do not divide a tile's queries
    assert (got - expected).abs().max().item() < 1e-4
    # progress moves once per query chunk (one attention tile at 6144 px is minutes of work) and ends at its total
    assert seen[-1][0] == seen[-1][1] == len(seen) and len(seen) > len(calls)


def test_float16_storage_stays_close():
    vae = random_vae(0, **SMALL)
    latent = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = vae.decode(latent)
    got = tiled_vae.tiled_decode(vae, latent, tile_size=24, storage_dtype=torch.float16)
    assert (got - expected).abs().max().item() < 1e-2


def test_full_sd_vae_decode_at_256_px_and_encode_at_128_px_with_64_px_tiles():
    vae = random_vae(4)
    latent = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = vae.decode(latent)
        pixels = expected[:, :, 64:192, 32:160].clamp(-1, 1)  # encode a 128 px crop: half the test's time
        expected_latent = vae.encode(pixels)
    got = tiled_vae.tiled_decode(vae, latent, tile_size=64)
    assert (got - expected).abs().max().item() <= 1e-3
    got_latent = tiled_vae.tiled_encode(vae, pixels, tile_size=64)
    assert (got_latent - expected_latent).abs().max().item() <= 1e-3


def _window_masked_attention(block, size, halo):
    """An AttnBlock forward over the whole image where each query sees only the keys in its block's window (the
    block of `size` positions it lies in, widened by `halo` on each side): local attention, written untiled."""
    def forward(x):
        b, c, h, w = x.shape
        normed = block.norm(x)
        q, k, v = (layer(normed).flatten(2).transpose(1, 2) for layer in (block.q, block.k, block.v))
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        ys, xs = ys.flatten(), xs.flatten()
        top, left = ys // size * size - halo, xs // size * size - halo  # the query's window, per query
        bottom, right = ys // size * size + size + halo, xs // size * size + size + halo
        seen = ((ys[None] >= top[:, None]) & (ys[None] < bottom[:, None])
                & (xs[None] >= left[:, None]) & (xs[None] < right[:, None]))
        scores = (q @ k.transpose(1, 2)) / c**0.5
        attended = torch.softmax(scores.masked_fill(~seen, float("-inf")), dim=-1) @ v
        return x + block.proj_out(attended.transpose(1, 2).reshape(b, c, h, w))
    return forward


@pytest.mark.parametrize("encode", [False, True])
def test_local_attention_equals_the_untiled_vae_with_each_query_block_masked_to_its_window(monkeypatch, encode):
    block, halo = 8, 4
    monkeypatch.setattr(tiled_vae, "LOCAL_ATTENTION_BLOCK", block)
    monkeypatch.setattr(tiled_vae, "LOCAL_ATTENTION_HALO", halo)
    vae = random_vae(0, **SMALL)
    masked = copy.deepcopy(vae)
    coder = masked.encoder if encode else masked.decoder
    coder.mid.attn_1.forward = _window_masked_attention(coder.mid.attn_1, block, halo)
    if encode:  # ch_mult 1, 2, 2: the attention runs at a quarter of the pixels, 40 x 56 positions
        given = torch.rand(1, 3, 160, 224, generator=torch.Generator().manual_seed(2)) * 2 - 1
        run, untiled, untiled_masked = tiled_vae.tiled_encode, vae.encode, masked.encode
    else:
        given = torch.randn(1, 4, 40, 56, generator=torch.Generator().manual_seed(1))
        run, untiled, untiled_masked = tiled_vae.tiled_decode, vae.decode, masked.decode
    with torch.no_grad():
        expected, exact = untiled_masked(given), untiled(given)
    seen = []
    got = run(vae, given, tile_size=24, storage_dtype=torch.float32, local_attention=True,
              progress=lambda done, total: seen.append((done, total)))
    assert (got - expected).abs().max().item() < 1e-4
    assert (got - exact).abs().max().item() > 1e-3  # not the exact attention: windows of 16 x 16 of 40 x 56
    assert seen[-1][0] == seen[-1][1] == len(seen)


def test_progress_counts_every_tile_and_cancel_stops_between_tiles():
    vae = random_vae(0, **SMALL)
    latent = torch.randn(1, 4, 24, 24)
    seen = []
    tiled_vae.tiled_decode(vae, latent, tile_size=16, progress=lambda done, total: seen.append((done, total)))
    assert len(seen) > 10 and seen[-1][0] == seen[-1][1] == len(seen)
    asked = []
    with pytest.raises(Cancelled):
        tiled_vae.tiled_decode(vae, latent, tile_size=16, should_cancel=lambda: asked.append(1) or len(asked) > 5)
    assert len(asked) == 6


def test_unknown_shapes_raise_unsupported():
    vae = random_vae(0, **SMALL)
    vae.decoder.tanh_out = True
    with pytest.raises(tiled_vae.UnsupportedVAE, match="tanh_out"):
        tiled_vae.tiled_decode(vae, torch.randn(1, 4, 8, 8))
    vae = random_vae(0, **SMALL)
    vae.decoder.mid.attn_1.q = torch.nn.Conv2d(64, 64, 3, padding=1)
    with pytest.raises(tiled_vae.UnsupportedVAE, match="attn_1.q"):
        tiled_vae.check_vae(vae)
    with pytest.raises(tiled_vae.UnsupportedVAE):
        tiled_vae.check_vae(torch.nn.Conv2d(3, 3, 1))


def test_channels_first_layout_equals_untiled(monkeypatch):
    """The layout used off CPU for contiguous inputs (CPU runs channels_last) gives the same result."""
    original = tiled_vae._settings
    def channels_first(*args, **kwargs):
        return dataclasses.replace(original(*args, **kwargs), channels_last=False)
    monkeypatch.setattr(tiled_vae, "_settings", channels_first)
    vae = random_vae(0, **SMALL)
    latent = torch.randn(1, 4, 21, 30, generator=torch.Generator().manual_seed(6))
    pixels = torch.rand(1, 3, 72, 50, generator=torch.Generator().manual_seed(7)) * 2 - 1
    with torch.no_grad():
        expected, expected_latent = vae.decode(latent), vae.encode(pixels)
    got = tiled_vae.tiled_decode(vae, latent, tile_size=24, storage_dtype=torch.float32)
    got_latent = tiled_vae.tiled_encode(vae, pixels, tile_size=24, storage_dtype=torch.float32)
    assert not got.is_contiguous(memory_format=torch.channels_last)
    assert (got - expected).abs().max().item() < 1e-4
    assert (got_latent - expected_latent).abs().max().item() < 1e-4


def test_channels_last_image_encodes_like_untiled():
    """ComfyUI's (B, H, W, C) images arrive channels_last."""
    vae = random_vae(0, **SMALL)
    image = torch.rand(2, 64, 80, 3, generator=torch.Generator().manual_seed(8))
    pixels = image.movedim(-1, 1) * 2 - 1
    with torch.no_grad():
        expected = vae.encode(pixels)
    got = tiled_vae.tiled_encode(vae, pixels, tile_size=24, storage_dtype=torch.float32)
    assert (got - expected).abs().max().item() < 1e-4


def test_values_beyond_float16_switch_storage_to_float32():
    """Activations far past float16's range (forced float16 storage) stay exact instead of overflowing."""
    vae = random_vae(0, **SMALL)
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(1e5)
        vae.encoder.conv_in.bias.mul_(1e5)
    pixels = torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(9)) * 2 - 1
    with torch.no_grad():
        expected = vae.encode(pixels)
        assert vae.encoder.conv_in(pixels).abs().max().item() > 70000  # the premise: float16 would overflow
    got = tiled_vae.tiled_encode(vae, pixels, tile_size=24, storage_dtype=torch.float16)
    assert torch.isfinite(got).all()
    assert (got - expected).abs().max().item() < 1e-3 * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize("layout, offset", [("channels_last", 100.0), ("channels_first", 1.0)])
def test_tile_moments_of_a_cropped_conv_output_equal_float64_ones(layout, offset):
    """A conv's output with its halo cropped off: the fused statistics less the halo strips (channels_last on the
    CPU) give the crop's own float64 moments even where the mean is 10^4 times the spread (float32 sums of squares
    cancel there); the row sums (any other tile, e.g. on a GPU) do at a mean 100 times the spread; both bound every
    |value| of the crop."""
    gen = torch.Generator().manual_seed(12)
    computed = torch.randn(2, 16, 35, 29, generator=gen) * 0.01 + offset * torch.rand(1, 16, 1, 1, generator=gen)
    if layout == "channels_last":
        computed = computed.contiguous(memory_format=torch.channels_last)
    margins = (1, 2, 3, 1)
    crop = tiled_vae._crop(computed, *margins)
    count, means, m2, bound = tiled_vae._tile_moments(crop, computed, margins)
    reference = crop.to(torch.float64)
    expected_means = reference.mean(dim=(2, 3))
    expected_m2 = (reference - expected_means[..., None, None]).square().sum(dim=(2, 3))
    assert count == crop.shape[2] * crop.shape[3]
    assert (means - expected_means).abs().max().item() < 2e-6 * offset  # float32 sums: a few ulps of the mean
    assert ((m2 - expected_m2).abs() / expected_m2).max().item() < 1e-3
    assert bound.item() >= crop.abs().max().item()


def test_activation_moments_merge_tile_by_tile_to_the_whole_images_group_norm():
    """Tiles of unequal size merged one by one (Chan's update) give the GroupNorm of the whole activation."""
    settings = tiled_vae._settings(random_vae(0, **SMALL), "cpu", torch.float32, 24, torch.float32, None, None)
    gen = torch.Generator().manual_seed(13)
    whole = (torch.randn(1, 32, 40, 30, generator=gen) * 0.05 + 30.0).contiguous(memory_format=torch.channels_last)
    act = tiled_vae._Activation(*whole.shape, settings)
    for rows, cols in tiled_vae._tiles(40, 30, 16):
        act.write(rows, cols, whole[:, :, rows, cols].contiguous(memory_format=torch.channels_last))
    norm = torch.nn.GroupNorm(8, 32, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=gen)
        norm.bias.uniform_(-0.5, 0.5, generator=gen)
        expected = copy.deepcopy(norm).double()(whole.double())  # torch's float32 GroupNorm cancels here
    scale, shift = act.group_stats(norm)
    assert (whole * scale + shift - expected).abs().max().item() < 1e-3  # float32 rounding of x * scale


def test_a_spilled_layer_asks_for_the_next_tiles_pages_while_this_tile_computes(tmp_path, monkeypatch):
    """In a spilled run each tile's compute starts after the next tile's input region (with its halo) and output
    region were asked for (`SpillStore.will_need`; writing for the output), so their pages come in from the disk
    while this tile computes; the layer's result is unchanged."""
    spill = tiled_vae.SpillStore(str(tmp_path))
    settings = tiled_vae._settings(random_vae(0, **SMALL), "cpu", torch.float32, 24, torch.float32, None, None, spill)
    source = tiled_vae._Activation(1, 8, 40, 40, settings)
    values = torch.randn(1, 8, 40, 40, generator=torch.Generator().manual_seed(5))
    source.data.copy_(values)
    asked, seen_at_compute = [], []
    real = spill.will_need
    monkeypatch.setattr(spill, "will_need", lambda t, writing=False: asked.append((t.data_ptr(), t.shape, writing))
                        or real(t, writing))

    def compute(tile):
        seen_at_compute.append(list(asked))
        return tile * 2

    regions = list(tiled_vae._tiles(40, 40, 16))  # 3 x 3 tiles
    out = tiled_vae._same_layer(source, 8, settings, compute, 1, regions=regions)
    assert len(seen_at_compute) == len(regions) == 9
    for (rows, cols), asked_before in zip(regions[1:], seen_at_compute):
        grown = source.data[:, :, tiled_vae._grow(rows, 1, 40)[0], tiled_vae._grow(cols, 1, 40)[0]]
        written = out.data[:, :, rows, cols]
        assert (grown.data_ptr(), grown.shape, False) in asked_before
        assert (written.data_ptr(), written.shape, True) in asked_before
    assert torch.equal(out.data, values * 2)


def test_cancel_is_asked_again_after_a_tiles_read_before_its_compute():
    """A Cancel that comes while a tile is read (seconds where a spilled run reads through the disk) stops the layer
    before that tile computes: nothing is computed after the request."""
    requested, computed = [], []
    settings = tiled_vae._settings(random_vae(0, **SMALL), "cpu", torch.float32, 24, torch.float32,
                                   lambda: bool(requested), None)
    source = tiled_vae._Activation(1, 8, 40, 40, settings)
    source.data.copy_(torch.randn(1, 8, 40, 40, generator=torch.Generator().manual_seed(6)))
    real_read = source.read
    source.read = lambda *args, **kwargs: requested.append(True) or real_read(*args, **kwargs)  # Cancel mid-read
    with pytest.raises(Cancelled):
        tiled_vae._same_layer(source, 8, settings, lambda tile: computed.append(tile) or tile * 2, 1,
                              regions=list(tiled_vae._tiles(40, 40, 16)))
    assert computed == []


def test_stored_bytes_counts_the_largest_layer_twice_in_float16_plus_the_input():
    vae = random_vae(0)
    # decode: the 256-channel upsample output at full resolution is the largest layer
    assert tiled_vae.stored_bytes(vae, (1, 4, 64, 64), encode=False) == 2 * 2 * 256 * 512 * 512 + 4 * 64 * 64 * 4
    # encode: the 128-channel full-resolution layers, batch 2
    assert tiled_vae.stored_bytes(vae, (2, 3, 512, 512), encode=True) == 2 * (2 * 2 * 128 * 512 * 512
                                                                             + 3 * 512 * 512 * 4)


def test_bfloat16_compute_is_as_close_to_float32_as_the_untiled_bfloat16_decode():
    """GroupNorm's scale-and-shift runs in float32 for half dtypes (in bf16 it cancels catastrophically)."""
    vae = random_vae(0)
    latent = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = vae.decode(latent)
        half = copy.deepcopy(vae).to(torch.bfloat16)
        untiled_error = (half.decode(latent.to(torch.bfloat16)).float() - reference).abs().max().item()
    tiled = tiled_vae.tiled_decode(half, latent.to(torch.bfloat16), tile_size=128)
    tiled_error = (tiled - reference).abs().max().item()
    assert tiled_error <= 1.5 * untiled_error, (tiled_error, untiled_error)


def test_bfloat16_batch_normalises_each_sample_with_its_own_statistics():
    """Two latents with different means and spreads in one bfloat16 batch: each as close to its float32 decode as
    the untiled bfloat16 batch is."""
    vae = random_vae(0)
    base = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    latent = torch.stack([base[0], base[1] * 3 + 1])
    with torch.no_grad():
        reference = vae.decode(latent)
        half = copy.deepcopy(vae).to(torch.bfloat16)
        untiled = half.decode(latent.to(torch.bfloat16)).float()
    tiled = tiled_vae.tiled_decode(half, latent.to(torch.bfloat16), tile_size=48)
    for sample in range(2):
        untiled_error = (untiled[sample] - reference[sample]).abs().max().item()
        tiled_error = (tiled[sample] - reference[sample]).abs().max().item()
        assert tiled_error <= 1.5 * untiled_error, (sample, tiled_error, untiled_error)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_compute_keeps_activations_in_its_own_dtype_losslessly(monkeypatch, half):
    """A bfloat16/float16 run stores its tiles as computed: no float32 copies, no float16 range check (a GPU sync
    per tile), and the same result as float32 storage, bit for bit."""
    vae = copy.deepcopy(random_vae(0)).to(half)
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(6)).to(half)
    stored = []
    write = tiled_vae._Activation.write

    def spy(self, rows, cols, tile, *computed):
        stored.append(self.data.dtype)
        return write(self, rows, cols, tile, *computed)

    monkeypatch.setattr(tiled_vae._Activation, "write", spy)
    got = tiled_vae.tiled_decode(vae, latent, tile_size=48)
    assert stored and set(stored) == {half}
    monkeypatch.setattr(tiled_vae._Activation, "write", write)
    exact = tiled_vae.tiled_decode(vae, latent, tile_size=48, storage_dtype=torch.float32)
    assert torch.equal(got, exact)


def test_spilled_activations_give_the_untiled_result_and_live_in_files(tmp_path, monkeypatch):
    """The spill path (activations in mapped temporary files, pages handed back to the kernel after every few
    tiles) is the same arithmetic: encode and decode match untiled, and the full activations went through the
    store's files (freed when the run ends)."""
    monkeypatch.setattr(tiled_vae, "SPILL_RESIDENT_BYTES", 2**16)  # hand pages back after every tile here
    released = []
    real_release = tiled_vae.SpillStore.release
    monkeypatch.setattr(tiled_vae.SpillStore, "release", lambda self: released.append(1) or real_release(self))
    vae = random_vae(0, **SMALL)
    latent = torch.randn(1, 4, 30, 22, generator=torch.Generator().manual_seed(10))
    pixels = torch.rand(1, 3, 72, 56, generator=torch.Generator().manual_seed(11)) * 2 - 1
    with torch.no_grad():
        expected, expected_latent = vae.decode(latent), vae.encode(pixels)
    store = tiled_vae.SpillStore(str(tmp_path))
    got = tiled_vae.tiled_decode(vae, latent, tile_size=24, storage_dtype=torch.float32, spill=store)
    full_resolution = 32 * got.shape[2] * got.shape[3] * 4  # one 32-channel float32 activation at the output size
    assert store.peak_bytes >= 2 * full_resolution  # a layer's input and output were both in files
    got_latent = tiled_vae.tiled_encode(vae, pixels, tile_size=24, spill=store)  # float16 storage where it fits
    assert (got - expected).abs().max().item() < 1e-4
    assert (got_latent - expected_latent).abs().max().item() < 1e-2
    assert list(tmp_path.iterdir()) == []  # unlinked files: nothing left behind
    in_ram = tiled_vae.tiled_encode(vae, pixels, tile_size=24)
    assert torch.equal(got_latent, in_ram)  # the same arithmetic as the in-RAM path, bit for bit
    assert len(released) > 20
    requests = []
    real_fadvise = os.posix_fadvise
    monkeypatch.setattr(tiled_vae.os, "posix_fadvise", lambda *a: requests.append(a) or real_fadvise(*a))
    assert torch.equal(tiled_vae.tiled_encode(vae, pixels, tile_size=24, spill=store), in_ram)
    assert requests == []  # its files stayed in RAM: no read-ahead requests
    monkeypatch.setattr(tiled_vae, "_resident", lambda address, nbytes: False)  # as once the files went to disk
    assert torch.equal(tiled_vae.tiled_encode(vae, pixels, tile_size=24, spill=store), in_ram)
    assert len(requests) > 100


def _open_files_in(folder) -> list[str]:
    """Targets of this process's open file descriptors inside `folder` (unlinked ones end in ' (deleted)')."""
    fds = Path("/proc/self/fd")
    targets = []
    for fd in fds.iterdir():
        try:
            targets.append(os.readlink(fd))
        except OSError:  # closed while listing
            continue
    return [target for target in targets if target.startswith(str(folder))]


def test_a_spill_mapping_holds_the_pages_a_tile_touches_not_the_read_around(tmp_path):
    """Writing then reading a narrow column band of a spilled activation (a tile's few bytes of each long row) keeps
    about a page per row resident, not the read-ahead's large folios around each fault (which made the whole file
    resident and the spilled decode's RSS grow with the image's width)."""
    store = tiled_vae.SpillStore(str(tmp_path))
    rows, row_bytes = 2048, 128 * 2**10
    spilled = store.empty((1, 1, rows, row_bytes // 2), torch.float16, channels_last=False)
    band = spilled[0, 0, :, :100]  # 200 bytes of each 128 KiB row
    band.fill_(1.0)
    written = _spill_resident_kib(str(tmp_path))
    store.release()
    assert float(band.float().sum()) == rows * 100
    read = _spill_resident_kib(str(tmp_path))
    page_per_row = rows * 4
    assert written <= 2 * page_per_row and read <= 2 * page_per_row, (written, read)


@pytest.mark.parametrize("view", ["tile", "rows", "column", "grid", "whole"])
def test_contiguous_runs_cover_exactly_the_elements_of_a_view(view):
    """The runs a read-ahead asks for are exactly the view's elements: nothing missed, nothing extra."""
    storage = torch.zeros(2, 40, 30, 16).permute(0, 3, 1, 2)  # a channels_last (B, C, H, W) activation
    tensor = {"tile": storage[:, :, 5:17, 3:11], "rows": storage[1:, :, 7:9], "column": storage[:, :, :, 4:5],
              "grid": storage[:, :, ::8, ::6], "whole": storage}[view]
    offsets, run = tiled_vae._contiguous_runs(tensor)
    covered = sorted(offset + i for offset in offsets for i in range(run))
    base = tensor.storage_offset()
    expected = torch.arange(storage.numel()).as_strided(tensor.shape, tensor.stride(), base).flatten() - base
    assert covered == sorted(expected.tolist())


def _cached(address: int, nbytes: int) -> list[bool]:
    """Per 4 KiB page from `address` (page-aligned): is it in the page cache (mincore)."""
    import ctypes
    pages = -(-nbytes // 4096)
    vector = (ctypes.c_ubyte * pages)()
    assert ctypes.CDLL(None, use_errno=True).mincore(ctypes.c_void_p(address), ctypes.c_size_t(nbytes), vector) == 0
    return [bool(v & 1) for v in vector]


def test_will_need_reads_a_spilled_tiles_rows_back_into_the_page_cache(tmp_path, monkeypatch):
    """A spilled activation whose pages left the page cache (a file grown past free RAM): asking ahead for one tile
    brings that tile's rows back before they are read, and not the rest of the file; a tile in RAM asks nothing."""
    import time
    store = tiled_vae.SpillStore(str(tmp_path))
    act = store.empty((1, 64, 256, 256), torch.float16, channels_last=True)  # 32 KiB a row
    act.fill_(1.0)
    base = act.data_ptr()
    nbytes, handle, _ = store._spans[base]
    os.fsync(handle.fileno())
    store.release()
    os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if any(_cached(base, nbytes)):
        pytest.skip("this filesystem keeps the file's pages in RAM (tmpfs?): nothing to read back")
    tile = act[:, :, 64:96, 128:192]  # 32 rows, 8 KiB of each
    requests = []
    real_fadvise = os.posix_fadvise
    monkeypatch.setattr(tiled_vae.os, "posix_fadvise", lambda *a: requests.append(a) or real_fadvise(*a))
    store.will_need(tile)
    assert len(requests) == 32  # a request per row
    row = 256 * 64 * 2
    wanted = [(64 + r) * row // 4096 + p for r in range(32) for p in range(128 * 128 // 4096, 192 * 128 // 4096)]
    deadline = time.monotonic() + 5
    while not all(_cached(base, nbytes)[page] for page in wanted) and time.monotonic() < deadline:
        time.sleep(0.01)
    cached = _cached(base, nbytes)
    assert all(cached[page] for page in wanted)
    assert sum(cached) <= 2 * len(wanted)  # the tile's pages, not whole rows or the file
    assert float(tile.float().sum()) == tile.numel()
    store.will_need(tile)
    assert len(requests) == 32  # now in RAM: nothing more asked


def test_spill_files_are_reused_across_layers_and_closed_with_the_store(tmp_path, monkeypatch):
    """A spilled run writes later layers into files earlier layers used (a first write into freshly reserved blocks
    costs the filesystem several times more), reserves fresh blocks for about its peak only, takes no more disk at
    its peak than a file per activation did, gives the same result, and leaves no file open once the store is gone."""
    import gc
    reserved = []
    real_fallocate = os.posix_fallocate
    monkeypatch.setattr(tiled_vae.os, "posix_fallocate",
                        lambda fd, offset, size: reserved.append(size - os.fstat(fd).st_size)
                        or real_fallocate(fd, offset, size))
    stored = []
    real_empty = tiled_vae.SpillStore.empty
    monkeypatch.setattr(tiled_vae.SpillStore, "empty", lambda self, shape, dtype, channels_last: stored.append(
        math.prod(shape) * torch.empty(0, dtype=dtype).element_size()) or real_empty(self, shape, dtype, channels_last))
    vae = random_vae(0, **SMALL)
    latent = torch.randn(1, 4, 30, 22, generator=torch.Generator().manual_seed(12))
    store = tiled_vae.SpillStore(str(tmp_path))
    got = tiled_vae.tiled_decode(vae, latent, tile_size=24, spill=store)
    pooled_peak = store.peak_bytes
    assert store.reused >= len(stored) // 2
    assert sum(reserved) <= 1.2 * pooled_peak < 0.6 * sum(stored)  # fresh blocks: about the peak's, once
    assert torch.equal(got, tiled_vae.tiled_decode(vae, latent, tile_size=24))  # same as in RAM, bit for bit
    assert _open_files_in(tmp_path)  # free files kept for the next run of this store
    del store
    gc.collect()
    assert _open_files_in(tmp_path) == []
    monkeypatch.setattr(tiled_vae.SpillStore, "_take_free", lambda self, nbytes: None)  # a fresh file every time
    fresh = tiled_vae.SpillStore(str(tmp_path))
    tiled_vae.tiled_decode(vae, latent, tile_size=24, spill=fresh)
    assert pooled_peak <= fresh.peak_bytes


def _spill_resident_kib(folder: str) -> int:
    """Resident KiB of every memory mapping of a file in `folder` (the spill store's files), from /proc/self/smaps."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:
            inside = len(fields) >= 6 and fields[5].startswith(folder)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


@pytest.mark.parametrize("encode", [False, True])
def test_a_spilled_attention_sweeps_blocks_of_keys_and_equals_untiled(tmp_path, monkeypatch, encode):
    """A spilled run's exact attention holds one block of keys and values at a time (copied out of the files) and
    merges the blocks' results by their log-sum-exp: the result still matches untiled, the files' resident pages stay
    below the size of the keys alone while it runs, and progress ends at its total."""
    monkeypatch.setattr(tiled_vae, "SPILL_RESIDENT_BYTES", 2**16)
    channels, positions = 64, 40 * 56  # the small VAE's mid block, at the latent's size
    monkeypatch.setattr(tiled_vae, "KEY_BLOCK_BYTES", 2 * channels * 4 * 600)  # 600 keys a block: 4 blocks
    monkeypatch.setattr(tiled_vae, "ATTENTION_SCORE_ELEMENTS", 600 * 500)  # 500 queries a call: 5 chunks
    calls, resident = [], []
    real = tiled_vae.attention_with_lse

    def spy(queries, keys, values):
        calls.append((queries.shape[2], keys.shape[2]))
        resident.append(_spill_resident_kib(str(tmp_path)))
        return real(queries, keys, values)

    monkeypatch.setattr(tiled_vae, "attention_with_lse", spy)
    vae = random_vae(0, **SMALL)
    seen = []
    store = tiled_vae.SpillStore(str(tmp_path))
    if encode:  # the encode asks for every block's, chunk's and tile's pages ahead, as once the files went to disk
        monkeypatch.setattr(tiled_vae, "_resident", lambda address, nbytes: False)
    with torch.no_grad():
        if encode:
            pixels = torch.rand(1, 3, 160, 224, generator=torch.Generator().manual_seed(12)) * 2 - 1
            expected = vae.encode(pixels)
            got = tiled_vae.tiled_encode(vae, pixels, tile_size=24, storage_dtype=torch.float32, spill=store,
                                         progress=lambda done, total: seen.append((done, total)))
        else:
            latent = torch.randn(1, 4, 40, 56, generator=torch.Generator().manual_seed(13))
            expected = vae.decode(latent)
            got = tiled_vae.tiled_decode(vae, latent, tile_size=24, storage_dtype=torch.float32, spill=store,
                                         progress=lambda done, total: seen.append((done, total)))
    assert (got - expected).abs().max().item() < 1e-4
    assert len(calls) == 4 * 5  # every query chunk against every block of keys
    assert {keys for _, keys in calls} == {600, positions - 3 * 600}
    assert {queries for queries, _ in calls} == {500, positions - 4 * 500}
    keys_kib = positions * channels * 4 / 1024
    assert max(resident) < keys_kib, (max(resident), keys_kib)  # the files' pages go back as the sweep goes
    assert seen[-1][0] == seen[-1][1] == len(seen)


def test_attention_with_lse_agrees_with_sdpa_and_logsumexp():
    """The kernel path (float32 on the CPU) and the plain-ops path (any other dtype) give softmax attention and the
    scores' log-sum-exp."""
    generator = torch.Generator().manual_seed(14)
    queries, keys, values = (torch.randn(1, 1, n, 16, generator=generator) for n in (50, 70, 70))
    expected = torch.nn.functional.scaled_dot_product_attention(queries, keys, values)
    expected_lse = torch.logsumexp(queries @ keys.transpose(-1, -2) / 4, dim=-1)
    for dtype in (torch.float32, torch.float64):
        out, lse = tiled_vae.attention_with_lse(queries.to(dtype), keys.to(dtype), values.to(dtype))
        assert (out.float() - expected).abs().max().item() < 1e-5
        assert (lse.float() - expected_lse).abs().max().item() < 1e-5


def test_bf16_attention_agrees_with_float32_attention_and_its_log_sum_exp(monkeypatch):
    """The bfloat16 products (float32 scores, softmax and sums) give softmax attention and the scores' log-sum-exp
    within bfloat16's rounding, in several chunks of queries that do not divide them, for each sample of a batch."""
    monkeypatch.setattr(tiled_vae, "BF16_SCORE_ELEMENTS", 64 * 500)  # 64 queries a product: 5 chunks of 300
    generator = torch.Generator().manual_seed(15)
    queries, keys, values = (torch.randn(2, 1, n, 64, generator=generator) for n in (300, 500, 500))
    expected = torch.nn.functional.scaled_dot_product_attention(queries, keys, values)
    expected_lse = torch.logsumexp(queries @ keys.transpose(-1, -2) / 8, dim=-1)
    out, lse = tiled_vae.bf16_attention_with_lse(queries, keys.bfloat16(), values.bfloat16())
    assert out.dtype == lse.dtype == torch.float32
    # measured: max 2.8e-3, mean 2.9e-4 (of outputs ~0.056 on average), log-sum-exp 1.7e-3: bfloat16's 8 bits
    assert 0 < (out - expected).abs().max().item() < 6e-3
    assert (out - expected).abs().mean().item() < 6e-4
    assert (lse - expected_lse).abs().max().item() < 4e-3


def test_float32_cpu_runs_take_bf16_attention_products_where_this_cpu_multiplies_bf16_faster(monkeypatch):
    """The choice follows the CPU's measured speed: bfloat16 products only for float32 runs on a CPU that multiplies
    bfloat16 at least BF16_ATTENTION_MIN_SPEEDUP times faster; GPU and half-precision runs keep their own dtype."""
    monkeypatch.setattr(tiled_vae, "BF16_ATTENTION_MIN_SPEEDUP", 1.5)
    assert tiled_vae.cpu_bf16_matmul_speedup() > 0  # measured on this machine, once
    monkeypatch.setattr(tiled_vae, "cpu_bf16_matmul_speedup", lambda: 4.0)
    assert tiled_vae.attention_dtype_for("cpu", torch.float32) == torch.bfloat16
    assert tiled_vae.attention_dtype_for("cpu", torch.float16) == torch.float16
    assert tiled_vae.attention_dtype_for("cuda", torch.float32) == torch.float32
    monkeypatch.setattr(tiled_vae, "cpu_bf16_matmul_speedup", lambda: 0.8)  # emulated bfloat16: slower
    assert tiled_vae.attention_dtype_for("cpu", torch.float32) == torch.float32


def test_cpu_speed_probe_verdict_survives_a_stall_across_several_products(monkeypatch):
    """A stall lasting several products (a reclaim under memory pressure, another process) while the speed probe runs
    does not tip its verdict: the dtypes alternate, so the stall hits both and each keeps unstalled tries. Measured:
    with each dtype's 3 tries in a row (the probe before), the stall covered all bfloat16 ones and the verdict fell
    from 12.6x to 0.39x (float32 attention chosen)."""
    tiled_vae.cpu_bf16_matmul_speedup.cache_clear()
    monkeypatch.setattr(tiled_vae, "cpu_bf16_matmul_speedup", tiled_vae.cpu_bf16_matmul_speedup.__wrapped__)
    clean = tiled_vae.cpu_bf16_matmul_speedup()
    real, calls = torch.matmul, []

    def stalled(*args, **kwargs):
        calls.append(None)
        if 5 <= len(calls) < 5 + tiled_vae.SPEEDUP_PROBE_TRIES - 1:  # after each dtype's warm-up, several in a row
            time.sleep(0.05)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "matmul", stalled)
    during_stall = tiled_vae.cpu_bf16_matmul_speedup()
    monkeypatch.setattr(torch, "matmul", real)
    assert len(calls) == 2 * (1 + tiled_vae.SPEEDUP_PROBE_TRIES)
    assert during_stall > clean / 2


@pytest.mark.parametrize("way", ["ram", "spill", "local"])
def test_bf16_attention_products_decode_within_exact_of_untiled(tmp_path, monkeypatch, way):
    """With the bfloat16 products chosen (as on a CPU fast at them), each way of running the attention (keys in RAM,
    the spilled key-block sweep, local windows) uses them, and the decode stays within 0.01 of its float32 result."""
    monkeypatch.setattr(tiled_vae, "BF16_ATTENTION_MIN_SPEEDUP", 1.5)
    monkeypatch.setattr(tiled_vae, "cpu_bf16_matmul_speedup", lambda: 4.0)
    monkeypatch.setattr(tiled_vae, "KEY_BLOCK_BYTES", 2 * 64 * 2 * 600)  # the sweep in 4 blocks of 600 keys
    calls = []
    real = tiled_vae.bf16_attention_with_lse
    monkeypatch.setattr(tiled_vae, "bf16_attention_with_lse",
                        lambda q, k, v: calls.append(k.dtype) or real(q, k, v))
    vae = random_vae(0, **SMALL)
    latent = torch.randn(1, 4, 40, 56, generator=torch.Generator().manual_seed(16))
    spill = tiled_vae.SpillStore(str(tmp_path)) if way == "spill" else None
    local = way == "local"
    seen = []
    got = tiled_vae.tiled_decode(vae, latent, tile_size=24, storage_dtype=torch.float32, spill=spill,
                                 local_attention=local, progress=lambda done, total: seen.append((done, total)))
    float32 = tiled_vae.tiled_decode(vae, latent, tile_size=24, storage_dtype=torch.float32, spill=spill,
                                     local_attention=local, attention_dtype=torch.float32)
    assert calls and set(calls) == {torch.bfloat16}
    if way == "spill":
        assert len(calls) == 1 + 4  # the layer's probe, then every block of keys (all 2240 queries in one chunk)
    assert 0 < (got - float32).abs().max().item() < 1e-2
    assert seen[-1][0] == seen[-1][1] == len(seen)


@pytest.mark.parametrize("way", ["ram", "spill"])
def test_attention_with_large_scores_keeps_float32_products(tmp_path, monkeypatch, caplog, way):
    """Where the probe finds the bfloat16 products too coarse for a layer's scores (queries and keys scaled up: a
    peaked softmax), that layer runs float32 products: the same result as a float32 run, bit for bit, progress still
    ends at its total (the float32 key blocks hold fewer keys), and the log says why. Measured: the probe 0.92; past
    it, bfloat16 products put this decode 0.30 off its float32 result."""
    monkeypatch.setattr(tiled_vae, "BF16_ATTENTION_MIN_SPEEDUP", 1.5)
    monkeypatch.setattr(tiled_vae, "cpu_bf16_matmul_speedup", lambda: 4.0)
    monkeypatch.setattr(tiled_vae, "KEY_BLOCK_BYTES", 2 * 64 * 2 * 600)  # bfloat16: 4 blocks; float32: 8
    vae = random_vae(0, **SMALL)
    attention = vae.decoder.mid.attn_1
    with torch.no_grad():
        attention.q.weight.mul_(6)
        attention.k.weight.mul_(6)
    latent = torch.randn(1, 4, 40, 56, generator=torch.Generator().manual_seed(16))
    kwargs = {"tile_size": 24, "storage_dtype": torch.float32}
    def decode(**more):
        spill = tiled_vae.SpillStore(str(tmp_path)) if way == "spill" else None
        seen = []
        out = tiled_vae.tiled_decode(vae, latent, spill=spill, progress=lambda done, total: seen.append((done, total)),
                                     **kwargs, **more)
        return out, seen
    with caplog.at_level("INFO", logger="astria"):
        got, seen = decode()
    float32, _ = decode(attention_dtype=torch.float32)
    monkeypatch.setattr(tiled_vae, "BF16_PROBE_MAX_ERROR", math.inf)
    bf16, _ = decode()  # bfloat16 products past the probe: what it protects against
    assert torch.equal(got, float32)
    assert (bf16 - float32).abs().max().item() > 1e-2  # outside exact: the case the probe exists for
    assert seen[-1][0] == seen[-1][1] == len(seen)
    assert "attention scores are too large for bfloat16 products" in caplog.text


def test_spilled_values_beyond_float16_switch_to_float32_files(tmp_path):
    vae = random_vae(0, **SMALL)
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(1e5)
        vae.encoder.conv_in.bias.mul_(1e5)
        pixels = torch.rand(1, 3, 48, 40, generator=torch.Generator().manual_seed(9)) * 2 - 1
        expected = vae.encode(pixels)
    got = tiled_vae.tiled_encode(vae, pixels, tile_size=24, storage_dtype=torch.float16,
                                 spill=tiled_vae.SpillStore(str(tmp_path)))
    assert (got - expected).abs().max().item() < 1e-3 * max(1.0, expected.abs().max().item())


def test_memory_needs_names_each_part():
    vae = random_vae(0)
    needs = tiled_vae.memory_needs(vae, (1, 4, 64, 64), encode=False, tile_size=256)
    assert needs.activations == tiled_vae.stored_bytes(vae, (1, 4, 64, 64), encode=False)
    assert needs.attention == 2 * 64 * 64 * 512 * 4 + tiled_vae.ATTENTION_SCORE_ELEMENTS * 4  # mid-block keys/values
    assert needs.result == (3 * 512 * 512 + 4 * 64 * 64) * 4
    assert needs.tiles == tiled_vae.TILE_COPIES * 128 * 256 * 256 * 4
    assert needs.sweep_file == 64 * 64 * 512 * (4 + 4)  # the key-block sweep's queries and float32 result
    assert needs.sweep_ram == 64 * 64 * 512 * 4 * 2 + 64 * 64 * 4  # one block (all 4096 keys here) and the lse
    assert needs.spilled_ram < needs.in_ram
