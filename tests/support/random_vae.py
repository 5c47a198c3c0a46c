"""The SD VAE architecture (ComfyUI's own AutoencoderKL) with seeded random weights: for tests and bench/."""
import torch

SD_VAE_CONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                 "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def random_vae(seed: int, **changes):
    """An AutoencoderKL as the host builds it for SD (config `changes` applied), with seeded random weights scaled
    to keep activations in a realistic range. Import ComfyUI (and pin its device) before calling."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    config = dict(SD_VAE_CONFIG, **changes)
    torch.manual_seed(seed)
    model = AutoencoderKL(ddconfig=config, embed_dim=config["z_channels"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 4:
                torch.nn.init.kaiming_uniform_(p, a=1.0)
            elif "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.uniform_(-0.1, 0.1)
    return model.eval()
