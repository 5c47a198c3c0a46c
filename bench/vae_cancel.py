#!/usr/bin/env python3
"""Tiled VAE decode at a large size for a limited time: memory while it runs, progress, and how fast Cancel stops it.

    VENV/bin/python bench/vae_cancel.py [--size 4096] [--after 120] [--tile 256]

Decodes a seeded latent with the random-weight SD VAE (loaded through ComfyUI's `comfy.sd.VAE`, as
bench/vae_tiling.py does) the way the nodes plan it (`host_vae.plan`: RAM or spill), asks it to cancel after
--after seconds through the same `should_cancel` hook the nodes connect to ComfyUI's Cancel, and prints: the way,
the peak RSS and RssAnon above the loaded VAE, tiles done of the total, the seconds from the cancel request to
the run stopping, the longest gap between two Cancel checks (the most a Cancel can wait at that size), the longest
gap between two progress updates (what a user sees of the progress bar), with the three longest named by the step
they fell in (its index and kind in the decoder's list) and the progress unit they ended at, and the major page
faults (reads the process waited on the disk for: a spill that outgrew RAM).
A large --after (longer than the decode) runs it to the end: the decode's time, peaks and progress gaps at that size.
The peak RSS is the kernel's high-water mark (VmHWM, reset through /proc/self/clear_refs after the VAE is loaded);
RssAnon is sampled every 50 ms.
"""
import argparse
import dataclasses
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vae_tiling  # noqa: E402  (same folder: its loaders and /proc helpers)


def major_faults() -> int:
    """This process's major page faults so far (pages it waited on the disk for), from /proc/self/stat."""
    with open("/proc/self/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[9])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--after", type=float, default=120.0, help="seconds before asking to cancel")
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--comfy", default=vae_tiling.DEFAULT_COMFY)
    args = ap.parse_args()
    vae_tiling.start_cpu_host(args.comfy, args.threads)
    import torch

    from comfyui_astria.nodes.comfy import host_vae
    from comfyui_astria.nodes.core import tiled_vae
    from comfyui_astria.nodes.core.cancel import Cancelled
    with tempfile.TemporaryDirectory(prefix="astria-cancel-bench-") as tmp:
        vae_file = Path(tmp) / "vae.safetensors"
        vae_tiling.write_random_vae(vae_file, 0)
        load_args = argparse.Namespace(vae_dtype="auto", checkpoint=None, vae_file=str(vae_file))
        vae = vae_tiling.load_vae(load_args)
    latent = torch.randn((1, 4, args.size // 8, args.size // 8), generator=torch.Generator().manual_seed(0))
    plan = host_vae.plan(vae, tuple(latent.shape), False, args.tile)
    print(f"{args.size} px decode, tile {args.tile}: {plan.describe('decode')}", flush=True)
    rss0, anon0 = vae_tiling._status_kib("VmRSS"), vae_tiling._status_kib("RssAnon")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    peaks = {"rss": rss0, "anon": anon0}
    updates, checks, asked = [], [], {}
    stop = threading.Event()

    def sample():
        while not stop.wait(0.05):
            peaks["rss"] = max(peaks["rss"], vae_tiling._status_kib("VmRSS"))
            peaks["anon"] = max(peaks["anon"], vae_tiling._status_kib("RssAnon"))

    threading.Thread(target=sample, daemon=True).start()
    faults0 = major_faults()
    started = time.perf_counter()

    def should_cancel():
        now = time.perf_counter()
        checks.append(now)
        if now - started >= args.after:
            asked.setdefault("at", now)
            return True
        return False

    spill = tiled_vae.SpillStore() if plan.way == "spill" else None
    steps_started = []  # (time, index, kind): which step each progress gap fell in
    for kind, step in list(tiled_vae._STEPS.items()):
        def timed(act, module, settings, run=step.run, kind=kind):
            steps_started.append((time.perf_counter(), len(steps_started), kind))
            return run(act, module, settings)
        tiled_vae._STEPS[kind] = dataclasses.replace(step, run=timed)
    try:
        with torch.inference_mode():
            tiled_vae.tiled_decode(vae.first_stage_model, latent, args.tile, should_cancel=should_cancel,
                                   progress=lambda done, total: updates.append((time.perf_counter(), done, total)),
                                   spill=spill)
        print("finished before the cancel request", flush=True)
    except Cancelled:
        pass
    ended = time.perf_counter()
    stop.set()
    peaks["rss"] = max(peaks["rss"], vae_tiling._status_kib("VmHWM"))
    done, total = (updates[-1][1], updates[-1][2]) if updates else (0, 0)
    gaps = [b[0] - a[0] for a, b in zip(updates, updates[1:])]
    print(f"ran {ended - started:.1f} s, {done}/{total} tiles; peak RSS +{(peaks['rss'] - rss0) / 1024:.0f} MiB, "
          f"RssAnon +{(peaks['anon'] - anon0) / 1024:.0f} MiB, spill files peak "
          f"{(spill.peak_bytes if spill else 0) / 2**30:.2f} GB; {major_faults() - faults0} major page faults",
          flush=True)
    if "at" in asked:
        print(f"cancel: stopped {ended - asked['at']:.2f} s after the request", flush=True)
    check_gaps = [b - a for a, b in zip(checks, checks[1:])]
    if check_gaps:
        longest = max(range(len(check_gaps)), key=check_gaps.__getitem__)
        index, kind = max(((t, n, k) for t, n, k in steps_started if t <= checks[longest + 1]),
                          default=(0, -1, "?"))[1:]
        print(f"longest gap between two Cancel checks (the most a Cancel can wait): {check_gaps[longest]:.2f} s, "
              f"in step {index} ({kind}); {len(checks)} checks", flush=True)
    if gaps:
        print(f"longest gap between progress updates: {max(gaps):.2f} s", flush=True)
        for i in sorted(range(len(gaps)), key=gaps.__getitem__)[::-1][:3]:
            at, unit = updates[i + 1][0], updates[i + 1][1]
            index, kind = max(((t, n, k) for t, n, k in steps_started if t <= at), default=(0, -1, "?"))[1:]
            print(f"  {gaps[i]:.2f} s, ending at unit {unit}/{total}, in step {index} ({kind})", flush=True)


if __name__ == "__main__":
    main()
