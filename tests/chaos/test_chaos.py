"""Chaos through a real toxiproxy server. For each fault: the client's wait is bounded by the total
timeout (plus slack for a busy machine, far below the fault's own length), the answer is a fallback or
the documented error with the exact reason, breaker state and metrics move, and after healing the
breaker closes and traffic is normal. The breaker's reset runs on the injected clock."""

from __future__ import annotations

import time

import aiohttp
import pytest
from aiohttp import web

from proxy.clock import ManualClock
from tests.support.proxy import upstream_config
from tests.support.toxiproxy import add_toxic, heal

TOTAL = 3.0
SLACK = 5.0  # a loaded machine answers late; every fault below lasts far longer than TOTAL + SLACK
FAULT = 30_000  # ms: a latency the proxy must never wait out


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
        timeouts={"connect": "1s", "attempt": "1s", "total": f"{TOTAL:g}s", "idle": "3s"},
        retry={"attempts": 2, "backoff_base": "10ms", "backoff_max": "50ms"},
        breaker={"fail_max": 3, "reset_timeout": "30s"},
    )
    sections.update(over)
    return upstream_config(url, **sections)


async def heal_and_check(s, p, name, hits_before, upstream, clock, metrics):
    clock.advance(30)  # reset_timeout: the next request is the half-open probe
    for _ in range(3):
        status, headers, _, _ = await timed_get(s, p.url + "/fresh")
        assert status == 200 and "X-Fallback" not in headers
    assert p.breaker.state == "closed"
    assert metrics.value("circuit_breaker_state", name=name, track="stable") == 0
    assert upstream.hits > hits_before


async def test_disabled_link_gives_502_within_connect_timeout_then_recovers(upstream, start_proxy, toxic_link):
    proxy, url = toxic_link(upstream.url)
    name, cfg = chaos_config(url, retry={"attempts": 1})
    p = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        assert (await timed_get(s, p.url + "/a"))[0] == 200
        proxy.disable()
        status, headers, body, waited = await timed_get(s, p.url + "/b")
        assert status == 502 and b"connect_failure" in body
        assert waited < 1 + SLACK
        proxy.enable()
        assert (await timed_get(s, p.url + "/c"))[0] == 200


# fault → the reason of the two requests that meet it before the breaker opens
FAULTS = {"latency": "timeout", "down": "upstream_error", "reset_peer": "upstream_error", "timeout": "timeout"}


@pytest.mark.parametrize("fault", sorted(FAULTS))
async def test_fault_is_bounded_served_from_fallback_and_heals(fault, upstream, start_proxy, toxic_link, metrics):
    proxy, url = toxic_link(upstream.url)
    name, cfg = chaos_config(url)
    clock = ManualClock()
    p = await start_proxy(cfg, clock=clock)
    async with aiohttp.ClientSession() as s:
        status, _, warm, _ = await timed_get(s, p.url + "/item")
        assert status == 200
        hits = upstream.hits
        if fault == "latency":
            add_toxic(proxy, "latency", latency=FAULT)
        elif fault == "down":
            proxy.disable()
        elif fault == "reset_peer":
            add_toxic(proxy, "reset_peer", timeout=0)
            add_toxic(proxy, "reset_peer", stream="upstream", timeout=0)
        else:
            add_toxic(proxy, "timeout", timeout=0)
        reasons = []
        for i in range(5):
            status, headers, body, waited = await timed_get(s, p.url + "/item")
            assert waited < TOTAL + SLACK, (i, waited)
            assert status == 200 and headers["X-Fallback"] == "cache" and body == warm, (i, status, body)
            reasons.append(headers["X-Fallback-Reason"])
        # request 1: two attempts fail; request 2: its first attempt is the third failure (fail_max 3), the
        # breaker opens and no retry goes into it; from then on the breaker answers
        assert reasons == [FAULTS[fault]] * 2 + ["circuit_breaker_open"] * 3
        status, headers, body, waited = await timed_get(s, p.url + "/never-cached")
        assert status == 503 and headers["X-Fallback-Reason"] == "circuit_breaker_open" and waited < TOTAL + SLACK
        assert p.breaker.state == "open"
        assert metrics.delta("circuit_breaker_opened_total", name=name, track="stable") == 1
        assert metrics.delta("fallback_responses_total", name=name, source="cache", reason="circuit_breaker_open") == 3
        assert metrics.delta("fallback_responses_total", name=name, source="cache", reason=FAULTS[fault]) == 2
        heal(proxy)
        await heal_and_check(s, p, name, hits, upstream, clock, metrics)


async def test_slicer_delivers_the_whole_body(upstream, start_proxy, toxic_link):
    payload = bytes(range(256)) * 400

    async def big(request):
        return web.Response(body=payload)

    upstream.behaviour = big
    proxy, url = toxic_link(upstream.url)
    name, cfg = chaos_config(url, timeouts={"attempt": "20s", "total": "20s", "idle": "20s"})
    p = await start_proxy(cfg)
    add_toxic(proxy, "slicer", average_size=500, size_variation=200, delay=100)
    async with aiohttp.ClientSession() as s:
        status, _, body, _ = await timed_get(s, p.url + "/big")
    assert status == 200 and body == payload


async def test_limit_data_mid_body_aborts_client_and_counts_a_failure(upstream, start_proxy, toxic_link, metrics):
    payload = b"x" * 200_000

    async def big(request):
        return web.Response(body=payload)

    upstream.behaviour = big
    proxy, url = toxic_link(upstream.url)
    name, cfg = chaos_config(url, breaker={"fail_max": 1, "reset_timeout": "30s"})
    clock = ManualClock()
    p = await start_proxy(cfg, clock=clock)
    add_toxic(proxy, "limit_data", bytes=50_000)
    async with aiohttp.ClientSession() as s:
        status, _, body, waited = await timed_get(s, p.url + "/big")
        assert status == "truncated"  # never a complete-looking short answer
        assert waited < TOTAL + SLACK
        assert p.breaker.state == "open"
        assert metrics.delta("upstream_requests_total", name=name, track="stable", route="default", status="reset",
                             outcome="upstream") == 1
        heal(proxy)
        clock.advance(30)
        status, _, body, _ = await timed_get(s, p.url + "/big")
        assert status == 200 and body == payload
