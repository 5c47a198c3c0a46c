"""Astria LoRA Loader on the generated kohya LoRA: weights move by weight x delta, tags add up, pickles refused."""
import pickle

import pytest
import torch
from safetensors.torch import load_file

from comfyui_astria.tests.support import paths

from .conftest import run_node

LORA_FILE = paths.MODELS_DIR / "loras" / "tiny_sd15_lora.safetensors"
UNET_LORA = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
CLIP_LORA = "lora_te_text_model_encoder_layers_0_mlp_fc1"
CLIP_KEY = "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"


def lora_delta(name):
    """up @ down x alpha / rank of one layer of the LoRA file: what weight 1.0 adds."""
    state = load_file(str(LORA_FILE))
    up, down = state[f"{name}.lora_up.weight"].float(), state[f"{name}.lora_down.weight"].float()
    return (up @ down) * (state[f"{name}.alpha"].float() / down.shape[0])


def unet_key(model):
    import comfy.lora

    return comfy.lora.model_lora_keys_unet(model.model, {})[UNET_LORA]


def patched(patcher, key):
    """The weight of key with the patcher's LoRA patches applied by the host's own LoRA math."""
    import comfy.lora

    base = patcher.model.state_dict()[key].detach().float().cpu().clone()
    return comfy.lora.calculate_weight(patcher.patches.get(key, []), base, key)


def load(comfy_host, sd15, text, **widgets):
    model, clip, _ = sd15
    prompt = run_node(comfy_host, "AstriaPrompt", text=text)[0]
    return run_node(comfy_host, "AstriaLoraLoader", model=model, clip=clip, astria_prompt=prompt, **widgets)


def test_weights_move_by_weight_times_the_lora_delta(comfy_host, sd15):
    model, clip, _ = sd15
    key = unet_key(model)
    base_unet = model.model.state_dict()[key].float().cpu()
    base_clip = clip.patcher.model.state_dict()[CLIP_KEY].float().cpu()
    new_model, new_clip, report = load(comfy_host, sd15, "a cat <lora:tiny_sd15_lora:0.5>")
    unet_change = patched(new_model, key) - base_unet
    clip_change = patched(new_clip.patcher, CLIP_KEY) - base_clip
    assert torch.allclose(unet_change, 0.5 * lora_delta(UNET_LORA), atol=2e-3)
    assert torch.allclose(clip_change, 0.5 * lora_delta(CLIP_LORA), atol=2e-3)
    assert unet_change.abs().max() > 1e-3
    assert "tiny_sd15_lora.safetensors" in report and "x0.5" in report


def test_the_same_file_twice_adds_up_and_scales_apply(comfy_host, sd15):
    model, _, _ = sd15
    key = unet_key(model)
    base = model.model.state_dict()[key].float().cpu()
    new_model, _, report = load(comfy_host, sd15, "<lora:tiny_sd15_lora:0.5> <lora:tiny_sd15_lora.safetensors:0.25>",
                                strength_model_scale=2.0)
    assert torch.allclose(patched(new_model, key) - base, 1.5 * lora_delta(UNET_LORA), atol=3e-3)
    assert report.splitlines() == [
        "tiny_sd15_lora -> tiny_sd15_lora.safetensors (exact match) x0.75 (named 2 times as tiny_sd15_lora, "
        "tiny_sd15_lora.safetensors: x0.5 + x0.25, weights added)",
        "warning: LoRA tiny_sd15_lora.safetensors is named 2 times in the prompt; it is applied once with the weights "
        "added (0.5 + 0.25 = 0.75).",
        "all weights scaled: model x2, text encoder x1",
    ]


def test_weight_zero_changes_nothing(comfy_host, sd15):
    model, clip, _ = sd15
    new_model, new_clip, _ = load(comfy_host, sd15, "a cat <lora:tiny_sd15_lora:0>")
    assert not new_model.patches and not new_clip.patcher.patches


def test_missing_lora_error_and_skip(comfy_host, sd15):
    with pytest.raises(ValueError, match="tiny_sd15_lora"):  # the closest names are suggested
        load(comfy_host, sd15, "<lora:tiny_sd15_lroa:1>")
    model, _, _ = sd15
    new_model, _, report = load(comfy_host, sd15, "<lora:tiny_sd15_lroa:1>", on_missing="skip with a warning")
    assert "SKIPPED" in report and not new_model.patches


def test_a_pasted_megabyte_name_gives_a_short_error(comfy_host, sd15):
    name = "x" * 1_000_000
    with pytest.raises(ValueError, match=r"\(1000000 characters\)") as raised:
        load(comfy_host, sd15, f"<lora:{name}:1>")
    assert len(str(raised.value)) < 2000


class _Tripwire:
    """Unpickling this creates a marker file: proof that a pickle was loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_lora_is_refused_and_never_unpickled(comfy_host, sd15, tmp_path):
    folder = tmp_path / "pickled_loras"
    folder.mkdir()
    marker = tmp_path / "unpickled"
    (folder / "evil_detail.ckpt").write_bytes(pickle.dumps({"state_dict": _Tripwire(marker)}))
    comfy_host.folder_paths.add_model_folder_path("loras", str(folder))
    try:
        with pytest.raises(ValueError, match="pickle"):
            load(comfy_host, sd15, "<lora:evil_detail:1>")
    finally:
        comfy_host.folder_paths.folder_names_and_paths["loras"][0].remove(str(folder))
        comfy_host.folder_paths.filename_list_cache.pop("loras", None)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../checkpoints/tiny_sd15", "/etc/passwd", "C:evil", "sub/../../x"])
def test_names_that_leave_the_folder_are_refused(comfy_host, sd15, name):
    with pytest.raises(ValueError):
        load(comfy_host, sd15, f"<lora:{name}:1>")
