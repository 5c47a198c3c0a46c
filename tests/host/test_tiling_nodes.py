"""Astria VAE Encode/Decode (Tiled) and Astria Tiled Diffusion as ComfyUI nodes on the test models."""
from pathlib import Path

import pytest
import torch

from .conftest import run_node
from .test_only_upscale import picture


def test_tiled_vae_nodes_equal_untiled_with_the_pixel_vae(comfy_host, sd15_pixel):
    _, _, vae = sd15_pixel
    image = picture(200, 136, seed=7)
    # bf16/fp16 VAEs on a GPU: a rounding step or two apart (latents reach 4, where a bf16 step is 1/32)
    tolerance, relative = (1e-4, 0) if vae.vae_dtype == torch.float32 else (2e-2, 1 / 64)
    with torch.inference_mode():
        untiled_latent = vae.encode(image)
        latent = run_node(comfy_host, "AstriaVAEEncodeTiled", pixels=image, vae=vae, tile_size=64, overlap=0)[0]
        assert torch.allclose(latent["samples"], untiled_latent, atol=tolerance, rtol=relative)
        untiled = vae.decode(untiled_latent)
        decoded = run_node(comfy_host, "AstriaVAEDecodeTiled", samples=latent, vae=vae, tile_size=64, overlap=0)[0]
    assert decoded.shape == untiled.shape == (1, 200, 136, 3)
    assert (decoded - untiled).abs().max().item() < tolerance


def test_tiled_diffusion_node_samples_a_latent_larger_than_a_tile(comfy_host, sd15_pixel):
    nodes = comfy_host.nodes
    model, clip, vae = sd15_pixel
    tiled = run_node(comfy_host, "AstriaTiledDiffusion", model=model, tile_size=256, overlap=64,
                     tile_batch_size=2)[0]
    calls = []
    tiled.set_model_unet_function_wrapper(lambda apply, args: calls.append(args["input"].shape) or apply(
        args["input"], args["timestep"], **args["c"]))
    positive = nodes.CLIPTextEncode().encode(clip, "a photo")[0]
    latent = {"samples": torch.zeros(1, 4, 48, 40)}  # 384 x 320 px: 2 x 2 tiles of at most 256 px
    with torch.inference_mode():
        out = nodes.KSampler().sample(tiled, 3, 2, 5.0, "euler", "normal", positive, positive, latent)[0]
    assert out["samples"].shape == (1, 4, 48, 40)
    assert torch.isfinite(out["samples"]).all()
    assert calls and all(shape[-1] <= 32 and shape[-2] <= 32 for shape in calls), calls


def counting_unet(model):
    """A clone of the model that records the latent size of every UNet call (tiles, or the whole latent)."""
    calls = []
    counted = model.clone()
    counted.set_model_unet_function_wrapper(lambda apply, args: calls.append(tuple(args["input"].shape[-2:])) or apply(
        args["input"], args["timestep"], **args["c"]))
    return counted, calls


def test_only_upscale_runs_tiled_when_the_target_is_larger_than_a_tile(comfy_host, sd15_pixel):
    model, clip, vae = sd15_pixel
    positive = comfy_host.nodes.CLIPTextEncode().encode(clip, "a photo")[0]
    image = picture(96, 96, seed=5)
    outputs, calls = {}, {}
    for tile_size in (256, 512):  # 288 px: 2 x 2 tiles of at most 256 px, or one piece under 512 px tiles
        counted, calls[tile_size] = counting_unet(model)
        with torch.inference_mode():
            outputs[tile_size] = run_node(comfy_host, "AstriaOnlyUpscale", image=image, model=counted, vae=vae,
                                          positive=positive, negative=positive, scale=3.0, denoise=0.2, steps=5,
                                          seed=3, tile_size=tile_size)[0]
    assert outputs[256].shape == outputs[512].shape == (1, 288, 288, 3)
    assert torch.isfinite(outputs[256]).all()
    steps_run = 2  # A1111: int(0.2 x 5) + 1
    assert calls[512] == [(36, 36)] * steps_run  # untiled: one call per step on the whole 36 x 36 latent
    tile_calls = calls[256]
    assert len(tile_calls) >= steps_run and all(max(shape) <= 32 for shape in tile_calls), tile_calls
    assert not torch.equal(outputs[256], outputs[512])  # the tiles blended their own predictions


def test_out_of_memory_retries_once_with_smaller_tiles(comfy_host, sd15_pixel, caplog):
    import comfy.model_management as mm
    import comfy.patcher_extension

    host_diffusion = comfy_host.pack_module.nodes.comfy.host_diffusion
    seen = []

    def flaky_calc(executor, model, conds, x, timestep, model_options):  # a wrapper installed after ours: per tile
        seen.append(tuple(x.shape[-2:]))
        if len(seen) == 1:
            raise mm.OOM_EXCEPTION("CUDA out of memory (simulated)")
        return executor(model, conds, x, timestep, model_options)

    model, clip, _ = sd15_pixel
    tiled = host_diffusion.with_tiled_diffusion(model, 512, 64, 4)
    tiled.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, "flaky", flaky_calc)
    positive = comfy_host.nodes.CLIPTextEncode().encode(clip, "a photo")[0]
    latent = {"samples": torch.zeros(1, 4, 80, 80)}  # 640 px: 2 x 2 tiles of 512, then 3 x 3 of 256
    with torch.inference_mode():
        out = comfy_host.nodes.KSampler().sample(tiled, 1, 1, 5.0, "euler", "normal", positive, positive, latent)[0]
    assert out["samples"].shape == (1, 4, 80, 80)
    assert max(seen[0]) > 32 and all(max(shape) <= 32 for shape in seen[1:]), seen
    assert "ran out of GPU memory" in caplog.text


@pytest.mark.parametrize("failures", [1, 2])
def test_vae_out_of_memory_retries_with_half_tiles_then_uses_the_hosts_tiled_vae(comfy_host, sd15_pixel, monkeypatch,
                                                                                  caplog, failures):
    import comfy.model_management as mm

    host_vae = comfy_host.pack_module.nodes.comfy.host_vae
    real_decode = host_vae.tiled_vae.tiled_decode
    tiles = []

    def flaky_decode(model, latent, tile_size=None, **options):
        tiles.append(tile_size)
        if len(tiles) <= failures:
            raise mm.OOM_EXCEPTION("CUDA out of memory (simulated)")
        return real_decode(model, latent, tile_size, **options)

    monkeypatch.setattr(host_vae.tiled_vae, "tiled_decode", flaky_decode)
    _, _, vae = sd15_pixel
    samples = torch.randn(1, 4, 24, 20, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        decoded = host_vae.decode(vae, samples, 256)
        expected = vae.decode(samples) if failures == 1 else vae.decode_tiled(samples, tile_x=16, tile_y=16,
                                                                              overlap=4)
    assert tiles == [256, 128]
    assert "ran out of GPU memory with 256 px tiles; retrying with 128 px tiles" in caplog.text
    assert ("using ComfyUI's tiled VAE with 128 px tiles" in caplog.text) == (failures == 2)
    assert (decoded - expected).abs().max().item() < 1e-4


def _vae_needs(comfy_host, vae, shape, encode, tile):
    tiled_vae = comfy_host.pack_module.nodes.core.tiled_vae
    return tiled_vae.memory_needs(vae.first_stage_model, shape, encode, tile, vae.vae_dtype)


def _budget_mb(nbytes):
    return str(nbytes / 2**20)


def test_a_budget_too_small_for_activations_in_ram_spills_them_and_stays_exact(comfy_host, sd15_pixel, monkeypatch,
                                                                              caplog, tmp_path):
    """The real memory model picks the path: a RAM budget between the spilled and the in-RAM working memory runs
    the spill path (files in ASTRIA_SPILL_DIR), and the result is still the untiled one; the log says so."""
    import logging

    tiled_vae = comfy_host.pack_module.nodes.core.tiled_vae
    monkeypatch.setattr(tiled_vae, "SPILL_RESIDENT_BYTES", 2**20)  # hand pages back every MiB at this small size
    _, _, vae = sd15_pixel
    image = picture(200, 136, seed=7)
    samples = vae.encode(image)
    needs = _vae_needs(comfy_host, vae, tuple(samples.shape), False, 64)
    assert needs.spilled_ram < needs.in_ram
    monkeypatch.setenv("ASTRIA_MEMORY_BUDGET_MB", _budget_mb((needs.spilled_ram + needs.in_ram) // 2))
    monkeypatch.setenv("ASTRIA_SPILL_DIR", str(tmp_path))
    made = []
    real_empty = tiled_vae.SpillStore.empty
    monkeypatch.setattr(tiled_vae.SpillStore, "empty",
                        lambda self, shape, *a, **k: made.append(shape) or real_empty(self, shape, *a, **k))
    with caplog.at_level(logging.INFO, logger="astria"), torch.inference_mode():
        decoded = run_node(comfy_host, "AstriaVAEDecodeTiled", samples={"samples": samples}, vae=vae, tile_size=64,
                           overlap=0)[0]
        untiled = vae.decode(samples)
    assert made, "no activation went to the spill file"
    assert "VAE decode: exact, activations spilled to a temporary file" in caplog.text
    tolerance = 1e-4 if vae.vae_dtype == torch.float32 else 2e-2
    assert (decoded - untiled).abs().max().item() < tolerance


def _resident_kib(address):
    """Resident KiB of the memory mapping holding `address`, from /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:
            start, end = (int(part, 16) for part in fields[0].split("-"))
            inside = start <= address < end
        elif inside and fields[0] == "Rss:":
            return int(fields[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def test_a_spilled_decode_parks_the_colour_fix_reference_in_a_spill_file(comfy_host, sd15_pixel, monkeypatch,
                                                                         tmp_path):
    """Where the only-upscale's decode spills, the upscaled image only the colour fix reads again waits in a spill
    file with no resident pages while the decode runs, and the result is the one it gives held in RAM."""
    from .test_only_upscale import upscale

    host_vae = comfy_host.pack_module.nodes.comfy.host_vae
    tiled_vae = comfy_host.pack_module.nodes.core.tiled_vae
    model, clip, vae = sd15_pixel
    image = picture(96, 96, seed=3)
    monkeypatch.setattr(tiled_vae, "SPILL_RESIDENT_BYTES", 2**20)
    needs = _vae_needs(comfy_host, vae, (1, 4, 24, 24), False, 256)  # the 192 px result's decode, as the node runs it
    assert needs.spilled_ram < needs.in_ram
    monkeypatch.setenv("ASTRIA_MEMORY_BUDGET_MB", _budget_mb((needs.spilled_ram + needs.in_ram) // 2))
    monkeypatch.setenv("ASTRIA_SPILL_DIR", str(tmp_path))
    parked, resident_during_decode = [], []
    real_park, real_decode = host_vae.park, tiled_vae.tiled_decode
    monkeypatch.setattr(host_vae, "park", lambda picture_: parked.append(real_park(picture_)) or parked[-1])

    def decode_noting_the_parked_pages(*args, **kwargs):
        resident_during_decode.extend(_resident_kib(held.data_ptr()) for held in parked)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(tiled_vae, "tiled_decode", decode_noting_the_parked_pages)
    widgets = dict(scale=2.0, denoise=0.3, seed=4, tile_size=256, color_fix="wavelet")
    out = upscale(comfy_host, model, clip, vae, image, **widgets)
    assert len(parked) == 1 and parked[0].shape == (1, 192, 192, 3)
    assert resident_during_decode == [0]
    monkeypatch.setattr(host_vae, "park", lambda picture_: picture_)
    assert torch.equal(out, upscale(comfy_host, model, clip, vae, image, **widgets))


@pytest.mark.parametrize("why", ["spilling is off", "spill files need Linux, and this OS is not"])
def test_without_spilling_a_small_budget_runs_the_hosts_tiled_vae_and_says_it_is_inexact(comfy_host, sd15_pixel,
                                                                                          monkeypatch, caplog, why,
                                                                                          tmp_path):
    """Spilling switched off, or an OS without what spill files use (Windows, macOS): the host's tiled VAE runs,
    and the log says which and why."""
    import logging

    _, _, vae = sd15_pixel
    samples = vae.encode(picture(200, 136, seed=7))
    needs = _vae_needs(comfy_host, vae, tuple(samples.shape), False, 64)
    monkeypatch.setenv("ASTRIA_MEMORY_BUDGET_MB", _budget_mb(needs.in_ram - 1))
    if why == "spilling is off":
        monkeypatch.setenv("ASTRIA_SPILL_DIR", "off")
    else:
        monkeypatch.setenv("ASTRIA_SPILL_DIR", str(tmp_path))
        monkeypatch.setattr(comfy_host.pack_module.nodes.core.tiled_vae, "SPILL_SUPPORTED", False)
    with caplog.at_level(logging.INFO, logger="astria"), torch.inference_mode():
        decoded = run_node(comfy_host, "AstriaVAEDecodeTiled", samples={"samples": samples}, vae=vae, tile_size=64,
                           overlap=0)[0]
        host = vae.decode_tiled(samples, tile_x=8, tile_y=8, overlap=0)
    assert "VAE decode: ComfyUI's tiled VAE (inexact" in caplog.text and why in caplog.text
    assert torch.equal(decoded, host)


def test_a_size_that_cannot_fit_is_refused_before_the_vae_runs(comfy_host, sd15_pixel, monkeypatch):
    tiled_vae = comfy_host.pack_module.nodes.core.tiled_vae
    calls = []
    monkeypatch.setattr(tiled_vae, "tiled_decode", lambda *a, **k: calls.append(1))
    _, _, vae = sd15_pixel
    monkeypatch.setenv("ASTRIA_MEMORY_BUDGET_MB", "1")
    with pytest.raises(ValueError, match=r"needs about .* GB of RAM and 0.0 GB is free: lower the scale"):
        run_node(comfy_host, "AstriaVAEDecodeTiled", samples={"samples": torch.zeros(1, 4, 64, 64)}, vae=vae,
                 tile_size=64, overlap=0)
    assert calls == []


def _spill_budget(comfy_host, vae, samples, monkeypatch):
    """A RAM budget between the spilled and the in-RAM working memory of decoding `samples` with 64 px tiles."""
    tiled_vae = comfy_host.pack_module.nodes.core.tiled_vae
    monkeypatch.setattr(tiled_vae, "SPILL_RESIDENT_BYTES", 2**20)  # hand pages back every MiB at this small size
    needs = _vae_needs(comfy_host, vae, tuple(samples.shape), False, 64)
    assert needs.spilled_ram < needs.in_ram
    monkeypatch.setenv("ASTRIA_MEMORY_BUDGET_MB", _budget_mb((needs.spilled_ram + needs.in_ram) // 2))
    return needs


def test_a_disk_that_fills_mid_run_falls_back_to_the_hosts_tiled_vae_and_says_why(comfy_host, sd15_pixel,
                                                                                   monkeypatch, caplog, tmp_path):
    """The plan chose the spill path, then a spill file cannot get its blocks (here a real kernel limit on file
    size, RLIMIT_FSIZE, between the small and the large activations' files): the run finishes with the host's
    tiled VAE, and the log says it is inexact and why; no raw error reaches the user."""
    import logging
    import resource
    import signal

    tiled_vae = comfy_host.pack_module.nodes.core.tiled_vae
    _, _, vae = sd15_pixel
    samples = vae.encode(picture(200, 136, seed=7))
    _spill_budget(comfy_host, vae, samples, monkeypatch)
    monkeypatch.setenv("ASTRIA_SPILL_DIR", str(tmp_path))
    made = []
    real_empty = tiled_vae.SpillStore.empty
    monkeypatch.setattr(tiled_vae.SpillStore, "empty",
                        lambda self, shape, *a, **k: made.append(shape) or real_empty(self, shape, *a, **k))
    limit = 256 * 1024  # the decoder's first (latent-sized) activations fit, the full-size ones do not
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the default kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        with caplog.at_level(logging.INFO, logger="astria"), torch.inference_mode():
            decoded = run_node(comfy_host, "AstriaVAEDecodeTiled", samples={"samples": samples}, vae=vae,
                               tile_size=64, overlap=0)[0]
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    with torch.inference_mode():
        host = vae.decode_tiled(samples, tile_x=8, tile_y=8, overlap=0)
    assert len(made) >= 2, "the run failed before it spilled anything: the limit is below the first file"
    assert "VAE decode: exact, activations spilled to a temporary file" in caplog.text
    assert "VAE decode: ComfyUI's tiled VAE (inexact, up to ~0.2 off: File too large while spilling" in caplog.text
    assert torch.equal(decoded, host)
    assert list(tmp_path.iterdir()) == []  # the spill files were unlinked temporary files


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs /dev/shm")
def test_a_spill_folder_in_ram_is_not_used_and_the_summary_says_why(comfy_host, sd15_pixel, monkeypatch, caplog):
    """ASTRIA_SPILL_DIR on a tmpfs (RAM): spilling there would save nothing, so the exact RAM way runs when it fits
    the budget and the host's tiled VAE when it does not, each with the reason in the log."""
    import logging
    import tempfile

    host_vae = comfy_host.pack_module.nodes.comfy.host_vae
    if not host_vae.spill_folder_in_ram("/dev/shm"):
        pytest.skip("/dev/shm is not a RAM filesystem here")
    _, _, vae = sd15_pixel
    samples = vae.encode(picture(200, 136, seed=7))
    with tempfile.TemporaryDirectory(dir="/dev/shm") as folder:
        monkeypatch.setenv("ASTRIA_SPILL_DIR", folder)
        needs = _spill_budget(comfy_host, vae, samples, monkeypatch)
        with caplog.at_level(logging.INFO, logger="astria"), torch.inference_mode():
            decoded = run_node(comfy_host, "AstriaVAEDecodeTiled", samples={"samples": samples}, vae=vae,
                               tile_size=64, overlap=0)[0]
            host = vae.decode_tiled(samples, tile_x=8, tile_y=8, overlap=0)
        assert f"the spill folder {folder} is a RAM filesystem (tmpfs)" in caplog.text
        assert "VAE decode: ComfyUI's tiled VAE (inexact" in caplog.text
        assert torch.equal(decoded, host)
        caplog.clear()
        monkeypatch.setenv("ASTRIA_MEMORY_BUDGET_MB", _budget_mb(needs.in_ram * 2))
        monkeypatch.setattr(host_vae, "ACTIVATIONS_IN_RAM_BYTES", 0)  # above the in-RAM limit: would spill on a disk
        with caplog.at_level(logging.INFO, logger="astria"), torch.inference_mode():
            decoded = run_node(comfy_host, "AstriaVAEDecodeTiled", samples={"samples": samples}, vae=vae,
                               tile_size=64, overlap=0)[0]
            untiled = vae.decode(samples)
        assert "VAE decode: exact, activations in RAM" in caplog.text and "is a RAM filesystem" in caplog.text
        assert list(Path(folder).iterdir()) == []
    tolerance = 1e-4 if vae.vae_dtype == torch.float32 else 2e-2
    assert (decoded - untiled).abs().max().item() < tolerance


def test_local_vae_attention_is_opt_in_and_the_log_says_it_is_not_exact(comfy_host, sd15, monkeypatch, caplog, float32_attention):
    """vae_attention=local on the tiled VAE decode node: a different image from the exact default (the tiny
    checkpoint's random VAE attends everywhere), what tiled_vae's local attention gives, and the log line says so."""
    import logging

    tiled_vae = comfy_host.pack_module.nodes.core.tiled_vae
    monkeypatch.setattr(tiled_vae, "LOCAL_ATTENTION_BLOCK", 8)  # windows of 16 x 16 positions in a 24 x 32 latent
    monkeypatch.setattr(tiled_vae, "LOCAL_ATTENTION_HALO", 4)
    _, _, vae = sd15
    samples = torch.randn(1, 4, 24, 32, generator=torch.Generator().manual_seed(5))
    with caplog.at_level(logging.INFO, logger="astria"), torch.inference_mode():
        exact = run_node(comfy_host, "AstriaVAEDecodeTiled", samples={"samples": samples}, vae=vae, tile_size=64,
                         overlap=0)[0]
        assert "VAE decode: exact, activations in RAM" in caplog.text
        caplog.clear()
        local = run_node(comfy_host, "AstriaVAEDecodeTiled", samples={"samples": samples}, vae=vae, tile_size=64,
                         overlap=0, vae_attention="local")[0]
        untiled = vae.decode(samples)
        ours = tiled_vae.tiled_decode(vae.first_stage_model, samples.to(vae.vae_dtype), 64, local_attention=True)
    assert "VAE decode: attention local to 1024 px windows (vae_attention=local: not exact)" in caplog.text
    tolerance = 1e-4 if vae.vae_dtype == torch.float32 else 2e-2
    assert (exact - untiled).abs().max().item() < tolerance
    assert (local - exact).abs().max().item() > 10 * tolerance
    assert (local - vae.process_output(ours.float()).movedim(1, -1)).abs().max().item() < tolerance


def test_at_the_default_vae_tile_a_1024_px_decode_spills_and_its_encode_stays_in_ram(comfy_host, monkeypatch,
                                                                                      tmp_path):
    """The in-RAM limit, on the SD VAE's real memory model at the only-upscale's VAE tile: a 1024 px decode (1.57 GiB
    in RAM) spills, which kept the 512->1024 only-upscale's peak under UltimateSDUpscale's; the 1024 px encode
    (1.09 GiB) and a 512 px decode stay in RAM, where spilling would only cost time."""
    import comfy.sd

    from comfyui_astria.tests.support.random_vae import random_vae

    host_vae = comfy_host.pack_module.nodes.comfy.host_vae
    tile = comfy_host.pack_module.nodes.comfy.upscale.VAE_TILE_PX
    monkeypatch.setenv("ASTRIA_SPILL_DIR", str(tmp_path))
    monkeypatch.setenv("ASTRIA_MEMORY_BUDGET_MB", "16000")
    vae = comfy.sd.VAE(sd=random_vae(0).state_dict())
    assert host_vae.plan(vae, (1, 4, 128, 128), False, tile).way == "spill"
    assert host_vae.plan(vae, (1, 3, 1024, 1024), True, tile).way == "ram"
    assert host_vae.plan(vae, (1, 4, 64, 64), False, tile).way == "ram"


def test_the_log_says_when_the_vae_attention_takes_bfloat16_products_and_the_result_stays_exact(
        comfy_host, sd15, monkeypatch, caplog):
    """On a CPU that multiplies bfloat16 fast the exact decode takes its attention products in bfloat16 and the log
    line says so; the image stays within 0.01 of the untiled VAE's. Where bfloat16 is slow: float32, no such line."""
    import logging

    tiled_vae = comfy_host.pack_module.nodes.core.tiled_vae
    _, _, vae = sd15
    if vae.vae_dtype != torch.float32:
        pytest.skip("the bfloat16 products are for float32 VAEs on the CPU")
    samples = torch.randn(1, 4, 24, 32, generator=torch.Generator().manual_seed(6))
    images = {}
    for speedup in (4.0, 1.0):
        monkeypatch.setattr(tiled_vae, "cpu_bf16_matmul_speedup", lambda: speedup)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="astria"), torch.inference_mode():
            images[speedup] = run_node(comfy_host, "AstriaVAEDecodeTiled", samples={"samples": samples}, vae=vae,
                                       tile_size=64, overlap=0)[0]
        said = "attention products in bfloat16 (4.0x float32's speed on this CPU" in caplog.text
        assert "VAE decode: exact, activations in RAM" in caplog.text and said == (speedup == 4.0)
    with torch.inference_mode():
        untiled = vae.decode(samples)
    assert (images[1.0] - untiled).abs().max().item() < 1e-4
    assert 0 < (images[4.0] - untiled).abs().max().item() < 1e-2


def test_the_exact_encode_keeps_float32_attention_where_the_decode_takes_bfloat16_products(
        comfy_host, sd15, monkeypatch, caplog):
    """The encoder's latent carries the bfloat16 products' rounding further (1.02e-2 off untiled at 2048 px), so on a
    CPU that multiplies bfloat16 fast the encode still runs float32 attention: no bfloat16 kernel call, no such log
    line, the same latent bit for bit as where bfloat16 is slow."""
    import logging

    tiled_vae = comfy_host.pack_module.nodes.core.tiled_vae
    _, _, vae = sd15
    if vae.vae_dtype != torch.float32:
        pytest.skip("the bfloat16 products are for float32 VAEs on the CPU")
    image = torch.rand(1, 192, 256, 3, generator=torch.Generator().manual_seed(7))
    calls, real = [], tiled_vae.bf16_attention_with_lse
    monkeypatch.setattr(tiled_vae, "bf16_attention_with_lse", lambda q, k, v: calls.append(k.dtype) or real(q, k, v))
    latents = {}
    for speedup in (4.0, 1.0):
        monkeypatch.setattr(tiled_vae, "cpu_bf16_matmul_speedup", lambda: speedup)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="astria"), torch.inference_mode():
            latents[speedup] = run_node(comfy_host, "AstriaVAEEncodeTiled", pixels=image, vae=vae, tile_size=64,
                                        overlap=0)[0]["samples"]
        assert "VAE encode: exact" in caplog.text and "attention products in bfloat16" not in caplog.text
    assert not calls
    assert torch.equal(latents[4.0], latents[1.0])
    monkeypatch.setattr(tiled_vae, "cpu_bf16_matmul_speedup", lambda: 4.0)
    with torch.inference_mode():  # the decode on the same fast CPU does take them
        run_node(comfy_host, "AstriaVAEDecodeTiled", samples={"samples": latents[4.0]}, vae=vae, tile_size=64,
                 overlap=0)
    assert calls and set(calls) == {torch.bfloat16}
