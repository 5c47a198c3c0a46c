"""Exactly-once jobs on Astria's prompt API, on top of `astria_transport` and the journal in `astria_journal`.

The rules (docs/astria-syntax.md, the remote API contract): a create that may have reached Astria is never sent
again blindly, every create carries an explicit seed, and a prompt Astria answers with is checked against the job
journal and against the time the request began (Astria's idempotency can hand back an older prompt).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from .astria_errors import (
    AstriaAmbiguousCreate,
    AstriaAuthError,
    AstriaCancelled,
    AstriaDuplicateRefused,
    AstriaError,
    AstriaNotFound,
    AstriaPromptFailed,
    AstriaProtocolError,
    AstriaRequestRejected,
    AstriaTimeout,
)
from .astria_journal import Attempt, JobJournal, job_key, normalized_text, seed_group
from .astria_transport import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_POLL_INTERVAL_S,
    LIST_MAX_PAGES,
    LIST_PAGE_SIZE,
    SEED_MODULUS,
    AstriaTransport,
    CancelCheck,
    StatusCallback,
    check_seed,
    parse_time,
    settle_seconds_from_env,
    sleep_checked,
)

logger = logging.getLogger("astria")


@dataclass(frozen=True)
class PromptRecord:
    """One of Astria's prompt objects, read once: the fields the job logic uses (docs/astria-syntax.md section 8).

    Only `id` must be there; the rest is kept as Astria wrote it, or None when missing or unreadable.
    """

    id: int
    text: Any = None
    seed: Optional[int] = None  # None when Astria's seed is missing or not a whole number
    negative_prompt: Any = None
    created_at: Any = None  # as written, for messages; `created` is the parsed time
    images: Any = None
    user_error: Any = None

    @classmethod
    def from_json(cls, prompt: Mapping[str, Any]) -> "PromptRecord":
        """Read a prompt object from a create, get or list answer (raises KeyError/ValueError without an id)."""
        try:
            seed = int(prompt.get("seed"))
        except (TypeError, ValueError):
            seed = None
        return cls(id=int(prompt["id"]), text=prompt.get("text"), seed=seed,
                   negative_prompt=prompt.get("negative_prompt"), created_at=prompt.get("created_at"),
                   images=prompt.get("images"), user_error=prompt.get("user_error"))

    @property
    def created(self) -> Optional[float]:
        """When Astria created the prompt (epoch seconds), or None when `created_at` is missing or unreadable."""
        return parse_time(self.created_at)

    def identity(self) -> Optional[tuple[str, int, str]]:
        """(text, seed, negative prompt) as a lookup matches them, whitespace normalised; None without a seed."""
        if self.seed is None:
            return None
        return normalized_text(self.text), self.seed, normalized_text(self.negative_prompt)

    def image_urls(self) -> Optional[list[str]]:
        """The rendered images' URLs ([] while rendering); None when `images` is not a list of URLs."""
        if not self.images:
            return []
        if not isinstance(self.images, list):
            return None
        urls = [item.get("url") if isinstance(item, dict) else item for item in self.images]
        return urls if all(isinstance(url, str) and url for url in urls) else None


@dataclass
class JobResult:
    """What one remote job delivered: the prompt, the seed it was actually created with, and the images."""

    prompt_id: int
    seed: int
    image_urls: list[str]
    images: list[bytes]
    resumed: bool
    key: str
    notices: list[str] = field(default_factory=list)


class AstriaClient(AstriaTransport):
    """Astria's API with exactly-once jobs: a create that may have reached Astria is never sent again blindly, and
    every prompt Astria answers with is checked against the job journal before it is used."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        settle_s: Optional[float] = None,
        journal: Optional[JobJournal] = None,
        max_seed_moves: int = 3,
        max_ambiguous_creates: int = 3,
        clock_slack_s: float = 2.0,
        unknown_skew_s: float = 300.0,
        **transport,
    ):
        super().__init__(base_url, api_key, **transport)
        wall_clock = self._wall_clock
        self.settle_s = settle_seconds_from_env() if settle_s is None else float(settle_s)
        self.journal = journal if journal is not None else JobJournal(None, wall_clock=wall_clock)
        self.max_seed_moves = max_seed_moves
        self.max_ambiguous_creates = max_ambiguous_creates
        self.clock_slack_s = clock_slack_s
        self.unknown_skew_s = unknown_skew_s
        self._reserved_seeds: dict[str, dict[str, int]] = {}  # group -> {running job key: seed}
        self._active_keys: set[str] = set()

    async def wait(self, prompt_id: int, *, poll_interval: float = DEFAULT_POLL_INTERVAL_S,
                   deadline: Optional[float] = None, cancelled: Optional[CancelCheck] = None,
                   on_poll: Optional[Callable[[float], None]] = None) -> list[str]:
        """Poll a prompt until it has images and return their URLs; `deadline` is seconds from now (default 600)."""
        prompt_id = int(prompt_id)
        started = self._clock()
        limit_s = self.retry.deadline_s if deadline is None else float(deadline)
        deadline_at = started + limit_s
        step = f"rendering prompt {prompt_id}"
        while True:
            prompt = PromptRecord.from_json(await self.get_prompt(prompt_id, deadline=deadline_at,
                                                                  cancelled=cancelled))
            if prompt.user_error:
                text = self._scrub(str(prompt.user_error))
                raise AstriaPromptFailed(f"Astria could not run prompt {prompt_id}: {text}", prompt_id, text)
            urls = prompt.image_urls()
            if urls is None:
                raise AstriaProtocolError(
                    f"Prompt {prompt_id} lists images that are not URLs ({self._scrub(str(prompt.images))[:120]!r}). "
                    f"The prompt is kept; running the same image again reads it again without paying.")
            if urls:
                return urls
            now = self._clock()
            if on_poll is not None:
                on_poll(now - started)
            if now >= deadline_at:
                raise self._timeout(step, prompt_id, deadline_at, f"it was still without images after {limit_s:.0f} s")
            await sleep_checked(self._sleep_fn, min(poll_interval, deadline_at - now), cancelled,
                                 lambda: AstriaCancelled(prompt_id))

    async def find_prompt(self, tune_id: int, text: str, seed: int, negative_prompt: Optional[str], *,
                          since_wall: float, exclude: set[int], cancelled: Optional[CancelCheck] = None
                          ) -> Optional[PromptRecord]:
        """Look a prompt up by (text, seed, negative prompt) among unclaimed prompts created since `since_wall`."""
        window_start = self._server_time(since_wall) - self.clock_slack_s
        wanted = (normalized_text(text), int(seed), normalized_text(negative_prompt))
        matches: list[PromptRecord] = []
        before_id = None
        for _page in range(LIST_MAX_PAGES):
            page = await self.list_prompts(tune_id, before_id=before_id, limit=LIST_PAGE_SIZE, cancelled=cancelled)
            reached_older = False
            records = [PromptRecord.from_json(prompt) for prompt in page]
            for prompt in records:
                if prompt.created is not None and prompt.created < window_start:
                    reached_older = True
                    continue
                if prompt.id not in exclude and prompt.identity() == wanted:
                    matches.append(prompt)
            if reached_older or len(page) < LIST_PAGE_SIZE:
                break
            before_id = min(prompt.id for prompt in records)
        if len(matches) > 1:
            logger.warning("Astria lists %d unclaimed prompts matching seed %d on tune %s; taking the oldest.",
                           len(matches), seed, tune_id)
        return min(matches, key=lambda prompt: prompt.id) if matches else None

    def _refusal_reason(self, prompt: PromptRecord, started_wall: float) -> Optional[str]:
        """Why a prompt Astria answered a create with is not this request's, or None when it is."""
        if self.journal.prompt_owner(prompt.id) is not None:
            return f"prompt {prompt.id} already belongs to another request in the job journal"
        created = prompt.created
        if created is not None and created < self._server_time(started_wall) - self.clock_slack_s:
            return (f"prompt {prompt.id} was created at {prompt.created_at}, before this request began "
                    "(Astria's idempotency returned an earlier prompt with the same settings)")
        return None

    def _free_seed(self, group: str, key: str, wanted: int, *, skip_wanted: bool) -> int:
        """Return `wanted` (or the next seed after it) that no journaled or running request of the group uses."""
        others = {seed for other, seed in self._reserved_seeds.get(group, {}).items() if other != key}
        taken = self.journal.seeds_taken(group) | others
        seed = (wanted + 1) % SEED_MODULUS if skip_wanted else wanted
        while seed in taken:
            seed = (seed + 1) % SEED_MODULUS
        self._reserved_seeds.setdefault(group, {})[key] = seed
        return seed

    async def _create_exactly_once(self, attempt: Attempt, tune_id: int, fields: Mapping[str, Any],
                                   image_png: Optional[bytes], cancelled: Optional[CancelCheck], report) -> int:
        """Create the attempt's prompt once: settle and look up after ambiguity, refuse prompts that are not ours."""
        text, negative = fields.get("text"), fields.get("negative_prompt")
        if attempt.state == "refused":
            attempt.seed = self._free_seed(attempt.group, attempt.key, attempt.seed, skip_wanted=True)
        elif attempt.state == "intent":
            # A run stopped between sending a create and recording its answer: the prompt may exist.
            elapsed = max(0.0, self._wall_clock() - (attempt.intent_wall or 0.0))
            prompt = await self._settle_and_find(attempt, tune_id, text, negative, attempt.intent_wall or 0.0,
                                                 max(0.0, self.settle_s - elapsed), cancelled, report)
            if prompt is not None:
                return self._claim(attempt, prompt, report, "found after a restart")
        seed_moves = ambiguous = 0
        while True:
            if cancelled is not None and cancelled():
                raise AstriaCancelled(None)
            self.journal.record("intent", attempt)
            started_wall = self._wall_clock()
            report("creating", f"Creating the prompt on Astria (seed {attempt.seed})")
            try:
                prompt = PromptRecord.from_json(await self.create_prompt(
                    tune_id, {**fields, "seed": attempt.seed}, image_png, cancelled=cancelled))
            except AstriaAmbiguousCreate as exc:
                ambiguous += 1
                logger.warning("Astria: %s Waiting %.0f s, then looking it up instead of sending it again.", exc,
                               self.settle_s)
                prompt = await self._settle_and_find(attempt, tune_id, text, negative, started_wall, self.settle_s,
                                                     cancelled, report)
                if prompt is None:
                    if ambiguous >= self.max_ambiguous_creates:
                        raise AstriaError(
                            f"Creating the prompt on Astria failed {ambiguous} times without a clear answer, and it "
                            f"was not found afterwards ({exc}). Nothing was sent again; try later: the next run "
                            "looks it up before creating.") from None
                    logger.info("Astria: the prompt was not found after the failed create; creating it now.")
                    continue
                return self._claim(attempt, prompt, report, "found after a failed create")
            except AstriaCancelled as exc:
                if not exc.maybe_created:  # cancelled before sending or while waiting out a 429: nothing exists
                    self.journal.record("failed", attempt, error=str(exc)[:300], created=False)
                raise  # abandoned in flight: the intent stays, so the next run looks the prompt up first
            except (AstriaAuthError, AstriaRequestRejected, AstriaProtocolError, AstriaTimeout) as exc:
                # Each of these means Astria did not create anything for this request.
                self.journal.record("failed", attempt, error=str(exc)[:300], created=False)
                raise
            reason = self._refusal_reason(prompt, started_wall)
            if reason is None:
                return self._claim(attempt, prompt, report, "created")
            seed_moves += 1
            self.journal.record("refused", attempt, prompt_id=prompt.id, reason=reason)
            if seed_moves > self.max_seed_moves:
                self.journal.record("failed", attempt, error="duplicate prompts refused", created=False)
                raise AstriaDuplicateRefused(
                    f"Astria answered {seed_moves} creates with prompts that are not this request's ({reason}). "
                    "Nothing new was created. Turn off idempotency in your Astria account settings, or change the "
                    "seed or the prompt text.")
            old_seed = attempt.seed
            attempt.seed = self._free_seed(attempt.group, attempt.key, old_seed, skip_wanted=True)
            notice = f"Refused {reason}; creating again with seed {attempt.seed} instead of {old_seed}."
            logger.warning("Astria: %s", notice)
            report("creating", notice)

    async def _settle_and_find(self, attempt: Attempt, tune_id: int, text, negative, since_wall: float,
                               settle_s: float, cancelled, report) -> Optional[PromptRecord]:
        report("settling", f"Astria's answer to the create was lost; waiting {settle_s:.0f} s, then looking for the "
                           "prompt instead of paying twice")
        await sleep_checked(self._sleep_fn, settle_s, cancelled, lambda: AstriaCancelled(None, maybe_created=True))
        try:
            return await self.find_prompt(tune_id, text, attempt.seed, negative, since_wall=since_wall,
                                          exclude=self.journal.claimed_prompt_ids(), cancelled=cancelled)
        except AstriaCancelled:
            raise AstriaCancelled(None, maybe_created=True) from None
        except AstriaAuthError:
            raise
        except AstriaError as exc:
            # The intent stays in the journal: nothing is sent again until a lookup has answered.
            raise AstriaError(f"A create's answer was lost and looking the prompt up failed too ({exc}). A prompt may "
                              "already exist on Astria and may be billed; nothing was sent again. Running the same "
                              "image again looks it up before creating anything.") from None

    def _claim(self, attempt: Attempt, prompt: PromptRecord, report, how: str) -> int:
        prompt_id = prompt.id
        self.journal.record("created", attempt, prompt_id=prompt_id)
        logger.info("Astria prompt %d %s (seed %d).", prompt_id, how, attempt.seed)
        report("created", f"Prompt {prompt_id} {how} on Astria (seed {attempt.seed})")
        return prompt_id

    async def run_job(self, tune_id: int, fields: Mapping[str, Any], image_png: Optional[bytes], *, seed: int,
                      slot: int = 0, on_status: Optional[StatusCallback] = None,
                      cancelled: Optional[CancelCheck] = None, poll_interval: float = DEFAULT_POLL_INTERVAL_S,
                      deadline: Optional[float] = None, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
                      max_pixels: int = DEFAULT_MAX_PIXELS) -> JobResult:
        """Create-or-resume one job (one input image), wait for it and download its images, journaling each step.

        `fields` are the `prompt[...]` form fields without the seed; `slot` is the image's index in its batch (so
        identical images of a batch are separate jobs). A job created earlier but never delivered is resumed with
        its recorded seed and prompt, whatever `seed` says now. `on_status(stage, text)` reports progress with
        stages from STATUS_STAGES. `deadline` (seconds, default 600) bounds the rendering wait.
        """
        if "seed" in fields:
            raise ValueError("Pass the seed as run_job(seed=...), not in fields: the journal records it per attempt.")
        if not normalized_text(fields.get("text")):
            raise ValueError("The Astria prompt has no text to send.")
        check_seed(seed)
        key = job_key(tune_id, fields, image_png, slot)
        group = seed_group(tune_id, fields.get("text"), fields.get("negative_prompt"))
        if key in self._active_keys:
            raise AstriaError(f"Image {slot + 1} is already being sent to Astria by this client; wait for it to finish.")

        def report(stage: str, text: str) -> None:
            if on_status is not None:
                on_status(stage, text)

        self._active_keys.add(key)
        try:
            attempt = self.journal.latest_attempt(key)
            resumed = attempt is not None and (attempt.is_open or (attempt.seed == seed and attempt.prompt_id))
            if resumed:
                self._reserved_seeds.setdefault(group, {})[key] = attempt.seed
                logger.info("Astria: resuming image %d with its recorded seed %d (state %s).", slot + 1, attempt.seed,
                            attempt.state)
            else:
                attempt = self.journal.begin(key, group, self._free_seed(group, key, seed, skip_wanted=False))
            if attempt.state in ("new", "intent", "refused"):
                prompt_id = await self._create_exactly_once(attempt, tune_id, fields, image_png, cancelled, report)
            else:
                prompt_id = attempt.prompt_id
                report("resumed", f"Resuming prompt {prompt_id} on Astria (seed {attempt.seed}); nothing is paid twice")
            notices = [] if attempt.seed == seed else [f"image {slot + 1} used seed {attempt.seed} (asked: {seed})"]
            try:
                urls = await self.wait(prompt_id, poll_interval=poll_interval, deadline=deadline, cancelled=cancelled,
                                       on_poll=lambda s: report("rendering", f"Rendering prompt {prompt_id} on "
                                                                             f"Astria: {s:.0f} s"))
                images = []
                for number, url in enumerate(urls, start=1):
                    report("downloading", f"Downloading image {number} of {len(urls)} of prompt {prompt_id}")
                    images.append(await self.download(url, max_bytes=max_bytes, max_pixels=max_pixels,
                                                       cancelled=cancelled, prompt_id=prompt_id))
            except (AstriaPromptFailed, AstriaNotFound) as exc:
                if attempt.state != "failed":
                    self.journal.record("failed", attempt, prompt_id=prompt_id, error=str(exc)[:300], created=True)
                raise
            if attempt.state != "delivered":
                self.journal.record("delivered", attempt, prompt_id=prompt_id)
            report("delivered", f"Prompt {prompt_id}: {len(images)} image(s) received")
            return JobResult(prompt_id=prompt_id, seed=attempt.seed, image_urls=urls, images=images,
                             resumed=bool(resumed), key=key, notices=notices)
        finally:
            self._active_keys.discard(key)
            self._reserved_seeds.get(group, {}).pop(key, None)  # the journal remembers the seeds it sent
