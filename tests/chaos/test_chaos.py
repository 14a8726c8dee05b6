"""Chaos through a real toxiproxy server. For each fault: the client's wait is bounded by the total
timeout (plus slack), the answer is a fallback or the documented error, breaker state and metrics move,
and after healing the breaker closes and traffic is normal."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from aiohttp import web

from tests.chaos.conftest import add_toxic
from tests.conftest import metric, upstream_config

SLACK = 1.0


async def timed_get(s, url):
    t0 = time.monotonic()
    try:
        async with s.get(url) as r:
            body = await r.read()
            return r.status, r.headers, body, time.monotonic() - t0
    except aiohttp.ClientPayloadError:
        return "truncated", None, b"", time.monotonic() - t0


def chaos_config(url, **over):
    sections = dict(
        timeouts={"connect": "500ms", "attempt": "300ms", "total": "1s", "idle": "1s"},
        retry={"attempts": 2, "backoff_base": "10ms", "backoff_max": "50ms"},
        breaker={"fail_max": 3, "reset_timeout": "500ms"},
    )
    sections.update(over)
    return upstream_config(url, **sections)


async def heal_and_check(s, p, name, upstream_hits_before, upstream):
    await asyncio.sleep(0.6)  # reset_timeout
    for _ in range(3):
        status, headers, _, _ = await timed_get(s, p.url + "/fresh")
        assert status == 200 and "X-Fallback" not in headers
    assert p.upstream.targets[0].breaker.state == "closed"
    assert metric("circuit_breaker_state", name=name, track="stable") == 0
    assert upstream.hits > upstream_hits_before


async def test_disabled_link_gives_502_within_connect_timeout_then_recovers(upstream, start_proxy, toxic_link):
    proxy, url = toxic_link(upstream.url)
    name, cfg = chaos_config(url, retry={"attempts": 1})
    p = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        assert (await timed_get(s, p.url + "/a"))[0] == 200
        proxy.disable()
        status, headers, body, waited = await timed_get(s, p.url + "/b")
        assert status == 502 and b"connect_failure" in body
        assert waited < 0.5 + SLACK
        proxy.enable()
        assert (await timed_get(s, p.url + "/c"))[0] == 200


@pytest.mark.parametrize("fault", ["latency", "down", "reset_peer", "timeout"])
async def test_fault_is_bounded_served_from_fallback_and_heals(fault, upstream, start_proxy, toxic_link):
    proxy, url = toxic_link(upstream.url)
    name, cfg = chaos_config(url)
    p = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        status, _, warm, _ = await timed_get(s, p.url + "/item")
        assert status == 200
        hits = upstream.hits
        if fault == "latency":
            add_toxic(proxy, "latency", latency=2000)
        elif fault == "down":
            proxy.disable()
        elif fault == "reset_peer":
            add_toxic(proxy, "reset_peer", timeout=0)
            add_toxic(proxy, "reset_peer", stream="upstream", timeout=0)
        else:
            add_toxic(proxy, "timeout", timeout=0)
        for i in range(5):
            status, headers, body, waited = await timed_get(s, p.url + "/item")
            assert waited < 1.0 + SLACK, (i, waited)
            assert status == 200 and headers["X-Fallback"] == "cache" and body == warm, (i, status, body)
            assert headers["X-Fallback-Reason"] in ("timeout", "upstream_error", "circuit_breaker_open")
        status, headers, body, waited = await timed_get(s, p.url + "/never-cached")
        assert status in (502, 503, 504) and b'"error"' in body and waited < 1.0 + SLACK
        assert p.upstream.targets[0].breaker.state == "open"
        assert metric("circuit_breaker_opened_total", name=name, track="stable") >= 1
        assert metric("fallback_responses_total", name=name, source="cache", reason="circuit_breaker_open") >= 1
        # heal
        if fault == "down":
            proxy.enable()
        else:
            for t in list(proxy.toxics()):
                proxy.destroy_toxic(t)
        await heal_and_check(s, p, name, hits, upstream)


async def test_slicer_delivers_the_whole_body(upstream, start_proxy, toxic_link, aiohttp_server):
    payload = bytes(range(256)) * 400

    async def big(request):
        return web.Response(body=payload)

    upstream.behaviour = big
    proxy, url = toxic_link(upstream.url)
    name, cfg = chaos_config(url)
    p = await start_proxy(cfg)
    add_toxic(proxy, "slicer", average_size=500, size_variation=200, delay=100)
    async with aiohttp.ClientSession() as s:
        status, _, body, _ = await timed_get(s, p.url + "/big")
    assert status == 200 and body == payload


async def test_limit_data_mid_body_aborts_client_and_counts_a_failure(upstream, start_proxy, toxic_link):
    payload = b"x" * 200_000

    async def big(request):
        return web.Response(body=payload)

    upstream.behaviour = big
    proxy, url = toxic_link(upstream.url)
    name, cfg = chaos_config(url, breaker={"fail_max": 1, "reset_timeout": "500ms"})
    p = await start_proxy(cfg)
    add_toxic(proxy, "limit_data", bytes=50_000)
    async with aiohttp.ClientSession() as s:
        status, _, body, waited = await timed_get(s, p.url + "/big")
        assert status == "truncated"  # never a complete-looking short answer
        assert waited < 1.0 + SLACK
        assert p.upstream.targets[0].breaker.state == "open"
        assert metric("upstream_requests_total", name=name, track="stable", route="default", status="reset",
                      outcome="upstream") == 1
        for t in list(proxy.toxics()):
            proxy.destroy_toxic(t)
        await asyncio.sleep(0.6)
        status, _, body, _ = await timed_get(s, p.url + "/big")
        assert status == 200 and body == payload
