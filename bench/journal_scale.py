"""Remote job journal at scale: load time of `user/__astria/jobs.jsonl` before and after compaction.

Writes a journal of N event records as the remote node writes them (per image: intent, created, delivered; every
tenth image a refused prompt first and a second intent with the next seed), then times: a load of the event lines
as main does it (compaction off), the compaction (once, at the load that finds many events), and a load of the
compacted file (snapshot lines). Prints file sizes and times; never asserts. Run it in the background on a shared
machine (times vary with the load).

Usage: python bench/journal_scale.py [--records 100000 1000000]
"""
import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
NEVER = 10**12


def import_journal():
    """nodes/core/astria_journal.py on its own (pure: standard library only)."""
    spec = importlib.util.spec_from_file_location("astria_journal", PACK_ROOT / "nodes/core/astria_journal.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def write_events(journal_module, path, records):
    """Write about `records` event lines shaped like the node's (same fields, hashes of the same length)."""
    version = journal_module.JOURNAL_VERSION
    written, image, prompt = 0, 0, 100_000
    with open(path, "w") as handle:
        while written < records:
            key, group, attempt = f"{image:032x}", f"{image % 50:032x}", f"{image:016x}"
            base = {"v": version, "key": key, "attempt": attempt, "group": group, "seed": image, "t": 1.7e9 + image}
            events = [{"event": "intent"}]
            if image % 10 == 0:
                prompt += 1
                events += [{"event": "refused", "prompt_id": prompt, "reason": "prompt was created before this "
                            "request began (Astria's idempotency returned an earlier prompt)"},
                           {"event": "intent", "seed": image + 1}]
            prompt += 1
            events += [{"event": "created", "prompt_id": prompt}, {"event": "delivered", "prompt_id": prompt}]
            for event in events:
                handle.write(json.dumps({**base, **event}, sort_keys=True) + "\n")
            written += len(events)
            image += 1
    return written, image


def timed(function):
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, nargs="+", default=[100_000, 1_000_000])
    args = parser.parse_args()
    journal = import_journal()
    print(f"{'records':>9} {'images':>8} {'events MB':>9} {'load s':>7} {'compact s':>9} {'snapshot MB':>11} "
          f"{'load s':>7} {'ratio':>6}")
    for records in args.records:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "jobs.jsonl"
            written, images = write_events(journal, path, records)
            events_mb = path.stat().st_size / 1e6
            before_s, before = timed(lambda: journal.JobJournal(path, compact_after_events=NEVER))
            compact_s, _ = timed(lambda: journal.JobJournal(path, compact_after_events=1))
            snapshot_mb = path.stat().st_size / 1e6
            after_s, after = timed(lambda: journal.JobJournal(path, compact_after_events=NEVER))
            same = (before._latest_by_key == after._latest_by_key and before._prompt_owner == after._prompt_owner
                    and before._seeds_by_group == after._seeds_by_group)
            print(f"{written:>9} {images:>8} {events_mb:>9.1f} {before_s:>7.2f} {compact_s:>9.2f} {snapshot_mb:>11.1f} "
                  f"{after_s:>7.2f} {before_s / after_s:>5.1f}x  same state: {same}", flush=True)


if __name__ == "__main__":
    main()
