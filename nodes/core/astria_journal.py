"""The remote-job journal: an fsynced JSONL file that makes every paid Astria prompt survive crashes and restarts.

One line per event. A *job* is one input image sent with one prompt text (its key hashes the tune, the form fields
without the seed, the image bytes and its place in the batch); an *attempt* is one request for that job, which ends
delivered or failed. Events: `intent` (written before every create, with the seed about to be sent), `created`
(the prompt id Astria answered), `refused` (a prompt we must not use: an old one returned by idempotency, or one
held for another job), `delivered` and `failed`. The journal stores hashes, seeds and prompt ids, never prompt text
or the API key.

Compaction: when a load finds `COMPACT_AFTER_EVENTS` event lines or more, the whole file is rewritten as a few
`snapshot` lines (one row per attempt that still matters: the newest of each job, and any other that holds a
seed); later events are appended after them as before. A snapshot keeps every seed ever sent per group and every prompt id
claimed, so exactly-once holds across it. It is crash-safe: written to a side file, fsynced, renamed over the
journal, directory fsynced; a kill before the rename leaves the old file (the side file is removed at the next
load), after it the new one. Appends and compaction hold the same lock (a lock file beside the journal, locked
with flock / msvcrt, and a thread lock) so no append of a concurrent job lands in a file being replaced.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

logger = logging.getLogger("astria")

JOURNAL_VERSION = 1
SNAPSHOT_VERSION = 2  # snapshot lines (older packs skip them as unreadable)
SNAPSHOT_EVENT = "snapshot"
SNAPSHOT_ROWS_PER_LINE = 10_000
COMPACT_AFTER_EVENTS = 1000
COMPACTION_STEPS = ("written", "fsynced", "renamed", "directory_fsynced")
OPEN_STATES = ("intent", "created", "refused")
FINISHED_STATES = ("delivered", "failed")


def form_value(value: Any) -> str:
    """Return a form field value exactly as it is sent to Astria (booleans as true/false)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def normalized_text(text: Optional[str]) -> str:
    """Return prompt text with runs of whitespace collapsed, as used to match prompts Astria lists."""
    return " ".join((text or "").split())


def job_key(tune_id: int | str, fields: Mapping[str, Any], image_png: Optional[bytes], slot: int = 0) -> str:
    """Hash what identifies one job: tune, form fields without the seed, the image bytes and its batch slot."""
    if "seed" in fields:
        raise ValueError("job_key takes the form fields without 'seed': the seed is recorded per attempt.")
    sent = {name: form_value(value) for name, value in sorted(fields.items()) if value is not None}
    digest = hashlib.sha256()
    digest.update(json.dumps({"tune": str(tune_id), "fields": sent, "slot": slot}, sort_keys=True).encode())
    digest.update(b"\0image\0")
    digest.update(image_png or b"")
    return digest.hexdigest()[:32]


def seed_group(tune_id: int | str, text: Optional[str], negative_prompt: Optional[str]) -> str:
    """Hash what Astria's idempotency would merge on, for seed bookkeeping: tune, text, negative prompt."""
    payload = json.dumps([str(tune_id), normalized_text(text), normalized_text(negative_prompt)])
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def new_attempt_id() -> str:
    """Return a fresh id for one request of a job."""
    return uuid.uuid4().hex[:16]


@dataclass
class Attempt:
    """The journal's view of one request for a job: its seed, prompt id and how far it got."""

    key: str
    attempt: str
    group: str
    seed: int
    state: str
    prompt_id: Optional[int] = None
    intent_wall: Optional[float] = None
    error: Optional[str] = None

    @property
    def is_open(self) -> bool:
        """True while the attempt may still own (or be about to own) a paid prompt that was not delivered."""
        return self.state in OPEN_STATES


class JobJournal:
    """Append-only, fsynced record of remote jobs; `path=None` keeps it in memory only (nothing survives)."""

    def __init__(self, path: Optional[str | os.PathLike], *, wall_clock=time.time,
                 compact_after_events: int = COMPACT_AFTER_EVENTS,
                 on_compaction_step: Optional[Callable[[str], None]] = None):
        self.path = Path(path) if path is not None else None
        self._wall_clock = wall_clock
        self._compact_after_events = compact_after_events
        self._on_compaction_step = on_compaction_step  # tests: called after each step of COMPACTION_STEPS
        self._attempts: dict[str, Attempt] = {}  # attempt id -> state
        self._snapshot_rows: dict[str, list] = {}  # attempt id -> snapshot row, until an Attempt is asked for
        self._latest_by_key: dict[str, str] = {}  # job key -> latest attempt id
        self._prompt_owner: dict[int, str] = {}  # prompt id -> job key that created or refused it
        self._seeds_by_group: dict[str, set[tuple[str, int]]] = {}  # group -> {(attempt id, seed)}
        self._needs_newline = False
        if self.path is not None:
            self._load()

    def __repr__(self) -> str:
        return f"JobJournal(path={str(self.path)!r}, attempts={len(self._attempts) + len(self._snapshot_rows)})"

    # ---- reading -------------------------------------------------------------------------------------------
    def _load(self) -> None:
        with _journal_lock(self.path):
            side_file = _side_file(self.path)
            if side_file.exists():
                side_file.unlink()  # a compaction that died before its rename: the journal itself is whole
            if not self.path.exists():
                return
            raw = self.path.read_bytes()
            # A crash can leave a half-written last line: skip it, and start the next append on a fresh line.
            self._needs_newline = bool(raw) and not raw.endswith(b"\n")
            events = 0
            for number, line in enumerate(raw.split(b"\n"), start=1):
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                    if event["event"] == SNAPSHOT_EVENT:
                        self._apply_snapshot(event)
                    else:
                        self._apply(event)
                        events += 1
                except (ValueError, KeyError, TypeError, IndexError) as exc:
                    logger.warning("Skipping unreadable line %d of the Astria job journal %s (%s).", number,
                                   self.path, type(exc).__name__)
            if events >= self._compact_after_events:
                self._compact()

    def _apply_snapshot(self, line: Mapping[str, Any]) -> None:
        """Load one snapshot line in bulk (attempts become objects when asked for).

        `attempts` rows come superseded first, so the last row of a key is its newest attempt; each row's own seed
        is taken in its group and its prompt id owned by its key unless `freed` / listed otherwise; `seeds` adds
        the other seeds an attempt sent, `owners` the prompts held without a row (refused ones)."""
        rows = line.get("attempts", ())
        self._snapshot_rows.update(zip((row[1] for row in rows), rows))
        self._latest_by_key.update((row[0], row[1]) for row in rows)
        for key, attempt_id, group, seed, _state, prompt_id, _wall, _error in rows:
            self._seeds_by_group.setdefault(group, set()).add((attempt_id, seed))
            if prompt_id is not None:
                self._prompt_owner[prompt_id] = key
        for group, attempt_id, seed in line.get("freed", ()):
            self._seeds_by_group[group].discard((attempt_id, seed))
        for group, pairs in line.get("seeds", {}).items():
            self._seeds_by_group.setdefault(group, set()).update(map(tuple, pairs))
        self._prompt_owner.update(line.get("owners", ()))

    def _attempt(self, attempt_id: str) -> Optional[Attempt]:
        """The attempt of this id, made from its snapshot row on first use; None when the journal has none."""
        attempt = self._attempts.get(attempt_id)
        if attempt is None and attempt_id in self._snapshot_rows:
            key, _id, group, seed, state, prompt_id, intent_wall, error = self._snapshot_rows.pop(attempt_id)
            attempt = Attempt(key=key, attempt=attempt_id, group=group, seed=int(seed), state=state,
                              prompt_id=prompt_id, intent_wall=intent_wall, error=error)
            self._attempts[attempt_id] = attempt
        return attempt

    def _snapshot_lines(self) -> list[str]:
        """The journal's whole state as snapshot lines: what a load of them rebuilds equals this view."""
        seeded = {attempt_id for pairs in self._seeds_by_group.values() for attempt_id, _seed in pairs}
        latest = set(self._latest_by_key.values())
        rows = [row for attempt_id, row in self._snapshot_rows.items() if attempt_id in seeded or attempt_id in latest]
        rows += [[a.key, a.attempt, a.group, a.seed, a.state, a.prompt_id, a.intent_wall, a.error]
                 for a in self._attempts.values() if a.attempt in seeded or a.attempt in latest]
        rows.sort(key=lambda row: row[1] in latest)  # superseded first: a key's last row is its newest attempt
        own = {(row[1], row[3]) for row in rows}
        freed = [[row[2], row[1], row[3]] for row in rows if (row[1], row[3]) not in self._seeds_by_group.get(row[2], ())]
        owned_by_rows = {row[5]: row[0] for row in rows if row[5] is not None}
        owners = [[prompt_id, key] for prompt_id, key in self._prompt_owner.items()
                  if owned_by_rows.get(prompt_id) != key]
        extra_seeds = {}
        for group, pairs in self._seeds_by_group.items():
            extra = sorted(pair for pair in pairs if pair not in own)
            if extra:
                extra_seeds[group] = extra
        lines = []
        for name, items in (("attempts", rows), ("freed", freed), ("owners", owners)):
            for start in range(0, len(items), SNAPSHOT_ROWS_PER_LINE):
                lines.append(json.dumps({"v": SNAPSHOT_VERSION, "event": SNAPSHOT_EVENT,
                                         name: items[start:start + SNAPSHOT_ROWS_PER_LINE]}))
        if extra_seeds:
            lines.append(json.dumps({"v": SNAPSHOT_VERSION, "event": SNAPSHOT_EVENT, "seeds": extra_seeds}))
        return lines

    def _compact(self) -> None:
        """Rewrite the journal as snapshot lines, crash-safely (the caller holds the journal lock)."""
        side_file = _side_file(self.path)
        data = "".join(line + "\n" for line in self._snapshot_lines()).encode()
        fd = os.open(side_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, data)
            self._compaction_step("written")
            os.fsync(fd)
            self._compaction_step("fsynced")
        finally:
            os.close(fd)
        os.replace(side_file, self.path)
        self._compaction_step("renamed")
        _fsync_directory(self.path.parent)
        self._compaction_step("directory_fsynced")
        self._needs_newline = False
        logger.info("Compacted the Astria job journal %s (%d attempts kept).", self.path, len(self._latest_by_key))

    def _compaction_step(self, step: str) -> None:
        if self._on_compaction_step is not None:
            self._on_compaction_step(step)

    def _apply(self, event: Mapping[str, Any]) -> None:
        kind = event["event"]
        attempt_id = event["attempt"]
        key = event["key"]
        if kind == "intent":
            seed = int(event["seed"])
            attempt = self._attempt(attempt_id)
            if attempt is None:
                attempt = Attempt(key=key, attempt=attempt_id, group=event["group"], seed=seed, state="intent")
                self._attempts[attempt_id] = attempt
            attempt.seed, attempt.state, attempt.prompt_id = seed, "intent", None
            attempt.intent_wall = float(event.get("t", 0.0))
            self._latest_by_key[key] = attempt_id
            self._seeds_by_group.setdefault(attempt.group, set()).add((attempt_id, seed))
            return
        attempt = self._attempt(attempt_id)
        if attempt is None:
            raise KeyError(attempt_id)
        prompt_id = event.get("prompt_id")
        if prompt_id is not None:
            self._prompt_owner[int(prompt_id)] = key
        if kind == "created":
            attempt.state, attempt.prompt_id = "created", int(prompt_id)
        elif kind == "refused":
            attempt.state, attempt.prompt_id = "refused", None
        elif kind == "delivered":
            attempt.state = "delivered"
        elif kind == "failed":
            attempt.state, attempt.error = "failed", event.get("error")
            if event.get("created") is False:
                # Astria certainly created nothing with this seed (401, 422, 429 until the deadline): free it again.
                self._seeds_by_group.get(attempt.group, set()).discard((attempt_id, attempt.seed))
        else:
            raise KeyError(kind)

    def latest_attempt(self, key: str) -> Optional[Attempt]:
        """Return the newest attempt recorded for a job key, or None when the job was never sent."""
        attempt_id = self._latest_by_key.get(key)
        return self._attempt(attempt_id) if attempt_id else None

    def prompt_owner(self, prompt_id: int) -> Optional[str]:
        """Return the job key that holds (or refused) this prompt id, or None when the journal never saw it."""
        return self._prompt_owner.get(int(prompt_id))

    def claimed_prompt_ids(self) -> set[int]:
        """Return every prompt id the journal holds for some job (created or refused)."""
        return set(self._prompt_owner)

    def seeds_taken(self, group: str) -> set[int]:
        """Return every seed ever sent (or about to be sent) for this tune + text + negative prompt."""
        return {seed for _attempt, seed in self._seeds_by_group.get(group, ())}

    # ---- writing -------------------------------------------------------------------------------------------
    def record(self, event: str, attempt: Attempt, **extra: Any) -> None:
        """Append one event for an attempt, fsynced before returning, and apply it to the in-memory view."""
        line = {"v": JOURNAL_VERSION, "event": event, "key": attempt.key, "attempt": attempt.attempt,
                "group": attempt.group, "seed": attempt.seed, "t": round(self._wall_clock(), 3)}
        line.update({name: value for name, value in extra.items() if value is not None})
        if self.path is not None:
            self._append(json.dumps(line, sort_keys=True))
        self._apply(line)  # updates the caller's Attempt object: it is the one in the index

    def _append(self, text: str) -> None:
        with _journal_lock(self.path):
            created = not self.path.exists()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                data = ("\n" if self._needs_newline else "") + text + "\n"
                _write_all(fd, data.encode())
                os.fsync(fd)
                self._needs_newline = False
            finally:
                os.close(fd)
            if created:
                _fsync_directory(self.path.parent)

    def begin(self, key: str, group: str, seed: int) -> Attempt:
        """Start a new attempt for a job (no event is written until its first intent)."""
        attempt = Attempt(key=key, attempt=new_attempt_id(), group=group, seed=seed, state="new")
        self._attempts[attempt.attempt] = attempt
        return attempt


def _fsync_directory(directory: Path) -> None:
    """Make a newly created file's directory entry durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written (one call may write less)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _side_file(path: Path) -> Path:
    """Where a compaction writes the new journal before renaming it over the old one."""
    return path.with_name(path.name + ".compacting")


_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


class _journal_lock:
    """Exclusive use of a journal for one append or one load (with its compaction): a thread lock for this process
    and a lock on `<journal>.lock` for other processes (flock; msvcrt on Windows)."""

    def __init__(self, path: Path):
        self.path = path
        with _THREAD_LOCKS_GUARD:
            self.thread_lock = _THREAD_LOCKS.setdefault(os.path.abspath(path), threading.Lock())
        self.fd: Optional[int] = None

    def __enter__(self):
        self.thread_lock.acquire()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
            if fcntl is not None:
                fcntl.flock(self.fd, fcntl.LOCK_EX)
            else:
                while True:
                    try:
                        msvcrt.locking(self.fd, msvcrt.LK_LOCK, 1)
                        break
                    except OSError:  # LK_LOCK gives up after about 10 s: keep waiting
                        continue
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc_info):
        self._release()

    def _release(self) -> None:
        if self.fd is not None:
            try:
                if fcntl is not None:
                    fcntl.flock(self.fd, fcntl.LOCK_UN)
                else:
                    os.lseek(self.fd, 0, os.SEEK_SET)
                    msvcrt.locking(self.fd, msvcrt.LK_UNLCK, 1)
            finally:
                os.close(self.fd)
                self.fd = None
        self.thread_lock.release()
