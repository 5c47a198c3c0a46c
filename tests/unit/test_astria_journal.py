"""The job journal's compaction: the same state after it, a kill at each of its steps loses nothing, and an append
of a concurrent job waits for it instead of landing in the file being replaced."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from comfyui_astria.nodes.core import astria_journal
from comfyui_astria.nodes.core.astria_journal import COMPACTION_STEPS, JobJournal

NEVER = 10**9  # compact_after_events that never compacts: a plain load of whatever is in the file
JOURNAL_MODULE = astria_journal.__file__


def state(journal):
    """Everything the journal answers from: attempts that matter, newest per job, prompt owners, seeds per group."""
    latest = {key: journal.latest_attempt(key) for key in journal._latest_by_key}
    groups = {group: journal.seeds_taken(group) for group in journal._seeds_by_group}
    return latest, {p: journal.prompt_owner(p) for p in journal.claimed_prompt_ids()}, groups


def write_history(path, jobs=30):
    """A journal of many jobs: delivered, failed (seed freed or not), refused then created, resent with new seeds."""
    journal = JobJournal(path, compact_after_events=NEVER)
    prompt = 1000
    for job in range(jobs):
        key, group = f"key{job}", f"group{job % 4}"
        first = journal.begin(key, group, seed=job)
        journal.record("intent", first)
        if job % 5 == 0:
            journal.record("failed", first, error="422", created=False)  # seed freed again
            continue
        prompt += 1
        if job % 3 == 0:
            journal.record("refused", first, prompt_id=prompt, reason="old")
            first.seed = job + 100
            journal.record("intent", first)
            prompt += 1
        journal.record("created", first, prompt_id=prompt)
        if job % 4 == 0:
            journal.record("failed", first, prompt_id=prompt, error="boom", created=True)
            second = journal.begin(key, group, seed=job + 200)  # a new attempt of the same job
            journal.record("intent", second)
            prompt += 1
            journal.record("created", second, prompt_id=prompt)
            if job % 8 == 0:
                continue  # left open: created, not delivered
            journal.record("delivered", second, prompt_id=prompt)
        else:
            journal.record("delivered", first, prompt_id=prompt)
    return state(journal)


def test_compaction_keeps_the_state_and_shrinks_the_file(tmp_path):
    path = tmp_path / "jobs.jsonl"
    expected = write_history(path)
    lines_before, size_before = len(path.read_text().splitlines()), path.stat().st_size
    compacted = JobJournal(path, compact_after_events=1)
    assert state(compacted) == expected
    lines = path.read_text().splitlines()
    assert {json.loads(line)["event"] for line in lines} == {"snapshot"} and len(lines) <= 4
    assert lines_before > 100 and path.stat().st_size < size_before / 2
    assert state(JobJournal(path, compact_after_events=NEVER)) == expected
    # appends after a snapshot, then a second compaction of both
    attempt = compacted.begin("key-new", "group0", seed=77)
    compacted.record("intent", attempt)
    compacted.record("created", attempt, prompt_id=99999)
    expected = state(compacted)
    assert state(JobJournal(path, compact_after_events=NEVER)) == expected
    assert state(JobJournal(path, compact_after_events=1)) == expected
    assert len(path.read_text().splitlines()) <= 4


def test_a_load_compacts_only_after_many_events(tmp_path):
    path = tmp_path / "jobs.jsonl"
    write_history(path, jobs=5)
    size = path.stat().st_size
    JobJournal(path)  # far fewer than COMPACT_AFTER_EVENTS
    assert path.stat().st_size == size
    JobJournal(path, compact_after_events=5)
    assert path.stat().st_size < size


def run_compaction(path, body, wait=True):
    """Load (and so compact) the journal at `path` in a fresh Python process whose step hook runs `body(step)`."""
    hook = textwrap.indent(textwrap.dedent(body).strip(), "    ")
    script = "\n".join([
        "import importlib.util, os, signal, sys, time",
        f"spec = importlib.util.spec_from_file_location('journal', {JOURNAL_MODULE!r})",
        "journal = importlib.util.module_from_spec(spec)",
        "sys.modules[spec.name] = journal",
        "spec.loader.exec_module(journal)",
        "def hook(step):",
        hook,
        f"journal.JobJournal({str(path)!r}, compact_after_events=1, on_compaction_step=hook)",
    ])
    process = subprocess.Popen([sys.executable, "-c", script])
    if wait:
        process.wait(timeout=60)
    return process


@pytest.mark.parametrize("step", COMPACTION_STEPS)
def test_a_kill_at_each_step_of_a_compaction_loses_nothing(tmp_path, step):
    path = tmp_path / "jobs.jsonl"
    expected = write_history(path)
    original = path.read_bytes()
    process = run_compaction(path, f"if step == {step!r}: os.kill(os.getpid(), signal.SIGKILL)")
    assert process.returncode == -signal.SIGKILL
    renamed = COMPACTION_STEPS.index(step) >= COMPACTION_STEPS.index("renamed")
    assert (path.read_bytes() == original) is not renamed  # before the rename the old file is untouched
    assert (tmp_path / "jobs.jsonl.compacting").exists() is not renamed
    assert state(JobJournal(path, compact_after_events=NEVER)) == expected
    assert not (tmp_path / "jobs.jsonl.compacting").exists()  # the next load clears a dead compaction's file
    assert state(JobJournal(path, compact_after_events=1)) == expected


def test_an_append_waits_for_a_compaction_in_another_process(tmp_path):
    path = tmp_path / "jobs.jsonl"
    write_history(path)
    appender = JobJournal(path, compact_after_events=NEVER)
    marker = tmp_path / "compacting-now"
    process = run_compaction(path, f"""
        if step == "written":
            open({str(marker)!r}, "w").close()
            time.sleep(1.5)
    """, wait=False)
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert time.monotonic() < deadline and process.poll() is None, "the compaction never started"
        time.sleep(0.02)
    attempt = appender.begin("key-late", "group-late", seed=5)
    started = time.monotonic()
    appender.record("intent", attempt)  # a concurrent job of this process
    waited = time.monotonic() - started
    assert process.wait(timeout=60) == 0
    reloaded = JobJournal(path, compact_after_events=NEVER)
    assert reloaded.latest_attempt("key-late") is not None and reloaded.seeds_taken("group-late") == {5}
    assert waited > 0.5  # it waited for the lock (the child held it while it slept)
    assert json.loads(path.read_text().splitlines()[0])["event"] == "snapshot"


def test_threads_of_one_process_share_the_lock(tmp_path):
    path = tmp_path / "jobs.jsonl"
    write_history(path, jobs=3)
    journals = [JobJournal(path, compact_after_events=NEVER) for _ in range(4)]

    def append(index):
        for n in range(25):
            journal = journals[index]
            journal.record("intent", journal.begin(f"t{index}-{n}", "g", seed=index * 100 + n))

    threads = [threading.Thread(target=append, args=(index,)) for index in range(4)]
    compacting = threading.Thread(target=lambda: [JobJournal(path, compact_after_events=1) for _ in range(5)])
    for thread in threads + [compacting]:
        thread.start()
    for thread in threads + [compacting]:
        thread.join()
    assert JobJournal(path, compact_after_events=NEVER).seeds_taken("g") == {i * 100 + n for i in range(4)
                                                                            for n in range(25)}


def test_the_lock_file_and_side_file_stay_private(tmp_path):
    path = tmp_path / "jobs.jsonl"
    write_history(path, jobs=3)
    JobJournal(path, compact_after_events=1)
    if os.name == "posix":
        assert (path.stat().st_mode & 0o777) == 0o600
        assert ((tmp_path / "jobs.jsonl.lock").stat().st_mode & 0o777) == 0o600
