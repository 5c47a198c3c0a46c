"""Bench-only ComfyUI custom node folder (no nodes): times the stages of every queued graph inside the server.

`bench/only_upscale.py` links this folder into its own bench server's custom_nodes (never a test server's). It
wraps the host calls every upscale graph goes through, so the built-ins, UltimateSDUpscale and ours are timed by
the same clock:
- encode / decode: `comfy.sd.VAE.encode`, `encode_tiled`, `decode`, `decode_tiled`, and our tiled VAE's entries
  (`nodes/comfy/host_vae.encode` / `decode`, which may fall back to the host's);
- sampling: `comfy.sample.sample` (KSampler's `common_ksampler`, UltimateSDUpscale's per-tile calls, ours);
- text encode: `comfy.sd.CLIP.encode_from_tokens` / `encode_from_tokens_scheduled`;
- resize: `comfy.utils.common_upscale` (ImageScaleBy) and our `img2img.lanczos_resize`;
- colour fix: our `img2img.color_fix`.
Only the outermost timed call of a thread counts (a fallback inside our VAE entry is not counted twice). Each
stage's peak resident memory is read too (Linux: VmHWM, reset through /proc/self/clear_refs as the stage starts).
At the end of each graph the server prints one line, `ASTRIA_BENCH_STAGES {json}`: seconds and peak RSS bytes per
stage and the graph's whole execution time; the bench reads it from the server's log.
"""
import functools
import json
import re
import sys
import threading
import time

import comfy.sample
import comfy.sd
import comfy.utils
import execution

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
MARKER = "ASTRIA_BENCH_STAGES"
_totals = {}
_calls = {}
_peaks = {}
_inside = threading.local()
STATUS = "/proc/self/status"


def _reset_peak():
    """Start a new resident-memory high-water mark (Linux; nothing elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def _peak_bytes():
    """The resident-memory high-water mark since the last reset (VmHWM), 0 where unreadable."""
    try:
        with open(STATUS) as handle:
            match = re.search(r"VmHWM:\s+(\d+) kB", handle.read())
    except OSError:
        return 0
    return int(match.group(1)) * 1024 if match else 0


def _timed(stage, function):
    """`function` with its wall time added to `stage` when it is the outermost timed call of its thread."""
    if getattr(function, "_astria_bench_stage", None):
        return function

    @functools.wraps(function)
    def timed(*args, **kwargs):
        if getattr(_inside, "depth", 0):
            return function(*args, **kwargs)
        _inside.depth = 1
        _reset_peak()
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            _inside.depth = 0
            _totals[stage] = _totals.get(stage, 0.0) + time.perf_counter() - started
            _calls[stage] = _calls.get(stage, 0) + 1
            _peaks[stage] = max(_peaks.get(stage, 0), _peak_bytes())

    timed._astria_bench_stage = stage
    return timed


def _wrap(owner, name, stage):
    """Replace owner.name with its timed form (once)."""
    if hasattr(owner, name):
        setattr(owner, name, _timed(stage, getattr(owner, name)))


for _name in ("encode", "encode_tiled"):
    _wrap(comfy.sd.VAE, _name, "encode")
for _name in ("decode", "decode_tiled"):
    _wrap(comfy.sd.VAE, _name, "decode")
for _name in ("encode_from_tokens", "encode_from_tokens_scheduled"):
    _wrap(comfy.sd.CLIP, _name, "text encode")
_wrap(comfy.sample, "sample", "sampling")
_wrap(comfy.utils, "common_upscale", "resize")


def _wrap_pack():
    """Time our own entries (the pack's modules, under whatever name ComfyUI imported the pack)."""
    for module_name, module in list(sys.modules.items()):
        if module_name.endswith("nodes.comfy.host_vae"):
            _wrap(module, "encode", "encode")
            _wrap(module, "decode", "decode")
        elif module_name.endswith("nodes.core.img2img"):
            _wrap(module, "lanczos_resize", "resize")
            _wrap(module, "color_fix", "colour fix")


_execute = execution.PromptExecutor.execute


def _execute_and_report(self, *args, **kwargs):
    """Run one graph, then print its stage times and reset them."""
    _wrap_pack()
    _totals.clear()
    _calls.clear()
    _peaks.clear()
    started = time.perf_counter()
    try:
        return _execute(self, *args, **kwargs)
    finally:
        figures = {"total": time.perf_counter() - started, "stages": dict(_totals), "calls": dict(_calls),
                   "peak_rss": dict(_peaks)}
        print(f"{MARKER} {json.dumps(figures)}", flush=True)


execution.PromptExecutor.execute = _execute_and_report
