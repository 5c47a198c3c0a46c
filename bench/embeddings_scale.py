"""Embedding-name matching at scale: the name-length index (nodes/core/embeddings.py) against main's regex.

Main matched names with one regex of every name (`(?:embedding:)?(name1|name2|...)` with word edges), which tries
each name at each position of the prompt: O(prompt x files). The index is a dictionary of case-folded names with
the lengths names come in per first character: a few look-ups per word edge of the prompt, O(prompt + files). For each file count this prints the time to index the files, the
time to find the names in a prompt three times (as one encode does: split, prefix, warnings), and the ratio.
Never asserts; run it in the background on a shared machine (times vary with the load).

Usage: python bench/embeddings_scale.py [--files 5000 50000] [--repeat 3]
"""
import argparse
import importlib.util
import re
import sys
import time
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]


def import_embeddings():
    """nodes/core/embeddings.py on its own (pure: no torch, no ComfyUI)."""
    spec = importlib.util.spec_from_file_location("astria_embeddings", PACK_ROOT / "nodes/core/embeddings.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class RegexIndex:
    """Main's matching (reference copy for this bench only): one alternation of all names, longest first."""

    def __init__(self, embeddings, filenames):
        self.files = {}
        for filename in sorted(filenames):
            name = embeddings.embedding_name(filename)
            if name and not any(char.isspace() for char in name):
                self.files.setdefault(name.lower(), filename)
        alternatives = "|".join(re.escape(name) for name in sorted(self.files, key=len, reverse=True))
        self.pattern = re.compile(f"(?<![\\w-])(?:{re.escape('embedding:')})?({alternatives})(?![\\w-])",
                                  re.IGNORECASE)

    def find(self, text):
        """(file, start, end) of every name in text."""
        return [(self.files[m.group(1).lower()], m.start(), m.end()) for m in self.pattern.finditer(text)]


def file_names(count):
    """A plausible embeddings folder: negative embeddings, styles, characters, in sub-folders."""
    kinds = ("EasyNegative", "bad-hands", "style", "character", "ng_deepnegative")
    return [f"{kinds[i % 5]}/{kinds[i % 5]}_{i:06d}_v{i % 3}.safetensors" for i in range(count)]


PROMPT = ("masterpiece, best quality, a photo of a woman in a red coat walking a dog on a rainy street at night, "
          "neon lights, reflections, (detailed face:1.2), [bokeh], style_000012_v0, embedding:EasyNegative_000005_v2, "
          "35mm film grain, sharp focus, highly detailed, bad-hands_000001_v1, cinematic lighting, volumetric fog")


def timed(function, repeat):
    """Best wall time of `repeat` runs, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, nargs="+", default=[5000, 50000])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    embeddings = import_embeddings()
    for repeat_prompt in (1, 8):
        prompt = ", ".join([PROMPT] * repeat_prompt)
        print(f"prompt: {len(prompt)} characters; find = 3 scans of it (split, prefix, warnings)")
        print(f"{'files':>7} {'':<10} {'index s':>9} {'find s':>9} {'total s':>9}")
        for count in args.files:
            compare(embeddings, file_names(count), prompt, args.repeat)


def compare(embeddings, names, prompt, repeat):
    """Print main's and the current index's times for one folder and prompt, and their ratios."""
    rows = {}
    for label, build in (("main", lambda: RegexIndex(embeddings, names)),
                         ("now", lambda: embeddings.embedding_index(names))):
        index_s, index = timed(build, repeat)
        find_s, mentions = timed(lambda: [index.find(prompt) for _ in range(3)][-1], repeat)
        rows[label] = (index_s, find_s, [tuple(m) for m in mentions])
        print(f"{len(names):>7} {label:<10} {index_s:>9.4f} {find_s:>9.4f} {index_s + find_s:>9.4f}", flush=True)
    same = rows["main"][2] == rows["now"][2]
    ratio = (rows["main"][0] + rows["main"][1]) / (rows["now"][0] + rows["now"][1])
    print(f"{len(names):>7} {'main/now':<10} {rows['main'][0] / rows['now'][0]:>8.1f}x "
          f"{rows['main'][1] / rows['now'][1]:>8.1f}x {ratio:>8.1f}x  same mentions: {same}", flush=True)


if __name__ == "__main__":
    main()
