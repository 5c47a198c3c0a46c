"""The host's Cancel, progress bar and out-of-memory cleanup, shared by our tiled VAE and tiled diffusion; the RAM
budget big allocations are planned against, and the refusal when a size cannot fit."""
import gc
import os

import comfy.model_management
import comfy.utils
import psutil

MEMORY_BUDGET_ENV = "ASTRIA_MEMORY_BUDGET_MB"
"""Caps the RAM the pack plans with, in MiB (default: what the OS reports available); tests and shared machines."""


def memory_budget():
    """Bytes of RAM a run may plan on: the OS's available memory, capped by ASTRIA_MEMORY_BUDGET_MB when set."""
    available = psutil.virtual_memory().available
    cap = os.environ.get(MEMORY_BUDGET_ENV, "").strip()
    if cap:
        try:
            available = min(available, int(float(cap) * 2**20))
        except ValueError:
            raise ValueError(f"{MEMORY_BUDGET_ENV}={cap!r} is not a number of MiB: unset it or give e.g. 8000")
    return available


def gb(nbytes):
    """Bytes as a short GB figure for messages."""
    return f"{nbytes / 2**30:.1f} GB"


def refuse_unless_fits(what, needed, budget, fix):
    """Raise our sentence (what needs how much, what is free, what to change) when `needed` exceeds `budget`."""
    if needed > budget:
        raise ValueError(f"{what} needs about {gb(needed)} of RAM and {gb(budget)} is free: {fix}. "
                          "Nothing was allocated.")


def raise_if_interrupted():
    """The host's Cancel, asked per tile and per layer chunk; raises ComfyUI's own interrupt exception (the
    contract: nodes/core/cancel.py)."""
    comfy.model_management.throw_exception_if_processing_interrupted()
    return False


def progress_bar():
    """A progress callback (done, total) that drives ComfyUI's progress bar."""
    bar = {}

    def progress(done, total):
        if "bar" not in bar:
            bar["bar"] = comfy.utils.ProgressBar(total)
        bar["bar"].update_absolute(done, total)

    return progress


def release_failed_try():
    """Free what a failed out-of-memory try left behind (its frames, then the allocator's cache)."""
    gc.collect()
    comfy.model_management.soft_empty_cache()
