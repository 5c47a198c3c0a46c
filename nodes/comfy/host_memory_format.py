"""The UNet's convolutions on the CPU in channels_last memory format while our tiled sampling runs them.

ComfyUI keeps a model's convolution weights in PyTorch's default (N, C, H, W) layout. On a CPU, oneDNN's
convolutions run fastest with channels_last weights and activations (our tiled VAE already runs that way), and a
convolution with a channels_last weight gives a channels_last output, so the layout carries through the UNet.
Measured on the tiny SD1.5-layout UNet, one 768 px tile (cond + uncond, 2 threads; bench/unet_attention.py):
1.44 s against 1.81 s with the default layout (0.80x), the same result to float rounding (convolutions are ~75% of the
UNet's time on the CPU); at 1024 -> 2048 with 16 steps the sampling stage went from 238.7 s (the host's attention,
default layout) to 178.7 s (SDPA and channels_last).

The weights change layout only for the duration of one tiled model call and go back to the layout they had before
(a pure copy: the same values, bit for bit), so the host's own sampling, other nodes and other packs see the model as
it was. Only plain float tensors on the CPU in the default layout are touched (a quantized or custom tensor type from
another pack is left as it is). The copy costs about one pass over the convolution weights per model call, small
against a tiled step on a CPU.
"""
import contextlib
import logging

import torch

log = logging.getLogger("astria")
CONVOLUTION_WEIGHT_DIMS = 4
"""(out channels, in channels, kernel height, kernel width): the weights whose layout matters to oneDNN."""
_logged = []


def _convertible(tensor) -> bool:
    """Whether a parameter is a plain float CPU tensor of a 2D convolution in the default layout."""
    return (type(tensor) in (torch.Tensor, torch.nn.Parameter) and tensor.ndim == CONVOLUTION_WEIGHT_DIMS
            and tensor.device.type == "cpu" and tensor.dtype.is_floating_point
            and tensor.is_contiguous() and not tensor.is_contiguous(memory_format=torch.channels_last))


@contextlib.contextmanager
def channels_last_convolutions(module):
    """Within the block, `module`'s CPU convolution weights are channels_last; afterwards, the layout they had."""
    converted = []
    for parameter in module.parameters():
        if _convertible(parameter.data):
            parameter.data = parameter.data.contiguous(memory_format=torch.channels_last)
            converted.append(parameter)
    if converted and not _logged:
        _logged.append(True)
        log.info("Astria tiled sampling: the UNet's convolutions run channels_last on the CPU (oneDNN's fastest "
                 "layout) while the tiles run; the model's weights go back to their layout after each step")
    try:
        yield len(converted)
    finally:
        for parameter in converted:
            parameter.data = parameter.data.contiguous()
