"""The chain against real aiohttp upstreams: breakers (all three modes), retries, budgets, Retry-After,
shedding, fallbacks, privacy, per-route policy, operator controls and what the logs say about them.
Breaker resets and cache ages run on an injected clock: nothing here waits for a window to close."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp import web

from proxy.clock import ManualClock
from tests.support.net import free_port, raw_head
from tests.support.proxy import upstream_config
from tests.support.upstreams import Gate, failing, hang
from tests.support.wait import eventually


def json_error(body: bytes) -> tuple[str, str]:
    e = json.loads(body)["error"]
    return e["type"], e["message"]


async def get(s, url, **kw):
    async with s.get(url, **kw) as r:
        return r.status, r.headers, await r.read()


async def test_breaker_opens_sends_nothing_then_half_opens_and_closes(upstream, start_proxy, metrics, json_log):
    clock = ManualClock()
    name, cfg = upstream_config(upstream.url, retry={"attempts": 1},
                                breaker={"fail_max": 3, "reset_timeout": "30s"})
    p = await start_proxy(cfg, clock=clock)
    upstream.behaviour = failing(500)
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            assert (await get(s, p.url + "/x"))[0] == 500
        assert upstream.hits == 3
        for _ in range(10):
            status, headers, body = await get(s, p.url + "/x")
            assert status == 503 and headers["X-Fallback-Reason"] == "circuit_breaker_open"
            assert int(headers["Retry-After"]) == 30
        assert upstream.hits == 3  # open: no upstream I/O at all
        assert metrics.value("circuit_breaker_state", name=name, track="stable") == 1
        assert metrics.delta("circuit_breaker_opened_total", name=name, track="stable") == 1
        assert metrics.delta("upstream_requests_total", name=name, track="stable", route="default", status="503",
                             outcome="rejected") == 10
        upstream.behaviour = None
        clock.advance(29)
        assert (await get(s, p.url + "/x"))[0] == 503  # not yet
        clock.advance(1)
        assert (await get(s, p.url + "/x"))[0] == 200  # the half-open probe, and it closes
        assert metrics.value("circuit_breaker_state", name=name, track="stable") == 0
        assert upstream.hits == 4
    # every transition is one JSON line naming upstream, track and why
    opened, = json_log.events("breaker_opened", upstream=name)
    assert (opened["track"], opened["failures"], opened["previous"], opened["reset_timeout"]) == ("stable", 3, "closed", 30)
    assert (opened["level"], opened["reason"]) == ("warning", "upstream answered 500")
    half, = json_log.events("breaker_half_open", upstream=name)
    closed, = json_log.events("breaker_closed", upstream=name)
    assert (half["previous"], closed["previous"], closed["state"]) == ("open", "half_open", "closed")


async def test_half_open_lets_only_max_calls_through(upstream, start_proxy):
    clock = ManualClock()
    name, cfg = upstream_config(upstream.url, retry={"attempts": 1},
                                breaker={"fail_max": 1, "reset_timeout": "30s", "half_open_max_calls": 1})
    p = await start_proxy(cfg, clock=clock)
    upstream.behaviour = failing(500)
    async with aiohttp.ClientSession() as s:
        await get(s, p.url + "/x")
        hits = upstream.hits
        clock.advance(30)
        gate = Gate()
        upstream.behaviour = gate
        tasks = [asyncio.create_task(get(s, p.url + "/x")) for _ in range(50)]
        # the one probe is held at the upstream while the other 49 are turned away
        await eventually(lambda: gate.arrived == 1 and sum(t.done() for t in tasks) == 49)
        gate.open()
        results = await asyncio.gather(*tasks)
    assert upstream.hits - hits == 1
    assert sorted(r[0] for r in results) == [200] + [503] * 49


async def test_ratio_breaker_through_the_proxy_opens_at_the_ratio_not_before(upstream, start_proxy):
    """`mode: ratio`: every other answer fails; the breaker opens when min_requests are in the window
    and the failure ratio reaches failure_ratio — not at the first failures, as consecutive would."""
    clock = ManualClock()
    name, cfg = upstream_config(upstream.url, retry={"attempts": 1},
                                breaker={"mode": "ratio", "fail_max": 1, "reset_timeout": "30s",
                                         "ratio": {"failure_ratio": 0.5, "window": "30s", "min_requests": 10}})
    p = await start_proxy(cfg, clock=clock)
    n = 0

    async def alternate(request):
        nonlocal n
        n += 1
        return web.Response(status=500 if n % 2 else 200, text="x")

    upstream.behaviour = alternate
    async with aiohttp.ClientSession() as s:
        for i in range(9):
            await get(s, p.url + f"/r{i}")  # each path once: no cached answer stands in for the upstream
            assert p.breaker.state == "closed"  # 9 requests: below min_requests, however many failed
        await get(s, p.url + "/r9")
        assert p.breaker.state == "open"  # the 10th: 5 of 10 failed
        assert (await get(s, p.url + "/r10"))[0] == 503 and upstream.hits == 10
        # a low steady rate does not trip it: 1 failure in 10, over a fresh window
        p.breaker.force("auto")
        clock.advance(31)
        n = 0

        async def alternate_low(request):
            nonlocal n
            n += 1
            return web.Response(status=500 if n % 10 == 0 else 200, text="x")

        upstream.behaviour = alternate_low

        for i in range(50):
            await get(s, p.url + f"/low{i}")
        assert p.breaker.state == "closed" and upstream.hits == 60


async def test_slow_calls_open_the_breaker_through_the_proxy(upstream, start_proxy):
    """`slow_call`: answers that take longer than duration count; at their ratio the breaker opens,
    though every answer was a 200. The upstream's slowness is the injected clock moving."""
    clock = ManualClock()
    name, cfg = upstream_config(upstream.url, retry={"attempts": 1},
                                breaker={"reset_timeout": "30s", "slow_call": {"duration": "1s", "ratio": 0.5},
                                         "ratio": {"window": "30s", "min_requests": 4}})
    p = await start_proxy(cfg, clock=clock)
    pattern = iter([True, False, False, True])

    async def maybe_slow(request):
        if next(pattern):
            clock.advance(2)  # two seconds pass while this answer is made
        return web.Response(text="ok")

    upstream.behaviour = maybe_slow
    async with aiohttp.ClientSession() as s:
        for i in range(3):
            assert (await get(s, p.url + f"/s{i}"))[0] == 200
            assert p.breaker.state == "closed", i
        assert (await get(s, p.url + "/s3"))[0] == 200
        assert p.breaker.state == "open"  # 2 of 4 slow = the ratio
        assert (await get(s, p.url + "/s4"))[0] == 503 and upstream.hits == 4


async def test_post_not_retried_get_retried_idempotency_key_honoured(upstream, start_proxy, metrics):
    name, cfg = upstream_config(upstream.url, retry={"attempts": 3, "backoff_base": "1ms", "backoff_max": "5ms"},
                                breaker={"fail_max": 100})
    p = await start_proxy(cfg)
    upstream.behaviour = failing(503)
    async with aiohttp.ClientSession() as s:
        async with s.post(p.url + "/p", data=b"x") as r:
            assert r.status == 503
        assert upstream.hits == 1
        assert (await get(s, p.url + "/g"))[0] == 503
        assert upstream.hits == 4
        async with s.post(p.url + "/p", data=b"x", headers={"Idempotency-Key": "abc"}) as r:
            assert r.status == 503
        assert upstream.hits == 7
        assert all(r["body"] == b"x" for r in upstream.requests if r["method"] == "POST")
    assert metrics.delta("upstream_retries_total", name=name, reason="503") == 4


async def test_bodies_over_max_replay_body_are_streamed_and_not_retried(upstream, start_proxy):
    name, cfg = upstream_config(upstream.url, retry={"attempts": 3, "backoff_base": "1ms", "backoff_max": "1ms",
                                                     "max_replay_body": "1KiB"}, breaker={"fail_max": 100})
    p = await start_proxy(cfg)
    upstream.behaviour = failing(503)
    async with aiohttp.ClientSession() as s:
        async with s.put(p.url + "/small", data=b"s" * 1024) as r:
            assert r.status == 503
        assert upstream.hits == 3  # kept for a replay: retried
        async with s.put(p.url + "/big", data=b"b" * 1025) as r:
            assert r.status == 503
        assert upstream.hits == 4  # one byte over: streamed through once, never replayed

        async def chunked():
            for _ in range(3):
                yield b"c" * 512

        async with s.put(p.url + "/chunked", data=chunked()) as r:
            assert r.status == 503
        assert upstream.hits == 5
    assert [len(r["body"]) for r in upstream.requests] == [1024, 1024, 1024, 1025, 1536]


async def test_budget_caps_retries_when_everything_fails(upstream, start_proxy, metrics):
    name, cfg = upstream_config(upstream.url, retry={"attempts": 3, "backoff_base": "50ms", "backoff_max": "50ms",
                                                     "budget_ratio": 0.2, "budget_min": 3},
                                breaker={"fail_max": 10000})
    p = await start_proxy(cfg)
    gate = Gate(failing(503))
    upstream.behaviour = gate
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        tasks = [asyncio.create_task(get(s, p.url + "/x")) for _ in range(100)]
        await eventually(lambda: gate.arrived == 100)
        gate.open()
        await asyncio.gather(*tasks)
    # 100 first attempts; retries in flight are capped at max(0.2 * in-flight, 3), far below 200
    retries = upstream.hits - 100
    assert 0 < retries <= 60, retries
    assert metrics.delta("upstream_retry_budget_exhausted_total", name=name) > 0
    assert metrics.delta("upstream_retries_total", name=name, reason="503") == retries


async def test_retry_after_honoured_or_refused(upstream, start_proxy):
    clock = ManualClock()
    name, cfg = upstream_config(upstream.url, retry={"attempts": 2, "backoff_max": "1s"}, breaker={"fail_max": 100})
    p = await start_proxy(cfg, clock=clock)
    async with aiohttp.ClientSession() as s:
        upstream.behaviour = failing(429, {"Retry-After": "30"})
        status, headers, _ = await get(s, p.url + "/r")
        assert status == 429 and headers["Retry-After"] == "30" and upstream.hits == 1
        assert clock.sleeps == []  # longer than backoff_max: the answer stands, nothing waited
        calls = 0

        async def once(request):
            nonlocal calls
            calls += 1
            if calls == 1:
                return web.Response(status=503, headers={"Retry-After": "1"})
            return web.Response(text="ok")

        upstream.behaviour = once
        status, _, _ = await get(s, p.url + "/r")
        assert status == 200 and calls == 2
        assert clock.sleeps == [1.0]  # the stated wait, not a jittered backoff


async def test_shed_at_max_in_flight_and_max_pending(upstream, start_proxy, metrics):
    name, cfg = upstream_config(upstream.url, retry={"attempts": 1},
                                limits={"max_in_flight": 4, "max_pending": 1, "pending_timeout": "60s"},
                                pool={"max_connections": 2})
    p = await start_proxy(cfg)
    gate = Gate()
    upstream.behaviour = gate
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        tasks = [asyncio.create_task(get(s, p.url + "/x")) for _ in range(8)]
        # two connections busy, one request waiting for them, the other five shed at once
        await eventually(lambda: gate.arrived == 2 and sum(t.done() for t in tasks) == 5
                         and p.upstream.targets[0].pool.pending == 1)
        assert upstream.hits == 2
        gate.open()
        results = await asyncio.gather(*tasks)
    statuses = sorted(r[0] for r in results)
    assert statuses.count(200) == 3 and statuses.count(503) == 5
    shed = [r for r in results if r[0] == 503]
    assert all(r[1]["X-Fallback-Reason"] == "overloaded" and r[1]["Retry-After"] == "1" for r in shed)
    assert metrics.delta("upstream_shed_total", name=name) == 5
    assert metrics.delta("upstream_requests_total", name=name, track="stable", route="default", status="503",
                         outcome="shed") == 5


async def test_fallback_cache_stale_static_with_headers(upstream, start_proxy, metrics, json_log):
    clock = ManualClock()
    name, cfg = upstream_config(upstream.url, retry={"attempts": 1}, breaker={"fail_max": 100},
                                fallback={"cache_ttl": "1m", "stale_ttl": "1h",
                                          "static": {"status": 200, "body": '{"degraded": true}'}})
    p = await start_proxy(cfg, clock=clock)
    async with aiohttp.ClientSession() as s:
        status, _, fresh = await get(s, p.url + "/item/1")
        assert status == 200
        upstream.behaviour = failing(503)
        status, headers, body = await get(s, p.url + "/item/1")
        assert (status, body, headers["X-Fallback"], headers["X-Fallback-Reason"]) == (200, fresh, "cache", "upstream_5xx")
        assert headers["Age"] == "0"
        clock.advance(61)
        status, headers, body = await get(s, p.url + "/item/1")
        assert (headers["X-Fallback"], headers["Age"], body) == ("stale", "61", fresh)
        status, headers, body = await get(s, p.url + "/item/2")
        assert headers["X-Fallback"] == "static" and body == b'{"degraded": true}'
        clock.advance(3600)
        status, headers, body = await get(s, p.url + "/item/1")
        assert headers["X-Fallback"] == "static"  # past stale_ttl: the entry is gone
        assert metrics.value("fallback_cache_entries", name=name) == 0
        # the episode: one line when it starts, one when a fresh answer ends it
        upstream.behaviour = None
        clock.advance(2)
        assert (await get(s, p.url + "/item/1"))[0] == 200
    assert metrics.delta("fallback_responses_total", name=name, source="cache", reason="upstream_5xx") == 1
    assert metrics.delta("fallback_responses_total", name=name, source="stale", reason="upstream_5xx") == 1
    assert metrics.delta("fallback_responses_total", name=name, source="static", reason="upstream_5xx") == 2
    assert metrics.value("fallback_cache_entries", name=name) == 1
    started, = json_log.events("fallback_started", upstream=name)
    ended, = json_log.events("fallback_ended", upstream=name)
    assert started["reason"] == "upstream_5xx" and started["level"] == "warning"
    assert (ended["reason"], ended["served"]) == ("upstream_5xx", 4)


async def test_set_cookie_no_store_and_private_never_served_to_another_request(upstream, start_proxy):
    name, cfg = upstream_config(upstream.url, retry={"attempts": 1}, breaker={"fail_max": 100})
    p = await start_proxy(cfg)

    async def personal(request):
        if request.path == "/cookie":
            return web.Response(text="alice's page", headers={"Set-Cookie": "session=alice"})
        if request.path == "/no-store":
            return web.Response(text="balance: 100", headers={"Cache-Control": "no-store"})
        if request.path == "/private":
            return web.Response(text="secret", headers={"Cache-Control": "private, max-age=60"})
        return web.Response(text="public", headers={"Cache-Control": "max-age=60"})

    upstream.behaviour = personal
    paths = ("/cookie", "/no-store", "/private", "/public")
    async with aiohttp.ClientSession() as s:
        for path in paths:
            assert (await get(s, p.url + path))[0] == 200
        upstream.behaviour = failing(503)
        served = {path: await get(s, p.url + path) for path in paths}
    for path in ("/cookie", "/no-store", "/private"):
        assert served[path][0] == 503 and "X-Fallback" not in served[path][1], path
    # the cache itself works: the public answer is served (so the three above were refused by the rules)
    assert served["/public"][0] == 200 and served["/public"][1]["X-Fallback"] == "cache"
    assert served["/public"][2] == b"public"


async def test_per_route_overrides(upstream, start_proxy, metrics):
    name, cfg = upstream_config(upstream.url, retry={"attempts": 3, "backoff_base": "1ms", "backoff_max": "1ms"},
                                breaker={"fail_max": 100}, timeouts={"attempt": "20s", "total": "25s"},
                                routes=[{"name": "reports", "match": {"methods": ["GET"], "path_prefix": "/reports"},
                                         "retry": {"attempts": 1}, "timeouts": {"attempt": "100ms", "total": "200ms"}}])
    p = await start_proxy(cfg)
    upstream.behaviour = failing(503)
    async with aiohttp.ClientSession() as s:
        await get(s, p.url + "/reports/q1")
        assert upstream.hits == 1
        await get(s, p.url + "/other")
        assert upstream.hits == 4
        upstream.behaviour = hang
        status, headers, body = await get(s, p.url + "/reports/slow")
        assert status == 504 and b"attempt timeout (100ms)" in body
    assert metrics.delta("upstream_requests_total", name=name, track="stable", route="reports", status="503",
                         outcome="upstream") == 1
    assert metrics.delta("upstream_requests_total", name=name, track="stable", route="default", status="503",
                         outcome="upstream") == 1


async def test_operator_controls_need_a_token(upstream, start_proxy, tmp_path, json_log):
    token = tmp_path / "token"
    token.write_text("s3cret-admin-token\n")
    name, cfg = upstream_config(upstream.url, retry={"attempts": 1})
    cfg["admin"]["token_file"] = str(token)
    cfg["log"] = {"level": "info", "access": True}
    p = await start_proxy(cfg)
    auth = {"Authorization": "Bearer s3cret-admin-token"}
    url = f"{p.admin}/admin/upstreams/{name}/breaker"
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json={"track": "stable", "state": "open"}) as r:
            assert r.status == 401
        async with s.post(url, json={"track": "stable", "state": "open"}, headers={"Authorization": "Bearer nope"}) as r:
            assert r.status == 401
        async with s.post(url, json={"track": "stable", "state": "open"}, headers=auth) as r:
            assert r.status == 200 and (await r.json())["state"] == "forced_open"
        assert (await get(s, p.url + "/x"))[0] == 503
        assert upstream.hits == 0
        async with s.post(url, json={"track": "stable", "state": "sideways"}, headers=auth) as r:
            assert r.status == 400
        async with s.post(url, json={"track": "stable", "state": "auto"}, headers=auth) as r:
            assert (await r.json())["state"] == "closed"
        assert (await get(s, p.url + "/x"))[0] == 200
        upstream.behaviour = failing(503)
        assert (await get(s, p.url + "/x"))[1]["X-Fallback"] == "cache"
        async with s.delete(f"{p.admin}/admin/upstreams/{name}/cache", headers=auth) as r:
            assert (await r.json())["removed"] == 1
        assert (await get(s, p.url + "/x"))[0] == 503
        # the log level: warning silences the access lines, info brings them back
        access_before = len(json_log.events("access", upstream=name))
        async with s.post(f"{p.admin}/admin/log-level", json={"level": "warning"}, headers=auth) as r:
            assert r.status == 200 and (await r.json()) == {"level": "warning"}
        await get(s, p.url + "/quiet")
        assert len(json_log.events("access", upstream=name)) == access_before
        async with s.post(f"{p.admin}/admin/log-level", json={"level": "info"}) as r:
            assert r.status == 401
        async with s.post(f"{p.admin}/admin/log-level", json={"level": "info"}, headers=auth) as r:
            assert r.status == 200
        await get(s, p.url + "/loud")
        assert [e["path"] for e in json_log.events("access", upstream=name)][access_before:] == ["/loud"]
        async with s.get(f"{p.admin}/admin/upstreams") as r:
            assert r.status == 200  # loopback admin: reads need no token
        async with s.get(f"{p.admin}/admin/config") as r:
            assert "s3cret-admin-token" not in await r.text()


async def test_mutating_admin_calls_forbidden_without_token_configured(upstream, start_proxy):
    name, cfg = upstream_config(upstream.url)
    p = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{p.admin}/admin/upstreams/{name}/breaker", json={"state": "open"}) as r:
            assert r.status == 403
    assert p.breaker.state == "closed"


async def test_admin_reads_need_a_token_off_loopback(upstream, start_proxy, tmp_path):
    token = tmp_path / "token"
    token.write_text("tok-123456")
    name, cfg = upstream_config(upstream.url, request_headers={"X-Auth-Token": "literal-credential",
                                                               "X-Plain": "not-shown", "Accept": "text/visible"})
    port = free_port()
    cfg["admin"] = {"listen": f"0.0.0.0:{port}", "token_file": str(token)}
    await start_proxy(cfg)
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as s:
        for path in ("/admin/upstreams", "/admin/config"):
            async with s.get(base + path) as r:
                assert r.status == 401
        async with s.get(base + "/admin/config", headers={"Authorization": "Bearer tok-123456"}) as r:
            text = await r.text()
            # literal header values are redacted unless the header is on the harmless list
            assert r.status == 200 and "literal-credential" not in text and "not-shown" not in text
            assert "text/visible" in text
        async with s.get(base + "/metrics") as r:
            assert r.status == 200
        async with s.get(base + "/health/ready") as r:
            assert r.status == 200


async def test_hostile_requests_never_touch_the_breaker(upstream, start_proxy):
    name, cfg = upstream_config(upstream.url, breaker={"fail_max": 1},
                                limits={"max_header_bytes": "2KiB", "max_request_body": "64KiB"},
                                retry={"max_replay_body": "1KiB"})
    p = await start_proxy(cfg)
    for _ in range(3):
        assert (await raw_head(p.url, b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(b"HTTP/1.1 400")
    head = await raw_head(p.url, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 6000 + b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431")

    async def big():
        for _ in range(100):
            yield b"c" * 1024

    async with aiohttp.ClientSession() as s:
        async with s.post(p.url + "/upload", data=big()) as r:
            assert r.status == 413
            assert (await r.json())["error"]["type"] == "request_too_large"
        assert p.breaker.state == "closed"
        async with s.get(p.url + "/ok") as r:
            assert r.status == 200


async def test_failures_after_headers_open_a_consecutive_breaker(upstream, start_proxy, json_log):
    async def truncated(request):
        resp = web.StreamResponse()
        resp.content_length = 100_000
        await resp.prepare(request)
        await resp.write(b"x" * 70_000)
        request.transport.close()  # dies mid-body
        return resp

    upstream.behaviour = truncated
    name, cfg = upstream_config(upstream.url, breaker={"fail_max": 3}, retry={"attempts": 1})
    p = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        for i in range(3):
            with pytest.raises(aiohttp.ClientPayloadError):
                async with s.get(p.url + "/big", headers={"X-Request-Id": f"cut-{i}"}) as r:
                    await r.read()
    assert p.breaker.state == "open"
    cut = json_log.events("upstream_failed_mid_body", upstream=name)
    assert [e["request_id"] for e in cut] == ["cut-0", "cut-1", "cut-2"]


async def test_timeouts_count_when_total_is_shorter_than_attempt(upstream, start_proxy):
    upstream.behaviour = hang
    name, cfg = upstream_config(upstream.url, breaker={"fail_max": 3},
                                retry={"attempts": 1}, timeouts={"attempt": "20s", "total": "150ms"})
    p = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            status, _, body = await get(s, p.url + "/x")
            assert status == 504 and b"total timeout (150ms)" in body
    assert p.breaker.state == "open"


async def test_idle_timeout_both_ways(upstream, start_proxy):
    async def stall(request):
        if request.method == "POST":
            await request.read()  # waits for the whole upload
            return web.Response(text="got it")
        resp = web.StreamResponse()
        resp.content_length = 10
        await resp.prepare(request)
        await resp.write(b"12345")
        await asyncio.Event().wait()  # silent for good: only the idle timeout can end this

    upstream.behaviour = stall
    name, cfg = upstream_config(upstream.url, retry={"attempts": 1},
                                timeouts={"idle": "300ms", "attempt": "20s", "total": "20s"})
    p = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        # a 10-byte body is read whole before the headers go out: the stall becomes a clean 504
        status, _, body = await get(s, p.url + "/down")
        assert status == 504
        assert json_error(body) == ("timeout", "target 'stable' failed while sending its answer (TimeoutError)")
    # the app stalls its upload: 408, nothing forwarded
    host, port = p.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly-part")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    assert head.startswith(b"HTTP/1.1 408")
    writer.close()
    assert [r["method"] for r in upstream.requests] == ["GET"]


async def test_request_id_in_every_request_log_line_and_no_access_log_unless_asked(upstream, start_proxy, json_log):
    """Each line about a request carries its X-Request-Id; access lines only with `log.access`."""
    name, cfg = upstream_config(upstream.url, retry={"attempts": 1})
    p = await start_proxy(cfg)
    dead, dead_cfg = upstream_config(f"http://127.0.0.1:{free_port()}", retry={"attempts": 1})
    dead_cfg["log"] = {"access": True}
    d = await start_proxy(dead_cfg)
    await eventually(lambda: p.app.checks_done and d.app.checks_done)  # start-up's own lines are out
    started = len(json_log.lines())
    async with aiohttp.ClientSession() as s:
        assert (await get(s, p.url + "/quiet", headers={"X-Request-Id": "rid-quiet"}))[0] == 200
        assert json_log.events("access") == []  # log.access is off by default
        for path, rid in (("/down/1", "rid-a"), ("/down/2", "rid-b")):
            assert (await get(s, d.url + path, headers={"X-Request-Id": rid}))[0] == 502
    request_lines = [ln for ln in json_log.lines() if ln["event"] in ("access", "upstream_failed")]
    assert {(ln["event"], ln["request_id"]) for ln in request_lines} == {
        ("upstream_failed", "rid-a"), ("access", "rid-a"), ("upstream_failed", "rid-b"), ("access", "rid-b")}
    access = json_log.events("access", request_id="rid-a")[0]
    assert (access["upstream"], access["path"], access["status"], access["outcome"]) == (dead, "/down/1", "502", "rejected")
    # generated ids too: a request without one gets one, and its line carries the same
    async with aiohttp.ClientSession() as s, s.get(d.url + "/no-id") as r:
        rid = r.headers["X-Request-Id"]
    assert json_log.events("access", path="/no-id")[0]["request_id"] == rid
    assert json_log.events("upstream_failed", request_id=rid)
    # and no line written while requests ran lacks one
    during = json_log.lines()[started:]
    assert len(during) == 6 and [ln["event"] for ln in during if "request_id" not in ln] == []
