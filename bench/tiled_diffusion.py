"""Tiled diffusion (MultiDiffusion) benchmark: UNet work amplification measured through the real sampling wrapper.

For each size, the wrapper that Astria Tiled Diffusion installs (`calc_cond_batch`) runs `steps` sampling steps
with a stand-in for the host's executor (`_calc_cond_batch`) that records the latent area of every model call;
amplification = sum of tile areas over all calls / (latent area x steps x conds). The floor is 1.0; target <= 1.15
with the default settings. For comparison, the same measurement with TiledDiffusion's default tiling (96 latent px
tiles, 8 overlap = 768 / 64 px) laid out by our planner. Never asserts; prints a table.

Usage: python bench/tiled_diffusion.py [--sizes 1024 2048 4096] [--steps 4]   (needs torch: the host's python)
"""
import argparse
import importlib.util
import sys
from pathlib import Path

import torch

PACK_ROOT = Path(__file__).resolve().parents[1]


def import_pack():
    """Load the pack under the alias `comfyui_astria` (never the repo root on sys.path: ComfyUI owns `nodes`)."""
    if "comfyui_astria" not in sys.modules:
        spec = importlib.util.spec_from_file_location("comfyui_astria", PACK_ROOT / "__init__.py",
                                                      submodule_search_locations=[str(PACK_ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["comfyui_astria"] = module
        spec.loader.exec_module(module)


def measure(size_px, tile_px, overlap_px, steps, tile_batch_size):
    """(tiles, model calls, amplification) of `steps` hooked steps on a size_px square latent."""
    from comfyui_astria.nodes.core import multidiffusion, tiling

    areas = []

    def fake_calc(model, conds, x, sigma, model_options):
        areas.append(x.shape[0] * x.shape[-2] * x.shape[-1] * len([c for c in conds if c is not None]))
        return [torch.zeros_like(x) for _ in conds]

    def plan_for(height, width):
        return tiling.latent_tile_plan(height, width, tile_px, overlap_px)

    wrapper = multidiffusion.make_tiled_calc_cond_batch_wrapper(plan_for, tile_batch_size)
    latent = torch.zeros(1, 4, size_px // 8, size_px // 8)
    conds = [[{"model_conds": {}}], [{"model_conds": {}}]]  # cond and uncond, as with cfg > 1
    for _ in range(steps):
        wrapper(fake_calc, None, conds, latent, torch.ones(1), {})
    work = sum(areas)
    ideal = latent.shape[-1] * latent.shape[-2] * steps * len(conds)
    return len(plan_for(*latent.shape[-2:])), len(areas), work / ideal


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--tile-batch-size", type=int, default=4)
    args = parser.parse_args()
    import_pack()
    from comfyui_astria.nodes.core.tiling import DEFAULT_OVERLAP, DEFAULT_TILE_SIZE

    print(f"{'size':>6} {'setting':<34} {'tiles':>5} {'calls':>6} {'UNet work':>10}")
    for size in args.sizes:
        for label, tile, overlap in ((f"ours (default {DEFAULT_TILE_SIZE}/{DEFAULT_OVERLAP} px)", DEFAULT_TILE_SIZE,
                                      DEFAULT_OVERLAP),
                                     ("768/64 px tiles (TD's sizes), our layout", 768, 64)):
            tiles, calls, amplification = measure(size, tile, overlap, args.steps, args.tile_batch_size)
            print(f"{size:>6} {label:<34} {tiles:>5} {calls:>6} {amplification:>9.3f}x", flush=True)


if __name__ == "__main__":
    main()
