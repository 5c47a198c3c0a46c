"""Async client for Astria's prompt API: retries within deadlines, exactly-once creates, safe downloads.

Pure Python + aiohttp (shipped by ComfyUI); imports nothing from ComfyUI. The rules it follows are in the pack's
spec (astria-syntax.md section 4): a create that may have reached Astria is never sent again blindly, every
create carries an explicit seed, a prompt Astria answers with is checked against the job journal and against the
time the request began (Astria's idempotency can hand back an older prompt), and the API key goes only into the
Authorization header of requests to the API's own origin.
"""
from __future__ import annotations

import asyncio
import html
import io
import json
import logging
import math
import os
import random
import re
import stat
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping, Optional
from urllib.parse import urlsplit

import aiohttp

from .astria_journal import Attempt, JobJournal, form_value, job_key, normalized_text, seed_group

logger = logging.getLogger("astria")

DEFAULT_BASE_URL = "https://api.astria.ai"
SEED_MODULUS = 2**32
DEFAULT_KEY_FILE_HINT = "user/__astria/api_key in ComfyUI's folder"
SETTLE_ENV = "ASTRIA_CREATE_SETTLE_S"
DEFAULT_SETTLE_S = 60.0  # Astria's docs: after a 504, wait 60 s before looking again
DEFAULT_DEADLINE_S = 600.0  # Astria's CLI gives a prompt 10 minutes
DEFAULT_POLL_INTERVAL_S = 5.0  # Astria's CLI polls every 5 s
RETRY_BASE_ENV = "ASTRIA_RETRY_BASE_S"
POLL_ENV = "ASTRIA_POLL_INTERVAL_S"
DEADLINE_ENV = "ASTRIA_DEADLINE_S"
CANCEL_CHECK_S = 1.0  # the longest a wait goes without looking at the cancel flag
REQUEST_CANCEL_CHECK_S = 0.5  # same, while an HTTP request is in flight (real time: the network is real)
LIST_PAGE_SIZE = 20
LIST_MAX_PAGES = 10
DEFAULT_MAX_IMAGE_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_PIXELS = 8192 * 8192
MAX_API_BODY_BYTES = 8 * 1024 * 1024
MIN_RETRY_AFTER_S = 1.0  # a Retry-After of 0 (or a date already past) must not turn retries into a busy loop
SERVER_TEXT_CHARS = 500
# Declared types an image may come with besides image/*: object stores often serve images as plain bytes. Any other
# declared type (text/html, application/json, XML) is an error page, even when its bytes happen to decode.
IMAGE_BYTE_TYPES = ("", "application/octet-stream", "binary/octet-stream", "application/binary")
STATUS_STAGES = ("creating", "settling", "created", "resumed", "rendering", "downloading", "delivered")

StatusCallback = Callable[[str, str], None]
CancelCheck = Callable[[], bool]


# ---- errors -------------------------------------------------------------------------------------------------
class AstriaError(Exception):
    """Base of every error the Astria client raises; its text is meant for the user."""


class AstriaAuthError(AstriaError):
    """Astria answered 401: the API key is missing, wrong or revoked."""


class AstriaRequestRejected(AstriaError):
    """Astria refused a request (422 validation or another 4xx): retrying the same request cannot help."""

    def __init__(self, message: str, status: int, server_text: str = ""):
        super().__init__(message)
        self.status = status
        self.server_text = server_text


class AstriaNotFound(AstriaRequestRejected):
    """Astria does not know the prompt (or tune) asked for."""


class AstriaPromptFailed(AstriaError):
    """Astria ran the prompt and reported a `user_error` for it."""

    def __init__(self, message: str, prompt_id: int, user_error: str):
        super().__init__(message)
        self.prompt_id = prompt_id
        self.user_error = user_error


class AstriaTimeout(AstriaError):
    """A step ran past its deadline; the message names the step and the prompt id when there is one."""

    def __init__(self, message: str, step: str, prompt_id: Optional[int] = None):
        super().__init__(message)
        self.step = step
        self.prompt_id = prompt_id


class AstriaCancelled(AstriaError):
    """The user cancelled; the message says whether a (billable) prompt already exists on Astria."""

    def __init__(self, prompt_id: Optional[int] = None, *, maybe_created: bool = False):
        if prompt_id is not None:
            text = (f"Cancelled. Prompt {prompt_id} was already created on Astria and may still be billed; running "
                    "the same image again resumes it instead of paying twice.")
        elif maybe_created:
            text = ("Cancelled while confirming a create whose answer was lost: a prompt may already exist on Astria "
                    "and may be billed; running the same image again looks it up before creating anything.")
        else:
            text = "Cancelled before anything was created on Astria: nothing was billed."
        super().__init__(text)
        self.prompt_id = prompt_id
        self.maybe_created = maybe_created


class AstriaAmbiguousCreate(AstriaError):
    """A create failed in a way that may still have saved the prompt (5xx, timeout, dropped connection)."""


class AstriaDuplicateRefused(AstriaError):
    """Astria kept answering creates with prompts that belong to other requests; nothing of ours was created."""


class AstriaProtocolError(AstriaError):
    """Astria (or something in between) answered in a way the client cannot use, e.g. a redirect."""


class AstriaDownloadError(AstriaError):
    """An image could not be downloaded or is not a usable image."""


# ---- settings -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RetryPolicy:
    """How GETs (and rate-limited creates) retry: exponential backoff with jitter inside an overall deadline."""

    base_s: float = 30.0  # Astria's docs suggest starting at 30 s
    factor: float = 2.0
    max_backoff_s: float = 300.0
    jitter: float = 0.25  # up to this fraction is added at random, so parallel jobs do not retry in step
    deadline_s: float = DEFAULT_DEADLINE_S

    def backoff_s(self, retry_number: int, rng: random.Random) -> float:
        """Return the wait before retry `retry_number` (0 for the first retry)."""
        plain = min(self.max_backoff_s, self.base_s * self.factor ** retry_number)
        return plain * (1.0 + self.jitter * rng.random())


@dataclass(frozen=True)
class Timeouts:
    """Per-request time limits in seconds (the overall deadlines are separate)."""

    connect_s: float = 20.0
    api_s: float = 60.0
    create_s: float = 180.0  # uploads the input image
    download_s: float = 300.0


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


@dataclass
class _Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes


class _SecretKey:
    """Holds the API key so that no repr, str or traceback of locals can show it."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "'***'"

    __str__ = __repr__


# ---- helpers ------------------------------------------------------------------------------------------------
def api_base_url() -> str:
    """Return the API base URL: `ASTRIA_API_URL` when set (tests point it at a local server), else Astria's."""
    return os.environ.get("ASTRIA_API_URL", "").strip() or DEFAULT_BASE_URL


def load_api_key(key_file: Optional[str | os.PathLike] = None) -> Optional[str]:
    """Return the key from `ASTRIA_API_KEY`, else from the key file, else None; warns when the file is readable by others."""
    from_env = os.environ.get("ASTRIA_API_KEY", "").strip()
    if from_env:
        return from_env
    if key_file is None:
        return None
    path = Path(key_file)
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("The Astria key file %s can be read by other users; run: chmod 600 %s", path, path)
    return text or None


def seconds_from_env(name: str, default: float, *, positive: bool = False) -> float:
    """Return a duration in seconds from the environment variable `name`, or `default` when it is unset or empty;
    a value that is not a finite number of seconds (or not above 0 when `positive`) is an error naming the fix."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number of seconds; set it to e.g. {default:g} or unset it.") \
            from None
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name}={raw!r} must be {'more than' if positive else '0 or more'} seconds "
                         f"(e.g. {default:g}, the default).")
    return value


def settle_seconds_from_env() -> float:
    """Return the wait after an ambiguous create, from `ASTRIA_CREATE_SETTLE_S` (default 60 s)."""
    return seconds_from_env(SETTLE_ENV, DEFAULT_SETTLE_S)


@dataclass(frozen=True)
class WaitSettings:
    """How long the remote node waits, from the environment (defaults: Astria's docs and CLI)."""

    retry: RetryPolicy
    poll_interval_s: float
    deadline_s: float

    @classmethod
    def from_env(cls) -> "WaitSettings":
        """`ASTRIA_RETRY_BASE_S` (first backoff after a 5xx or a dropped connection, default 30, doubling),
        `ASTRIA_POLL_INTERVAL_S` (default 5) and `ASTRIA_DEADLINE_S` (how long a prompt may render, default 600)."""
        deadline = seconds_from_env(DEADLINE_ENV, DEFAULT_DEADLINE_S, positive=True)
        retry = RetryPolicy(base_s=seconds_from_env(RETRY_BASE_ENV, RetryPolicy.base_s, positive=True),
                            deadline_s=deadline)
        return cls(retry, seconds_from_env(POLL_ENV, DEFAULT_POLL_INTERVAL_S, positive=True), deadline)


def check_image_bytes(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Decode image bytes fully (Pillow, with its decompression-bomb guard) and return (width, height)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; a download must not get that far.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise AstriaDownloadError(
                        f"The image is {width}x{height} pixels, more than the {max_pixels} allowed; "
                        "it was not decoded (possible decompression bomb).")
                image.load()
    except AstriaDownloadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise AstriaDownloadError(f"The image was refused by Pillow's decompression-bomb guard: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise AstriaDownloadError(f"The downloaded file is not a readable image ({type(exc).__name__}: {exc}).") \
            from None
    return width, height


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme.lower(), (parts.hostname or "").lower(), port


def _loggable_url(url: str) -> str:
    """Return the URL without query or fragment (presigned image URLs carry tokens there)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _parse_time(text: Any) -> Optional[float]:
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _as_prompt(payload: Any) -> Optional[dict]:
    """Return the prompt object from a create/get answer (a dict, or a one-element list), or None."""
    if isinstance(payload, list) and len(payload) == 1:
        payload = payload[0]
    if isinstance(payload, dict) and payload.get("id") is not None:
        return payload
    return None


_HTML_HIDDEN = re.compile(r"<(script|style)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_HTML_TAG = re.compile(r"<[^>]*>")


def _readable(payload: Any) -> str:
    """Flatten a JSON error (`{"errors": {"text": ["can't be blank"]}}`, lists, nested dicts) into one sentence."""
    if payload is None or payload == "":
        return ""
    if isinstance(payload, str):
        return payload.strip()
    if isinstance(payload, list):
        return "; ".join(text for text in (_readable(item) for item in payload) if text)
    if isinstance(payload, dict):
        parts = []
        for name, value in payload.items():
            text = _readable(value)
            if text:
                parts.append(f"{name}: {text}")
        return "; ".join(parts)
    return str(payload)


def _plain_text(body: bytes) -> str:
    """Return a non-JSON body as one line of text: an HTML/XML page (a proxy's error page) without its markup."""
    text = body.decode("utf-8", "replace").strip()
    if text.startswith("<"):
        text = html.unescape(_HTML_TAG.sub(" ", _HTML_HIDDEN.sub(" ", text)))
    return " ".join(text.split())


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_MODULUS:
        raise ValueError(f"seed {seed!r} is out of range: Astria seeds are whole numbers from 0 to {SEED_MODULUS - 1}.")
    return seed


async def _sleep_checked(sleep, seconds: float, cancelled: Optional[CancelCheck], on_cancel: Callable[[], Exception]):
    """Sleep in steps of at most CANCEL_CHECK_S, raising on_cancel() as soon as cancelled() says so."""
    remaining = max(0.0, seconds)
    while True:
        if cancelled is not None and cancelled():
            raise on_cancel()
        if remaining <= 0:
            return
        step = min(CANCEL_CHECK_S, remaining)
        await sleep(step)
        remaining -= step


# ---- the client ---------------------------------------------------------------------------------------------
class AstriaClient:
    """Talks to Astria's API for one API key; use `async with` (or `await close()`) to release connections."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        wall_clock: Callable[[], float] = time.time,
        timeouts: Timeouts = Timeouts(),
        retry: RetryPolicy = RetryPolicy(),
        settle_s: Optional[float] = None,
        journal: Optional[JobJournal] = None,
        key_file_hint: str = DEFAULT_KEY_FILE_HINT,
        max_seed_moves: int = 3,
        max_ambiguous_creates: int = 3,
        clock_slack_s: float = 2.0,
        unknown_skew_s: float = 300.0,
        rng: Optional[random.Random] = None,
    ):
        scheme, host, _port = _origin(base_url)
        if scheme not in ("http", "https") or not host:
            raise ValueError(f"The Astria API URL {base_url!r} must start with https:// (check ASTRIA_API_URL).")
        if scheme == "http" and host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"The Astria API URL {base_url!r} is plain http: the API key would travel unencrypted. "
                             "Use https:// (plain http is allowed only for a local test server).")
        if not isinstance(api_key, str) or not api_key.strip():
            raise AstriaAuthError(f"No Astria API key: set ASTRIA_API_KEY or the key file {key_file_hint}.")
        if any(ch.isspace() or ord(ch) < 32 for ch in api_key.strip()) or api_key.strip() != api_key:
            raise AstriaAuthError("The Astria API key contains spaces or line breaks; check ASTRIA_API_KEY or the key "
                                  f"file {key_file_hint}.")
        self.base_url = base_url.rstrip("/")
        self._key = _SecretKey(api_key)
        self._clock = clock
        self._sleep_fn = sleep
        self._wall_clock = wall_clock
        self.timeouts = timeouts
        self.retry = retry
        self.settle_s = settle_seconds_from_env() if settle_s is None else float(settle_s)
        self.journal = journal if journal is not None else JobJournal(None, wall_clock=wall_clock)
        self.key_file_hint = key_file_hint
        self.max_seed_moves = max_seed_moves
        self.max_ambiguous_creates = max_ambiguous_creates
        self.clock_slack_s = clock_slack_s
        self.unknown_skew_s = unknown_skew_s
        self._rng = rng or random.Random()
        self._session: Optional[aiohttp.ClientSession] = None
        self._server_offset_s: Optional[float] = None  # server wall time minus ours, from Date headers
        self._reserved_seeds: dict[str, dict[str, int]] = {}  # group -> {running job key: seed}
        self._active_keys: set[str] = set()

    def __repr__(self) -> str:
        return f"AstriaClient(base_url={self.base_url!r}, api_key='***')"

    async def __aenter__(self) -> "AstriaClient":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session (safe to call twice)."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ---- transport --------------------------------------------------------------------------------------
    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No cookies and no proxy settings from the environment: nothing but our own headers leaves.
            self._session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), trust_env=False)
        return self._session

    def _scrub(self, text: str) -> str:
        """Remove the key from text that came from elsewhere (a server echoing headers must not leak it)."""
        return text.replace(self._key.reveal(), "***") if text else text

    def _server_text(self, body: bytes) -> str:
        """Return the error a server sent, as readable text (JSON in any shape, plain text, HTML), key removed."""
        payload = _json_or_none(body)
        if isinstance(payload, dict):
            for name in ("error", "errors", "message"):
                if payload.get(name):
                    payload = payload[name]
                    break
            text = _readable(payload)
        elif isinstance(payload, (list, str)):
            text = _readable(payload)
        else:
            text = _plain_text(body)
        text = self._scrub(text)  # before cutting, so no part of the key survives at the cut
        return text if len(text) <= SERVER_TEXT_CHARS else text[:SERVER_TEXT_CHARS - 3] + "..."

    def _note_server_date(self, headers: Mapping[str, str]) -> None:
        date = headers.get("Date")
        if not date:
            return
        try:
            server_now = parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            return
        # Date is truncated to the second and stamped before we receive it, so this never overestimates the
        # server's time: our own new prompt can never look "older than the request".
        self._server_offset_s = server_now - self._wall_clock()

    def _server_time(self, our_wall_time: float) -> float:
        """Return a lower bound of the server's clock at one of our wall-clock instants."""
        if self._server_offset_s is None:
            return our_wall_time - self.unknown_skew_s
        return our_wall_time + self._server_offset_s

    async def _api_call(self, method: str, path: str, *, params=None, data=None, timeout_s: float) -> _Answer:
        headers = {"Authorization": f"Bearer {self._key.reveal()}", "Accept": "application/json"}
        timeout = aiohttp.ClientTimeout(total=timeout_s, connect=self.timeouts.connect_s)
        async with self._http().request(method, self.base_url + path, params=params, data=data, headers=headers,
                                        allow_redirects=False, timeout=timeout) as response:
            body = await response.content.read(MAX_API_BODY_BYTES)
            answer = _Answer(response.status, dict(response.headers), body)
        self._note_server_date(answer.headers)
        logger.debug("%s %s -> %d", method, path, answer.status)
        return answer

    async def _fetch_image(self, url: str, max_bytes: int) -> _Answer:
        # No Authorization header, ever: image URLs live on another host (and may be presigned).
        timeout = aiohttp.ClientTimeout(total=self.timeouts.download_s, connect=self.timeouts.connect_s)
        async with self._http().get(url, timeout=timeout, headers={"Accept": "image/*"}) as response:
            if response.status != 200:
                return _Answer(response.status, dict(response.headers), await response.content.read(65536))
            length = response.content_length
            if length is not None and length > max_bytes:
                raise AstriaDownloadError(f"The image at {_loggable_url(url)} is {length} bytes, more than the "
                                          f"{max_bytes} allowed.")
            buffer = bytearray()
            async for chunk in response.content.iter_chunked(256 * 1024):
                buffer.extend(chunk)
                if len(buffer) > max_bytes:
                    raise AstriaDownloadError(f"The image at {_loggable_url(url)} is larger than the {max_bytes} "
                                              "bytes allowed.")
            return _Answer(response.status, dict(response.headers), bytes(buffer))

    async def _until_cancelled(self, coro, cancelled: Optional[CancelCheck], on_cancel: Callable[[], Exception]):
        """Await a request, abandoning it within REQUEST_CANCEL_CHECK_S of cancelled() turning true."""
        task = asyncio.ensure_future(coro)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=REQUEST_CANCEL_CHECK_S)
                if done:
                    return task.result()
                if cancelled is not None and cancelled():
                    raise on_cancel()
        finally:
            if not task.done():
                task.cancel()
                try:
                    await task
                except BaseException:  # noqa: BLE001 - the request is being abandoned; its outcome is moot
                    pass

    def _retry_after_s(self, headers: Mapping[str, str]) -> Optional[float]:
        """Return the wait a Retry-After header asks for (seconds or an HTTP-date), at least MIN_RETRY_AFTER_S."""
        raw = headers.get("Retry-After")
        if not raw:
            return None
        try:
            seconds = float(raw)
        except ValueError:
            try:
                when = parsedate_to_datetime(raw).timestamp()
            except (TypeError, ValueError, IndexError, OverflowError):
                return None
            seconds = when - self._server_time(self._wall_clock())
        if math.isnan(seconds):
            return None
        return max(MIN_RETRY_AFTER_S, seconds)

    def _next_wait(self, answer: Optional[_Answer], retries: int) -> tuple[float, str]:
        """Return the wait before the next try and where it came from (Retry-After or the backoff)."""
        wait_s = self._retry_after_s(answer.headers) if answer is not None else None
        if wait_s is not None:
            return wait_s, "Retry-After"
        return self.retry.backoff_s(retries, self._rng), "backoff"

    def _past_deadline(self, step: str, prompt_id: Optional[int], deadline: float, problem: str, wait_s: float,
                       source: str, tail: str = "") -> AstriaTimeout:
        """The error for a retry whose wait would end after the deadline."""
        if source == "Retry-After" and self._clock() + wait_s > deadline:
            shown = "a very long time" if not math.isfinite(wait_s) or wait_s > 1e9 else f"{wait_s:.0f} s"
            detail = (f"the last answer was {problem} and asked to wait {shown} (Retry-After), past the deadline"
                      f"{tail}; try again later")
        else:
            detail = f"the last answer was {problem}{tail}"
        return self._timeout(step, prompt_id, deadline, detail)

    async def _get_with_retries(self, fetch: Callable[[], Awaitable[_Answer]], *, step: str, deadline: float,
                                cancelled: Optional[CancelCheck], prompt_id: Optional[int],
                                unusable: Optional[Callable[[_Answer], Optional[str]]] = None) -> _Answer:
        """Run a GET until it answers something other than 429/5xx/a connection error, within the deadline.

        `unusable(answer)` may name a problem with an otherwise fine answer (a proxy's HTML page instead of JSON):
        such answers are retried like a 5xx, since a GET can always be sent again.
        """
        def on_cancel():
            return AstriaCancelled(prompt_id)

        retries = 0
        while True:
            try:
                answer = await self._until_cancelled(fetch(), cancelled, on_cancel)
                problem = None
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                answer, problem = None, f"connection problem ({type(exc).__name__})"
            if answer is not None:
                if answer.status == 429 or answer.status >= 500:
                    problem = f"HTTP {answer.status}"
                else:
                    problem = unusable(answer) if unusable is not None else None
                    if problem is None:
                        return answer
            wait_s, source = self._next_wait(answer, retries)
            if self._clock() + wait_s > deadline:
                raise self._past_deadline(step, prompt_id, deadline, problem, wait_s, source)
            logger.warning("Astria: %s got %s; retrying in %.1f s (retry %d).", step, problem, wait_s, retries + 1)
            retries += 1
            await _sleep_checked(self._sleep_fn, wait_s, cancelled, on_cancel)

    def _timeout(self, step: str, prompt_id: Optional[int], deadline: float, detail: str = "") -> AstriaTimeout:
        where = f" (prompt {prompt_id})" if prompt_id is not None and f"prompt {prompt_id}" not in step else ""
        text = f"Astria did not finish {step}{where} before the deadline"
        if detail:
            text += f"; {detail}"
        text += "."
        if prompt_id is not None:
            text += (f" Nothing is lost: prompt {prompt_id} keeps running on Astria and stays in your Astria gallery; "
                     "running the same image again resumes it without paying twice.")
        return AstriaTimeout(text, step, prompt_id)

    def _raise_for_api_status(self, answer: _Answer, what: str, prompt_id: Optional[int] = None) -> None:
        """Turn a non-2xx API answer into the error the user should see."""
        status = answer.status
        if 200 <= status < 300:
            return
        if status == 401:
            raise AstriaAuthError(f"Astria rejected the API key (HTTP 401) while {what}: set ASTRIA_API_KEY or the "
                                  f"key file {self.key_file_hint}.")
        if 300 <= status < 400:
            raise AstriaProtocolError(
                f"Astria's API answered HTTP {status} (a redirect) while {what}. Redirects are not followed so the "
                f"API key only ever goes to {self.base_url}; check ASTRIA_API_URL.")
        text = self._server_text(answer.body)
        if status == 404:
            if prompt_id is not None:
                raise AstriaNotFound(
                    f"Astria has no prompt {prompt_id} (HTTP 404) while {what}: it was deleted on Astria, or it "
                    f"belongs to another account or API key ({text or 'no details'}). It cannot be resumed: change "
                    "the seed (or the prompt) to send a new, paid request.", status, text)
            raise AstriaNotFound(f"Astria does not know the tune or address (HTTP 404) while {what}: "
                                 f"{text or 'no details'}. Check the tune id and ASTRIA_API_URL.", status, text)
        if status == 422:
            raise AstriaRequestRejected(f"Astria refused the request while {what} (HTTP 422): {text}", status, text)
        raise AstriaRequestRejected(f"Astria answered HTTP {status} while {what}: {text or 'no details'}.", status, text)

    async def _get_json(self, path: str, *, params=None, step: str, deadline: Optional[float] = None,
                        cancelled: Optional[CancelCheck] = None, prompt_id: Optional[int] = None,
                        shape: Callable[[Any], bool] = lambda payload: True, shape_text: str = "JSON") -> Any:
        """GET a JSON answer; a 2xx that is not JSON of the expected shape (a proxy's page) is retried."""
        if deadline is None:
            deadline = self._clock() + self.retry.deadline_s

        def unusable(answer: _Answer) -> Optional[str]:
            if not 200 <= answer.status < 300:
                return None
            payload = _json_or_none(answer.body)
            if payload is not None and shape(payload):
                return None
            return f"HTTP {answer.status} but not {shape_text} ({self._server_text(answer.body)[:120]!r})"

        answer = await self._get_with_retries(
            lambda: self._api_call("GET", path, params=params, timeout_s=self.timeouts.api_s),
            step=step, deadline=deadline, cancelled=cancelled, prompt_id=prompt_id, unusable=unusable)
        self._raise_for_api_status(answer, step, prompt_id)
        return _json_or_none(answer.body)

    # ---- the API ----------------------------------------------------------------------------------------
    async def get_prompt(self, prompt_id: int, *, deadline: Optional[float] = None,
                         cancelled: Optional[CancelCheck] = None) -> dict:
        """Return one prompt object (`GET /prompts/:id.json`), retrying 429/5xx/connection errors."""
        payload = await self._get_json(f"/prompts/{int(prompt_id)}.json", step=f"reading prompt {prompt_id}",
                                       deadline=deadline, cancelled=cancelled, prompt_id=int(prompt_id),
                                       shape=lambda answer: _as_prompt(answer) is not None,
                                       shape_text="JSON with a prompt object")
        return _as_prompt(payload)

    async def list_prompts(self, tune_id: int, before_id: Optional[int] = None, limit: int = LIST_PAGE_SIZE, *,
                           cancelled: Optional[CancelCheck] = None) -> list[dict]:
        """Return one page of the tune's prompts, newest first (`GET /tunes/:id/prompts`)."""
        params = {"limit": str(max(1, min(120, int(limit))))}
        if before_id is not None:
            params["before_id"] = str(int(before_id))
        payload = await self._get_json(f"/tunes/{int(tune_id)}/prompts", params=params,
                                       step=f"listing the prompts of tune {tune_id}", cancelled=cancelled,
                                       shape=lambda answer: isinstance(answer, list), shape_text="a JSON list")
        return [item for item in payload if isinstance(item, dict)]

    async def create_prompt(self, tune_id: int, fields: Mapping[str, Any], image_png: Optional[bytes], *,
                            cancelled: Optional[CancelCheck] = None) -> dict:
        """POST one prompt (multipart `prompt[...]`, file `prompt[input_image]`); never re-sent after it may have landed.

        Retries only what certainly created nothing: 429 (after Retry-After) and connections that never opened.
        Raises AstriaAmbiguousCreate when the prompt may exist (5xx, timeout, dropped connection, unreadable 2xx),
        and AstriaCancelled with `maybe_created` when Cancel abandons the request while it is in flight.
        """
        if "seed" not in fields:
            raise ValueError("Every Astria create carries an explicit seed (fields['seed']); none was given.")
        _check_seed(int(fields["seed"]))
        deadline = self._clock() + self.retry.deadline_s
        step = f"creating a prompt on tune {tune_id}"
        retries = 0
        while True:
            if cancelled is not None and cancelled():
                raise AstriaCancelled(None)
            try:
                # Cancel abandons the upload at once; the request may have reached Astria, so the caller looks
                # the prompt up on the next run instead of trusting that nothing was created.
                answer = await self._until_cancelled(
                    self._api_call("POST", f"/tunes/{int(tune_id)}/prompts", data=self._create_form(fields, image_png),
                                   timeout_s=self.timeouts.create_s),
                    cancelled, lambda: AstriaCancelled(None, maybe_created=True))
            except aiohttp.ClientConnectorError as exc:
                # The connection never opened, so nothing was sent: safe to try again.
                answer, problem = None, f"could not connect ({type(exc).__name__})"
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                raise AstriaAmbiguousCreate(
                    f"The create request on tune {tune_id} failed after it was sent ({type(exc).__name__}); "
                    "the prompt may exist on Astria.") from exc
            else:
                if 200 <= answer.status < 300:  # 201 Created, 200 (idempotency, a list), or another success
                    prompt = _as_prompt(_json_or_none(answer.body))
                    if prompt is None:
                        raise AstriaAmbiguousCreate(f"Astria accepted a create on tune {tune_id} but its answer "
                                                    "could not be read; the prompt may exist.")
                    return prompt
                if answer.status == 429:
                    problem = "HTTP 429 (rate limited)"
                elif answer.status >= 500 or answer.status == 408:
                    raise AstriaAmbiguousCreate(f"Astria answered HTTP {answer.status} to a create on tune {tune_id}; "
                                                "the prompt may still have been saved.")
                else:
                    self._raise_for_api_status(answer, step)
                    raise AstriaProtocolError(f"Astria answered HTTP {answer.status} to a create on tune {tune_id}.")
            wait_s, source = self._next_wait(answer, retries)
            if self._clock() + wait_s > deadline:
                raise self._past_deadline(step, None, deadline, problem, wait_s, source, "; nothing was created")
            logger.warning("Astria: %s got %s; trying again in %.1f s.", step, problem, wait_s)
            retries += 1
            await _sleep_checked(self._sleep_fn, wait_s, cancelled, lambda: AstriaCancelled(None))

    @staticmethod
    def _create_form(fields: Mapping[str, Any], image_png: Optional[bytes]) -> aiohttp.FormData:
        form = aiohttp.FormData(default_to_multipart=True)  # multipart even without a file, as the spec says
        for name, value in fields.items():
            if value is not None:
                form.add_field(f"prompt[{name}]", form_value(value))
        if image_png is not None:
            form.add_field("prompt[input_image]", image_png, filename="input.png", content_type="image/png")
        return form

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
            prompt = await self.get_prompt(prompt_id, deadline=deadline_at, cancelled=cancelled)
            user_error = prompt.get("user_error")
            if user_error:
                text = self._scrub(str(user_error))
                raise AstriaPromptFailed(f"Astria could not run prompt {prompt_id}: {text}", prompt_id, text)
            images = prompt.get("images") or []
            if images:
                urls = [item.get("url") if isinstance(item, dict) else item
                        for item in (images if isinstance(images, list) else [images])]
                if not isinstance(images, list) or not all(isinstance(url, str) and url for url in urls):
                    raise AstriaProtocolError(
                        f"Prompt {prompt_id} lists images that are not URLs ({self._scrub(str(images))[:120]!r}). "
                        f"The prompt is kept; running the same image again reads it again without paying.")
                return urls
            now = self._clock()
            if on_poll is not None:
                on_poll(now - started)
            if now >= deadline_at:
                raise self._timeout(step, prompt_id, deadline_at, f"it was still without images after {limit_s:.0f} s")
            await _sleep_checked(self._sleep_fn, min(poll_interval, deadline_at - now), cancelled,
                                 lambda: AstriaCancelled(prompt_id))

    async def download(self, url: str, *, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
                       max_pixels: int = DEFAULT_MAX_PIXELS, deadline: Optional[float] = None,
                       cancelled: Optional[CancelCheck] = None, prompt_id: Optional[int] = None) -> bytes:
        """Download an image URL without the API key; checks size, content type and that it decodes.

        Every AstriaDownloadError says what to do; with `prompt_id` it says that the prompt is kept and a rerun
        downloads it again without paying.
        """
        try:
            return await self._download_checked(url, max_bytes, max_pixels, deadline, cancelled, prompt_id)
        except AstriaDownloadError as exc:
            if prompt_id is None:
                raise
            raise AstriaDownloadError(
                f"{exc} Nothing is lost: prompt {prompt_id} is kept on Astria and in the job journal; running the "
                "same image again reads it again for fresh image links and downloads them without paying.") from None

    async def _download_checked(self, url: str, max_bytes: int, max_pixels: int, deadline: Optional[float],
                                cancelled: Optional[CancelCheck], prompt_id: Optional[int]) -> bytes:
        shown = self._scrub(_loggable_url(url))
        scheme, host, _port = _origin(url)
        if scheme not in ("http", "https") or not host:
            raise AstriaDownloadError(f"Astria gave an image address that is not http(s): {shown!r}.")
        deadline_at = self._clock() + (self.retry.deadline_s if deadline is None else float(deadline))
        step = f"downloading {shown}"
        answer = await self._get_with_retries(lambda: self._fetch_image(url, max_bytes), step=step,
                                              deadline=deadline_at, cancelled=cancelled, prompt_id=prompt_id)
        if answer.status in (401, 403, 404, 410):
            raise AstriaDownloadError(f"Downloading {shown} was refused with HTTP {answer.status}: Astria's image "
                                      "links are signed and expire (or the image was deleted).")
        if answer.status != 200:
            raise AstriaDownloadError(f"Downloading {shown} failed with HTTP {answer.status}.")
        content_type = answer.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if not content_type.startswith("image/") and content_type not in IMAGE_BYTE_TYPES:
            raise AstriaDownloadError(f"{shown} answered {content_type}, not an image (an error page?).")
        # The bytes decide, whatever the header claims: image/png may hold a JPEG, octet-stream a PNG.
        check_image_bytes(answer.body, max_pixels=max_pixels)
        return answer.body

    # ---- exactly-once jobs ------------------------------------------------------------------------------
    async def find_prompt(self, tune_id: int, text: str, seed: int, negative_prompt: Optional[str], *,
                          since_wall: float, exclude: set[int], cancelled: Optional[CancelCheck] = None
                          ) -> Optional[dict]:
        """Look a prompt up by (text, seed, negative prompt) among unclaimed prompts created since `since_wall`."""
        window_start = self._server_time(since_wall) - self.clock_slack_s
        wanted = (normalized_text(text), int(seed), normalized_text(negative_prompt))
        matches: list[dict] = []
        before_id = None
        for _page in range(LIST_MAX_PAGES):
            page = await self.list_prompts(tune_id, before_id=before_id, limit=LIST_PAGE_SIZE, cancelled=cancelled)
            reached_older = False
            for prompt in page:
                created = _parse_time(prompt.get("created_at"))
                if created is not None and created < window_start:
                    reached_older = True
                    continue
                if int(prompt["id"]) in exclude:
                    continue
                try:
                    found = (normalized_text(prompt.get("text")), int(prompt.get("seed")),
                             normalized_text(prompt.get("negative_prompt")))
                except (TypeError, ValueError):
                    continue
                if found == wanted:
                    matches.append(prompt)
            if reached_older or len(page) < LIST_PAGE_SIZE:
                break
            before_id = min(int(prompt["id"]) for prompt in page)
        if len(matches) > 1:
            logger.warning("Astria lists %d unclaimed prompts matching seed %d on tune %s; taking the oldest.",
                           len(matches), seed, tune_id)
        return min(matches, key=lambda prompt: int(prompt["id"])) if matches else None

    def _refusal_reason(self, prompt: dict, started_wall: float) -> Optional[str]:
        prompt_id = int(prompt["id"])
        if self.journal.prompt_owner(prompt_id) is not None:
            return f"prompt {prompt_id} already belongs to another request in the job journal"
        created = _parse_time(prompt.get("created_at"))
        if created is not None and created < self._server_time(started_wall) - self.clock_slack_s:
            return (f"prompt {prompt_id} was created at {prompt.get('created_at')}, before this request began "
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
                prompt = await self.create_prompt(tune_id, {**fields, "seed": attempt.seed}, image_png,
                                                  cancelled=cancelled)
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
            self.journal.record("refused", attempt, prompt_id=int(prompt["id"]), reason=reason)
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
                               settle_s: float, cancelled, report) -> Optional[dict]:
        report("settling", f"Astria's answer to the create was lost; waiting {settle_s:.0f} s, then looking for the "
                           "prompt instead of paying twice")
        await _sleep_checked(self._sleep_fn, settle_s, cancelled, lambda: AstriaCancelled(None, maybe_created=True))
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

    def _claim(self, attempt: Attempt, prompt: dict, report, how: str) -> int:
        prompt_id = int(prompt["id"])
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
        _check_seed(seed)
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
