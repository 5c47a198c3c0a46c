"""The remote-job journal: an fsynced JSONL file that makes every paid Astria prompt survive crashes and restarts.

One line per event. A *job* is one input image sent with one prompt text (its key hashes the tune, the form fields
without the seed, the image bytes and its place in the batch); an *attempt* is one request for that job, which ends
delivered or failed. Events: `intent` (written before every create, with the seed about to be sent), `created`
(the prompt id Astria answered), `refused` (a prompt we must not use: an old one returned by idempotency, or one
held for another job), `delivered` and `failed`. The journal stores hashes, seeds and prompt ids, never prompt text
or the API key.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

logger = logging.getLogger("astria")

JOURNAL_VERSION = 1
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

    def __init__(self, path: Optional[str | os.PathLike], *, wall_clock=time.time):
        self.path = Path(path) if path is not None else None
        self._wall_clock = wall_clock
        self._attempts: dict[str, Attempt] = {}  # attempt id -> state
        self._latest_by_key: dict[str, str] = {}  # job key -> latest attempt id
        self._prompt_owner: dict[int, str] = {}  # prompt id -> job key that created or refused it
        self._seeds_by_group: dict[str, set[tuple[str, int]]] = {}  # group -> {(attempt id, seed)}
        self._needs_newline = False
        if self.path is not None:
            self._load()

    def __repr__(self) -> str:
        return f"JobJournal(path={str(self.path)!r}, attempts={len(self._attempts)})"

    # ---- reading -------------------------------------------------------------------------------------------
    def _load(self) -> None:
        if not self.path.exists():
            return
        raw = self.path.read_bytes()
        # A crash can leave a half-written last line: skip it, and start the next append on a fresh line.
        self._needs_newline = bool(raw) and not raw.endswith(b"\n")
        for number, line in enumerate(raw.split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
                self._apply(event)
            except (ValueError, KeyError, TypeError) as exc:
                logger.warning("Skipping unreadable line %d of the Astria job journal %s (%s).", number, self.path,
                               type(exc).__name__)

    def _apply(self, event: Mapping[str, Any]) -> None:
        kind = event["event"]
        attempt_id = event["attempt"]
        key = event["key"]
        if kind == "intent":
            seed = int(event["seed"])
            attempt = self._attempts.get(attempt_id)
            if attempt is None:
                attempt = Attempt(key=key, attempt=attempt_id, group=event["group"], seed=seed, state="intent")
                self._attempts[attempt_id] = attempt
            attempt.seed, attempt.state, attempt.prompt_id = seed, "intent", None
            attempt.intent_wall = float(event.get("t", 0.0))
            self._latest_by_key[key] = attempt_id
            self._seeds_by_group.setdefault(attempt.group, set()).add((attempt_id, seed))
            return
        attempt = self._attempts[attempt_id]
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
        return self._attempts.get(attempt_id) if attempt_id else None

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
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            data = ("\n" if self._needs_newline else "") + text + "\n"
            os.write(fd, data.encode())
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
