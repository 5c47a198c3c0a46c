"""The Astria client against a fake Astria server: retries, exactly-once creates, the journal and key safety.

Every test runs the real client over HTTP against tests/unit/fake_astria.py on 127.0.0.1, with virtual time
(FakeClock) shared by both, so waits of minutes take milliseconds and request gaps are exact.
"""
import asyncio
import json
import logging
import random
import traceback

import pytest

pytest.importorskip("aiohttp", reason="the Astria client needs aiohttp (ComfyUI's venv ships it)")
pytest.importorskip("PIL", reason="downloads are decode-checked with Pillow (ComfyUI's venv ships it)")

from comfyui_astria.nodes.core import astria_api
from comfyui_astria.nodes.core.astria_api import (
    AstriaAuthError,
    AstriaCancelled,
    AstriaClient,
    AstriaDownloadError,
    AstriaDuplicateRefused,
    AstriaPromptFailed,
    AstriaProtocolError,
    AstriaRequestRejected,
    AstriaTimeout,
    RetryPolicy,
    check_image_bytes,
)
from comfyui_astria.nodes.core.astria_journal import JobJournal, job_key, seed_group
from comfyui_astria.tests.unit.fake_astria import FakeAstria, FakeClock, Faults, png_bytes

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
    assert astria_api.load_api_key(key_file) is None
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    assert astria_api.load_api_key(key_file) == KEY
    monkeypatch.setenv("ASTRIA_API_KEY", "from-env")
    assert astria_api.load_api_key(key_file) == "from-env"
