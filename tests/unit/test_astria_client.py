"""The Astria client against a fake Astria server: retries, exactly-once creates, the journal and key safety.

Every test runs the real client over HTTP against tests/unit/fake_astria.py on 127.0.0.1, with virtual time
(FakeClock) shared by both, so waits of minutes take milliseconds and request gaps are exact.
"""
import asyncio
import json
import logging
import random
import time
import traceback
from email.utils import formatdate

import pytest

pytest.importorskip("aiohttp", reason="the Astria client needs aiohttp (ComfyUI's venv ships it)")
pytest.importorskip("PIL", reason="downloads are decode-checked with Pillow (ComfyUI's venv ships it)")

from comfyui_astria.nodes.core import astria_transport
from comfyui_astria.nodes.core.astria_errors import (
    AstriaAuthError,
    AstriaCancelled,
    AstriaDownloadError,
    AstriaDuplicateRefused,
    AstriaNotFound,
    AstriaPromptFailed,
    AstriaProtocolError,
    AstriaRequestRejected,
    AstriaTimeout,
)
from comfyui_astria.nodes.core.astria_jobs import AstriaClient
from comfyui_astria.nodes.core.astria_journal import JobJournal, job_key, seed_group
from comfyui_astria.nodes.core.astria_transport import RetryPolicy, Timeouts, check_image_bytes
from comfyui_astria.tests.unit.fake_astria import FakeAstria, FakeClock, Faults, Scripted, png_bytes

KEY = "sk-SENTINEL-4b1d9e77c0ffee"
TUNE = 690204
FIELDS = {"text": "masterpiece, best quality, highres --only_upscale", "negative_prompt": "worst quality",
          "denoising_strength": 0.1, "num_images": 1}
INPUT_PNG = png_bytes((16, 16), (10, 200, 10))


def make_client(fake, clock, journal=None, **overrides):
    options = dict(clock=clock, sleep=clock.sleep, wall_clock=clock.wall, settle_s=60.0, journal=journal,
                   retry=RetryPolicy(base_s=1.0, factor=2.0, jitter=0.0, deadline_s=600.0), rng=random.Random(0),
                   key_file_hint="user/__astria/api_key")
    options.update(overrides)
    return AstriaClient(fake.base_url, KEY, **options)


def scenario(body, faults=None, journal=None, server_key=KEY, clock=None, **client_options):
    """Run `body(fake, client, clock)` against a fresh fake server; returns what body returns."""
    clock = clock or FakeClock()

    async def main():
        async with FakeAstria(clock, server_key, faults) as fake:
            async with make_client(fake, clock, journal, **client_options) as client:
                return await body(fake, client, clock)

    return asyncio.run(main())


def timeline(fake):
    """Return (method, path, status, virtual time) of every API request the fake saw."""
    return [(r.method, r.path, r.status, r.t) for r in fake.requests]


# ---- the plain path -------------------------------------------------------------------------------------------
def test_run_job_creates_once_polls_every_5_s_and_downloads_without_the_key():
    statuses = []

    async def body(fake, client, clock):
        result = await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=42, on_status=lambda *s: statuses.append(s))
        return fake, result

    fake, result = scenario(body)
    prompt_id = result.prompt_id
    assert timeline(fake) == [
        ("POST", f"/tunes/{TUNE}/prompts", 201, 0.0),
        ("GET", f"/prompts/{prompt_id}.json", 200, 0.0),
        ("GET", f"/prompts/{prompt_id}.json", 200, 5.0),
        ("GET", f"/prompts/{prompt_id}.json", 200, 10.0),  # the fake renders in 10 s
    ]
    create = fake.creates()[0]
    assert create.fields == {"prompt[text]": FIELDS["text"], "prompt[negative_prompt]": "worst quality",
                             "prompt[denoising_strength]": "0.1", "prompt[num_images]": "1", "prompt[seed]": "42"}
    assert create.files == {"prompt[input_image]": len(INPUT_PNG)}
    assert all(r.has_auth for r in fake.requests)
    assert [(r.path, r.has_auth) for r in fake.image_requests] == [(f"/img/{prompt_id}/0.png", False)]
    assert result.images == [fake.image] and result.seed == 42 and not result.resumed
    assert [stage for stage, _ in statuses] == ["creating", "created", "rendering", "rendering", "downloading",
                                                "delivered"]


# ---- retries ----------------------------------------------------------------------------------------------------
def test_429_every_other_request_waits_retry_after_and_never_creates_twice():
    async def body(fake, client, clock):
        return fake, await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=1)

    fake, result = scenario(body, Faults(rate_limit_every_other=True, retry_after_s=7))
    pid = result.prompt_id
    assert timeline(fake) == [
        ("POST", f"/tunes/{TUNE}/prompts", 429, 0.0),
        ("POST", f"/tunes/{TUNE}/prompts", 201, 7.0),  # a 429 create saved nothing: sending again is safe
        ("GET", f"/prompts/{pid}.json", 429, 7.0),
        ("GET", f"/prompts/{pid}.json", 200, 14.0),
        ("GET", f"/prompts/{pid}.json", 429, 19.0),
        ("GET", f"/prompts/{pid}.json", 200, 26.0),
    ]
    assert len(fake.prompts) == 1 and result.images == [fake.image]


def test_500_twice_on_get_backs_off_exponentially_then_succeeds():
    async def body(fake, client, clock):
        return fake, await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=1)

    fake, result = scenario(body, Faults(fail_500_times=2, fail_500_methods=("GET",)))
    gets = [(r.status, r.t) for r in fake.api("GET")]
    assert gets[:3] == [(500, 0.0), (500, 1.0), (200, 3.0)]  # backoff 1 s, then 2 s
    assert len(fake.creates()) == 1 and result.images == [fake.image]


def test_backoff_jitter_stays_within_its_fraction():
    policy = RetryPolicy(base_s=30.0, factor=2.0, jitter=0.5, max_backoff_s=100.0)
    rng = random.Random(3)
    waits = [policy.backoff_s(n, rng) for n in range(4)]
    for wait, plain in zip(waits, [30.0, 60.0, 100.0, 100.0]):
        assert plain <= wait <= plain * 1.5
    assert len(set(waits)) == 4


def test_5xx_forever_stops_at_the_overall_deadline_naming_the_step_and_prompt():
    async def body(fake, client, clock):
        with pytest.raises(AstriaTimeout) as caught:
            await client.get_prompt(1234)
        return fake, caught.value, clock

    fake, error, clock = scenario(body, Faults(fail_500_times=1000),
                                  retry=RetryPolicy(base_s=1.0, jitter=0.0, deadline_s=20.0))
    assert [r.t for r in fake.requests] == [0.0, 1.0, 3.0, 7.0, 15.0]  # the next wait (16 s) would pass 20 s
    assert "reading prompt 1234" in str(error) and error.prompt_id == 1234 and "HTTP 500" in str(error)


def test_dropped_connections_on_get_are_retried():
    async def body(fake, client, clock):
        return fake, await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=1), clock

    # aiohttp itself resends an idempotent GET once on a dropped connection, so 4 drops make 2 failures we see.
    fake, result, clock = scenario(body, Faults(drop_get_times=4))
    gets = [(r.status, r.t) for r in fake.api("GET")]
    assert gets[:5] == [(0, 0.0), (0, 0.0), (0, 1.0), (0, 1.0), (200, 3.0)]
    assert len(fake.creates()) == 1 and result.images == [fake.image]


def test_422_is_not_retried_and_shows_the_server_error():
    journal = JobJournal(None)

    async def body(fake, client, clock):
        with pytest.raises(AstriaRequestRejected) as caught:
            await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=5)
        return fake, caught.value

    fake, error = scenario(body, Faults(reject_422="denoising_strength must be below 1"), journal=journal)
    assert timeline(fake) == [("POST", f"/tunes/{TUNE}/prompts", 422, 0.0)]
    assert "denoising_strength must be below 1" in str(error) and error.status == 422
    attempt = journal.latest_attempt(job_key(TUNE, FIELDS, INPUT_PNG))
    assert attempt.state == "failed"
    # Nothing was created with seed 5, so a corrected request may use it again.
    assert journal.seeds_taken(seed_group(TUNE, FIELDS["text"], FIELDS["negative_prompt"])) == set()


def test_user_error_is_a_clear_error_and_a_rerun_pays_nothing():
    journal = JobJournal(None)

    async def body(fake, client, clock):
        errors = []
        for _ in range(2):
            with pytest.raises(AstriaPromptFailed) as caught:
                await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=5)
            errors.append(caught.value)
        return fake, errors

    fake, errors = scenario(body, Faults(user_error="No face detected in the input image"), journal=journal)
    assert len(fake.creates()) == 1 and fake.image_requests == []
    for error in errors:
        assert "No face detected" in str(error) and str(error.prompt_id) in str(error)


def test_a_never_finishing_prompt_times_out_naming_the_step_and_prompt():
    async def body(fake, client, clock):
        with pytest.raises(AstriaTimeout) as caught:
            await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=5, deadline=30)
        return fake, caught.value

    fake, error = scenario(body, Faults(never_finish=True))
    pid = error.prompt_id
    assert [r.t for r in fake.api("GET")] == [0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0]
    assert f"rendering prompt {pid}" in str(error) and "resumes" in str(error)
    assert len(fake.creates()) == 1


# ---- ambiguous creates ------------------------------------------------------------------------------------------
def test_504_after_save_settles_looks_up_and_leaves_exactly_one_prompt():
    journal = JobJournal(None)

    async def body(fake, client, clock):
        return fake, await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=9)

    fake, result = scenario(body, Faults(create_504_after_save=1), journal=journal)
    pid = result.prompt_id
    assert timeline(fake) == [
        ("POST", f"/tunes/{TUNE}/prompts", 504, 0.0),
        ("GET", f"/tunes/{TUNE}/prompts", 200, 60.0),  # after the settle delay, a lookup instead of a second POST
        ("GET", f"/prompts/{pid}.json", 200, 60.0),
    ]
    assert list(fake.prompts) == [pid] and result.seed == 9
    assert journal.prompt_owner(pid) == result.key


def test_500_before_save_finds_nothing_and_creates_again_with_the_same_seed():
    async def body(fake, client, clock):
        return fake, await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=9)

    fake, result = scenario(body, Faults(create_500_before_save=1, fail_500_methods=()))
    assert [(r.method, r.status, r.t) for r in fake.requests[:3]] == [("POST", 500, 0.0), ("GET", 200, 60.0),
                                                                      ("POST", 201, 60.0)]
    assert [r.fields["prompt[seed]"] for r in fake.creates()] == ["9", "9"]
    assert list(fake.prompts) == [result.prompt_id]


def test_dropped_create_after_save_is_found_not_resent():
    async def body(fake, client, clock):
        return fake, await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=9)

    fake, result = scenario(body, Faults(drop_create_after_save=1))
    assert len(fake.creates()) == 1 and list(fake.prompts) == [result.prompt_id]
    assert [r.method for r in fake.requests[:2]] == ["POST", "GET"] and fake.requests[1].t == 60.0


# ---- batches and idempotency ------------------------------------------------------------------------------------
@pytest.mark.parametrize("same_seed_for_all", [False, True])
def test_a_batch_of_identical_images_gets_distinct_seeds_and_one_prompt_each(same_seed_for_all):
    async def body(fake, client, clock):
        jobs = [client.run_job(TUNE, FIELDS, INPUT_PNG, seed=100 if same_seed_for_all else 100 + slot, slot=slot)
                for slot in range(3)]
        return fake, await asyncio.gather(*jobs)

    fake, results = scenario(body, Faults(idempotent=True))
    assert sorted(r.fields["prompt[seed]"] for r in fake.creates()) == ["100", "101", "102"]
    assert len(fake.prompts) == 3 and len({r.prompt_id for r in results}) == 3
    assert sorted(r.seed for r in results) == [100, 101, 102]


def test_an_old_prompt_returned_by_idempotency_is_refused_and_the_next_seed_is_used():
    journal = JobJournal(None)
    clock = FakeClock(start=10_000.0)

    async def body(fake, client, clock):
        old = fake.add_prompt(TUNE, {**FIELDS, "seed": 42}, created_t=clock() - 3600)
        return fake, old, await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=42)

    fake, old, result = scenario(body, Faults(idempotent=True), journal=journal, clock=clock)
    assert [(r.fields["prompt[seed]"], r.status) for r in fake.creates()] == [("42", 200), ("43", 201)]
    assert result.seed == 43 and result.prompt_id != old and len(fake.prompts) == 2
    assert result.notices == ["image 1 used seed 43 (asked: 42)"]
    assert journal.prompt_owner(old) == result.key  # recorded as refused: never claimed by a later lookup


def test_idempotency_that_never_stops_fails_clearly_after_a_few_seeds():
    clock = FakeClock(start=10_000.0)

    async def body(fake, client, clock):
        fake.faults.answer_with_prompt_id = fake.add_prompt(TUNE, {**FIELDS, "seed": 7}, created_t=clock() - 60)
        with pytest.raises(AstriaDuplicateRefused) as caught:
            await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=7)
        return fake, caught.value

    fake, error = scenario(body, Faults(), clock=clock)
    assert [r.fields["prompt[seed]"] for r in fake.creates()] == ["7", "8", "9", "10"]
    assert "idempotency" in str(error) and "Nothing new was created" in str(error)


def test_a_prompt_the_journal_holds_for_another_image_is_refused_even_when_fresh():
    async def body(fake, client, clock):
        first = await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=1, slot=0)
        fake.prompts[first.prompt_id].created_t = clock()  # looks brand new: only the journal can tell
        fake.faults.answer_with_prompt_id, fake.faults.answer_with_prompt_times = first.prompt_id, 1
        second = await client.run_job(TUNE, FIELDS, png_bytes((16, 16), (1, 2, 3)), seed=50, slot=1)
        return fake, first, second

    fake, first, second = scenario(body)
    assert [(r.fields["prompt[seed]"], r.status) for r in fake.creates()] == [("1", 201), ("50", 200), ("51", 201)]
    assert second.prompt_id not in (first.prompt_id,) and second.seed == 51


# ---- the journal: restarts, resumes, delivered jobs -------------------------------------------------------------
def test_restart_mid_render_resumes_with_the_recorded_seed_and_creates_nothing(tmp_path):
    path = tmp_path / "__astria" / "jobs.jsonl"
    clock = FakeClock()

    async def body(fake, client, clock):
        with pytest.raises(AstriaTimeout):
            await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=42, deadline=3)
        # A new process: new journal object from the same file, new client, seed widget moved on.
        async with make_client(fake, clock, JobJournal(path, wall_clock=clock.wall)) as restarted:
            statuses = []
            result = await restarted.run_job(TUNE, FIELDS, INPUT_PNG, seed=999,
                                             on_status=lambda *s: statuses.append(s[0]))
        return fake, result, statuses

    fake, result, statuses = scenario(body, journal=JobJournal(path, wall_clock=clock.wall), clock=clock)
    assert len(fake.creates()) == 1 and len(fake.prompts) == 1
    assert result.resumed and result.seed == 42 and result.images == [fake.image]
    assert statuses[0] == "resumed"
    assert [json.loads(line)["event"] for line in path.read_text().splitlines()] == ["intent", "created", "delivered"]


def test_restart_after_a_lost_create_answer_looks_it_up_instead_of_creating(tmp_path):
    path = tmp_path / "jobs.jsonl"
    clock = FakeClock()

    async def body(fake, client, clock):
        with pytest.raises(AstriaCancelled) as caught:
            await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=42, cancelled=lambda: clock() >= 5)
        assert "may already exist" in str(caught.value)
        async with make_client(fake, clock, JobJournal(path, wall_clock=clock.wall)) as restarted:
            result = await restarted.run_job(TUNE, FIELDS, INPUT_PNG, seed=7)
        return fake, result

    fake, result = scenario(body, Faults(create_504_after_save=1), journal=JobJournal(path, wall_clock=clock.wall),
                            clock=clock)
    assert len(fake.creates()) == 1 and list(fake.prompts) == [result.prompt_id] and result.seed == 42
    lookup = fake.api("GET", f"/tunes/{TUNE}/prompts")[0]
    assert lookup.t == 60.0  # the restart waited out the rest of the settle delay (5 s had passed)


def test_delivered_job_same_seed_is_fetched_again_new_seed_is_a_new_request():
    async def body(fake, client, clock):
        first = await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=3)
        again = await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=3)
        fresh = await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=4)
        return fake, first, again, fresh

    fake, first, again, fresh = scenario(body)
    assert [r.fields["prompt[seed]"] for r in fake.creates()] == ["3", "4"]
    assert again.prompt_id == first.prompt_id and again.resumed
    assert fresh.prompt_id != first.prompt_id and fresh.seed == 4 and not fresh.resumed


def test_journal_tolerates_a_truncated_last_line(tmp_path):
    path = tmp_path / "jobs.jsonl"
    journal = JobJournal(path)
    attempt = journal.begin("k1", "g1", 11)
    journal.record("intent", attempt)
    journal.record("created", attempt, prompt_id=77)
    with open(path, "a") as handle:
        handle.write('{"v": 1, "event": "deliv')  # the process died mid-write
    reloaded = JobJournal(path)
    assert reloaded.latest_attempt("k1").state == "created" and reloaded.latest_attempt("k1").prompt_id == 77
    reloaded.record("delivered", reloaded.latest_attempt("k1"), prompt_id=77)
    assert JobJournal(path).latest_attempt("k1").state == "delivered"
    assert oct(path.stat().st_mode & 0o777) == "0o600"


# ---- cancel -----------------------------------------------------------------------------------------------------
def test_cancel_mid_poll_stops_within_a_second_and_names_the_billed_prompt():
    async def body(fake, client, clock):
        with pytest.raises(AstriaCancelled) as caught:
            await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=5, cancelled=lambda: clock() >= 12.5)
        return fake, caught.value, clock()

    fake, error, stopped_at = scenario(body, Faults(render_s=100))
    assert 12.5 <= stopped_at <= 13.5
    assert [r.t for r in fake.api("GET")] == [0.0, 5.0, 10.0]
    assert str(error.prompt_id) in str(error) and "billed" in str(error)


def test_cancel_abandons_a_request_that_hangs():
    async def body(fake, client, clock):
        prompt = await client.create_prompt(TUNE, {**FIELDS, "seed": 3}, INPUT_PNG)
        fake.faults.hang_gets = True
        polls = []

        def cancelled():
            polls.append(None)
            return len(polls) >= 2  # the user presses Cancel while the GET hangs

        with pytest.raises(AstriaCancelled) as caught:
            await client.wait(prompt["id"], cancelled=cancelled)
        return [r.status for r in fake.api("GET")], caught.value, prompt["id"]

    statuses, error, prompt_id = scenario(body)
    assert statuses == [None]  # abandoned before the server answered
    assert error.prompt_id == prompt_id


# ---- downloads --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["content_type", "too_many_bytes", "too_many_pixels", "not_an_image"])
def test_downloads_are_checked(case):
    faults = Faults(image_content_type="text/html" if case == "content_type" else "image/png")
    image = b"\x89PNG\r\n\x1a\nnot really" if case == "not_an_image" else png_bytes((32, 32))
    limits = {"too_many_bytes": {"max_bytes": 50}, "too_many_pixels": {"max_pixels": 100}}.get(case, {})
    clock = FakeClock()

    async def main():
        async with FakeAstria(clock, KEY, faults, image=image) as fake:
            async with make_client(fake, clock) as client:
                with pytest.raises(AstriaDownloadError) as caught:
                    await client.download(f"{fake.images_url}/img/1/0.png?sig=secret", **limits)
                return fake, caught.value

    fake, error = asyncio.run(main())
    assert len(fake.image_requests) == 1 and not fake.image_requests[0].has_auth
    assert "sig=secret" not in str(error)


def test_check_image_bytes_decodes_and_guards():
    assert check_image_bytes(png_bytes((20, 10))) == (20, 10)
    with pytest.raises(AstriaDownloadError, match="more than the 100 allowed"):
        check_image_bytes(png_bytes((20, 10)), max_pixels=100)
    with pytest.raises(AstriaDownloadError, match="not a readable image"):
        check_image_bytes(png_bytes((20, 10))[:40])


# ---- the key ----------------------------------------------------------------------------------------------------
def test_the_key_appears_in_no_log_record_exception_repr_or_journal(caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "jobs.jsonl"
    texts = []

    def collect(error):
        texts.append(str(error))
        texts.append(repr(error))
        texts.append("".join(traceback.format_exception(error)))

    async def body(fake, client, clock):
        texts.append(repr(client))
        await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=1)  # retries, a 504, a lookup, a download
        fake.faults.reject_422, fake.faults.echo_auth_in_errors = "bad denoise", True
        with pytest.raises(AstriaRequestRejected) as rejected:
            await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=2)
        collect(rejected.value)
        fake.faults.redirect_gets = True
        with pytest.raises(AstriaProtocolError) as redirected:
            await client.get_prompt(1)
        collect(redirected.value)
        return fake

    faults = Faults(rate_limit_every_other=True, create_504_after_save=1, fail_500_times=1)
    fake = scenario(body, faults, journal=JobJournal(path))
    assert "Bearer ***" in texts[1]  # the header the server echoed was scrubbed from the error text
    assert "/echo" not in [r.path for r in fake.image_requests]  # the redirect was not followed
    assert not any(r.has_auth for r in fake.image_requests)

    clock = FakeClock()

    async def wrong_key(fake, client, clock):
        with pytest.raises(AstriaAuthError) as caught:
            await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=1)
        return caught.value

    error = scenario(wrong_key, server_key="the-server-wants-another-key", clock=clock)
    collect(error)
    assert "ASTRIA_API_KEY" in str(error) and "user/__astria/api_key" in str(error)

    with pytest.raises(AstriaAuthError) as bad_key:
        AstriaClient("http://127.0.0.1:1", KEY + "\n")
    collect(bad_key.value)

    records = [record.getMessage() + repr(record.args) for record in caplog.records]
    assert any("retrying" in record for record in records)  # logging did happen
    for text in texts + records + [path.read_text()]:
        assert KEY not in text


def test_the_client_refuses_plain_http_to_a_remote_host_and_reads_settle_from_env(monkeypatch):
    with pytest.raises(ValueError, match="plain http"):
        AstriaClient("http://api.astria.ai", KEY)
    monkeypatch.setenv("ASTRIA_CREATE_SETTLE_S", "5")
    assert AstriaClient("https://api.astria.ai", KEY).settle_s == 5.0
    monkeypatch.setenv("ASTRIA_CREATE_SETTLE_S", "soon")
    with pytest.raises(ValueError, match="ASTRIA_CREATE_SETTLE_S"):
        AstriaClient("https://api.astria.ai", KEY)


def test_load_api_key_prefers_the_environment_then_the_key_file(monkeypatch, tmp_path):
    key_file = tmp_path / "api_key"
    monkeypatch.delenv("ASTRIA_API_KEY", raising=False)
    assert astria_transport.load_api_key(key_file) is None
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    assert astria_transport.load_api_key(key_file) == KEY
    monkeypatch.setenv("ASTRIA_API_KEY", "from-env")
    assert astria_transport.load_api_key(key_file) == "from-env"


# ---- injected faults: error shapes, Retry-After, odd answers, downloads, secrets, cancel -------------------------
HTML_422 = ("<!DOCTYPE html><html><head><title>The change you wanted was rejected (422)</title>"
            "<style>body { color: red; }</style></head><body><h1>The change you wanted was rejected.</h1>"
            "<p>Maybe you tried to change something you didn't have access to.</p></body></html>")


@pytest.mark.parametrize("body, content_type, shown", [
    ({"error": "text can't be blank"}, "application/json", "text can't be blank"),
    ({"errors": {"text": ["can't be blank"]}}, "application/json", "text: can't be blank"),
    ({"text": ["can't be blank"], "seed": ["is not a number"]}, "application/json",
     "text: can't be blank; seed: is not a number"),
    ({"error": {"denoising_strength": ["must be less than or equal to 1"]}}, "application/json",
     "denoising_strength: must be less than or equal to 1"),
    ({"errors": ["Text can't be blank", "Seed is invalid"]}, "application/json", "Text can't be blank; Seed is invalid"),
    ("Text can't be blank", "text/plain", "Text can't be blank"),
    (HTML_422, "text/html", "The change you wanted was rejected (422) The change you wanted was rejected."),
    ({"error": "Prompt en français refusé"}, "application/json", "Prompt en français refusé"),
])
def test_422_in_every_shape_is_shown_readably_and_never_retried(body, content_type, shown):
    journal = JobJournal(None)

    async def run(fake, client, clock):
        fake.faults.create_script = [Scripted(422, body, content_type=content_type)]
        with pytest.raises(AstriaRequestRejected) as caught:
            await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=5)
        return fake, caught.value

    fake, error = scenario(run, journal=journal)
    assert timeline(fake) == [("POST", f"/tunes/{TUNE}/prompts", 422, 0.0)]
    assert shown in str(error) and error.status == 422
    assert "<" not in str(error) and "{" not in str(error) and "\\u" not in str(error)
    assert journal.latest_attempt(job_key(TUNE, FIELDS, INPUT_PNG)).state == "failed"


def _http_date(seconds_from_now):
    return lambda clock: formatdate(clock.wall() + seconds_from_now, usegmt=True)


@pytest.mark.parametrize("retry_after, second_post_at", [
    ("3", 3.0),  # seconds
    (_http_date(30), 30.0),  # an HTTP-date
    (None, 1.0),  # missing: the backoff's base (1 s in these tests)
    ("soon", 1.0),  # unreadable: as missing
    ("0", 1.0),  # "now" would hammer the server: at least 1 s
    (_http_date(-100), 1.0),  # a date in the past: the same
    ("-5", 1.0),
])
def test_create_429_honours_retry_after_then_succeeds_with_one_prompt(retry_after, second_post_at):
    async def run(fake, client, clock):
        value = retry_after(clock) if callable(retry_after) else retry_after
        headers = {} if value is None else {"Retry-After": value}
        fake.faults.create_script = [Scripted(429, {"error": "Too many requests"}, headers=headers)]
        return fake, await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=1)

    fake, result = scenario(run)
    assert [(r.status, r.t) for r in fake.creates()] == [(429, 0.0), (201, second_post_at)]
    assert list(fake.prompts) == [result.prompt_id]


@pytest.mark.parametrize("retry_after", ["86400", "1e400", "inf"])
def test_create_429_with_an_absurd_retry_after_fails_at_once_saying_so(retry_after):
    async def run(fake, client, clock):
        fake.faults.create_script = [Scripted(429, {"error": "slow down"}, headers={"Retry-After": retry_after})]
        with pytest.raises(AstriaTimeout) as caught:
            await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=1)
        return fake, caught.value, clock()

    fake, error, stopped_at = scenario(run)
    assert len(fake.creates()) == 1 and stopped_at == 0.0 and fake.prompts == {}
    assert "Retry-After" in str(error) and "nothing was created" in str(error)


@pytest.mark.parametrize("status", [500, 502, 503, 504])
@pytest.mark.parametrize("saved", [True, False])
def test_create_5xx_settles_then_looks_up_and_posts_again_only_when_absent(status, saved):
    async def run(fake, client, clock):
        body = "<html><body><h1>502 Bad Gateway</h1></body></html>" if status == 502 else {"error": "oops"}
        fake.faults.create_script = [Scripted(status, body, save=saved,
                                              content_type="text/html" if status == 502 else "application/json")]
        return fake, await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=9)

    fake, result = scenario(run)
    posts = [(r.status, r.t) for r in fake.creates()]
    assert posts == ([(status, 0.0)] if saved else [(status, 0.0), (201, 60.0)])
    assert fake.requests[1].method == "GET" and fake.requests[1].path == f"/tunes/{TUNE}/prompts"
    assert fake.requests[1].t == 60.0
    assert list(fake.prompts) == [result.prompt_id] and result.seed == 9


def test_a_create_that_times_out_is_looked_up_not_posted_again():
    async def run(fake, client, clock):
        fake.faults.create_script = [Scripted(201, save=True, hang=True)]
        return fake, await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=9)

    fake, result = scenario(run, timeouts=Timeouts(create_s=0.2))
    assert len(fake.creates()) == 1 and list(fake.prompts) == [result.prompt_id]


@pytest.mark.parametrize("status, wrap", [(200, False), (201, True), (200, True), (202, False)])
def test_create_answers_200_201_202_and_one_element_lists_are_all_used(status, wrap):
    async def run(fake, client, clock):
        fake.faults.create_script = [Scripted(status, (lambda view: [view]) if wrap else (lambda view: view),
                                              save=True)]
        return fake, await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=9)

    fake, result = scenario(run)
    assert len(fake.creates()) == 1 and list(fake.prompts) == [result.prompt_id]
    assert fake.api("GET", f"/tunes/{TUNE}/prompts") == []  # nothing ambiguous: no lookup


@pytest.mark.parametrize("junk, content_type", [
    ("<html><body>Checking your browser before accessing api.astria.ai</body></html>", "text/html"),
    ('{"id": 10', "application/json"),  # cut short
    ("", "application/json"),
])
def test_a_poll_answered_with_junk_by_a_proxy_is_retried_within_the_deadline(junk, content_type):
    async def run(fake, client, clock):
        fake.faults.poll_script = [Scripted(200, junk, content_type=content_type)] * 2
        return fake, await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=1)

    fake, result = scenario(run, Faults(render_s=0))
    polls = fake.api("GET", "/prompts/")
    assert [(r.status, r.t) for r in polls] == [(200, 0.0), (200, 1.0), (200, 3.0)]  # backoff 1 s, then 2 s
    assert result.images == [fake.image] and len(fake.creates()) == 1


def test_a_poll_that_only_ever_gets_junk_stops_at_the_deadline_naming_the_prompt():
    async def run(fake, client, clock):
        fake.faults.poll_script = [Scripted(200, "<html>maintenance</html>", content_type="text/html")] * 100
        with pytest.raises(AstriaTimeout) as caught:
            await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=1, deadline=20)
        return caught.value

    error = scenario(run, Faults(render_s=0))
    assert f"prompt {error.prompt_id}" in str(error) and "not JSON" in str(error)
    assert "resumes it without paying twice" in str(error)


def test_a_poll_502_html_page_and_a_429_are_retried():
    async def run(fake, client, clock):
        fake.faults.poll_script = [
            Scripted(502, "<html><body><h1>502 Bad Gateway</h1></body></html>", content_type="text/html"),
            Scripted(429, {"error": "Too many requests"}, headers={"Retry-After": "4"}),
        ]
        return fake, await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=1)

    fake, result = scenario(run, Faults(render_s=0))
    assert [(r.status, r.t) for r in fake.api("GET", "/prompts/")] == [(502, 0.0), (429, 1.0), (200, 5.0)]
    assert result.images == [fake.image]


def test_a_prompt_deleted_on_astria_says_so_and_what_to_do():
    async def run(fake, client, clock):
        fake.faults.poll_script = [Scripted(404, {"error": "Not found"})]
        with pytest.raises(AstriaNotFound) as caught:
            await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=1)
        return fake, caught.value

    fake, error = scenario(run)
    assert f"prompt {next(iter(fake.prompts))}" in str(error)
    assert "deleted" in str(error) and "change the seed" in str(error)


@pytest.mark.parametrize("images", [
    lambda urls: [{"url": url, "width": 8} for url in urls],
    lambda urls: urls,
])
def test_images_as_strings_or_objects_with_unknown_fields_are_downloaded(images):
    async def run(fake, client, clock):
        def answer(view):
            urls = [f"{fake.images_url}/img/{view['id']}/0.png?sig=token0"]
            return {**view, "images": images(urls), "brand_new_field": {"x": [1, 2]}, "status": "done"}

        fake.faults.poll_script = [Scripted(200, answer)]
        return fake, await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=1)

    fake, result = scenario(run)
    assert result.images == [fake.image]


@pytest.mark.parametrize("bad", [[5], [{"href": "x"}], [None], "http://127.0.0.1/x.png"])
def test_images_that_are_not_urls_are_a_clear_protocol_error(bad):
    async def run(fake, client, clock):
        fake.faults.poll_script = [Scripted(200, lambda view: {**view, "images": bad})]
        with pytest.raises(AstriaProtocolError) as caught:
            await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=1)
        return fake, caught.value

    fake, error = scenario(run)
    assert "not URLs" in str(error) and fake.image_requests == []


def test_a_poll_timeout_names_the_prompt_and_says_nothing_is_lost(tmp_path):
    path = tmp_path / "jobs.jsonl"
    clock = FakeClock()

    async def run(fake, client, clock):
        with pytest.raises(AstriaTimeout) as caught:
            await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=5, deadline=30)
        fake.faults.never_finish = False
        async with make_client(fake, clock, JobJournal(path, wall_clock=clock.wall)) as restarted:
            again = await restarted.run_job(TUNE, FIELDS, INPUT_PNG, seed=6)
        return fake, caught.value, again

    fake, error, again = scenario(run, Faults(never_finish=True), journal=JobJournal(path, wall_clock=clock.wall),
                                  clock=clock)
    assert f"prompt {error.prompt_id}" in str(error) and "nothing is lost" in str(error).lower()
    assert again.prompt_id == error.prompt_id and again.resumed and len(fake.creates()) == 1


# ---- downloads under faults ---------------------------------------------------------------------------------------
def download_scenario(faults, image=None, **download_options):
    """Download one image URL of the fake's image origin; returns (fake, bytes or the error raised)."""
    clock = FakeClock()

    async def main():
        async with FakeAstria(clock, KEY, faults, image=image) as fake:
            async with make_client(fake, clock) as client:
                try:
                    data = await client.download(f"{fake.images_url}/img/1/0.png?sig=secret", prompt_id=77,
                                                 **download_options)
                except AstriaDownloadError as error:
                    return fake, error
                return fake, data

    return asyncio.run(main())


def test_an_image_redirected_to_another_host_is_fetched_without_the_key():
    clock = FakeClock()

    async def main():
        async with FakeAstria(clock, KEY) as fake:
            port = fake.images_url.rsplit(":", 1)[1]
            fake.faults.image_redirect_to = f"http://localhost:{port}/moved/x.png"  # another host name
            async with make_client(fake, clock) as client:
                data = await client.download(f"{fake.images_url}/img/1/0.png")
            return fake, data

    fake, data = asyncio.run(main())
    assert data == fake.image
    assert [(r.path, r.has_auth) for r in fake.image_requests] == [("/img/1/0.png", False), ("/moved/x.png", False)]
    assert not any("Authorization" in r.headers for r in fake.image_requests)


@pytest.mark.parametrize("status", [403, 404, 410])
def test_an_expired_image_url_says_what_to_do(status):
    fake, error = download_scenario(Faults(image_script=[Scripted(status, "<Error>AccessDenied</Error>",
                                                                  content_type="application/xml")]))
    assert isinstance(error, AstriaDownloadError) and f"HTTP {status}" in str(error)
    assert "expire" in str(error) and "again" in str(error) and "without paying" in str(error)
    assert "sig=secret" not in str(error) and len(fake.image_requests) == 1


def test_a_truncated_image_is_downloaded_again():
    image = png_bytes((64, 64))
    fake, data = download_scenario(Faults(image_script=[Scripted(200, image, content_type="image/png",
                                                                 truncate_to=20)]), image=image)
    assert data == image and len(fake.image_requests) == 2


@pytest.mark.parametrize("content_type", ["application/octet-stream", "binary/octet-stream", None, "image/jpeg"])
def test_a_real_image_with_a_wrong_or_missing_content_type_is_accepted(content_type):
    image = png_bytes((12, 12))
    fake, data = download_scenario(Faults(image_script=[Scripted(200, image, content_type=content_type)]))
    assert data == image


@pytest.mark.parametrize("body, content_type", [
    (b"<html><body>Access denied</body></html>", "image/png"),  # an error page that claims to be an image
    (b"\x00" * 300, "application/octet-stream"),
])
def test_bytes_that_are_not_an_image_are_refused_saying_what_to_do(body, content_type):
    fake, error = download_scenario(Faults(image_script=[Scripted(200, body, content_type=content_type)]))
    assert isinstance(error, AstriaDownloadError) and "not a readable image" in str(error)
    assert "prompt 77" in str(error) and "without paying" in str(error)


def test_a_huge_image_is_refused_before_it_is_decoded_saying_what_to_do():
    image = png_bytes((300, 300))
    fake, error = download_scenario(Faults(), image=image, max_pixels=300 * 299)
    assert isinstance(error, AstriaDownloadError) and "300x300" in str(error) and "prompt 77" in str(error)


def test_a_failed_download_keeps_the_prompt_and_a_rerun_downloads_it_without_creating():
    journal = JobJournal(None)

    async def run(fake, client, clock):
        fake.faults.image_script = [Scripted(403, "expired", content_type="text/plain")]
        with pytest.raises(AstriaDownloadError):
            await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=3)
        return fake, await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=4)

    fake, result = scenario(run, journal=journal)
    assert len(fake.creates()) == 1 and result.resumed and result.images == [fake.image]


# ---- the key under hostile servers --------------------------------------------------------------------------------
def test_the_key_never_leaks_when_servers_echo_it_in_bodies_headers_and_redirects(caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "jobs.jsonl"
    texts = []

    def collect(error):
        texts.extend([str(error), repr(error), "".join(traceback.format_exception(error))])

    async def run(fake, client, clock):
        echo = f"Authorization: Bearer {KEY}"
        fake.faults.create_script = [
            Scripted(429, {"error": f"slow down {KEY}"}, headers={"Retry-After": "1", "X-Echo": echo}),
            Scripted(503, f"<html><body>{echo}</body></html>", content_type="text/html", save=True),
        ]
        fake.faults.poll_script = [
            Scripted(500, {"error": echo}),
            Scripted(200, f"not json {echo}", content_type="text/plain"),
            Scripted(200, lambda view: {**view, "images": [], "user_error": None, "note": KEY}),
        ]
        await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=1)
        fake.faults.create_script = [Scripted(422, {"errors": {"text": [f"bad {KEY}"]}})]
        with pytest.raises(AstriaRequestRejected) as rejected:
            await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=2)
        collect(rejected.value)
        fake.faults.poll_script = [Scripted(302, "", headers={"Location": f"{fake.images_url}/echo?key={KEY}"})]
        with pytest.raises(AstriaProtocolError) as redirected:
            await client.get_prompt(1001)
        collect(redirected.value)
        fake.faults.poll_script = [Scripted(200, lambda view: {**view, "user_error": f"no face ({echo})"})]
        with pytest.raises(AstriaPromptFailed) as failed:
            await client.wait(1001)
        collect(failed.value)
        fake.faults.create_script = [Scripted(401, {"error": f"invalid token {KEY}"})]
        with pytest.raises(AstriaAuthError) as unauthorized:
            await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=3)
        collect(unauthorized.value)
        return fake

    fake = scenario(run, journal=JobJournal(path))
    assert "ASTRIA_API_KEY" in texts[-3]
    assert "/echo" not in [r.path for r in fake.image_requests]  # the redirect was not followed
    records = [record.getMessage() + repr(record.args) for record in caplog.records]
    for text in texts + records + [path.read_text()]:
        assert KEY not in text


# ---- cancel -----------------------------------------------------------------------------------------------------
def test_cancel_while_the_create_request_hangs_stops_promptly_and_the_rerun_finds_the_prompt(tmp_path):
    path = tmp_path / "jobs.jsonl"
    clock = FakeClock()

    async def run(fake, client, clock):
        fake.faults.create_script = [Scripted(201, save=True, hang=True)]
        pressed_at = time.monotonic() + 0.3
        with pytest.raises(AstriaCancelled) as caught:
            await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=42, cancelled=lambda: time.monotonic() >= pressed_at)
        stopped_after = time.monotonic() - pressed_at
        async with make_client(fake, clock, JobJournal(path, wall_clock=clock.wall)) as restarted:
            result = await restarted.run_job(TUNE, FIELDS, INPUT_PNG, seed=7)
        return fake, caught.value, stopped_after, result

    fake, error, stopped_after, result = scenario(run, journal=JobJournal(path, wall_clock=clock.wall), clock=clock,
                                                  timeouts=Timeouts(create_s=60.0))
    assert stopped_after < 5.0  # not the create's 60 s timeout (a generous bound: no timed assert of the 0.5 s step)
    assert "may already exist" in str(error)
    assert len(fake.creates()) == 1 and list(fake.prompts) == [result.prompt_id] and result.seed == 42


def test_cancel_during_the_lookup_after_a_lost_create_says_a_prompt_may_exist():
    journal = JobJournal(None)

    async def run(fake, client, clock):
        fake.faults.create_script = [Scripted(504, {"error": "Gateway timeout"}, save=True)]
        fake.faults.fail_500_times = 100  # the lookup keeps failing, so it is backing off when Cancel comes
        with pytest.raises(AstriaCancelled) as caught:
            await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=42, cancelled=lambda: clock() >= 62.0)
        return caught.value

    error = scenario(run, journal=journal)
    assert "may already exist" in str(error) and "nothing was billed" not in str(error)
    assert journal.latest_attempt(job_key(TUNE, FIELDS, INPUT_PNG)).state == "intent"  # a rerun looks it up


def test_cancel_during_a_poll_backoff_keeps_the_prompt_for_the_rerun():
    journal = JobJournal(None)

    async def run(fake, client, clock):
        fake.faults.fail_500_times = 3
        fake.faults.fail_500_methods = ("GET",)
        with pytest.raises(AstriaCancelled) as caught:
            await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=42, cancelled=lambda: clock() >= 2.0)
        stopped_at = clock()
        result = await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=1)
        return fake, caught.value, stopped_at, result

    fake, error, stopped_at, result = scenario(run, Faults(render_s=0), journal=journal)
    assert 2.0 <= stopped_at <= 3.0 and str(error.prompt_id) in str(error)
    assert len(fake.creates()) == 1 and result.prompt_id == error.prompt_id and result.resumed


def test_cancel_during_a_429_backoff_on_create_says_nothing_was_billed():
    journal = JobJournal(None)

    async def run(fake, client, clock):
        fake.faults.create_script = [Scripted(429, {"error": "slow"}, headers={"Retry-After": "100"})]
        with pytest.raises(AstriaCancelled) as caught:
            await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=42, cancelled=lambda: clock() >= 10.0)
        return fake, caught.value, clock()

    fake, error, stopped_at = scenario(run, journal=journal)
    assert stopped_at <= 11.0 and "nothing was billed" in str(error) and len(fake.creates()) == 1


def test_a_create_that_cannot_connect_is_retried_and_fails_saying_nothing_was_created():
    journal = JobJournal(None)
    clock = FakeClock()

    async def main():
        async with FakeAstria(clock, KEY) as fake:
            closed = fake.base_url
        client = AstriaClient(closed, KEY, clock=clock, sleep=clock.sleep, wall_clock=clock.wall, journal=journal,
                              retry=RetryPolicy(base_s=1.0, jitter=0.0, deadline_s=10.0), settle_s=60.0)
        async with client:
            with pytest.raises(AstriaTimeout) as caught:
                await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=5)
        return caught.value

    error = asyncio.run(main())
    assert clock() == 7.0  # backoff 1 + 2 + 4 s (8 more would pass 10 s), no 60 s settle: nothing was ever sent
    assert "nothing was created" in str(error) and "could not connect" in str(error)
    assert journal.latest_attempt(job_key(TUNE, FIELDS, INPUT_PNG)).state == "failed"


def test_wait_settings_from_the_environment(monkeypatch):
    for name in ("ASTRIA_RETRY_BASE_S", "ASTRIA_POLL_INTERVAL_S", "ASTRIA_DEADLINE_S"):
        monkeypatch.delenv(name, raising=False)
    defaults = astria_transport.WaitSettings.from_env()
    assert (defaults.retry.base_s, defaults.poll_interval_s, defaults.deadline_s) == (30.0, 5.0, 600.0)
    monkeypatch.setenv("ASTRIA_RETRY_BASE_S", "2.5")
    monkeypatch.setenv("ASTRIA_POLL_INTERVAL_S", " 1 ")
    monkeypatch.setenv("ASTRIA_DEADLINE_S", "90")
    waits = astria_transport.WaitSettings.from_env()
    assert (waits.retry.base_s, waits.poll_interval_s, waits.deadline_s, waits.retry.deadline_s) == (2.5, 1.0, 90, 90)
    for bad in ("0", "-1", "nan", "inf", "soon"):
        monkeypatch.setenv("ASTRIA_POLL_INTERVAL_S", bad)
        with pytest.raises(ValueError, match="ASTRIA_POLL_INTERVAL_S="):
            astria_transport.WaitSettings.from_env()
    monkeypatch.setenv("ASTRIA_POLL_INTERVAL_S", "5")
    monkeypatch.setenv("ASTRIA_CREATE_SETTLE_S", "0")  # the settle wait may be 0, the others not
    assert astria_transport.settle_seconds_from_env() == 0.0


def test_exactly_once_holds_across_a_journal_compaction(tmp_path):
    path = tmp_path / "jobs.jsonl"
    clock = FakeClock()

    async def body(fake, client, clock):
        first = await client.run_job(TUNE, FIELDS, INPUT_PNG, seed=1, slot=0)
        JobJournal(path, wall_clock=clock.wall, compact_after_events=1)  # a restart that compacts
        assert {json.loads(line)["event"] for line in path.read_text().splitlines()} == {"snapshot"}
        compacted = JobJournal(path, wall_clock=clock.wall)  # the next restart reads only the snapshot
        fake.prompts[first.prompt_id].created_t = clock()  # looks brand new: only the journal can tell
        fake.faults.answer_with_prompt_id, fake.faults.answer_with_prompt_times = first.prompt_id, 1
        async with make_client(fake, clock, compacted) as restarted:
            second = await restarted.run_job(TUNE, FIELDS, png_bytes((16, 16), (1, 2, 3)), seed=1, slot=1)
            again = await restarted.run_job(TUNE, FIELDS, INPUT_PNG, seed=1, slot=0)
        return fake, first, again, second

    fake, first, again, second = scenario(body, journal=JobJournal(path, wall_clock=clock.wall), clock=clock)
    # the delivered job is fetched again; the other image cannot reuse seed 1 (sent) nor take prompt 1 (claimed)
    assert again.resumed and again.prompt_id == first.prompt_id
    assert [(r.fields["prompt[seed]"], r.status) for r in fake.creates()] == [("1", 201), ("2", 200), ("3", 201)]
    assert second.seed == 3 and second.prompt_id != first.prompt_id
