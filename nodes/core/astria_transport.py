"""HTTP to Astria's prompt API: the key, retries with backoff within deadlines, Retry-After, safe downloads.

Pure Python + aiohttp (shipped by ComfyUI); imports nothing from ComfyUI. The API key goes only into the
Authorization header of requests to the API's own origin, and never into a repr, a log line or an error.
The exactly-once job logic built on this lives in `astria_jobs.py`.
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
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping, Optional
from urllib.parse import urlsplit

import aiohttp

from .astria_errors import (
    AstriaAmbiguousCreate,
    AstriaAuthError,
    AstriaCancelled,
    AstriaDownloadError,
    AstriaNotFound,
    AstriaProtocolError,
    AstriaRequestRejected,
    AstriaTimeout,
)
from .astria_journal import form_value
from .spec_tables import SEED_MAX

logger = logging.getLogger("astria")

DEFAULT_BASE_URL = "https://api.astria.ai"
SEED_MODULUS = SEED_MAX + 1  # seeds wrap around Astria's range
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


def parse_time(text: Any) -> Optional[float]:
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


def check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_MODULUS:
        raise ValueError(f"seed {seed!r} is out of range: Astria seeds are whole numbers from 0 to {SEED_MODULUS - 1}.")
    return seed


async def sleep_checked(sleep, seconds: float, cancelled: Optional[CancelCheck], on_cancel: Callable[[], Exception]):
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
class AstriaTransport:
    """HTTP to Astria's API for one API key: retries within deadlines, Retry-After, safe downloads; use
    `async with` (or `await close()`) to release connections. `AstriaClient` adds the exactly-once jobs."""

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
        key_file_hint: str = DEFAULT_KEY_FILE_HINT,
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
        self.key_file_hint = key_file_hint
        self._rng = rng or random.Random()
        self._session: Optional[aiohttp.ClientSession] = None
        self._server_offset_s: Optional[float] = None  # server wall time minus ours, from Date headers

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r}, api_key='***')"

    async def __aenter__(self):
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
            await sleep_checked(self._sleep_fn, wait_s, cancelled, on_cancel)

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
        check_seed(int(fields["seed"]))
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
            await sleep_checked(self._sleep_fn, wait_s, cancelled, lambda: AstriaCancelled(None))

    @staticmethod
    def _create_form(fields: Mapping[str, Any], image_png: Optional[bytes]) -> aiohttp.FormData:
        form = aiohttp.FormData(default_to_multipart=True)  # multipart even without a file, as the spec says
        for name, value in fields.items():
            if value is not None:
                form.add_field(f"prompt[{name}]", form_value(value))
        if image_png is not None:
            form.add_field("prompt[input_image]", image_png, filename="input.png", content_type="image/png")
        return form

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
