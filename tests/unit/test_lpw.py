"""Diffusers' long-prompt-weighting (Astria's use_lpw): chunks and weighting equal diffusers' own results.

The golden data (data/lpw_golden.json) is diffusers' lpw_stable_diffusion.py and lpw_stable_diffusion_xl.py run
by tools/make_lpw_golden.py on the fake tokenizer and encoders of tests/support/lpw_fakes.py; here the same fakes
encode our chunks and our weighting is applied, and both must give diffusers' chunks and tensors.
"""
import json
from pathlib import Path

import pytest

from comfyui_astria.nodes.core import prompt_tokens
from comfyui_astria.nodes.core.embeddings import embedding_index
from comfyui_astria.nodes.core.prompt_tokens import (
    FRAMED_LENGTH,
    Vocabulary,
    float16_weight,
    lpw_sd1_chunks,
    lpw_sd1_weighted,
    lpw_sdxl_chunks,
    lpw_sdxl_weighted,
    lpw_tokens,
)
from comfyui_astria.tests.support import lpw_fakes

GOLDEN = json.loads((Path(__file__).parent / "data" / "lpw_golden.json").read_text(encoding="ascii"))
NO_EMBEDDINGS = embedding_index(())
VOCABULARY = Vocabulary(tokenize=lpw_fakes.fake_token_ids, start=lpw_fakes.START, end=lpw_fakes.END,
                        pad=lpw_fakes.END, comma=267, vectors=lambda filename: None)


@pytest.fixture(scope="module")
def torch():
    try:
        import torch
    except ImportError:
        pytest.skip("torch is not installed in this python; run with the ComfyUI host venv")
    return torch


def encode(torch, chunks, channels, salt):
    """Our chunks through the fake encoder, one chunk at a time as the host encodes them, side by side in tokens."""
    return torch.cat([lpw_fakes.fake_hidden(torch.tensor([chunk.tokens]), channels, salt) for chunk in chunks], 1)


def test_golden_file_is_from_diffusers_and_the_same_fakes(torch):
    assert len(GOLDEN["diffusers_commit"]) == 40 and "lpw_stable_diffusion_xl.py" in GOLDEN["about"]
    assert GOLDEN["fingerprint"] == lpw_fakes.golden_fingerprint()
    assert [(case["positive"], case["negative"]) for case in GOLDEN["cases"]] == \
        [tuple(pair) for pair in lpw_fakes.GOLDEN_PROMPTS]
    assert {len(case["sd1"]["positive"]) for case in GOLDEN["cases"]} == {77, 154, 231}


@pytest.mark.parametrize("number", range(len(lpw_fakes.GOLDEN_PROMPTS)))
def test_sd1_chunks_and_weighting_match_diffusers(torch, number):
    case = GOLDEN["cases"][number]
    chunks = lpw_sd1_chunks(case["positive"], case["negative"], VOCABULARY, NO_EMBEDDINGS)
    golden = case["sd1"]
    assert [chunk.tokens for chunk in chunks.positive + chunks.negative] == golden["calls"] or (
        len(golden["calls"]) == 2 and [chunks.positive[0].tokens, chunks.negative[0].tokens] == golden["calls"])
    for chunk_list, expected in ((chunks.positive, golden["positive"]), (chunks.negative, golden["negative"])):
        got = lpw_sd1_weighted(encode(torch, chunk_list, lpw_fakes.CHANNELS_SD1, 0.0), chunk_list)
        assert torch.allclose(got[0], torch.tensor(expected), rtol=1e-6, atol=1e-6), number


@pytest.mark.parametrize("number", range(len(lpw_fakes.GOLDEN_PROMPTS)))
def test_sdxl_chunks_weighting_and_pooled_output_match_diffusers(torch, number):
    case = GOLDEN["cases"][number]
    chunks = lpw_sdxl_chunks(case["positive"], case["negative"], VOCABULARY, NO_EMBEDDINGS)
    golden = case["sdxl"]
    if "error" in golden:  # diffusers fails on two empty prompts; ours encodes the start and end token
        assert chunks.last_length == 2 and chunks.positive[0].tokens[:2] == [lpw_fakes.START, lpw_fakes.END]
        return
    count = len(chunks.positive)
    assert len(chunks.negative) == count
    kept = [FRAMED_LENGTH] * (count - 1) + [chunks.last_length]
    # diffusers encodes chunk by chunk, the positive then the negative one, its last chunk unpadded
    interleaved = [chunk_list[number].tokens[:kept[number]]
                   for number in range(count) for chunk_list in (chunks.positive, chunks.negative)]
    assert interleaved == golden["calls_l"] == golden["calls_g"]
    for chunk_list, label in ((chunks.positive, "positive"), (chunks.negative, "negative")):
        z = torch.cat([encode(torch, chunk_list, lpw_fakes.CHANNELS_L, 0.0),
                       encode(torch, chunk_list, lpw_fakes.CHANNELS_G, 1.0)], dim=-1)
        got = lpw_sdxl_weighted(z, chunk_list, chunks.last_length)
        assert torch.allclose(got[0], torch.tensor(golden[label]), rtol=1e-6, atol=1e-6), (number, label)
        last = torch.tensor([chunk_list[-1].tokens])
        pooled = lpw_fakes.fake_pooled(last, lpw_fakes.fake_hidden(last, lpw_fakes.CHANNELS_G, 1.0))
        assert torch.allclose(pooled[0], torch.tensor(golden[f"{label}_pooled"]), rtol=1e-6, atol=1e-6)


def test_sd1_cuts_at_225_tokens_and_pads_the_shorter_prompt():
    chunks = lpw_sd1_chunks("a" * 300, "b", VOCABULARY, NO_EMBEDDINGS)
    assert chunks.cut == (75, 0) and len(chunks.positive) == len(chunks.negative) == prompt_tokens.LPW_MAX_CHUNKS
    assert chunks.negative[1].tokens == [lpw_fakes.START] + [lpw_fakes.END] * 76


def test_break_is_text_for_sd1_and_the_word_at_weight_minus_one_for_sdxl():
    sd1 = lpw_tokens("a BREAK b", VOCABULARY, NO_EMBEDDINGS, breaks=False)
    sdxl = lpw_tokens("a BREAK b", VOCABULARY, NO_EMBEDDINGS, breaks=True)
    assert [token for token, _ in sd1] == [token for token, _ in sdxl]
    assert {weight for _, weight in sd1} == {1.0} and [weight for _, weight in sdxl].count(-1.0) == 5


def test_weights_are_rounded_to_float16_as_diffusers_sdxl_stores_them():
    assert float16_weight(1.0001) == 1.0 and float16_weight(1.1) == 1.099609375
    with pytest.raises(ValueError, match="float16"):
        float16_weight(70000.0)
