"""The UNet's attention on the CPU: the host's own PyTorch SDPA function in place of its sub-quadratic default.

ComfyUI picks one attention function at start-up; on a CPU (no CUDA, no `--use-pytorch-cross-attention`) that is
`attention_sub_quad`, a chunked attention written as many small tensor ops. PyTorch's fused SDPA (the host's
`attention_pytorch`) gives the same result (1.4-1.8e-6 max abs on the tiny UNet) in 0.80-0.90x the UNet's time
per 512-768 px tile on 2 CPU cores (bench/unet_attention.py; docs/performance.md). So our tiled sampling, on the
CPU only, swaps that one function for the host's SDPA one through the host's
`optimized_attention_override` hook, chained: an override another pack already set still runs, with our choice of
function passed on to it. A user's explicit `--use-quad-cross-attention` or `--use-split-cross-attention` is kept,
and nothing changes on a GPU.
"""
import logging

import comfy.cli_args
from comfy.ldm.modules import attention as host_attention

log = logging.getLogger("astria")
OVERRIDE_KEY = "optimized_attention_override"
"""The transformer_options entry ComfyUI's attention functions call through (comfy/ldm/modules/attention.py)."""


def _unwrapped(function):
    """The function ComfyUI's `wrap_attn` decorator passes to an override (the undecorated one)."""
    return getattr(function, "__wrapped__", function)


_HOST_SUB_QUAD = _unwrapped(host_attention.attention_sub_quad)
_HOST_SDPA = _unwrapped(host_attention.attention_pytorch)
_logged = []


def user_chose_attention() -> bool:
    """Whether the user started ComfyUI with an explicit attention flag that this module must leave alone."""
    args = comfy.cli_args.args
    return bool(getattr(args, "use_quad_cross_attention", False) or getattr(args, "use_split_cross_attention", False))


def sdpa_on_cpu_override(previous=None):
    """An attention override that runs the host's SDPA function where the host chose sub-quad for a CPU tensor,
    then hands the call to `previous` (another pack's override) if there is one."""
    def override(function, *args, **kwargs):
        if function is _HOST_SUB_QUAD and args and getattr(args[0], "device", None) is not None \
                and args[0].device.type == "cpu":
            function = _HOST_SDPA
            if not _logged:
                _logged.append(True)
                log.info("Astria tiled sampling: UNet attention on the CPU through PyTorch SDPA (the host's "
                         "attention_pytorch) instead of ComfyUI's sub-quadratic default: the same result, faster "
                         "on 768 px tiles; start ComfyUI with --use-quad-cross-attention to keep the default")
        if previous is not None:
            return previous(function, *args, **kwargs)
        return function(*args, **kwargs)

    override.astria_sdpa_on_cpu = True
    return override


def with_sdpa_on_cpu(model_options):
    """model_options whose transformer_options carry our chained override (unchanged if it is already there, or
    when the user chose an attention function at start-up)."""
    transformer_options = model_options.get("transformer_options", {})
    previous = transformer_options.get(OVERRIDE_KEY)
    if user_chose_attention() or getattr(previous, "astria_sdpa_on_cpu", False):
        return model_options
    transformer_options = {**transformer_options, OVERRIDE_KEY: sdpa_on_cpu_override(previous)}
    return {**model_options, "transformer_options": transformer_options}
