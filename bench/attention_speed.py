"""Print how long parse_attention and to_comfy take on 1 MB adversarial prompts (run with any python 3.10+).

    python3 bench/attention_speed.py

Each line: the input's name, its size, what happened (pieces or the refusal), and the best of 3 runs.
"""
import importlib.util
import random
import sys
import time
from pathlib import Path

MEGABYTE = 1_000_000


def _load_attention():
    """Import nodes/core/attention.py by path (the repo root must not be on sys.path: ComfyUI owns `nodes`)."""
    path = Path(__file__).resolve().parent.parent / "nodes" / "core" / "attention.py"
    spec = importlib.util.spec_from_file_location("astria_attention_bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _fill(unit: str) -> str:
    return (unit * (MEGABYTE // len(unit) + 1))[:MEGABYTE]


def adversarial_inputs() -> dict[str, str]:
    """1 MB prompts aimed at the slow paths: deep nesting, many pieces under many brackets, long BREAK scans."""
    rng = random.Random(0)
    distinct_weights = "".join(f"(a:1.{i:05d})" for i in range(MEGABYTE // 10))
    return {
        "'(a ' x N (refused at depth 65)": _fill("(a "),
        "random bytes (latin-1)": rng.randbytes(MEGABYTE).decode("latin-1"),
        "random bracket soup": "".join(rng.choice("()[]\\: a,") for _ in range(MEGABYTE)),
        "plain words": _fill("masterpiece, best quality, "),
        "'(a)' x N": _fill("(a)"),
        "63 open + '(a) ' x N": "(" * 63 + _fill("(a) "),
        "63 open + '[\\(' x N": "[" * 63 + _fill("\\("),
        "63 open + distinct weights": "(" * 63 + distinct_weights[:MEGABYTE],
        "63 open + '(a) ' x N + 63 close": "(" * 63 + _fill("(a) ") + ")" * 63,
        "spaces then xBREAK": " " * MEGABYTE + "xBREAK",
        "'a BREAK ' x N": _fill("a BREAK "),
        "'(a:' x N (colon scans)": _fill("(a:"),
        "':' + digits x N": _fill(":1.1.1.1.1.1.1.1.1"),
    }


def _best_of(runs: int, func, text):
    """Best wall and CPU seconds of `runs` calls (CPU time is steadier on a shared machine), and the outcome."""
    best = best_cpu = float("inf")
    outcome = None
    for _ in range(runs):
        start, start_cpu = time.perf_counter(), time.process_time()
        try:
            result = func(text)
            outcome = f"{len(result[0]) if isinstance(result, tuple) else len(result)} " + (
                "chars" if isinstance(result, tuple) else "pieces"
            )
        except ValueError as err:
            outcome = f"refused: {str(err)[:60]}"
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - start_cpu)
    return best, best_cpu, outcome


def main() -> None:
    """Time every adversarial input through both entry points and print one line per pair."""
    attention = _load_attention()
    print(f"{'input':40} {'func':16} {'MB':>5} {'wall s':>7} {'cpu s':>7}  outcome")
    for name, text in adversarial_inputs().items():
        for func in (attention.parse_attention, attention.to_comfy):
            seconds, cpu_seconds, outcome = _best_of(3, func, text)
            print(
                f"{name:40} {func.__name__:16} {len(text) / MEGABYTE:5.2f} {seconds:7.3f} {cpu_seconds:7.3f}  {outcome}"
            )


if __name__ == "__main__":
    main()
