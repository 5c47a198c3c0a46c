"""CUDA checks (ASTRIA_TEST_DEVICE=gpu on a CUDA machine, run by bench/cuda_checks.sh): our exact tiled VAE on the
host's CUDA VAE, and a real GPU out-of-memory error retried once with half the tile size."""
import logging

import pytest
import torch

from comfyui_astria.tests.support import paths

pytestmark = pytest.mark.skipif(
    paths.HOST_ON_CPU or not torch.cuda.is_available(),
    reason="CUDA check: needs a CUDA GPU and ASTRIA_TEST_DEVICE=gpu (bench/cuda_checks.sh runs it there)")

LATENT_1024 = (1, 4, 128, 128)


def _peak_reserved(run):
    """run() and the peak of GPU memory the caching allocator reserved while it ran."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    out = run()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_reserved()


def _latent():
    return torch.randn(LATENT_1024, generator=torch.Generator().manual_seed(3))


def test_tiled_decode_runs_on_the_gpu_and_matches_untiled(comfy_host, sd15):
    _, _, vae = sd15
    vae_tiling = comfy_host.pack_module.nodes.comfy.vae_tiling
    latent = _latent()
    with torch.inference_mode():
        untiled = vae.decode(latent)
        tiled = vae_tiling.decode(vae, latent, 256)
    assert vae.device.type == "cuda"
    assert tiled.shape == untiled.shape == (1, 1024, 1024, 3)
    difference = (tiled.float() - untiled.float()).abs().max().item()
    assert difference < 0.01, f"tiled decode is {difference:.4f} off the untiled one (vae dtype {vae.vae_dtype})"


def test_a_real_gpu_out_of_memory_is_retried_with_half_the_tile(comfy_host, sd15, caplog):
    _, _, vae = sd15
    vae_tiling = comfy_host.pack_module.nodes.comfy.vae_tiling
    latent = _latent()
    with torch.inference_mode():
        half, half_peak = _peak_reserved(lambda: vae_tiling.decode(vae, latent, 512))
        _, whole_peak = _peak_reserved(lambda: vae_tiling.decode(vae, latent, 1024))
    assert whole_peak > half_peak * 1.2, (half_peak, whole_peak)  # the limit below must sit between them
    limit = (half_peak + whole_peak) / 2
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(limit / torch.cuda.get_device_properties(0).total_memory)
    try:
        with caplog.at_level(logging.WARNING), torch.inference_mode():
            retried = vae_tiling.decode(vae, latent, 1024)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert "ran out of GPU memory with 1024 px tiles; retrying with 512 px tiles" in caplog.text
    assert (retried.float() - half.float()).abs().max().item() < 1e-3


def test_a_real_gpu_out_of_memory_in_tiled_diffusion_is_retried(comfy_host, sd15, caplog):
    model, clip, _ = sd15
    vae_tiling = comfy_host.pack_module.nodes.comfy.vae_tiling
    positive = comfy_host.nodes.CLIPTextEncode().encode(clip, "a photo")[0]
    latent = {"samples": torch.zeros(1, 4, 512, 512)}  # 4096 px: 2048 px tiles, 4 per batch, then 1024 px, 1

    def sample(tile, batch):
        tiled = vae_tiling.with_tiled_diffusion(model, tile, 64, batch)
        return comfy_host.nodes.KSampler().sample(tiled, 1, 1, 5.0, "euler", "normal", positive, positive,
                                                  latent)[0]["samples"]

    with torch.inference_mode():
        half, half_peak = _peak_reserved(lambda: sample(1024, 1))
        _, whole_peak = _peak_reserved(lambda: sample(2048, 4))
        assert whole_peak > half_peak * 1.2, (half_peak, whole_peak)
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(
            (half_peak + whole_peak) / 2 / torch.cuda.get_device_properties(0).total_memory)
        try:
            with caplog.at_level(logging.WARNING):
                retried = sample(2048, 4)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
            torch.cuda.empty_cache()
    assert "tiled diffusion ran out of GPU memory; retrying with 1024 px tiles, one per batch" in caplog.text
    assert (retried - half).abs().max().item() < 1e-3
