"""The host's Cancel, progress bar and out-of-memory cleanup, shared by our tiled VAE and tiled diffusion."""
import gc

import comfy.model_management
import comfy.utils


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
