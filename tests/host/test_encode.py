"""Astria Encode on the test models: A1111's emphasis formula, ComfyUI's and no weighting, BREAK, embeddings, SDXL."""
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from comfyui_astria.nodes.core import attention, syntax
from comfyui_astria.tests.support import paths

from .conftest import run_node

EMBEDDING_FILE = paths.MODELS_DIR / "embeddings" / "tiny_neg.safetensors"
SDXL_FILE = paths.MODELS_DIR / "checkpoints" / "tiny_sdxl.safetensors"
CHUNK = 77
TOLERANCE = 1e-5  # the same tokens encoded in another batch differ in the last float bits on CPU


def encode(comfy_host, clip, text, weighting, negative=""):
    """(positive, negative, notes) of Astria Encode on a prompt with the given negative_prompt."""
    prompt = syntax.parse_prompt(text + (f"\nnegative_prompt={negative}" if negative else ""))
    return run_node(comfy_host, "AstriaEncode", clip=clip, astria_prompt=prompt, weighting=weighting)


def clip_text_encode(comfy_host, clip, text):
    """ComfyUI's CLIPTextEncode of text: the reference for the comfy and none modes."""
    return comfy_host.nodes.CLIPTextEncode().encode(clip, text)[0]


def emphasis_reference(z, weights):
    """The formula, written out: z x weight per token, scaled so the mean is the unweighted z's mean."""
    weighted = z * torch.tensor(weights, dtype=z.dtype)[:, None]
    return weighted * (z.mean() / weighted.mean())


def token_count(clip, text, key="l"):
    """Tokens ComfyUI gives text in its first chunk, start and end included (padding not counted)."""
    pairs = clip.tokenize(text)[key][0]
    end = next(i for i, (token, _) in enumerate(pairs[1:], 1) if not torch.is_tensor(token) and token == 49407)
    return end + 1


def test_a1111_mode_is_the_emphasis_formula_on_the_unweighted_encoding(comfy_host, sd15):
    _, clip, _ = sd15
    vectors = load_file(str(EMBEDDING_FILE))["emb_params"].shape[0]
    text = "a (red:1.5) cat, [tiny_neg]"
    positive, _, notes = encode(comfy_host, clip, text, "a1111")
    plain = clip_text_encode(comfy_host, clip, "a red cat, embedding:tiny_neg")
    # start, a, red, cat, comma, the embedding's vectors, end: every word here is one CLIP token.
    assert token_count(clip, "a red cat, embedding:tiny_neg") == 5 + vectors + 1
    weights = [1.0, 1.0, 1.5, 1.0, 1.0] + [1 / 1.1] * vectors + [1.0] * (CHUNK - 5 - vectors)
    z = plain[0][0][0]
    expected = emphasis_reference(z, weights)
    cond = positive[0][0]
    assert cond.shape == (1, CHUNK, 768)
    assert torch.allclose(cond[0], expected, atol=TOLERANCE)
    assert not torch.allclose(cond[0], z, atol=1e-3)  # the weights did something
    assert torch.allclose(positive[0][1]["pooled_output"], plain[0][1]["pooled_output"], atol=TOLERANCE)
    assert "weighting a1111" in notes and "embedding tiny_neg.safetensors used" in notes


def test_comfy_mode_is_clip_text_encode_of_the_converted_text(comfy_host, sd15):
    _, clip, _ = sd15
    text = "a ((red:1.5) cat:1.2) on [[a mat]], \\(literal\\)"
    positive, negative, notes = encode(comfy_host, clip, text, "comfy")
    expected = clip_text_encode(comfy_host, clip, attention.to_comfy(text).text)
    assert torch.equal(positive[0][0], expected[0][0])
    assert torch.equal(positive[0][1]["pooled_output"], expected[0][1]["pooled_output"])
    assert torch.equal(negative[0][0], clip_text_encode(comfy_host, clip, "")[0][0])
    assert notes.startswith("weighting comfy")


def test_use_lpw_false_encodes_brackets_as_text_and_still_finds_the_embedding(comfy_host, sd15):
    # The docs' upscale example, with the test embedding in place of JuggernautNegative-neg.
    _, clip, _ = sd15
    text = ("masterpiece, best quality, highres --only_upscale\nuse_lpw=false")
    positive, negative, notes = encode(comfy_host, clip, text, "from prompt",
                                       negative="(worst quality, low quality, normal quality:2) tiny_neg EasyNegative")
    expected_negative = clip_text_encode(
        comfy_host, clip, "\\(worst quality, low quality, normal quality:2\\) embedding:tiny_neg EasyNegative")
    assert torch.equal(negative[0][0], expected_negative[0][0])
    assert torch.equal(positive[0][0], clip_text_encode(comfy_host, clip, "masterpiece, best quality, highres")[0][0])
    assert "weighting none" in notes and "embedding tiny_neg.safetensors used" in notes
    assert "'EasyNegative' looks like a textual-inversion embedding" in notes  # no such file: kept as text


def test_break_starts_a_second_chunk(comfy_host, sd15):
    _, clip, _ = sd15
    positive, _, notes = encode(comfy_host, clip, "a cat BREAK a dog", "a1111")
    cond = positive[0][0]
    assert cond.shape == (1, 2 * CHUNK, 768)
    assert torch.allclose(cond[:, :CHUNK], clip_text_encode(comfy_host, clip, "a cat")[0][0], atol=TOLERANCE)
    assert torch.allclose(cond[:, CHUNK:], clip_text_encode(comfy_host, clip, "a dog")[0][0], atol=TOLERANCE)
    assert "positive: 2 chunks of 75 tokens" in notes


def test_bracketed_break_stays_in_the_chunk_and_is_noted(comfy_host, sd15):
    # A1111 breaks the chunk only at an unbracketed BREAK; in brackets it is the word "break", weighted -1.1.
    _, clip, _ = sd15
    positive, _, notes = encode(comfy_host, clip, "a (cat BREAK dog)", "a1111")
    assert positive[0][0].shape == (1, CHUNK, 768)
    assert "positive: 1 chunk of 75 tokens" in notes
    assert f"positive: {attention.BRACKETED_BREAK_WARNING}" in notes
    _, _, plain_notes = encode(comfy_host, clip, "a cat BREAK dog", "a1111")
    assert attention.BRACKETED_BREAK_WARNING not in plain_notes


def test_the_embedding_changes_the_conditioning(comfy_host, sd15):
    _, clip, _ = sd15
    positive, _, _ = encode(comfy_host, clip, "a photo, tiny_neg", "a1111")
    as_embedding = clip_text_encode(comfy_host, clip, "a photo, embedding:tiny_neg")[0][0]
    as_words = clip_text_encode(comfy_host, clip, "a photo, tiny_neg")[0][0]
    assert torch.allclose(positive[0][0], as_embedding, atol=TOLERANCE)
    assert not torch.allclose(positive[0][0], as_words, atol=1e-2)


def test_a_bad_prompt_fails_only_that_node_with_its_position(comfy_host, sd15):
    _, clip, _ = sd15
    bad = syntax.parse_prompt("a (cat:1.2.3)")  # the Astria block is fine; its attention syntax is not
    with pytest.raises(ValueError, match=r"positive prompt: line 1, column 8: the weight '1\.2\.3'"):
        run_node(comfy_host, "AstriaEncode", clip=clip, astria_prompt=bad, weighting="a1111")
    deep = syntax.parse_prompt("a cat\nnegative_prompt=" + "(" * 65 + "x")
    with pytest.raises(ValueError, match="negative prompt: .*deeper than 64"):
        run_node(comfy_host, "AstriaEncode", clip=clip, astria_prompt=deep, weighting="comfy")


@pytest.fixture(scope="session")
def sdxl(comfy_host):
    """(model, clip, vae) of the tiny SDXL checkpoint, generated into the models cache on first use (~30 s, 2 GB)."""
    if not SDXL_FILE.is_file():
        partial = SDXL_FILE.parent.parent / ".tiny_sdxl.partial"
        subprocess.run([sys.executable, str(paths.PACK_ROOT / "tools" / "make_tiny_sdxl.py"), str(partial),
                        "--comfy", str(paths.COMFY_DIR)], check=True, capture_output=True)
        (partial / "checkpoints" / SDXL_FILE.name).replace(SDXL_FILE)  # atomic: never a half-written checkpoint
        shutil.rmtree(partial, ignore_errors=True)
        comfy_host.folder_paths.filename_list_cache.clear()
    return comfy_host.nodes.CheckpointLoaderSimple().load_checkpoint(SDXL_FILE.name)[:3]


@pytest.mark.sdxl
def test_sdxl_a1111_weights_clip_l_and_clip_g_each_and_keeps_the_pooled_output(comfy_host, sdxl):
    _, clip, _ = sdxl
    positive, _, _ = encode(comfy_host, clip, "a (red:1.5) cat", "a1111")
    plain = clip_text_encode(comfy_host, clip, "a red cat")
    z = plain[0][0][0]
    weights = [1.0, 1.0, 1.5] + [1.0] * (CHUNK - 3)
    # A1111 rescales each text encoder's output to its own mean: CLIP-L's 768 channels, then CLIP-G's 1280.
    expected = torch.cat([emphasis_reference(z[:, :768], weights), emphasis_reference(z[:, 768:], weights)], dim=-1)
    cond, extra = positive[0]
    assert cond.shape == (1, CHUNK, 2048)
    assert torch.allclose(cond[0], expected, atol=1e-4)
    assert extra["pooled_output"].shape == (1, 1280)
    assert torch.allclose(extra["pooled_output"], plain[0][1]["pooled_output"], atol=1e-4)
