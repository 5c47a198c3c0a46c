"""A fixed fake CLIP tokenizer and text encoders, for the LPW golden data (tools/make_lpw_golden.py) and its test.

Diffusers' long-prompt-weighting functions only call `tokenizer(word).input_ids` and the encoders' forward; these
fakes stand in for a real CLIP so the golden file records diffusers' chunking and weighting arithmetic on inputs
both sides can rebuild exactly. Needs torch (imported lazily).
"""
START, END = 49406, 49407
CHANNELS_SD1, CHANNELS_L, CHANNELS_G = 4, 2, 3


def fake_token_ids(word: str) -> list[int]:
    """One token per non-space character (ids 1000-1399), a comma its own token 267, as a CLIP tokenizer would."""
    return [267 if char == "," else 1000 + ord(char) % 400 for char in word if not char.isspace()]


def fake_table(channels: int, salt: float):
    """A fixed token-embedding table (float32, computed in float64 from sines: no random generator involved)."""
    import torch

    ids = torch.arange(END + 1, dtype=torch.float64).unsqueeze(1)
    columns = torch.arange(channels, dtype=torch.float64).unsqueeze(0)
    return torch.sin(ids * 0.61803 + columns * 1.7 + salt).float()


def fake_hidden(ids, channels: int, salt: float):
    """A causal fake encoder: each position's vector is its token's row plus the running mean of the rows so far,
    plus a position term, so a token's output depends only on it and the tokens before it (as CLIP's does)."""
    import torch

    rows = fake_table(channels, salt)[ids.long()]
    count = torch.arange(1, ids.shape[-1] + 1, dtype=torch.float32).unsqueeze(-1)
    position = torch.cos(count * 0.37 + salt)
    return rows + 0.5 * rows.cumsum(dim=-2) / count + 0.25 * position


def fake_pooled(ids, hidden):
    """The pooled output: the hidden vector at the first end token, doubled (a fixed stand-in for the projection)."""
    first_end = (ids == END).int().argmax(dim=-1)
    return hidden[range(ids.shape[0]), first_end] * 2.0


GOLDEN_PROMPTS = [
    ("a photo of a cat", ""),
    ("a (red:1.5) cat, [blue] sky, ((sunny))", "(ugly:1.3), [blurry]"),
    ("(unclosed weight and [square", "bad:0.8) text (nested (deep:0.5) x:1.2)"),
    ("a (dog: 1.2) cat", "(low quality: 0.7)"),
    ("left BREAK right (BREAK) [BREAK]", "BREAK"),
    ("x" * 74, ""),
    ("y" * 75, "z" * 3),
    ("w" * 76, ""),
    ("a, " * 60 + "(end:1.4)", "neg, " * 20),
    ("(" + "long text " * 40 + ":1.1)", ""),
    ("short (one:0.9)", "(" + "n" * 200 + ":1.2)"),
    ("k" * 220 + " (tail:1.3)" + "m" * 30, "(" + "q" * 260 + ":0.8)"),
    ("(tiny:1.0001) (zero:0) (neg:-1) (big:3.3333)", "(a:0.123456789)"),
    ("", "(only negative:1.5)"),
    ("\\(literal\\) (w:1.2)", ""),
]
"""(positive, negative) pairs: weights, nesting, unclosed brackets, BREAK, chunk edges at 75, 150 and 225
tokens, SD1.x's 225-token cut, a longer negative, weights float16 rounds (1.0001 to 1.0), escapes."""


REAL_TOKENIZER_PROMPTS = [
    "masterpiece, best quality, highres, (worst quality, low quality, normal quality:2) JuggernautNegative-neg",
    "a (dog: 1.2) cat, [[blurry]], (red:1.5) BREAK (blue BREAK sky:0.8), \\(literal\\) [unclosed",
    "photo of a caf\u00e9, na\u00efve art, \u6771\u4eac, emoji \U0001f44d, CAPS and-hyphens 3.5mm",
    "highly detailed, " * 80 + "(end:1.3)",
]
"""Prompts whose tokens diffusers' LPW tokenization gives with the real CLIP tokenizer (host test of ours)."""


def golden_fingerprint() -> str:
    """A digest of the fakes' outputs on fixed ids, stored with the golden data to show both sides built the same."""
    import torch

    ids = torch.tensor([[START, 267, 1000, 1399, END, END]])
    hidden = fake_hidden(ids, CHANNELS_L, 0.0)
    return f"{float(hidden.double().sum()):.9f} {float(fake_table(CHANNELS_G, 1.0).double().abs().sum()):.6f}"
