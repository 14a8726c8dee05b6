"""`protocol: openai` with the real `openai` SDK as the client and a fake OpenAI-compatible upstream
(tests/support/fake_openai.py). Streams are paced by the test, not by sleeps; waits the proxy makes
(Retry-After, X-RateLimit-Reset) are read from the injected clock."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import openai
import pytest

from proxy.clock import ManualClock
from proxy.llm import sse
from tests.support.proxy import upstream_config
from tests.support.volume import MountedVolume
from tests.support.wait import eventually

MSG = [{"role": "user", "content": "hi"}]


def llm_config(url, **sections):
    return upstream_config(url, protocol="openai", **sections)


def client(p, **kw) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=p.url + "/api/v1", api_key="sk-app-placeholder", max_retries=0, **kw)


async def test_stream_relayed_chunk_by_chunk(fake, start_proxy, metrics):
    """The fake sends each chunk only after the client has the one before: a proxy that held chunks back
    would deadlock here (and fail at the wait's deadline), whatever the machine's speed."""
    fake.gate = asyncio.Queue()
    name, cfg = llm_config(fake.url, llm={"models": ["fake/model-a"]})
    p = await start_proxy(cfg)
    stream = await client(p).chat.completions.create(model="fake/model-a", messages=MSG, stream=True)
    text, chunks = [], 0
    it = stream.__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(it.__anext__(), 30)
        except StopAsyncIteration:
            break
        chunks += 1
        assert fake.chunks_sent == min(chunks, fake.chunks)  # nothing sent ahead of what the client has
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
        fake.gate.put_nowait(None)  # now the next one
    assert "".join(text) == fake.content({"messages": MSG})
    assert chunks == 11  # ten content chunks and the final one with finish_reason and usage
    assert metrics.delta("llm_stream_first_byte_seconds_count", name=name, model="fake/model-a") == 1
    assert metrics.delta("llm_tokens_total", name=name, model="fake/model-a", kind="completion") == 10
    assert metrics.delta("llm_tokens_total", name=name, model="fake/model-a", kind="prompt") == 7


async def test_non_streaming_and_other_endpoints(fake, start_proxy, metrics):
    name, cfg = llm_config(fake.url)
    p = await start_proxy(cfg)
    c = client(p)
    r = await c.chat.completions.create(model="m", messages=MSG)
    assert r.choices[0].message.content.startswith("Hello")
    t = await c.completions.create(model="m", prompt="p")
    assert t.choices[0].text.startswith("Hello")
    e = await c.embeddings.create(model="m", input="x")
    assert e.data[0].embedding == [0.1, 0.2, 0.3]
    models = await c.models.list()
    assert [m.id async for m in models] == ["fake/model-a", "fake/model-b"]
    assert metrics.delta("llm_tokens_total", name=name, model="other", kind="completion") == 10


async def test_key_injected_placeholder_never_forwarded(fake, start_proxy, tmp_path, caplog):
    key = tmp_path / "api-key"
    key.write_text("sk-or-real-secret-key\n")
    name, cfg = llm_config(fake.url, request_headers={"Authorization": f"Bearer ${{file:{key}}}"},
                           health={"interval": "200ms"})
    p = await start_proxy(cfg)
    await client(p).chat.completions.create(model="m", messages=MSG)
    # the active health check (GET /api/v1/models, by the proxy alone: this test never lists models)
    await eventually(lambda: fake.model_requests, what="an active health check reached /models")
    assert all(r["auth"] == ["Bearer sk-or-real-secret-key"] for r in fake.requests + fake.model_requests)
    assert len(fake.requests) == 1
    health = p.upstream.targets[0].health
    assert health.healthy is True and health.last_check is not None  # a check's result, not the initial state
    async with aiohttp.ClientSession() as s:
        async with s.get(p.admin + "/admin/config") as r:
            assert "sk-or-real-secret-key" not in await r.text()
        async with s.get(p.admin + "/metrics") as r:
            assert "sk-or-real-secret-key" not in await r.text()
    fake.fail_all = 500  # errors are logged: the key must not be in any of it
    await client(p).chat.completions.create(model="m", messages=MSG)
    logged = caplog.text + " ".join(str(getattr(r, "fields", "")) for r in caplog.records)
    assert caplog.records and "sk-or-real-secret-key" not in logged


async def test_key_rotated_by_a_secret_data_swap_reaches_completions_and_checks(fake, start_proxy, tmp_path):
    secrets = MountedVolume(tmp_path / "secret", "api-key")
    path = secrets.write("sk-or-before-rotation\n")
    name, cfg = llm_config(fake.url, request_headers={"Authorization": f"Bearer ${{file:{path}}}"},
                           health={"interval": "200ms"})
    cfg["reload"] = {"interval": "200ms"}
    p = await start_proxy(cfg)
    await client(p).chat.completions.create(model="m", messages=MSG)
    assert fake.requests[-1]["auth"] == ["Bearer sk-or-before-rotation"]
    secrets.write("sk-or-after-rotation\n")  # the kubelet's ..data swap: the file itself is never written
    await eventually(lambda: p.app.runtime.upstreams[name].request_headers["Authorization"]
                     == "Bearer sk-or-after-rotation", what="the rotated key is applied")
    await client(p).chat.completions.create(model="m", messages=[{"role": "user", "content": "after"}])
    assert fake.requests[-1]["auth"] == ["Bearer sk-or-after-rotation"]
    n = len(fake.model_requests)
    await eventually(lambda: len(fake.model_requests) > n + 1, what="two more health checks")
    assert fake.model_requests[-1]["auth"] == ["Bearer sk-or-after-rotation"]


async def test_cache_warm_then_fallback_with_marker_and_stream_replay(fake, start_proxy, metrics):
    name, cfg = llm_config(fake.url, retry={"attempts": 1}, breaker={"fail_max": 100})
    p = await start_proxy(cfg)
    c = client(p)
    warm = await c.chat.completions.create(model="m", messages=MSG, temperature=0.2)
    streamed = [ch async for ch in await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "s"}], stream=True)]
    streamed_text = "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices)
    fake.fail_all = 503
    # same request, other key order and an excluded field (user): same cache key
    r = await c.chat.completions.create(temperature=0.2, messages=MSG, model="m", user="someone")
    assert r.choices[0].message.content == warm.choices[0].message.content
    assert r.model_extra["fallback"] is True and r.model_extra["fallback_reason"] == "upstream_5xx"
    # the non-streamed answer replayed as a stream
    chunks = [ch async for ch in await c.chat.completions.create(model="m", messages=MSG, temperature=0.2, stream=True)]
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == warm.choices[0].message.content
    assert chunks[0].model_extra["fallback"] is True
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10  # usage comes last, as OpenAI sends it
    # the streamed answer cached earlier: served to a non-streaming caller, and replayed to a streaming one
    r2 = await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "s"}])
    assert r2.choices[0].message.content == streamed_text and r2.model_extra["fallback"] is True
    assert r2.usage.completion_tokens == 10
    again = [ch async for ch in await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "s"}], stream=True)]
    assert "".join(ch.choices[0].delta.content or "" for ch in again if ch.choices) == streamed_text
    # nothing cached: the degraded completion, for both kinds of caller
    d = await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "never asked"}])
    assert d.choices[0].message.content == "I'm currently experiencing technical difficulties. Please try again in a moment."
    assert d.model_extra["fallback_reason"] == "upstream_5xx_no_cache"
    ds = [ch async for ch in await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "nope"}], stream=True)]
    assert "technical difficulties" in "".join(ch.choices[0].delta.content or "" for ch in ds if ch.choices)
    assert metrics.delta("fallback_responses_total", name=name, source="degraded", reason="upstream_5xx") == 2


async def test_degraded_can_answer_503(fake, start_proxy):
    name, cfg = llm_config(fake.url, retry={"attempts": 1}, llm={"degraded": {"status": 503}})
    p = await start_proxy(cfg)
    fake.fail_all = 500
    with pytest.raises(openai.InternalServerError) as ei:
        await client(p).chat.completions.create(model="m", messages=MSG)
    assert ei.value.status_code == 503
    assert ei.value.response.headers["X-Fallback"] == "degraded"


async def test_model_failover_in_order_with_header(fake, start_proxy, json_log):
    name, cfg = llm_config(fake.url, retry={"attempts": 1}, breaker={"fail_max": 100},
                           llm={"fallback_models": ["fake/b", "fake/c"]})
    cfg["log"] = {"access": True}
    p = await start_proxy(cfg)
    fake.fail_models = {"fake/a", "fake/b"}
    raw = await client(p).chat.completions.with_raw_response.create(model="fake/a", messages=MSG)
    assert raw.headers["X-Model-Fallback"] == "fake/c"
    assert raw.parse().model == "fake/c"
    assert [r["body"]["model"] for r in fake.requests] == ["fake/a", "fake/b", "fake/c"]
    (line,) = json_log.events("access", upstream=name)
    assert line["model_fallback"] == "fake/c" and line["status"] == "200"  # the log says it too


async def test_a_429_without_retry_after_fails_over_to_the_next_model(fake, start_proxy):
    """A rate limit without a stated wait is that model's, not an outage: the primary is asked again once
    after a jittered wait of at least backoff_base (never hammered, though attempts is 3), then the next
    model answers, and the breaker counts nothing."""
    name, cfg = llm_config(fake.url, retry={"attempts": 3, "backoff_base": "300ms"},
                           llm={"fallback_models": ["fake/b"]})
    p = await start_proxy(cfg)
    fake.rate_limit_models = {"fake/a"}
    raw = await client(p).chat.completions.with_raw_response.create(model="fake/a", messages=MSG)
    assert raw.headers["X-Model-Fallback"] == "fake/b" and raw.parse().model == "fake/b"
    assert [r["body"]["model"] for r in fake.requests] == ["fake/a", "fake/a", "fake/b"]
    assert fake.requests[1]["t"] - fake.requests[0]["t"] >= 0.3
    assert p.breaker.cb.fail_counter == 0
    fake.rate_limit_models = {"fake/a", "fake/b"}  # every model limited, nothing cached: the 429 to back off
    with pytest.raises(openai.RateLimitError):
        await client(p).chat.completions.create(model="fake/a", messages=[{"role": "user", "content": "new"}])


async def test_an_open_target_breaker_skips_model_failover(fake, start_proxy, metrics):
    """Every model goes to the same target: once the target's breaker is open (connection-level
    failures: here a reset before any head), failing over would only knock on a door known to be shut."""
    name, cfg = llm_config(fake.url, retry={"attempts": 1}, breaker={"fail_max": 1, "reset_timeout": "1h"},
                           llm={"fallback_models": ["fake/b", "fake/c"]})
    p = await start_proxy(cfg)
    fake.reset_first = 100
    r = await client(p).chat.completions.create(model="fake/a", messages=MSG)
    assert [q["body"]["model"] for q in fake.requests] == ["fake/a"]
    assert p.breaker.state == "open"
    assert r.model_extra["fallback_reason"] == "upstream_error_no_cache"
    r = await client(p).chat.completions.create(model="fake/b", messages=MSG)  # would succeed upstream
    assert r.model_extra["fallback_reason"] == "circuit_breaker_open_no_cache" and len(fake.requests) == 1


async def test_failover_bounded_by_total_timeout(fake, start_proxy):
    """The primary's attempt times out (2 s), the first fallback model is cut by the total (3 s), the
    second is never tried: no model gets a request it has no time left to answer. Seconds of margin on
    each side, so a loaded machine keeps the same order of events."""
    name, cfg = llm_config(fake.url, retry={"attempts": 1}, breaker={"fail_max": 100},
                           timeouts={"attempt": "2s", "total": "3s"},
                           llm={"fallback_models": ["fake/b", "fake/c"], "degraded": {"enabled": False}})
    p = await start_proxy(cfg)
    fake.hang = True
    with pytest.raises(openai.APIStatusError) as ei:
        await client(p).chat.completions.create(model="fake/a", messages=MSG)
    assert ei.value.status_code == 504
    assert ei.value.body["message"] == "total timeout (3s) expired before the upstream answered"
    assert [r["body"]["model"] for r in fake.requests] == ["fake/a", "fake/b"]


async def test_rate_limit_short_retry_after_waited_long_passed_through(fake, start_proxy):
    clock = ManualClock()
    name, cfg = llm_config(fake.url, retry={"attempts": 2, "backoff_max": "1s"}, breaker={"fail_max": 100})
    p = await start_proxy(cfg, clock=clock)
    fake.fail_all, fake.retry_after = 429, "30"
    with pytest.raises(openai.RateLimitError) as ei:
        await client(p).chat.completions.create(model="m", messages=[{"role": "user", "content": "uncached"}])
    assert ei.value.response.headers["Retry-After"] == "30" and len(fake.requests) == 1
    fake.fail_all = None
    warm = await client(p).chat.completions.create(model="m", messages=MSG)
    fake.fail_all = 429
    r = await client(p).chat.completions.create(model="m", messages=MSG)
    assert r.model_extra["fallback_reason"] == "rate_limited" and r.choices[0].message.content == warm.choices[0].message.content
    assert clock.sleeps == []
    # a short Retry-After is waited for, then the call goes through
    fake.retry_after, fake.fail_first, fake.completions = "1", 1, 0
    n = len(fake.requests)
    r = await client(p).chat.completions.create(model="m", messages=[{"role": "user", "content": "fresh"}])
    assert r.model_extra == {} and len(fake.requests) - n == 2  # the upstream's answer, no fallback markers
    assert clock.sleeps == [1.0]


async def test_x_ratelimit_reset_honoured_end_to_end(fake, start_proxy):
    """OpenRouter states its wait as `X-RateLimit-Reset`, an epoch time in milliseconds."""
    clock = ManualClock()
    name, cfg = llm_config(fake.url, retry={"attempts": 2, "backoff_max": "2s"}, breaker={"fail_max": 100})
    p = await start_proxy(cfg, clock=clock)
    fake.fail_all, fake.fail_first = 429, 1
    fake.rate_limit_reset = str(int((time.time() + 1.5) * 1000))
    r = await client(p).chat.completions.create(model="m", messages=MSG)
    assert r.choices[0].message.content.startswith("Hello") and len(fake.requests) == 2
    assert len(clock.sleeps) == 1 and 0 < clock.sleeps[0] <= 1.5  # the wait the header stated
    # a reset further away than backoff_max: passed back at once
    fake.fail_first, fake.completions = 0, 0
    fake.rate_limit_reset = str(int((time.time() + 60) * 1000))
    with pytest.raises(openai.RateLimitError):
        await client(p).chat.completions.create(model="m", messages=[{"role": "user", "content": "later"}])
    assert len(fake.requests) == 3 and len(clock.sleeps) == 1


async def test_bad_input_refused_in_openai_shape_nothing_forwarded(fake, start_proxy):
    name, cfg = llm_config(fake.url)
    p = await start_proxy(cfg)
    url = p.url + "/api/v1/chat/completions"
    async with aiohttp.ClientSession() as s:
        for data, headers, status in [
            (b"not json", {}, 400),
            (b"[1, 2]", {}, 400),
            (b"x" * (20 * 1024 * 1024), {}, 413),
            (b'{"model": "m", "messages": []}', {"X-Proxy-Cache": "sometimes"}, 400),
            (b'{"model": "m", "messages": []}', {"X-Proxy-Timeout": "soon"}, 400),
        ]:
            async with s.post(url, data=data, headers={"Content-Type": "application/json", **headers}) as r:
                assert r.status == status
                err = (await r.json())["error"]
                assert {"message", "type", "code"} <= set(err) and err["request_id"]
    assert fake.requests == []


async def test_proxy_cache_headers(fake, start_proxy):
    name, cfg = llm_config(fake.url, retry={"attempts": 1})
    p = await start_proxy(cfg)
    c = client(p)
    with pytest.raises(openai.APIStatusError) as ei:
        await c.chat.completions.create(model="m", messages=MSG, extra_headers={"X-Proxy-Cache": "only-if-cached"})
    assert ei.value.status_code == 504
    await c.chat.completions.create(model="m", messages=MSG, extra_headers={"X-Proxy-Cache": "no-store"})
    with pytest.raises(openai.APIStatusError):
        await c.chat.completions.create(model="m", messages=MSG, extra_headers={"X-Proxy-Cache": "only-if-cached"})
    warm = await c.chat.completions.create(model="m", messages=MSG)
    n = len(fake.requests)
    hit = await c.chat.completions.create(model="m", messages=MSG, extra_headers={"X-Proxy-Cache": "only-if-cached"})
    assert hit.choices[0].message.content == warm.choices[0].message.content and len(fake.requests) == n
    assert all("X-Proxy-Cache" not in r["headers"] for r in fake.requests)


async def test_proxy_timeout_header_capped(fake, start_proxy):
    name, cfg = llm_config(fake.url, retry={"attempts": 1}, timeouts={"attempt": "20s", "total": "20s"},
                           llm={"degraded": {"enabled": False}})
    p = await start_proxy(cfg)
    fake.hang = True
    with pytest.raises(openai.APIStatusError) as ei:
        await client(p).chat.completions.create(model="m", messages=MSG, extra_headers={"X-Proxy-Timeout": "300ms"})
    assert ei.value.status_code == 504
    assert ei.value.body["message"] == "total timeout (300ms) expired before the upstream answered"
    fake.hang = False
    r = await client(p).chat.completions.create(model="m", messages=MSG, extra_headers={"X-Proxy-Timeout": "1h"})
    assert r.choices[0].message.content  # an hour is capped at the configured 20 s, which is enough here


async def test_stream_first_byte_timeout_and_retry_before_first_byte(fake, start_proxy):
    name, cfg = llm_config(fake.url, retry={"attempts": 2, "backoff_base": "10ms", "backoff_max": "10ms"},
                           timeouts={"first_byte": "300ms"}, llm={"degraded": {"enabled": False}},
                           breaker={"fail_max": 100})
    p = await start_proxy(cfg)
    fake.hang = True
    with pytest.raises(openai.APIStatusError) as ei:
        await client(p).chat.completions.create(model="m", messages=MSG, stream=True)
    assert ei.value.status_code == 504
    assert ei.value.body["message"] == "first_byte timeout (300ms) expired before the upstream answered"
    assert len(fake.requests) == 2  # retried: nothing had reached the client


async def _raw_stream(p) -> bytes:
    async with aiohttp.ClientSession() as s:
        async with s.post(p.url + "/api/v1/chat/completions", json={"model": "m", "messages": MSG, "stream": True},
                          timeout=aiohttp.ClientTimeout(total=60)) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
            return await r.read()


def _events(body: bytes) -> list[bytes]:
    return [e + b"\n\n" for e in body.split(b"\n\n") if e]


async def test_mid_stream_cut_ends_with_the_exact_error_event_then_done(fake, start_proxy):
    """The provider's connection dies after three chunks: the app gets those three, then one
    OpenAI-shaped error event and `data: [DONE]`, byte for byte — and the failure counts (continuation
    off: tests/functional/test_openai_continuation.py has it on)."""
    name, cfg = llm_config(fake.url, retry={"attempts": 3}, breaker={"fail_max": 100}, llm={"continuation": {"enabled": False}})
    p = await start_proxy(cfg)
    fake.cut_after = 3
    events = _events(await _raw_stream(p))
    assert len(events) == 5
    text, n = fake.content({"messages": MSG}), fake.chunks
    assert [json.loads(e[6:])["choices"][0]["delta"]["content"] for e in events[:3]] == [
        text[i * len(text) // n:(i + 1) * len(text) // n] for i in range(3)]
    assert events[3] == b'data: {"error":{"message":"the upstream stream was interrupted","type":"upstream_error","code":502}}\n\n'
    assert events[4] == sse.DONE
    assert len(fake.requests) == 1  # never retried once the first event reached the app
    assert p.model_breaker().cb.fail_counter == 1 and p.breaker.cb.fail_counter == 0


async def test_stream_idle_timeout_between_events(fake, start_proxy):
    """Silence between events longer than `idle` ends the stream in-band; a long stream with steady
    events is never cut (streams have no total timeout)."""
    name, cfg = llm_config(fake.url, timeouts={"idle": "1s", "total": "1s", "attempt": "1s"},
                           breaker={"fail_max": 100}, llm={"continuation": {"enabled": False}})
    p = await start_proxy(cfg)
    fake.stall_after = 3
    events = _events(await _raw_stream(p))
    assert len(events) == 5
    assert events[3] == (b'data: {"error":{"message":"no event from the upstream within the idle timeout",'
                         b'"type":"upstream_error","code":502}}\n\n')
    assert events[4] == sse.DONE
    assert p.model_breaker().cb.fail_counter == 1 and p.breaker.cb.fail_counter == 0
    # steady events, each well inside `idle`, for longer than total and attempt: never cut
    fake.stall_after, fake.chunks, fake.delay = None, 30, 0.1
    events = _events(await _raw_stream(p))
    assert events[-1] == sse.DONE and b'"error"' not in b"".join(events)
    assert len(events) == 32


async def test_a_whole_stream_without_done_is_a_success_and_gets_its_done(fake, start_proxy, metrics):
    """[DONE] is optional in practice: a stream whose choices all finished and whose body ended cleanly is
    a whole answer. The app gets every token, finish_reason, usage and one [DONE] the proxy adds; the
    breaker counts successes (six of them, fail_max 5: it would have opened), and the answer is cached."""
    name, cfg = llm_config(fake.url, retry={"attempts": 1}, breaker={"fail_max": 5})
    p = await start_proxy(cfg)
    fake.stream_done = False
    for _ in range(6):
        events = _events(await _raw_stream(p))
        assert events[-1] == sse.DONE and events.count(sse.DONE) == 1 and b'"error"' not in b"".join(events)
        assert b'"finish_reason": "stop"' in b"".join(events) and b'"usage"' in b"".join(events)
    assert p.breaker.state == "closed" and p.breaker.cb.fail_counter == 0
    text = []
    async for ch in await client(p).chat.completions.create(model="m", messages=MSG, stream=True):
        if ch.choices and ch.choices[0].delta.content:
            text.append(ch.choices[0].delta.content)
    assert "".join(text) == fake.content({"messages": MSG})  # the real SDK reads it to the end
    assert metrics.family_delta("upstream_requests_total", name=name, status="reset") == 0
    async with aiohttp.ClientSession() as s, s.post(  # whole: it was cached
            p.url + "/api/v1/chat/completions", json={"model": "m", "messages": MSG, "stream": True},
            headers={"X-Proxy-Cache": "only-if-cached"}) as r:
        assert r.status == 200 and (await r.read()).endswith(sse.DONE)


async def test_a_stream_that_ends_before_every_choice_finished_is_a_failure(fake, start_proxy):
    name, cfg = llm_config(fake.url, retry={"attempts": 1}, llm={"continuation": {"enabled": False}})
    p = await start_proxy(cfg)
    fake.stream_done = fake.stream_finish = False  # tokens, then a clean end with no finish_reason
    stream = await client(p).chat.completions.create(model="m", messages=MSG, stream=True)
    with pytest.raises(openai.APIError) as ei:
        async for _ in stream:
            pass
    assert str(ei.value) == "the upstream stream ended early"
    assert p.model_breaker().cb.fail_counter == 1 and p.breaker.cb.fail_counter == 0


async def test_app_closing_a_stream_stops_the_upstream_stream(fake, start_proxy):
    """The app gives up on a long completion: the proxy must drop the upstream stream at once, not keep
    paying for tokens nobody will read."""
    fake.chunks, fake.gate = 200, asyncio.Queue()
    name, cfg = llm_config(fake.url)
    p = await start_proxy(cfg)
    stream = await client(p).chat.completions.create(model="m", messages=MSG, stream=True)
    got = 0
    async for _ in stream:
        got += 1
        fake.gate.put_nowait(None)
        if got == 3:
            break
    await stream.close()
    for _ in range(50):  # tokens for the rest of the stream: an upstream still streaming would use them
        fake.gate.put_nowait(None)
    await eventually(lambda: fake.aborted == 1, what="the upstream stream was dropped")
    assert fake.chunks_sent < 60
    await eventually(lambda: p.upstream.counters.in_flight == 0)
