#!/usr/bin/env python3
"""Peak memory of the only-upscale's full-size image stages besides the VAE, each alone in its own process.

    VENV/bin/python bench/upscale_stages.py [--size 4096]

Stages (output --size x --size, batch 1): `lanczos-host` is ComfyUI's `common_upscale(..., "lanczos")` plus the clamp
the node used to apply; `lanczos-ours` is `img2img.lanczos_resize` (the same PIL Lanczos, converted in row bands);
`colour-fix-whole` is the wavelet colour fix in one band (what it was before the row bands), `colour-fix-ours` with
the default bands; `esrgan-host` is the host's tiled ImageUpscaleWithModel with the tiny 4x ESRGAN
(tools/make_tiny_extras.py) from --size/4 to --size (from ASTRIA_BENCH_ESRGAN_INPUT px when set, then the host's
Lanczos to --size, as a user wires it); `esrgan-ours` the only-upscale's banded pass
(`nodes/comfy/upscale.upscale_with_model`: the host's node per row band, then Lanczos) on the same input. Prints wall time, peak RSS above the process's state just
before the stage (inputs made, model loaded) in MiB and in full-size float32 RGB images (--size^2 x 12 bytes), and
max abs between the two variants of a stage.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vae_tiling  # noqa: E402

STAGES = ["lanczos-host", "lanczos-ours", "colour-fix-whole", "colour-fix-ours", "esrgan-host", "esrgan-ours"]
ESRGAN_INPUT = int(os.environ.get("ASTRIA_BENCH_ESRGAN_INPUT", "0"))
"""Input side of the esrgan stages (default --size / 4: the model's output is the target; e.g. --size / 2: the
model's 4x output is resized to the target, as in a 2x only-upscale with a 4x model)."""
MODELS = Path(os.environ.get("ASTRIA_TEST_MODELS", Path.home() / ".cache/comfyui-astria/models-v1"))


def run_stage(stage, size, out_path):
    """Run one stage in this process: (seconds, peak MiB above the state just before, result saved)."""
    import torch
    torch.set_num_threads(2)
    vae_tiling.import_comfy(os.environ.get("COMFYUI_PATH", str(Path.home() / ".cache/comfyui-astria/host-0.3.75/"
                                                                 "ComfyUI")), "cpu")
    vae_tiling.import_pack()
    import comfy.utils

    from comfyui_astria.nodes.core import img2img
    gen = torch.Generator().manual_seed(0)
    if stage.startswith("lanczos"):
        source = torch.rand(1, size // 2, size // 2, 3, generator=gen)
        if stage == "lanczos-host":
            def fn():
                return comfy.utils.common_upscale(source.movedim(-1, 1), size, size, "lanczos",
                                                  "disabled").movedim(1, -1).clamp(0, 1)
        else:
            def fn():
                return img2img.lanczos_resize(source, size, size)
    elif stage.startswith("colour-fix"):
        result = torch.rand(1, size, size, 3, generator=gen)
        reference = torch.rand(1, size, size, 3, generator=gen)
        if stage == "colour-fix-whole":
            img2img.BAND_ROWS = size
        def fn():
            return img2img.color_fix(result, reference, "wavelet")
    else:
        import folder_paths
        from comfy_extras.nodes_upscale_model import ImageUpscaleWithModel, UpscaleModelLoader
        folder_paths.add_model_folder_path("upscale_models", str(MODELS / "upscale_models"))
        model = UpscaleModelLoader.execute("tiny_esrgan_x4.safetensors").result[0]
        side = ESRGAN_INPUT or size // 4
        source = torch.rand(1, side, side, 3, generator=gen)

        if stage == "esrgan-host":
            def fn():  # as a user wires it: the model's node, then the host's Lanczos to the target if it differs
                upscaled = ImageUpscaleWithModel.execute(model, source)[0]
                if upscaled.shape[1:3] == (size, size):
                    return upscaled
                return comfy.utils.common_upscale(upscaled.movedim(-1, 1), size, size, "lanczos",
                                                  "disabled").movedim(1, -1).clamp(0, 1)
        else:
            import importlib
            upscale = importlib.import_module("comfyui_astria.nodes.comfy.upscale")

            def fn():
                return upscale.upscale_with_model(model, source, size, size)
    with torch.inference_mode():
        out, seconds, peak, anon = vae_tiling.measure(fn, cuda=False)
    torch.save(out, out_path)
    return {"seconds": seconds, "peak_mib": peak, "anon_mib": anon}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=STAGES)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_stage(args.case, args.size, args.out)), flush=True)
        return
    image_mib = args.size * args.size * 12 / 2**20
    print(f"CPU, 2 threads; output {args.size} px; one float32 RGB image = {image_mib:.0f} MiB")
    print(f"{'stage':17} {'seconds':>8} {'peak MiB':>9} {'images':>7} {'RssAnon':>8}  max abs vs the other")
    import torch
    with tempfile.TemporaryDirectory(prefix="astria-stages-") as tmp:
        outs = {}
        for stage in args.stages:
            out = Path(tmp) / f"{stage}.pt"
            done = subprocess.run([sys.executable, __file__, "--case", stage, "--size", str(args.size), "--out",
                                   str(out)], capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(f"{stage:17} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}", flush=True)
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            outs[stage] = out
            pair = {"lanczos-ours": "lanczos-host", "colour-fix-ours": "colour-fix-whole",
                    "esrgan-ours": "esrgan-host"}.get(stage)
            diff = (f"{(torch.load(out) - torch.load(outs[pair])).abs().max().item():.1e}"
                    if pair in outs else "")
            print(f"{stage:17} {row['seconds']:8.1f} {row['peak_mib']:9.0f} {row['peak_mib'] / image_mib:7.2f} "
                  f"{row['anon_mib']:8.0f}  {diff}", flush=True)


if __name__ == "__main__":
    main()
