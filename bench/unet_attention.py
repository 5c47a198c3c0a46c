#!/usr/bin/env python3
"""The UNet's time per tile on the CPU: the host's attention function (sub-quad) vs our swap to its SDPA one.

    VENV/bin/python bench/unet_attention.py [--tiles 512 768 1024] [--checkpoint tiny_sd15.safetensors] [--threads 2]

Loads the checkpoint through ComfyUI's loader (CPU), then per tile size (pixels; the latent is 1/8) calls the
diffusion model on a cond + uncond batch (what one tile of a cfg step costs), once untimed, then --repeats times
with the host's own choice (`optimized_attention`, sub-quad on a CPU) and with the pack's override
(`host_attention.with_sdpa_on_cpu`), alternating. Prints the mean time of each, the ratio, the microseconds per
latent pixel, and the max abs difference of the two outputs.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vae_tiling  # noqa: E402  (same folder: its loaders)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiles", type=int, nargs="+", default=[512, 768, 1024])
    ap.add_argument("--checkpoint", default="tiny_sd15.safetensors", help="a file in the test models' checkpoints")
    ap.add_argument("--models", default=str(Path.home() / ".cache/comfyui-astria/models-v1"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--comfy", default=vae_tiling.DEFAULT_COMFY)
    args = ap.parse_args()
    vae_tiling.start_cpu_host(args.comfy, args.threads)
    import comfy.sd
    import torch
    from comfy.ldm.modules import attention

    from comfyui_astria.nodes.comfy import host_attention
    model = comfy.sd.load_checkpoint_guess_config(str(Path(args.models) / "checkpoints" / args.checkpoint),
                                                  output_vae=False, output_clip=False)[0]
    unet = model.model.diffusion_model.float()
    ours = host_attention.with_sdpa_on_cpu({"transformer_options": {}})["transformer_options"]
    context = torch.randn(2, 77, 768, generator=torch.Generator().manual_seed(1))
    print(f"host attention: {attention.optimized_attention.__name__}; torch {torch.__version__}, "
          f"{args.threads} threads", flush=True)
    print("| tile | latent | host | ours (SDPA) | x host | host us/latent px | ours us/latent px | max abs |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for tile in args.tiles:
        side = tile // 8
        x = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(0))
        timesteps = torch.tensor([500.0, 500.0])
        times, outs = {"host": [], "ours": []}, {}
        with torch.inference_mode():
            for name, options in (("host", {}), ("ours", ours)):
                outs[name] = unet(x, timesteps, context=context, transformer_options=dict(options))
            for _ in range(args.repeats):
                for name, options in (("host", {}), ("ours", ours)):
                    start = time.perf_counter()
                    unet(x, timesteps, context=context, transformer_options=dict(options))
                    times[name].append(time.perf_counter() - start)
        host, mine = (sum(times[n]) / len(times[n]) for n in ("host", "ours"))
        diff = (outs["host"] - outs["ours"]).abs().max().item()
        print(f"| {tile} | {side} | {host:.2f} s | {mine:.2f} s | {mine / host:.2f} | {host / side**2 * 1e6:.0f} | "
              f"{mine / side**2 * 1e6:.0f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
