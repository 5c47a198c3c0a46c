"""Astria Encode on the test models: A1111's emphasis formula, ComfyUI's and no weighting, BREAK, embeddings, SDXL."""
import json
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


# ---------------------------------------------------------------------------------------------------------------
# lpw: diffusers' long-prompt-weighting pipelines (their arithmetic is checked against diffusers in
# tests/unit/test_lpw.py; here the glue: which chunks the host encodes, the mean over all of them, SDXL's pooled)

def unweighted_chunks(clip, chunks, key="l"):
    """The host's plain encoding of framed chunks, each 77 tokens at weight 1 (ComfyUI's own machinery)."""
    tokens = [[(token, 1.0) for token in chunk] for chunk in chunks]
    return clip.encode_from_tokens({key: tokens} if key == "l" else {"l": tokens, "g": tokens}, return_pooled=True)


def plain_ids(clip, text, key="l"):
    """The host tokenizer's ids of text, without start and end token."""
    tokenizer = getattr(clip.tokenizer, f"clip_{key}")
    return tokenizer.tokenizer(text)["input_ids"][1:-1]


def test_lpw_sd1_weights_all_chunks_together_and_pads_the_negative_to_as_many(comfy_host, sd15):
    _, clip, _ = sd15
    words = "cat, " * 45  # 90 tokens: a second chunk, and commas that A1111 would have broken at
    positive, negative, notes = encode(comfy_host, clip, f"a (red:1.5) {words}", "lpw", negative="[ugly]")
    ids = [49406, *plain_ids(clip, "a "), *plain_ids(clip, "red"), *plain_ids(clip, f" {words}")]
    ids += [49407] * (2 * 75 + 1 - len(ids))
    chunks = [ids[:76] + [49407], [49406] + ids[76:151] + [49407]]
    z, _ = unweighted_chunks(clip, chunks)
    weights = torch.ones(2 * CHUNK)
    weights[2] = 1.5  # "red": the third token of the first chunk
    weighted = z[0] * weights[:, None]
    expected = weighted * (z[0].mean() / weighted.mean())  # one mean over both chunks, not one per chunk
    assert positive[0][0].shape == (1, 2 * CHUNK, 768)
    assert torch.allclose(positive[0][0][0], expected, atol=TOLERANCE)
    assert negative[0][0].shape == (1, 2 * CHUNK, 768)  # padded to the positive's two chunks, as diffusers does
    assert "positive: 2 chunks of 75 tokens" in notes and "weighting lpw" in notes


def test_lpw_tokens_from_the_host_tokenizer_are_diffusers_own(comfy_host, sd15):
    """diffusers' LPW tokenization with the real CLIP tokenizer (data/lpw_golden.json) = ours with the host's."""
    from comfyui_astria.nodes.comfy import encode as encode_module
    from comfyui_astria.nodes.core import prompt_tokens
    from comfyui_astria.nodes.core.embeddings import embedding_index

    _, clip, _ = sd15
    (encoder,) = encode_module.clip_encoders(clip)
    vocabulary = encode_module._ClipVocabularies([encoder]).vocabulary(*encoder)
    golden = json.loads((paths.PACK_ROOT / "tests" / "unit" / "data" / "lpw_golden.json").read_text())
    assert len(golden["real_tokenizer"]) >= 4
    for case in golden["real_tokenizer"]:
        for family, breaks, limit in (("sd1", False, 225), ("sdxl", True, None)):
            items = prompt_tokens.lpw_tokens(case["text"], vocabulary, embedding_index(()), breaks=breaks)[:limit]
            assert [token for token, _ in items] == case[family][0], (family, case["text"])
            assert [float(weight).hex() for _, weight in items] == case[family][1], (family, case["text"])


def test_lpw_sd1_drops_tokens_beyond_225_and_says_so(comfy_host, sd15):
    _, clip, _ = sd15
    positive, _, notes = encode(comfy_host, clip, "cat " * 300, "lpw")
    assert positive[0][0].shape == (1, 3 * CHUNK, 768)
    assert "positive: 75 tokens beyond 225 dropped, as diffusers' SD1.x long-prompt-weighting pipeline drops " \
           "them (max_embeddings_multiples 3)" in notes


def test_from_prompt_is_lpw_unless_use_lpw_is_false(comfy_host, sd15):
    _, clip, _ = sd15
    prompt = syntax.parse_prompt("a (red:1.5) cat")
    *_, notes = run_node(comfy_host, "AstriaEncode", clip=clip, astria_prompt=prompt, weighting="from prompt")
    assert notes.startswith("weighting lpw")


@pytest.mark.sdxl
def test_sdxl_lpw_moves_weighted_tokens_toward_the_end_token_and_keeps_the_last_chunk_unpadded(comfy_host, sdxl):
    _, clip, _ = sdxl
    positive, negative, notes = encode(comfy_host, clip, "a (red:1.5) cat", "lpw")
    plain = clip_text_encode(comfy_host, clip, "a red cat")[0]
    z = plain[0][0]
    length = token_count(clip, "a red cat")  # start, a, red, cat, end: diffusers does not pad its last chunk
    expected = z[:length].clone()
    expected[2] = z[length - 1] + (z[2] - z[length - 1]) * 1.5  # e_last + (e - e_last) * w
    cond, extra = positive[0]
    assert cond.shape == (1, length, 2048) and negative[0][0].shape == (1, length, 2048)
    assert torch.allclose(cond[0], expected, atol=1e-4)
    assert torch.allclose(extra["pooled_output"], plain[1]["pooled_output"], atol=1e-4)
    assert "positive: 1 chunk of 75 tokens, the last one 3 tokens" in notes


@pytest.mark.sdxl
def test_sdxl_lpw_pooled_output_is_the_last_chunks(comfy_host, sdxl):
    _, clip, _ = sdxl
    words = "cat " * 80
    positive, _, _ = encode(comfy_host, clip, words, "lpw")
    ids = plain_ids(clip, words)
    last = [49406, *ids[75:], 49407] + [49407] * (75 - len(ids[75:]))
    _, last_pooled = unweighted_chunks(clip, [last], key="lg")
    first = [49406, *ids[:75], 49407]
    _, first_pooled = unweighted_chunks(clip, [first], key="lg")
    pooled = positive[0][1]["pooled_output"]
    assert positive[0][0].shape == (1, CHUNK + 7, 2048)
    assert torch.allclose(pooled, last_pooled, atol=1e-4) and not torch.allclose(pooled, first_pooled, atol=1e-2)


# ---------------------------------------------------------------------------------------------------------------
# A1111 zeroes an exactly empty SDXL negative prompt (modules/sd_models_xl.py, force_zero_negative_prompt)

@pytest.mark.sdxl
def test_sdxl_a1111_empty_negative_is_zeros_with_the_size_embeddings_kept(comfy_host, sdxl):
    model, clip, _ = sdxl
    _, negative, notes = encode(comfy_host, clip, "a cat", "a1111")
    cond, extra = negative[0]
    assert cond.shape == (1, CHUNK, 2048) and not cond.any()
    assert extra["pooled_output"].shape == (1, 1280) and not extra["pooled_output"].any()
    assert "negative: empty on SDXL: cross-attention and pooled output are zeros, as A1111 does for an empty " \
           "negative prompt (force_zero_negative_prompt; the size embeddings are kept)" in notes
    adm = model.model.encode_adm(pooled_output=extra["pooled_output"], width=1024, height=1024)
    assert not adm[:, :1280].any() and adm[:, 1280:].abs().sum() > 0  # the size embeddings are still there
    _, written, _ = encode(comfy_host, clip, "a cat", "a1111", negative="ugly")
    _, comfy_empty, _ = encode(comfy_host, clip, "a cat", "comfy")
    assert written[0][0].any() and comfy_empty[0][0].any()  # only an empty negative, only in a1111 mode
