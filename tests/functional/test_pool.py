"""The connection pool of the lean upstream client, against a real aiohttp upstream: keep-alive reuse,
retirement after max_lifetime (on the injected clock), and the pending queue's timeout."""

from __future__ import annotations

import asyncio

import aiohttp

from proxy.clock import ManualClock
from tests.support.proxy import upstream_config
from tests.support.upstreams import Gate
from tests.support.wait import eventually


async def _get(s, url):
    async with s.get(url) as r:
        return r.status, await r.read()


async def test_lean_client_retires_idle_connections_after_max_lifetime(upstream, start_proxy):
    clock = ManualClock()
    name, cfg = upstream_config(upstream.url, pool={"max_lifetime": "60s", "idle_timeout": "1h"})
    p = await start_proxy(cfg, clock=clock)
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            assert (await _get(s, p.url + "/a"))[0] == 200
        clock.advance(30)
        assert (await _get(s, p.url + "/b"))[0] == 200
        first = {r["peer"] for r in upstream.requests}
        assert len(first) == 1  # one kept-alive connection, reused while younger than max_lifetime
        old = upstream.requests[0]["transport"]
        clock.advance(31)
        assert (await _get(s, p.url + "/c"))[0] == 200
    assert upstream.requests[-1]["peer"] not in first  # a new connection after 61 s
    await eventually(old.is_closing, what="the retired connection is closed")


async def test_lean_client_retires_a_busy_connection_when_its_answer_is_done(upstream, start_proxy):
    clock = ManualClock()
    name, cfg = upstream_config(upstream.url, pool={"max_lifetime": "60s", "idle_timeout": "1h"})
    p = await start_proxy(cfg, clock=clock)
    gate = Gate()
    upstream.behaviour = gate
    async with aiohttp.ClientSession() as s:
        held = asyncio.create_task(_get(s, p.url + "/long"))
        await eventually(lambda: gate.arrived == 1)
        clock.advance(61)  # the connection outlives max_lifetime while its request is in flight
        gate.open()
        assert (await held)[0] == 200
        await eventually(upstream.requests[0]["transport"].is_closing,
                         what="closed once its answer was done, not returned to the pool")
        upstream.behaviour = None
        assert (await _get(s, p.url + "/next"))[0] == 200
    assert upstream.requests[1]["peer"] != upstream.requests[0]["peer"]


async def test_a_request_waiting_past_pending_timeout_is_shed(upstream, start_proxy, metrics):
    name, cfg = upstream_config(upstream.url, retry={"attempts": 1}, pool={"max_connections": 1},
                                limits={"max_pending": 5, "pending_timeout": "200ms"})
    p = await start_proxy(cfg)
    gate = Gate()
    upstream.behaviour = gate
    async with aiohttp.ClientSession() as s:
        held = asyncio.create_task(_get(s, p.url + "/holds-the-only-connection"))
        await eventually(lambda: gate.arrived == 1)
        async with s.get(p.url + "/waits") as r:  # waits for the connection, which stays taken
            body = await r.json()
            assert r.status == 503 and r.headers["X-Fallback-Reason"] == "overloaded"
            assert body["error"]["message"] == "no connection free within pending_timeout (200ms)"
        assert upstream.hits == 1
        gate.open()
        assert (await held)[0] == 200
    assert metrics.delta("upstream_requests_total", name=name, track="stable", route="default", status="503",
                         outcome="shed") == 1


async def test_aiohttp_path_never_retries_behind_the_retry_policy(start_proxy, metrics):
    """HEAD and streamed bodies go through aiohttp's client, which on its own re-sends an idempotent
    request once when the connection drops. Behind the proxy's retry policy that is an uncounted retry
    past the budget and the breaker: with attempts 1, a reset is one connection, not two."""
    from tests.support.relay import CountingRelay

    relay = await CountingRelay(1).start()
    relay.down = True  # accepts, then resets every connection
    name, cfg = upstream_config(f"http://127.0.0.1:{relay.port}", retry={"attempts": 1})
    p = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        async with s.head(p.url + "/h") as r:
            assert r.status == 502
        assert relay.accepted == 1

        async def body():
            yield b"streamed"

        async with s.put(p.url + "/p", data=body()) as r:
            assert r.status == 502
        assert relay.accepted == 2
    relay.close()
    assert metrics.delta("upstream_requests_total", name=name, track="stable", route="default", status="502",
                         outcome="rejected") == 2


async def test_a_kept_alive_connection_the_upstream_closed_is_replayed_once_uncounted(start_proxy, metrics):
    """HEAD (aiohttp's path) on a kept-alive connection the upstream closes as it is reused: sent once
    more on a new connection, not a 502, not a retry, not a breaker failure. A streamed body cannot be
    sent twice: that one is the upstream's failure."""
    from tests.support.upstreams import ClosesKeptAlive

    up = await ClosesKeptAlive().start()
    name, cfg = upstream_config(up.url, retry={"attempts": 1}, breaker={"fail_max": 1})
    p = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.head(p.url + "/h") as r:
                assert r.status == 200
        assert (up.connections, len(up.answered), len(up.dropped)) == (2, 2, 1)
        assert p.breaker.state == "closed" and p.breaker.cb.fail_counter == 0

        async def body():
            yield b"streamed"

        async with s.post(p.url + "/p", data=body()) as r:
            assert r.status == 502 and (await r.json())["error"]["type"] == "upstream_reset"
    assert up.dropped[-1] == b"POST /p HTTP/1.1" and up.connections == 2  # never sent again
    assert metrics.sample("upstream_retries_total", name=name, reason="reset") is None
    up.close()
