"""`protocol: openai` with the real `openai` SDK as the client and a fake OpenAI-compatible upstream."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import openai
import pytest

from tests.conftest import metric, upstream_config

MSG = [{"role": "user", "content": "hi"}]




def llm_config(url, **sections):
    name, cfg = upstream_config(url, protocol="openai", **sections)
    return name, cfg


def client(p, **kw) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=p.url + "/api/v1", api_key="sk-app-placeholder", max_retries=0, **kw)


async def test_stream_relayed_chunk_by_chunk(fake, start_proxy):
    fake.delay = 0.2
    name, cfg = llm_config(fake.url, llm={"models": ["fake/model-a"]})
    p = await start_proxy(cfg)
    c = client(p)
    t0 = time.monotonic()
    stream = await c.chat.completions.create(model="fake/model-a", messages=MSG, stream=True)
    arrivals, text = [], []
    async for chunk in stream:
        arrivals.append(time.monotonic() - t0)
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
    assert "".join(text) == fake.content({"messages": MSG})
    assert len(arrivals) == 11
    assert arrivals[0] < 0.6 * arrivals[-1]  # the first chunk long before the upstream finished
    assert arrivals[-1] >= 1.8
    # chunks arrived spread out, not all at once at the end
    assert sum(1 for a, b in zip(arrivals, arrivals[1:], strict=False) if b - a > 0.1) >= 8
    assert metric("llm_stream_first_byte_seconds_count", name=name, model="fake/model-a") == 1
    assert metric("llm_tokens_total", name=name, model="fake/model-a", kind="completion") == 10
    assert metric("llm_tokens_total", name=name, model="fake/model-a", kind="prompt") == 7


async def test_non_streaming_and_other_endpoints(fake, start_proxy):
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
    assert metric("llm_tokens_total", name=name, model="other", kind="completion") == 10


async def test_key_injected_placeholder_never_forwarded(fake, start_proxy, tmp_path, caplog):
    key = tmp_path / "api-key"
    key.write_text("sk-or-real-secret-key\n")
    name, cfg = llm_config(fake.url, request_headers={"Authorization": f"Bearer ${{file:{key}}}"})
    p = await start_proxy(cfg)
    await client(p).chat.completions.create(model="m", messages=MSG)
    await client(p).models.list()
    assert all(r["auth"] == ["Bearer sk-or-real-secret-key"] for r in fake.requests + fake.model_requests)
    assert len(fake.requests) == 1 and fake.model_requests  # the health check carries the key too
    async with aiohttp.ClientSession() as s:
        async with s.get(p.admin + "/admin/config") as r:
            assert "sk-or-real-secret-key" not in await r.text()
        async with s.get(p.admin + "/metrics") as r:
            assert "sk-or-real-secret-key" not in await r.text()
    fake.fail_all = 500  # errors are logged: the key must not be in any of it
    await client(p).chat.completions.create(model="m", messages=MSG)
    logged = caplog.text + " ".join(str(getattr(r, "fields", "")) for r in caplog.records)
    assert caplog.records and "sk-or-real-secret-key" not in logged


async def test_cache_warm_then_fallback_with_marker_and_stream_replay(fake, start_proxy):
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
    assert chunks[-1].choices == [] or chunks[-1].choices[0].finish_reason == "stop"
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
    assert metric("fallback_responses_total", name=name, source="degraded", reason="upstream_5xx") == 2


async def test_degraded_can_answer_503(fake, start_proxy):
    name, cfg = llm_config(fake.url, retry={"attempts": 1}, llm={"degraded": {"status": 503}})
    p = await start_proxy(cfg)
    fake.fail_all = 500
    with pytest.raises(openai.InternalServerError) as ei:
        await client(p).chat.completions.create(model="m", messages=MSG)
    assert ei.value.status_code == 503
    assert ei.value.response.headers["X-Fallback"] == "degraded"


async def test_model_failover_in_order_with_header(fake, start_proxy):
    name, cfg = llm_config(fake.url, retry={"attempts": 1}, breaker={"fail_max": 100},
                           llm={"fallback_models": ["fake/b", "fake/c"]})
    p = await start_proxy(cfg)
    fake.fail_models = {"fake/a", "fake/b"}
    raw = await client(p).chat.completions.with_raw_response.create(model="fake/a", messages=MSG)
    assert raw.headers["X-Model-Fallback"] == "fake/c"
    assert raw.parse().model == "fake/c"
    assert [r["body"]["model"] for r in fake.requests] == ["fake/a", "fake/b", "fake/c"]


async def test_failover_bounded_by_total_timeout(fake, start_proxy):
    name, cfg = llm_config(fake.url, retry={"attempts": 1}, breaker={"fail_max": 100},
                           timeouts={"attempt": "400ms", "total": "700ms"},
                           llm={"fallback_models": ["fake/b", "fake/c"], "degraded": {"enabled": False}})
    p = await start_proxy(cfg)
    fake.slow = 0.5
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as ei:
        await client(p).chat.completions.create(model="fake/a", messages=MSG)
    assert time.monotonic() - t0 < 1.5
    assert ei.value.status_code == 504
    assert len(fake.requests) == 2  # primary timed out at 400 ms, the first fallback was cut by the total


async def test_rate_limit_short_retry_after_waited_long_passed_through(fake, start_proxy):
    name, cfg = llm_config(fake.url, retry={"attempts": 2, "backoff_max": "1s"}, breaker={"fail_max": 100})
    p = await start_proxy(cfg)
    fake.fail_all, fake.retry_after = 429, "30"
    with pytest.raises(openai.RateLimitError) as ei:
        await client(p).chat.completions.create(model="m", messages=[{"role": "user", "content": "uncached"}])
    assert ei.value.response.headers["Retry-After"] == "30" and len(fake.requests) == 1
    fake.fail_all = None
    warm = await client(p).chat.completions.create(model="m", messages=MSG)
    fake.fail_all = 429
    r = await client(p).chat.completions.create(model="m", messages=MSG)
    assert r.model_extra["fallback_reason"] == "rate_limited" and r.choices[0].message.content == warm.choices[0].message.content
    fake.retry_after = "1"
    n = len(fake.requests)
    t0 = time.monotonic()

    async def heal():
        await asyncio.sleep(0.5)
        fake.fail_all = None

    healer = asyncio.create_task(heal())
    r = await client(p).chat.completions.create(model="m", messages=[{"role": "user", "content": "fresh"}])
    await healer
    assert "fallback" not in (r.model_extra or {}) and len(fake.requests) - n == 2
    assert time.monotonic() - t0 >= 0.95


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
    name, cfg = llm_config(fake.url, retry={"attempts": 1}, timeouts={"attempt": "5s", "total": "5s"},
                           llm={"degraded": {"enabled": False}})
    p = await start_proxy(cfg)
    fake.slow = 1.0
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as ei:
        await client(p).chat.completions.create(model="m", messages=MSG, extra_headers={"X-Proxy-Timeout": "300ms"})
    assert ei.value.status_code == 504 and time.monotonic() - t0 < 0.9
    r = await client(p).chat.completions.create(model="m", messages=MSG, extra_headers={"X-Proxy-Timeout": "1h"})
    assert r.choices[0].message.content  # an hour is capped at the configured 5 s, which is enough here


async def test_stream_first_byte_timeout_and_retry_before_first_byte(fake, start_proxy):
    name, cfg = llm_config(fake.url, retry={"attempts": 2, "backoff_base": "10ms", "backoff_max": "10ms"},
                           timeouts={"first_byte": "300ms"}, llm={"degraded": {"enabled": False}},
                           breaker={"fail_max": 100})
    p = await start_proxy(cfg)
    fake.slow = 0.6
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as ei:
        await client(p).chat.completions.create(model="m", messages=MSG, stream=True)
    assert ei.value.status_code == 504 and time.monotonic() - t0 < 1.2
    assert len(fake.requests) == 2  # retried: nothing had reached the client


async def test_stream_without_done_ends_with_error_event(fake, start_proxy):
    name, cfg = llm_config(fake.url, retry={"attempts": 1})
    p = await start_proxy(cfg)
    fake.stream_done = False
    stream = await client(p).chat.completions.create(model="m", messages=MSG, stream=True)
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass


async def test_app_closing_a_stream_stops_the_upstream_stream(fake, start_proxy):
    """The app gives up on a long completion: the proxy must drop the upstream stream at once, not keep
    paying for tokens nobody will read."""
    fake.chunks, fake.delay = 200, 0.02  # ~4 s of stream
    name, cfg = llm_config(fake.url)
    p = await start_proxy(cfg)
    stream = await client(p).chat.completions.create(model="m", messages=MSG, stream=True)
    got = 0
    async for _ in stream:
        got += 1
        if got == 3:
            break
    await stream.close()
    for _ in range(100):
        if fake.aborted:
            break
        await asyncio.sleep(0.02)
    assert fake.aborted == 1 and fake.chunks_sent < 100
    for _ in range(50):
        if p.upstream.counters.in_flight == 0:
            break
        await asyncio.sleep(0.02)
    assert p.upstream.counters.in_flight == 0
