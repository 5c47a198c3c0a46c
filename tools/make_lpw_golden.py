#!/usr/bin/env python3
"""Write tests/unit/data/lpw_golden.json: diffusers' own long-prompt-weighting functions run on fixed fakes.

    PYTHON tools/make_lpw_golden.py DIFFUSERS_CHECKOUT [OUT_JSON] [--clip-tokenizer DIR]

DIFFUSERS_CHECKOUT is a git checkout (or a bare clone) of huggingface/diffusers; its
examples/community/lpw_stable_diffusion.py (`get_weighted_text_embeddings`, as the pipeline calls it:
max_embeddings_multiples=3, no_boseos_middle=False) and lpw_stable_diffusion_xl.py
(`get_weighted_text_embeddings_sdxl`) are imported from there and run on the prompts, fake tokenizer and fake
encoders of tests/support/lpw_fakes.py; its HEAD commit, and the commit that last changed the two files, are
recorded. PYTHON needs torch, transformers and
diffusers (for instance the host venv with PYTHONPATH pointing at a `pip install --target` folder of diffusers;
never install into the host venv). The chunks each encoder was called with and the weighted outputs are saved;
nothing of diffusers' code is copied here. With a real CLIP tokenizer (DIR: ComfyUI's comfy/sd1_tokenizer, the
default) the token ids and weights both pipelines give a few real prompts are saved too ("real_tokenizer"), for the
host test that compares the host tokenizer's.
"""
import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "support"))
import lpw_fakes  # noqa: E402

DEFAULT_OUT = ROOT / "tests" / "unit" / "data" / "lpw_golden.json"


COMMUNITY = "examples/community"


def git(checkout: Path, *arguments: str) -> str:
    """The output of a git command in the diffusers checkout."""
    return subprocess.run(["git", "-C", str(checkout), *arguments], capture_output=True, text=True,
                          check=True).stdout


def load_community(checkout: Path, name: str, scratch: Path):
    """Import examples/community/NAME.py of the diffusers checkout (at HEAD, if it is a bare clone) as a module."""
    path = checkout / COMMUNITY / f"{name}.py"
    if not path.is_file():
        path = scratch / f"{name}.py"
        path.write_text(git(checkout, "show", f"HEAD:{COMMUNITY}/{name}.py"), encoding="utf-8")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeTokenizer:
    """What the LPW functions use of a CLIPTokenizer: calling it on a word, its length and special ids."""

    model_max_length = 77
    bos_token_id = lpw_fakes.START
    eos_token_id = lpw_fakes.END
    pad_token_id = lpw_fakes.END

    def __call__(self, text, **_):
        return type("Encoding", (), {"input_ids": [lpw_fakes.START, *lpw_fakes.fake_token_ids(text), lpw_fakes.END]})


class Output(tuple):
    """A transformers-like model output: indexable, with `.hidden_states`."""

    @property
    def hidden_states(self):
        return self[-1]


class FakeEncoder:
    """A fake CLIP text encoder that records every chunk of ids it encodes."""

    def __init__(self, channels, salt, penultimate):
        self.channels, self.salt, self.penultimate = channels, salt, penultimate
        self.calls = []
        self.text_model = type("TextModel", (), {"final_layer_norm": staticmethod(lambda x: x)})

    def __call__(self, ids, output_hidden_states=False):
        self.calls.append(ids[0].tolist())
        hidden = lpw_fakes.fake_hidden(ids, self.channels, self.salt)
        pooled = lpw_fakes.fake_pooled(ids, hidden)
        # SDXL reads hidden_states[-2] (the penultimate layer), SD1.x hidden_states[-1]: put ours where each reads.
        states = (hidden, hidden, hidden * 0.0) if self.penultimate else (hidden * 0.0, hidden)
        return Output((pooled if self.penultimate else hidden, states))


def number(value) -> float:
    """A float32 as the shortest float64 that reads back as the same float32 (9 significant digits at most)."""
    return float(f"{float(value):.9g}")


def rows(tensor):
    """A (1, tokens, channels) tensor as nested lists of floats."""
    return [[number(value) for value in row] for row in tensor[0]]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkout", type=Path)
    parser.add_argument("out", type=Path, nargs="?", default=DEFAULT_OUT)
    parser.add_argument("--clip-tokenizer", type=Path, default=Path.home() / ".cache" / "comfyui-astria" /
                        "host-0.3.75" / "ComfyUI" / "comfy" / "sd1_tokenizer")
    args = parser.parse_args()
    commit = git(args.checkout, "rev-parse", "HEAD").strip()
    files = [f"{COMMUNITY}/lpw_stable_diffusion.py", f"{COMMUNITY}/lpw_stable_diffusion_xl.py"]
    changed = git(args.checkout, "log", "-1", "--format=%H", "HEAD", "--", *files).strip()
    with tempfile.TemporaryDirectory() as scratch:
        sd1 = load_community(args.checkout, "lpw_stable_diffusion", Path(scratch))
        sdxl = load_community(args.checkout, "lpw_stable_diffusion_xl", Path(scratch))
    cases = []
    with torch.no_grad():
        for positive, negative in lpw_fakes.GOLDEN_PROMPTS:
            encoder = FakeEncoder(lpw_fakes.CHANNELS_SD1, 0.0, penultimate=False)
            pipe = type("Pipe", (), {"tokenizer": FakeTokenizer(), "text_encoder": encoder, "device": "cpu"})()
            embeds, negative_embeds = sd1.get_weighted_text_embeddings(
                pipe, positive, negative, max_embeddings_multiples=3, no_boseos_middle=False)
            case = {"positive": positive, "negative": negative,
                    "sd1": {"calls": encoder.calls, "positive": rows(embeds), "negative": rows(negative_embeds)}}
            encoder_l = FakeEncoder(lpw_fakes.CHANNELS_L, 0.0, penultimate=True)
            encoder_g = FakeEncoder(lpw_fakes.CHANNELS_G, 1.0, penultimate=True)
            pipe = type("Pipe", (), {"tokenizer": FakeTokenizer(), "tokenizer_2": FakeTokenizer(),
                                     "text_encoder": encoder_l, "text_encoder_2": encoder_g})()
            try:
                out = sdxl.get_weighted_text_embeddings_sdxl(pipe, positive, neg_prompt=negative, device="cpu")
            except RuntimeError as error:  # both prompts without tokens: no chunk to concatenate
                case["sdxl"] = {"error": str(error).splitlines()[0]}
            else:
                case["sdxl"] = {"calls_l": encoder_l.calls, "calls_g": encoder_g.calls,
                                "positive": rows(out[0]), "negative": rows(out[1]),
                                "positive_pooled": [number(v) for v in out[2][0]],
                                "negative_pooled": [number(v) for v in out[3][0]]}
            cases.append(case)
    from transformers import CLIPTokenizer

    clip_tokenizer = CLIPTokenizer.from_pretrained(str(args.clip_tokenizer))
    pipe = type("Pipe", (), {"tokenizer": clip_tokenizer})()
    real = []
    for text in lpw_fakes.REAL_TOKENIZER_PROMPTS:
        (sd1_tokens,), (sd1_weights,) = sd1.get_prompts_with_weights(pipe, [text], 225)
        sdxl_tokens, sdxl_weights = sdxl.get_prompts_tokens_with_weights(clip_tokenizer, text)
        real.append({"text": text, "sd1": [sd1_tokens, [float(w).hex() for w in sd1_weights]],
                     "sdxl": [sdxl_tokens, [float(w).hex() for w in sdxl_weights]]})
    golden = {
        "about": "Outputs of diffusers' long-prompt-weighting community pipelines at commit " + commit + " "
                 "(the two files last changed in " + changed + ") "
                 "(examples/community/lpw_stable_diffusion.py get_weighted_text_embeddings with "
                 "max_embeddings_multiples=3 and no_boseos_middle=False, as its pipeline calls it; "
                 "lpw_stable_diffusion_xl.py get_weighted_text_embeddings_sdxl), run by tools/make_lpw_golden.py "
                 "on the prompts, fake tokenizer and fake encoders of tests/support/lpw_fakes.py. Per case: the "
                 "id chunks each encoder was called with, in call order, and the weighted outputs "
                 "(tokens x channels; SDXL: CLIP-L then CLIP-G channels) and SDXL's pooled outputs.",
        "diffusers_commit": commit,
        "files_changed_in": changed,
        "fingerprint": lpw_fakes.golden_fingerprint(),
        "cases": cases,
        "real_tokenizer": real,
    }
    args.out.write_text(json.dumps(golden, separators=(",", ":")) + "\n", encoding="ascii")
    print(f"{len(cases)} cases -> {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
