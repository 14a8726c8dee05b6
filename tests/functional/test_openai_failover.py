"""`protocol: openai` model failover by what went wrong (issue 16): a silent model is left at once for
the next one, a prompt too long for a model goes to a larger-context model, a refusal reaches the app
unchanged, a non-streamed answer cut mid-body is asked again. The real `openai` SDK is the client; the
fake provider (tests/support/fake_openai.py) misbehaves on purpose and logs each attempt."""

from __future__ import annotations

import openai
import pytest

from tests.support.metrics import value
from tests.support.proxy import upstream_config

MSG = [{"role": "user", "content": "hi"}]


def llm_config(url, **sections):
    return upstream_config(url, protocol="openai", **sections)


def client(p) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=p.url + "/api/v1", api_key="sk-app-placeholder", max_retries=0)


def models(fake) -> list[str]:
    return [r["body"]["model"] for r in fake.requests]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_silent_model_costs_one_timeout_then_the_next_model_answers(fake, start_proxy, stream):
    """With retry.on including timeout and 3 attempts, a model that never answers is asked once: the
    fallback answers after one first_byte (stream) or attempt timeout, not three."""
    name, cfg = llm_config(fake.url, retry={"attempts": 3}, breaker={"fail_max": 100},
                           timeouts={"attempt": "1s", "first_byte": "1s", "total": "30s"},
                           llm={"fallback_models": ["fake/b"]})
    p = await start_proxy(cfg)
    fake.hang_models = {"fake/a"}
    c = client(p)
    if stream:
        chunks = [ch async for ch in await c.chat.completions.create(model="fake/a", messages=MSG, stream=True)]
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert chunks[0].model == "fake/b"
    else:
        r = await c.chat.completions.create(model="fake/a", messages=MSG)
        text = r.choices[0].message.content
        assert r.model == "fake/b"
    assert text == fake.content({"messages": MSG})
    assert models(fake) == ["fake/a", "fake/b"]


async def test_failover_on_timeout_false_retries_the_silent_model_in_place(fake, start_proxy):
    name, cfg = llm_config(fake.url, retry={"attempts": 2, "backoff_base": "0s", "backoff_max": "0s"},
                           breaker={"fail_max": 100}, timeouts={"attempt": "500ms", "total": "30s"},
                           llm={"fallback_models": ["fake/b"], "failover_on_timeout": False})
    p = await start_proxy(cfg)
    fake.hang_models = {"fake/a"}
    r = await client(p).chat.completions.create(model="fake/a", messages=MSG)
    assert r.model == "fake/b"
    assert models(fake) == ["fake/a", "fake/a", "fake/b"]


async def test_a_connect_failure_is_the_targets_and_is_retried_per_the_retry_rules(fake, start_proxy):
    """A reset before any head is the target's fault, not the model's: retried on the same model."""
    name, cfg = llm_config(fake.url, retry={"attempts": 3, "backoff_base": "0s", "backoff_max": "0s"},
                           llm={"fallback_models": ["fake/b"]})
    p = await start_proxy(cfg)
    fake.reset_first = 1
    r = await client(p).chat.completions.create(model="fake/a", messages=MSG)
    assert r.model == "fake/a"
    assert models(fake) == ["fake/a", "fake/a"]
    # the reset before any head is charged to the track's breaker, not to the model's
    assert p.breaker.last_failure is not None and p.model_breaker().last_failure is None


async def test_a_refused_connection_is_retried_on_the_same_model_and_charges_the_track(start_proxy, metrics):
    from tests.support.net import free_port

    name, cfg = llm_config(f"http://127.0.0.1:{free_port()}", retry={"attempts": 3, "backoff_base": "0s",
                                                                     "backoff_max": "0s"},
                           breaker={"fail_max": 100}, llm={"fallback_models": ["fake/b"]})
    p = await start_proxy(cfg)
    r = await client(p).chat.completions.create(model="fake/a", messages=MSG)
    assert r.model_extra["fallback_reason"] == "upstream_error_no_cache"
    # 3 attempts (retried per the retry rules), then no failover: every model is behind that door
    assert metrics.delta("upstream_retries_total", name=name, reason="connect-failure") == 2
    assert p.breaker.cb.fail_counter == 3 and p.model_breaker().last_failure is None


@pytest.mark.parametrize("stream", [False, True])
async def test_context_length_goes_to_the_context_fallback_model_never_the_same_one(fake, start_proxy, stream):
    name, cfg = llm_config(fake.url, retry={"attempts": 3},
                           llm={"fallback_models": ["fake/b"], "context_fallback_models": ["fake/long"]})
    p = await start_proxy(cfg)
    fake.context_limit_models = {"fake/a"}
    c = client(p)
    raw = await c.chat.completions.with_raw_response.create(model="fake/a", messages=MSG, stream=stream)
    assert raw.headers["X-Model-Fallback"] == "fake/long"
    if stream:
        chunks = [ch async for ch in raw.parse()]
        assert chunks[0].model == "fake/long"
    else:
        assert raw.parse().model == "fake/long"
    # the plain fallback model is not a larger one: it is skipped for a context failure
    assert models(fake) == ["fake/a", "fake/long"]


async def test_context_length_without_a_larger_model_is_the_providers_error_asked_once(fake, start_proxy, metrics):
    name, cfg = llm_config(fake.url, retry={"attempts": 3}, llm={"fallback_models": ["fake/b"]})
    p = await start_proxy(cfg)
    fake.context_limit_models = {"fake/a"}
    with pytest.raises(openai.BadRequestError) as ei:
        await client(p).chat.completions.create(model="fake/a", messages=MSG)
    assert ei.value.code == "context_length_exceeded"
    assert models(fake) == ["fake/a"]
    assert p.breaker.cb.fail_counter == 0


@pytest.mark.parametrize("stream", [False, True])
async def test_a_content_policy_refusal_reaches_the_app_unchanged_after_one_attempt(fake, start_proxy, stream):
    name, cfg = llm_config(fake.url, retry={"attempts": 3},
                           llm={"fallback_models": ["fake/b"], "context_fallback_models": ["fake/long"]})
    p = await start_proxy(cfg)
    fake.content_filter = True
    with pytest.raises(openai.BadRequestError) as ei:
        await client(p).chat.completions.create(model="fake/a", messages=MSG, stream=stream)
    assert ei.value.code == "content_policy_violation"
    assert ei.value.body["message"] == "Your request was rejected as a result of our safety system."
    assert models(fake) == ["fake/a"]


async def test_a_non_streamed_answer_cut_mid_body_is_asked_again(fake, start_proxy, metrics):
    """The body is read inside the attempt: a cut after the head is a reset the retry sees, not a
    truncated JSON body the SDK chokes on."""
    name, cfg = llm_config(fake.url, retry={"attempts": 3, "backoff_base": "0s", "backoff_max": "0s"})
    p = await start_proxy(cfg)
    fake.body_cut_first = 1
    r = await client(p).chat.completions.create(model="fake/a", messages=MSG)
    assert r.choices[0].message.content == fake.content({"messages": MSG})
    assert [a[2] for a in fake.attempts] == ["body-cut", "ok"]
    # a cut after the head is the model's failure: the track's door worked
    assert p.model_breaker().last_failure is not None and p.breaker.last_failure is None
    assert metrics.delta("llm_tokens_total", name=name, model="other", kind="completion") == 10


async def test_keep_alive_comments_are_relayed_but_do_not_end_the_first_byte_wait(fake, start_proxy):
    """OpenRouter sends `: OPENROUTER PROCESSING` while a model is queued. They reach the app ahead of
    the first event; a model that sends only those past first_byte is left for the next one."""
    import aiohttp

    name, cfg = llm_config(fake.url, timeouts={"first_byte": "1s"}, breaker={"fail_max": 100},
                           llm={"fallback_models": ["fake/b"]})
    p = await start_proxy(cfg)
    fake.comments, fake.first_delay, fake.fault_models = True, 0.3, {"fake/a"}
    body = {"model": "fake/a", "messages": MSG, "stream": True}
    async with aiohttp.ClientSession() as s, s.post(p.url + "/api/v1/chat/completions", json=body) as r:
        raw = await r.read()
    assert raw.startswith(b": OPENROUTER PROCESSING\n\n") and b'"model": "fake/a"' in raw
    fake.requests.clear()
    fake.first_delay = 5.0  # queued well past first_byte, comments all along
    async with aiohttp.ClientSession() as s, s.post(p.url + "/api/v1/chat/completions", json=body) as r:
        raw = await r.read()
    assert r.headers["X-Model-Fallback"] == "fake/b" and b'"model": "fake/b"' in raw
    assert models(fake) == ["fake/a", "fake/b"]


async def test_a_failing_model_opens_its_own_breaker_not_the_targets(fake, start_proxy, metrics):
    """fake/a answers 500 (fail_max 2): its breaker opens, the target's and fake/b's stay closed; while
    it is open requests go straight to fake/b; after reset_timeout one probe finds it healed and
    traffic returns to it."""
    from proxy.clock import ManualClock

    clock = ManualClock()
    name, cfg = llm_config(fake.url, retry={"attempts": 1}, breaker={"fail_max": 2, "reset_timeout": "30s"},
                           llm={"fallback_models": ["fake/b"], "models": ["fake/a"]})
    p = await start_proxy(cfg, clock=clock)
    fake.fail_models = {"fake/a"}
    c = client(p)
    for i in range(2):
        r = await c.chat.completions.create(model="fake/a", messages=[{"role": "user", "content": f"q{i}"}])
        assert r.model == "fake/b"
    assert p.model_breaker("fake/a").state == "open"
    assert p.breaker.state == "closed" and p.model_breaker("fake/b").state == "closed"
    assert value("llm_model_breaker_state", name=name, track="stable", model="fake/a") == 1
    fake.requests.clear()
    r = await c.chat.completions.create(model="fake/a", messages=[{"role": "user", "content": "q2"}])
    assert r.model == "fake/b" and models(fake) == ["fake/b"], "an open model is not asked"
    fake.fail_models = set()
    clock.advance(30)
    fake.requests.clear()
    r = await c.chat.completions.create(model="fake/a", messages=[{"role": "user", "content": "q3"}])
    assert r.model == "fake/a" and models(fake) == ["fake/a"]
    assert p.model_breaker("fake/a").state == "closed"


async def test_a_model_breaker_can_be_forced_through_the_admin_api(fake, start_proxy, tmp_path):
    import aiohttp

    token = tmp_path / "token"
    token.write_text("tok\n")
    name, cfg = llm_config(fake.url, llm={"fallback_models": ["fake/b"], "models": ["fake/a"]})
    cfg["admin"]["token_file"] = str(token)
    p = await start_proxy(cfg)
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer tok"}) as s:
        async with s.post(f"{p.admin}/admin/upstreams/{name}/breaker", json={"state": "open", "model": "fake/a"}) as r:
            assert r.status == 200 and (await r.json())["model"] == "fake/a"
        async with s.post(f"{p.admin}/admin/upstreams/{name}/breaker", json={"state": "open", "model": "nope"}) as r:
            assert r.status == 404
        async with s.get(f"{p.admin}/admin/upstreams") as r:
            track = (await r.json())[name]["targets"]["stable"]
        async with s.get(f"{p.admin}/health/ready") as r:
            ready = await r.json()
    assert track["breaker"]["state"] == "closed"
    assert track["model_breakers"]["fake/a"]["state"] == "forced_open"
    assert ready["dependencies"][name]["tracks"]["stable"]["model_breakers"]["fake/a"] == "forced_open"
    r = await client(p).chat.completions.create(model="fake/a", messages=MSG)
    assert r.model == "fake/b" and models(fake) == ["fake/b"]
    import asyncio
    import subprocess
    import sys

    out = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "proxy", "status", "--admin", p.admin],
                                  capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "models: fake/a forced_open" in out.stdout
