#!/usr/bin/env python3
"""The exact VAE attention's kernel on the CPU: float32 (PyTorch's CPU flash kernel) vs the bfloat16 products the
tiled VAE takes on CPUs fast at them (`tiled_vae.bf16_attention_with_lse`).

    VENV/bin/python bench/vae_attention_kernel.py [--keys 16384 65536] [--queries 4096] [--threads 2]

Per key count, one call of --queries queries against that many keys (512 channels, the SD VAE's mid-block; random
unit-variance inputs times --scale, which scales the scores by its square; a seeded generator), each kernel once
untimed, then --repeats times alternating. Prints the mean time of each, bf16 / float32, this CPU's bf16 matmul
speedup (what the tiled VAE decides by), the bf16 result's max and mean abs difference to the float32 one and its
log-sum-exp's, and what the tiled VAE's per-layer probe (`bf16_attention_error`, on the first 1024 positions) says.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vae_tiling  # noqa: E402  (same folder: the pack's import)

CHANNELS = 512
PROBE_POSITIONS = 1024


def _timed(call, times: list) -> None:
    """Run call once and append its wall time to times."""
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)


def main():
    """Time both kernels per key count and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--queries", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scale", type=float, default=1.0, help="queries and keys times this (scores: its square)")
    ap.add_argument("--comfy", default=vae_tiling.DEFAULT_COMFY)
    args = ap.parse_args()
    vae_tiling.start_cpu_host(args.comfy, args.threads)
    import torch

    from comfyui_astria.nodes.core import tiled_vae
    print(f"bf16 matmul speedup on this CPU: {tiled_vae.cpu_bf16_matmul_speedup():.1f}x "
          f"(bf16 products where >= {tiled_vae.BF16_ATTENTION_MIN_SPEEDUP}x)")
    print("| keys | queries | float32 (flash) | bf16 products | bf16 x float32 | max abs | mean abs | lse max abs "
          "| probe (keeps bf16?) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    gen = torch.Generator().manual_seed(0)
    for n in args.keys:
        q = torch.randn(1, 1, args.queries, CHANNELS, generator=gen) * args.scale
        k = torch.randn(1, 1, n, CHANNELS, generator=gen) * args.scale
        v = torch.randn(1, 1, n, CHANNELS, generator=gen)
        k16, v16 = k.to(torch.bfloat16), v.to(torch.bfloat16)
        runs = {"f32": lambda: tiled_vae.attention_with_lse(q, k, v),
                "bf16": lambda: tiled_vae.attention_with_lse(q, k16, v16)}
        results = {name: call() for name, call in runs.items()}  # untimed: kernels picked, buffers touched
        times = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, call in runs.items():
                _timed(call, times[name])
        mean = {name: sum(t) / len(t) for name, t in times.items()}
        (out32, lse32), (out16, lse16) = results["f32"], results["bf16"]
        diff = (out16 - out32).abs()
        sample = slice(0, PROBE_POSITIONS)
        probe = tiled_vae.bf16_attention_error(q[:, :, sample], k[:, :, sample], v[:, :, sample])
        keeps = "yes" if probe <= tiled_vae.BF16_PROBE_MAX_ERROR else "no: float32"
        print(f"| {n} | {args.queries} | {mean['f32']:.3f} s | {mean['bf16']:.3f} s | {mean['bf16'] / mean['f32']:.2f} "
              f"| {diff.max().item():.1e} | {diff.mean().item():.1e} | {(lse16 - lse32).abs().max().item():.1e} "
              f"| {probe:.1e} ({keeps}) |",
              flush=True)


if __name__ == "__main__":
    main()
