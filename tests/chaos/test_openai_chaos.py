"""The LLM path through a real toxiproxy server, with the real `openai` SDK as the client."""

from __future__ import annotations

import openai
import pytest

from tests.support.proxy import upstream_config
from tests.support.toxiproxy import add_toxic, heal

MSG = [{"role": "user", "content": "chaos"}]


def client(p):
    return openai.AsyncOpenAI(base_url=p.url + "/api/v1", api_key="placeholder", max_retries=0)


async def test_upstream_down_serves_cached_replayed_and_degraded(fake, start_proxy, toxic_link, metrics):
    proxy, url = toxic_link(fake.url)
    name, cfg = upstream_config(url, protocol="openai", timeouts={"connect": "500ms"},
                                breaker={"fail_max": 2, "reset_timeout": "1h"})
    p = await start_proxy(cfg)
    c = client(p)
    warm = await c.chat.completions.create(model="m", messages=MSG)
    streamed = [ch async for ch in await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "s"}], stream=True)]
    proxy.disable()
    r = await c.chat.completions.create(model="m", messages=MSG)
    assert r.model_extra["fallback"] is True and r.choices[0].message.content == warm.choices[0].message.content
    replay = [ch async for ch in await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "s"}], stream=True)]
    assert "".join(ch.choices[0].delta.content or "" for ch in replay if ch.choices) == \
        "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices)
    d = await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "new"}])
    # the cached answer and the replay tripped the breaker (fail_max 2): the new question never went out
    assert d.model_extra["fallback"] is True and d.model_extra["fallback_reason"] == "circuit_breaker_open_no_cache"
    assert p.upstream.targets[0].breaker.state == "open"
    assert metrics.delta("fallback_responses_total", name=name, source="degraded", reason="circuit_breaker_open") == 1


async def test_mid_stream_cut_gives_error_event_counts_failure_no_retry(fake, start_proxy, toxic_link):
    fake.delay = 0.05
    proxy, url = toxic_link(fake.url)
    name, cfg = upstream_config(url, protocol="openai", retry={"attempts": 3}, breaker={"fail_max": 100},
                                llm={"continuation": {"enabled": False}})
    p = await start_proxy(cfg)
    add_toxic(proxy, "limit_data", bytes=600)
    stream = await client(p).chat.completions.create(model="m", messages=MSG, stream=True)
    got = []
    with pytest.raises(openai.APIError) as ei:
        async for ch in stream:
            got.append(ch)
    assert got, "some chunks arrived before the cut"
    assert str(ei.value) == "the upstream stream was interrupted"
    assert len(fake.requests) == 1  # no retry after the first byte
    assert p.model_breaker().cb.fail_counter == 1 and p.breaker.cb.fail_counter == 0
    # nothing partial was cached
    heal(proxy)
    fake.fail_all = 500
    d = await client(p).chat.completions.create(model="m", messages=MSG)
    assert d.model_extra["fallback_reason"] == "upstream_5xx_no_cache"
