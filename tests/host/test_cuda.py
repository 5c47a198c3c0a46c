"""CUDA checks (ASTRIA_TEST_DEVICE=gpu on a CUDA machine, run by bench/cuda_checks.sh): our exact tiled VAE on the
host's CUDA VAE, and a real GPU out-of-memory error retried once with half the tile size."""
import copy
import logging

import pytest
import torch

from comfyui_astria.tests.support import paths

pytestmark = pytest.mark.skipif(
    paths.HOST_ON_CPU or not torch.cuda.is_available(),
    reason="CUDA check: needs a CUDA GPU and ASTRIA_TEST_DEVICE=gpu (bench/cuda_checks.sh runs it there)")

LATENT_1024 = (1, 4, 128, 128)


def _peak_reserved(run, allocated=False):
    """run() and the peak of GPU memory the caching allocator reserved (or handed out) while it ran."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    out = run()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() if allocated else torch.cuda.max_memory_reserved()


def _latent():
    return torch.randn(LATENT_1024, generator=torch.Generator().manual_seed(3))


def test_tiled_decode_on_the_gpu_is_as_close_to_float32_as_the_untiled_one(comfy_host, sd15):
    _, _, vae = sd15
    host_vae = comfy_host.pack_module.nodes.comfy.host_vae
    latent = _latent()
    with torch.inference_mode():
        untiled = vae.decode(latent).float()
        tiled = host_vae.decode(vae, latent, 256).float()
        exact = copy.deepcopy(vae.first_stage_model).float()
        reference = exact.decode(latent.to(vae.device, torch.float32)).float()
        reference = vae.process_output(reference).movedim(1, -1).to(untiled.device)
    assert vae.device.type == "cuda"
    assert tiled.shape == untiled.shape == (1, 1024, 1024, 3)
    untiled_error = (untiled - reference).abs().max().item()
    tiled_error = (tiled - reference).abs().max().item()
    # in bf16/fp16 the untiled decode is itself off float32; tiling must add nothing visible to that
    assert tiled_error <= max(1.5 * untiled_error, 0.01), (
        f"{vae.vae_dtype}: tiled is {tiled_error:.4f} off float32, untiled {untiled_error:.4f}")


def test_a_real_gpu_out_of_memory_is_retried_with_half_the_tile(comfy_host, sd15, caplog):
    _, _, vae = sd15
    host_vae = comfy_host.pack_module.nodes.comfy.host_vae
    latent = _latent()
    with torch.inference_mode():
        # calibrated on the live bytes the allocator must find (reserved memory includes reusable cache)
        half, half_peak = _peak_reserved(lambda: host_vae.decode(vae, latent, 512), allocated=True)
        _, whole_peak = _peak_reserved(lambda: host_vae.decode(vae, latent, 1024), allocated=True)
    assert whole_peak > half_peak * 1.2, (half_peak, whole_peak)  # the limit below must sit between them
    limit = (half_peak + whole_peak) / 2
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(limit / torch.cuda.get_device_properties(0).total_memory)
    try:
        with caplog.at_level(logging.WARNING), torch.inference_mode():
            retried = host_vae.decode(vae, latent, 1024)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert "ran out of GPU memory with 1024 px tiles; retrying with 512 px tiles" in caplog.text
    assert (retried.float() - half.float()).abs().max().item() < 1e-3


def test_a_real_gpu_out_of_memory_in_tiled_diffusion_is_retried(comfy_host, sd15, caplog):
    model, clip, _ = sd15
    host_diffusion = comfy_host.pack_module.nodes.comfy.host_diffusion
    positive = comfy_host.nodes.CLIPTextEncode().encode(clip, "a photo")[0]
    latent = {"samples": torch.zeros(1, 4, 512, 512)}  # 4096 px: 2048 px tiles, 4 per batch, then 1024 px, 1

    def sample(tile, batch):
        tiled = host_diffusion.with_tiled_diffusion(model, tile, 64, batch)
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
