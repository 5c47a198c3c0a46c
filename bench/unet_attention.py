#!/usr/bin/env python3
"""The UNet's time per tile on the CPU: the host's attention function (sub-quad) vs our swap to its SDPA one, and
with the convolutions channels_last too (what our tiled sampling runs).

    VENV/bin/python bench/unet_attention.py [--tiles 512 768 1024] [--checkpoint tiny_sd15.safetensors] [--threads 2]

Loads the checkpoint through ComfyUI's loader (CPU), then per tile size (pixels; the latent is 1/8) calls the
diffusion model on a cond + uncond batch (what one tile of a cfg step costs), once untimed, then --repeats times
with the host's own choice (`optimized_attention`, sub-quad on a CPU) and with the pack's override
(`host_attention.with_sdpa_on_cpu`) and with it inside `host_memory_format.channels_last_convolutions` (the weights
converted once per call, as a tiled step does), alternating. Prints the mean time of each, the ratios to the host,
the microseconds per latent pixel, and the max abs difference of each output to the host's.
"""
import argparse
import contextlib
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

    from comfyui_astria.nodes.comfy import host_attention, host_memory_format
    model = comfy.sd.load_checkpoint_guess_config(str(Path(args.models) / "checkpoints" / args.checkpoint),
                                                  output_vae=False, output_clip=False)[0]
    unet = model.model.diffusion_model.float()
    ours = host_attention.with_sdpa_on_cpu({"transformer_options": {}})["transformer_options"]
    context = torch.randn(2, 77, 768, generator=torch.Generator().manual_seed(1))
    print(f"host attention: {attention.optimized_attention.__name__}; torch {torch.__version__}, "
          f"{args.threads} threads", flush=True)
    arms = {"host": ({}, False), "ours": (ours, False), "ours-cl": (ours, True)}

    def call(x, timesteps, name):
        options, channels_last = arms[name]
        layout = host_memory_format.channels_last_convolutions(unet) if channels_last else contextlib.nullcontext()
        with layout:
            return unet(x, timesteps, context=context, transformer_options=dict(options))

    print("| tile | latent | host | ours (SDPA) | ours (SDPA + channels_last) | x host | x host | "
          "host us/latent px | ours+cl us/latent px | max abs (SDPA) | max abs (+cl) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for tile in args.tiles:
        side = tile // 8
        x = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(0))
        timesteps = torch.tensor([500.0, 500.0])
        times, outs = {name: [] for name in arms}, {}
        with torch.inference_mode():
            for name in arms:
                outs[name] = call(x, timesteps, name)
            for _ in range(args.repeats):
                for name in arms:
                    start = time.perf_counter()
                    call(x, timesteps, name)
                    times[name].append(time.perf_counter() - start)
        host, mine, cl = (sum(times[n]) / len(times[n]) for n in arms)
        diff, diff_cl = ((outs["host"] - outs[n]).abs().max().item() for n in ("ours", "ours-cl"))
        print(f"| {tile} | {side} | {host:.2f} s | {mine:.2f} s | {cl:.2f} s | {mine / host:.2f} | {cl / host:.2f} | "
              f"{host / side**2 * 1e6:.0f} | {cl / side**2 * 1e6:.0f} | {diff:.1e} | {diff_cl:.1e} |", flush=True)

if __name__ == "__main__":
    main()
