#!/usr/bin/env python3
"""Tiled VAE figures: untiled vs the host's tiled VAE vs ours (nodes/core/tiled_vae.py), decode and encode.

    VENV/bin/python bench/vae_tiling.py [--sizes 512 1024] [--full] [--checkpoint CKPT] [--tile 512 --overlap 64]

Every case runs in its own process (the VAE loaded alone, weights loaded before measuring): wall time, peak
resident memory above the loaded-VAE baseline (Linux VmHWM reset through /proc/self/clear_refs), and max/mean abs
difference to the untiled result (pixels 0..1 for decode, latent units for encode). Without --checkpoint the VAE
is the SD VAE architecture with seeded random weights, loaded through ComfyUI's own `comfy.sd.VAE`. --full adds
2048 px (untiled needs ~18 GB: run it alone on the machine). Also prints the UNet work amplification of the
default MultiDiffusion plan. Timings on a shared machine are noisy: compare ratios within one run.
"""
import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PACK_ROOT = Path(__file__).resolve().parent.parent
SD_VAE_CONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                 "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def import_pack():
    """Load the pack under its alias without putting the repo root on sys.path (ComfyUI has its own `nodes`)."""
    sys.path.insert(0, str(PACK_ROOT / "tests"))
    import conftest  # noqa: F401  (registers `comfyui_astria`)
    sys.path.pop(0)


def import_comfy(comfy_path: str) -> None:
    if not os.path.isfile(os.path.join(comfy_path, "comfy", "sd.py")):
        sys.exit(f"error: {comfy_path} is not a ComfyUI tree; pass --comfy or set COMFYUI_PATH")
    sys.path.insert(0, comfy_path)
    import comfy.cli_args
    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True


_libc = ctypes.CDLL("libc.so.6")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def measure(fn):
    """fn() -> (result, seconds, peak extra resident MiB above the resident size just before)."""
    gc.collect()
    _libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rss0 = _status_kib("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    return out, seconds, (_status_kib("VmHWM") - rss0) / 1024


def write_random_vae(path: Path, seed: int) -> None:
    """An SD VAE state dict with seeded random weights (scaled so activations stay in a realistic range)."""
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from safetensors.torch import save_file
    torch.manual_seed(seed)
    model = AutoencoderKL(ddconfig=SD_VAE_CONFIG, embed_dim=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 4:
                torch.nn.init.kaiming_uniform_(p, a=1.0)
            elif "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.uniform_(-0.1, 0.1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def load_vae(args):
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils
    if args.checkpoint:
        _, _, vae, _ = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=True, output_clip=False,
                                                             output_model=False)
    else:
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(args.vae_file))
    mm.load_models_gpu([vae.patcher])
    return vae


def inputs(size: int, seed: int):
    """Decode input: a seeded N(0,1) latent; encode input: a smooth seeded image (B, H, W, 3) in 0..1."""
    gen = torch.Generator().manual_seed(seed)
    latent = torch.randn((1, 4, size // 8, size // 8), generator=gen)
    coarse = torch.rand((1, 3, size // 32, size // 32), generator=gen)
    image = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic").clamp(0, 1)
    return latent, image.movedim(1, -1).contiguous()


def run_case(args) -> None:
    """One measurement in this process; prints a JSON row and saves the output for the diff."""
    torch.set_num_threads(args.threads)
    import_comfy(args.comfy)
    import_pack()
    from comfyui_astria.nodes.core import tiled_vae
    vae = load_vae(args)
    latent, image = inputs(args.size, args.seed)
    ratio = vae.spacial_compression_decode()
    lt, lo = args.tile // ratio, args.overlap // ratio
    model = vae.first_stage_model

    def ours_decode():
        raw = tiled_vae.tiled_decode(model, latent.to(vae.vae_dtype), tile_size=args.tile, device=vae.device)
        return vae.process_output(raw).movedim(1, -1)

    def ours_encode():
        pixels = vae.process_input(vae.vae_encode_crop_pixels(image).movedim(-1, 1))
        return tiled_vae.tiled_encode(model, pixels.to(vae.vae_dtype), tile_size=args.tile, device=vae.device)

    cases = {
        ("decode", "untiled"): lambda: vae.decode(latent),
        ("decode", "host"): lambda: vae.decode_tiled(latent, tile_x=lt, tile_y=lt, overlap=lo),
        ("decode", "ours"): ours_decode,
        ("encode", "untiled"): lambda: vae.encode(image),
        ("encode", "host"): lambda: vae.encode_tiled(image, tile_x=args.tile, tile_y=args.tile, overlap=args.overlap),
        ("encode", "ours"): ours_encode,
    }
    with torch.inference_mode():  # as ComfyUI runs nodes; the host's encode_tiled needs it
        out, seconds, peak = measure(cases[(args.op, args.mode)])
    torch.save(out.float().cpu(), args.out)
    print(json.dumps({"seconds": seconds, "peak_mib": peak}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfy", default=os.environ.get(
        "COMFYUI_PATH", str(Path.home() / ".cache/comfyui-astria/host-0.3.75/ComfyUI")))
    ap.add_argument("--checkpoint", help="a checkpoint ComfyUI loads; default: a random-weight SD VAE")
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--full", action="store_true", help="add 2048 px (untiled needs ~18 GB of RAM)")
    ap.add_argument("--ops", nargs="+", choices=["decode", "encode"], default=["decode", "encode"])
    ap.add_argument("--modes", nargs="+", choices=["untiled", "host", "ours"], default=["untiled", "host", "ours"])
    ap.add_argument("--tile", type=int, default=512, help="tile side in pixels (the host node's default 512)")
    ap.add_argument("--overlap", type=int, default=64, help="overlap in pixels (host only; ours needs none)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--case", nargs=3, metavar=("OP", "MODE", "SIZE"), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--vae-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        args.op, args.mode, args.size = args.case[0], args.case[1], int(args.case[2])
        run_case(args)
        return
    print_amplification()
    sizes = args.sizes + ([2048] if args.full and 2048 not in args.sizes else [])
    with tempfile.TemporaryDirectory(prefix="astria-vae-bench-") as tmp:
        if not args.checkpoint:
            import_comfy(args.comfy)
            args.vae_file = str(Path(tmp) / "sd_vae_random.safetensors")
            write_random_vae(Path(args.vae_file), args.seed)
        print(f"torch {torch.__version__}, {args.threads} threads, tile {args.tile} px, host overlap "
              f"{args.overlap} px, VAE: {args.checkpoint or 'SD VAE, random weights'}", flush=True)
        print(f"{'op':7} {'size':>5} {'mode':8} {'seconds':>8} {'x untiled':>9} {'peak MiB':>9} {'x untiled':>9} "
              f"{'max abs':>9} {'mean abs':>9}", flush=True)
        for size in sizes:
            for op in args.ops:
                bench_op(args, tmp, op, size)


def bench_op(args, tmp: str, op: str, size: int) -> None:
    rows = {}
    for mode in args.modes:
        out = Path(tmp) / f"{op}-{mode}-{size}.pt"
        cmd = [sys.executable, __file__, "--case", op, mode, str(size), "--out", str(out), "--comfy", args.comfy,
               "--threads", str(args.threads), "--tile", str(args.tile), "--overlap", str(args.overlap),
               "--seed", str(args.seed)]
        cmd += ["--checkpoint", args.checkpoint] if args.checkpoint else ["--vae-file", args.vae_file]
        done = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{op:7} {size:5} {mode:8} failed: {done.stderr.strip().splitlines()[-1:]}", flush=True)
            continue
        rows[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        rows[mode]["out"] = out
    base = rows.get("untiled")
    reference = torch.load(base["out"]) if base else None
    for mode, row in rows.items():
        time_ratio = f"{row['seconds'] / base['seconds']:.2f}" if base else "-"
        mem_ratio = f"{row['peak_mib'] / max(base['peak_mib'], 1):.2f}" if base else "-"
        if reference is not None:
            d = (torch.load(row["out"]) - reference).abs()
            diffs = f"{d.max().item():9.2e} {d.mean().item():9.2e}"
        else:
            diffs = f"{'-':>9} {'-':>9}"
        print(f"{op:7} {size:5} {mode:8} {row['seconds']:8.2f} {time_ratio:>9} {row['peak_mib']:9.0f} "
              f"{mem_ratio:>9} {diffs}", flush=True)


def print_amplification() -> None:
    """UNet work of the default MultiDiffusion plan: sum of tile areas per step / latent area."""
    import_pack()
    from comfyui_astria.nodes.core.tiling import DEFAULT_OVERLAP, DEFAULT_TILE_SIZE, latent_tile_plan
    print(f"MultiDiffusion, default tile {DEFAULT_TILE_SIZE} px, overlap {DEFAULT_OVERLAP} px:")
    for px in (1024, 1536, 2048, 3072, 4096):
        plan = latent_tile_plan(px // 8, px // 8)
        print(f"  {px:5} px: {len(plan):3} tiles, sides {sorted(set(plan.rows.sizes))} latent px, "
              f"UNet work x{plan.amplification:.3f}")


if __name__ == "__main__":
    main()
