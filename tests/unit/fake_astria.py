"""A fake Astria API for tests: prompts create/list/get with injectable faults, images on a second origin.

Tests start it on 127.0.0.1 with port 0 (`await fake.start()`) and stop it (`await fake.stop()`). Time comes from
a FakeClock the test also hands to the client, so every wait is virtual and request gaps are exact. Every
request is recorded (method, path, query, virtual time, which headers were present, the status answered).
"""
from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import formatdate
from typing import Any, Callable, Optional

from aiohttp import web
from PIL import Image

EPOCH = 1_700_000_000.0  # the fake's wall clock is EPOCH + the virtual clock


class FakeClock:
    """Virtual time shared by the client and the fake server: sleeping advances it instantly."""

    def __init__(self, start: float = 0.0):
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        """Return the virtual wall-clock time (seconds since the Unix epoch)."""
        return EPOCH + self.now

    async def sleep(self, seconds: float) -> None:
        """Advance virtual time by `seconds` and let other tasks run."""
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


@dataclass
class Scripted:
    """One canned answer, served instead of the normal one (after the auth check) by a route's script."""

    status: int = 200
    body: Any = None  # bytes/str as is, dict/list as JSON, or a callable of the saved prompt's view (creates)
    headers: dict = field(default_factory=dict)
    content_type: Optional[str] = "application/json"
    save: bool = False  # creates only: save the prompt first, as a server that fails after saving does
    drop: bool = False  # close the connection instead of answering
    hang: bool = False  # never answer (until the fake stops)
    truncate_to: Optional[int] = None  # announce the whole body's length, send only this many bytes, then close


@dataclass
class Faults:
    """What the fake does wrong; counters count down as faults are served."""

    rate_limit_every_other: bool = False  # 429 on the 1st, 3rd, 5th ... API request
    retry_after_s: float = 7.0
    fail_500_times: int = 0  # 500 on the next N matching requests
    fail_500_methods: tuple = ("GET",)
    create_504_after_save: int = 0  # the prompt is saved, then the create answers 504
    create_500_before_save: int = 0  # nothing is saved, the create answers 500
    drop_create_after_save: int = 0  # the prompt is saved, then the connection is dropped
    drop_get_times: int = 0  # GETs whose connection is dropped without an answer
    reject_422: Optional[str] = None  # creates answer 422 with this `error`
    echo_auth_in_errors: bool = False  # a careless server that puts the Authorization header in its error text
    user_error: Optional[str] = None  # prompts fail with this `user_error` ...
    user_error_seeds: tuple = ()  # ... only those created with one of these seeds (as sent), when given
    never_finish: bool = False
    render_s: float = 10.0  # virtual seconds from create until images appear
    idempotent: bool = False  # equal attributes (the image ignored) answer the earlier prompt
    answer_with_prompt_id: Optional[int] = None  # creates answer this existing prompt ...
    answer_with_prompt_times: int = 10**9  # ... this many times
    hang_gets: bool = False  # GET /prompts/:id.json never answers (until the fake stops)
    redirect_gets: bool = False  # GET /prompts/:id.json answers 302 to the image origin
    image_content_type: str = "image/png"
    images_per_prompt: int = 1
    create_script: list = field(default_factory=list)  # Scripted answers for the next creates, in order
    poll_script: list = field(default_factory=list)  # ... for the next GET /prompts/:id.json
    image_script: list = field(default_factory=list)  # ... for the next image downloads
    image_redirect_to: Optional[str] = None  # image URLs answer 302 to this address


@dataclass
class RecordedRequest:
    """One request as the fake saw it."""

    origin: str  # "api" or "images"
    method: str
    path: str
    query: dict
    t: float
    has_auth: bool
    headers: tuple  # names of the headers present (never their values)
    fields: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)  # form field name -> byte size
    status: Optional[int] = None


@dataclass
class FakePrompt:
    """A prompt saved on the fake."""

    id: int
    tune_id: int
    attrs: dict  # the `prompt[...]` string fields without `prompt[]`
    created_t: float
    user_error: Optional[str] = None


def png_bytes(size=(8, 8), color=(200, 40, 40)) -> bytes:
    """Return a small PNG image."""
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


class FakeAstria:
    """The fake API server plus its image server (a second origin)."""

    def __init__(self, clock: FakeClock, api_key: str, faults: Optional[Faults] = None, image: Optional[bytes] = None,
                 image_for: Optional[Callable[[FakePrompt], bytes]] = None):
        self.clock = clock
        self._expected_auth = f"Bearer {api_key}"
        self.faults = faults or Faults()
        self.image = image if image is not None else png_bytes()
        self.image_for = image_for  # when set, each prompt's images come from image_for(prompt)
        self.prompts: dict[int, FakePrompt] = {}
        self.requests: list[RecordedRequest] = []
        self.image_requests: list[RecordedRequest] = []
        self._next_id = 1000
        self._api_count = 0
        self._runners: list[web.AppRunner] = []
        self._release_hung = asyncio.Event()
        self.base_url = ""
        self.images_url = ""

    async def start(self) -> "FakeAstria":
        """Start both servers on 127.0.0.1, each on a free port."""
        api = web.Application()
        api.router.add_post("/tunes/{tune}/prompts", self._create)
        api.router.add_get("/tunes/{tune}/prompts", self._list)
        api.router.add_get("/prompts/{pid}.json", self._get)
        images = web.Application()
        images.router.add_get("/img/{pid}/{n}.png", self._image)
        images.router.add_get("/echo", self._echo)
        images.router.add_get("/moved/{name}", self._moved)
        self.base_url = await self._serve(api)
        self.images_url = await self._serve(images)
        return self

    async def _serve(self, app: web.Application) -> str:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._runners.append(runner)
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    async def stop(self) -> None:
        """Stop both servers."""
        self._release_hung.set()
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()

    async def __aenter__(self) -> "FakeAstria":
        return await self.start()

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()

    # ---- test helpers ---------------------------------------------------------------------------------------
    def add_prompt(self, tune_id: int, attrs: dict, *, created_t: float) -> int:
        """Save a prompt as if created at virtual time `created_t` (for idempotency cases); returns its id."""
        prompt = FakePrompt(self._new_id(), tune_id, {k: str(v) for k, v in attrs.items()}, created_t)
        self.prompts[prompt.id] = prompt
        return prompt.id

    def api(self, method: Optional[str] = None, prefix: str = "") -> list[RecordedRequest]:
        """Return the recorded API requests, optionally only one method and a path prefix."""
        return [r for r in self.requests if (method is None or r.method == method) and r.path.startswith(prefix)]

    def creates(self) -> list[RecordedRequest]:
        """Return the recorded create requests."""
        return [r for r in self.requests if r.method == "POST"]

    # ---- internals ------------------------------------------------------------------------------------------
    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _record(self, origin: str, request: web.Request) -> RecordedRequest:
        record = RecordedRequest(origin, request.method, request.path, dict(request.query), self.clock(),
                                 "Authorization" in request.headers, tuple(request.headers.keys()))
        (self.requests if origin == "api" else self.image_requests).append(record)
        return record

    def _json(self, record: RecordedRequest, payload, status: int = 200, headers: Optional[dict] = None):
        record.status = status
        all_headers = {"Date": formatdate(self.clock.wall(), usegmt=True)}
        all_headers.update(headers or {})
        return web.json_response(payload, status=status, headers=all_headers)

    def _drop(self, record: RecordedRequest, request: web.Request):
        record.status = 0
        request.transport.close()
        raise asyncio.CancelledError()

    async def _serve_scripted(self, record: RecordedRequest, request: web.Request, answer: Scripted, view=None):
        """Answer with a Scripted reply (JSON, text, HTML, bytes; dropped or truncated on demand)."""
        if answer.drop:
            self._drop(record, request)
        if answer.hang:
            await self._release_hung.wait()
        body = answer.body(view) if callable(answer.body) else answer.body
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        elif isinstance(body, str):
            body = body.encode()
        elif body is None:
            body = b""
        record.status = answer.status
        headers = {"Date": formatdate(self.clock.wall(), usegmt=True), **answer.headers}
        if answer.content_type is not None:
            headers["Content-Type"] = answer.content_type
        if answer.truncate_to is None:
            return web.Response(body=body, status=answer.status, headers=headers)
        response = web.StreamResponse(status=answer.status, headers=headers)
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[:answer.truncate_to])
        request.transport.close()
        raise asyncio.CancelledError()

    def _gate(self, record: RecordedRequest, request: web.Request):
        """Auth and rate limit, shared by every API route; returns an answer when the request stops here."""
        if request.headers.get("Authorization") != self._expected_auth:
            return self._json(record, {"error": "Unauthorized"}, 401)
        self._api_count += 1
        if self.faults.rate_limit_every_other and self._api_count % 2 == 1:
            return self._json(record, {"error": "Too many requests"}, 429,
                              {"Retry-After": str(int(self.faults.retry_after_s))})
        if self.faults.fail_500_times > 0 and request.method in self.faults.fail_500_methods:
            self.faults.fail_500_times -= 1
            return self._json(record, {"error": "Internal server error"}, 500)
        return None

    def _view(self, prompt: FakePrompt) -> dict:
        finished = not self.faults.never_finish and self.clock() >= prompt.created_t + self.faults.render_s
        images = []
        if finished and not prompt.user_error:
            images = [f"{self.images_url}/img/{prompt.id}/{n}.png?sig=token{n}"
                      for n in range(self.faults.images_per_prompt)]
        created_wall = self.clock.wall() - (self.clock() - prompt.created_t)  # EPOCH + created_t on a FakeClock
        created_at = datetime.fromtimestamp(created_wall, tz=timezone.utc)
        view = {"id": prompt.id, "tune_id": prompt.tune_id, "text": prompt.attrs.get("text"),
                "negative_prompt": prompt.attrs.get("negative_prompt", ""),
                "seed": int(prompt.attrs["seed"]) if "seed" in prompt.attrs else None,
                "created_at": created_at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "images": images, "user_error": prompt.user_error if finished else None}
        view.update({k: v for k, v in prompt.attrs.items() if k not in view})
        return view

    async def _create(self, request: web.Request):
        record = self._record("api", request)
        form = await request.post()  # read the whole body first: faults below happen after it was sent
        for name, value in form.items():
            if hasattr(value, "file"):
                record.files[name] = len(value.file.read())
            else:
                record.fields[name] = value
        stop = self._gate(record, request)
        if stop is not None:
            return stop
        faults = self.faults
        if faults.create_script:
            answer = faults.create_script.pop(0)
            view = None
            if answer.save:
                view = self._view(self._save(int(request.match_info["tune"]), record))
            return await self._serve_scripted(record, request, answer, view)
        if faults.reject_422 is not None:
            text = faults.reject_422
            if faults.echo_auth_in_errors:
                text += f" (request had {request.headers.get('Authorization')})"
            return self._json(record, {"error": text}, 422)
        if faults.create_500_before_save > 0:
            faults.create_500_before_save -= 1
            return self._json(record, {"error": "Internal server error"}, 500)
        tune_id = int(request.match_info["tune"])
        attrs = {name[len("prompt["):-1]: value for name, value in record.fields.items()
                 if name.startswith("prompt[") and name.endswith("]")}
        if not attrs.get("text"):
            return self._json(record, {"error": "text can't be blank"}, 422)
        if faults.answer_with_prompt_id is not None and faults.answer_with_prompt_times > 0:
            faults.answer_with_prompt_times -= 1
            return self._json(record, self._view(self.prompts[faults.answer_with_prompt_id]), 200)
        if faults.idempotent:
            for earlier in self.prompts.values():
                if earlier.tune_id == tune_id and earlier.attrs == attrs:
                    return self._json(record, self._view(earlier), 200)
        fails = not faults.user_error_seeds or attrs.get("seed") in {str(s) for s in faults.user_error_seeds}
        prompt = FakePrompt(self._new_id(), tune_id, attrs, self.clock(),
                            user_error=faults.user_error if fails else None)
        self.prompts[prompt.id] = prompt
        if faults.create_504_after_save > 0:
            faults.create_504_after_save -= 1
            return self._json(record, {"error": "Gateway timeout"}, 504)
        if faults.drop_create_after_save > 0:
            faults.drop_create_after_save -= 1
            self._drop(record, request)
        return self._json(record, self._view(prompt), 201)

    def _save(self, tune_id: int, record: RecordedRequest) -> FakePrompt:
        attrs = {name[len("prompt["):-1]: value for name, value in record.fields.items()
                 if name.startswith("prompt[") and name.endswith("]")}
        prompt = FakePrompt(self._new_id(), tune_id, attrs, self.clock())
        self.prompts[prompt.id] = prompt
        return prompt

    async def _list(self, request: web.Request):
        record = self._record("api", request)
        stop = self._gate(record, request)
        if stop is not None:
            return stop
        tune_id = int(request.match_info["tune"])
        limit = min(120, int(request.query.get("limit", 20)))
        before_id = int(request.query["before_id"]) if "before_id" in request.query else None
        found = [p for p in sorted(self.prompts.values(), key=lambda p: -p.id)
                 if p.tune_id == tune_id and (before_id is None or p.id < before_id)]
        return self._json(record, [self._view(p) for p in found[:limit]])

    async def _get(self, request: web.Request):
        record = self._record("api", request)
        stop = self._gate(record, request)
        if stop is not None:
            return stop
        if self.faults.drop_get_times > 0:
            self.faults.drop_get_times -= 1
            self._drop(record, request)
        if self.faults.poll_script:
            prompt = self.prompts.get(int(request.match_info["pid"]))
            answer = self.faults.poll_script.pop(0)
            return await self._serve_scripted(record, request, answer, self._view(prompt) if prompt else None)
        if self.faults.hang_gets:
            await self._release_hung.wait()
            return self._json(record, {"error": "Service unavailable"}, 503)
        if self.faults.redirect_gets:
            record.status = 302
            raise web.HTTPFound(f"{self.images_url}/echo")
        prompt = self.prompts.get(int(request.match_info["pid"]))
        if prompt is None:
            return self._json(record, {"error": "Not found"}, 404)
        return self._json(record, self._view(prompt))

    async def _image(self, request: web.Request):
        record = self._record("images", request)
        if self.faults.image_redirect_to is not None:
            record.status = 302
            raise web.HTTPFound(self.faults.image_redirect_to)
        if self.faults.image_script:
            return await self._serve_scripted(record, request, self.faults.image_script.pop(0))
        record.status = 200
        prompt = self.prompts.get(int(request.match_info["pid"]))
        body = self.image_for(prompt) if self.image_for is not None and prompt is not None else self.image
        return web.Response(body=body, content_type=self.faults.image_content_type)

    async def _moved(self, request: web.Request):
        record = self._record("images", request)
        record.status = 200
        return web.Response(body=self.image, content_type="image/png")

    async def _echo(self, request: web.Request):
        record = self._record("images", request)
        record.status = 200
        return web.json_response({"id": 1, "images": []})


class RealClock(FakeClock):
    """Real time for a fake served to a real ComfyUI (host and server tiers): seconds since it was made."""

    def __init__(self):
        super().__init__()
        self._started = time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() - self._started

    def wall(self) -> float:
        """Return the real wall-clock time."""
        return time.time()


class FakeAstriaThread:
    """A FakeAstria on real time, served from its own thread and event loop, for callers without a loop of theirs."""

    def __init__(self, api_key: str, faults: Optional[Faults] = None, **fake_options):
        self.fake = FakeAstria(RealClock(), api_key, faults, **fake_options)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-astria", daemon=True)

    def start(self) -> FakeAstria:
        """Start the servers; returns the fake (its base_url, faults, prompts and requests)."""
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.fake.start(), self._loop).result(timeout=30)
        return self.fake

    def stop(self) -> None:
        """Stop the servers and the thread."""
        asyncio.run_coroutine_threadsafe(self.fake.stop(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()

    def __enter__(self) -> FakeAstria:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
