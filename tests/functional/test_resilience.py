"""The chain against real aiohttp upstreams: breakers, retries, budgets, Retry-After, shedding,
fallbacks, privacy, per-route policy and operator controls."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import metric, raw_head, upstream_config


def failing(status=503, headers=None):
    async def answer(request):
        return web.Response(status=status, text="down", headers=headers)
    return answer


async def get(s, url, **kw):
    async with s.get(url, **kw) as r:
        return r.status, r.headers, await r.read()


async def test_breaker_opens_sends_nothing_then_half_opens_and_closes(upstream, start_proxy):
    name, cfg = upstream_config(upstream.url, retry={"attempts": 1},
                                breaker={"fail_max": 3, "reset_timeout": "300ms"})
    p = await start_proxy(cfg)
    upstream.behaviour = failing(500)
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            assert (await get(s, p.url + "/x"))[0] == 500
        assert upstream.hits == 3
        for _ in range(10):
            status, headers, body = await get(s, p.url + "/x")
            assert status == 503 and headers["X-Fallback-Reason"] == "circuit_breaker_open"
            assert int(headers["Retry-After"]) >= 1
        assert upstream.hits == 3  # open: no upstream I/O at all
        assert metric("circuit_breaker_state", name=name, track="stable") == 1
        assert metric("circuit_breaker_opened_total", name=name, track="stable") == 1
        assert metric("upstream_requests_total", name=name, track="stable", route="default", status="503",
                      outcome="rejected") == 10
        upstream.behaviour = None
        await asyncio.sleep(0.35)
        assert (await get(s, p.url + "/x"))[0] == 200
        assert metric("circuit_breaker_state", name=name, track="stable") == 0


async def test_half_open_lets_only_max_calls_through(upstream, start_proxy):
    name, cfg = upstream_config(upstream.url, retry={"attempts": 1},
                                breaker={"fail_max": 1, "reset_timeout": "200ms", "half_open_max_calls": 1})
    p = await start_proxy(cfg)
    upstream.behaviour = failing(500)
    async with aiohttp.ClientSession() as s:
        await get(s, p.url + "/x")
        hits = upstream.hits
        await asyncio.sleep(0.25)
        release = asyncio.Event()

        async def slow_ok(request):
            await release.wait()
            return web.Response(text="ok")

        upstream.behaviour = slow_ok
        tasks = [asyncio.create_task(get(s, p.url + "/x")) for _ in range(50)]
        await asyncio.sleep(0.3)
        release.set()
        results = await asyncio.gather(*tasks)
    assert upstream.hits - hits == 1
    assert sorted(r[0] for r in results).count(200) == 1


async def test_post_not_retried_get_retried_idempotency_key_honoured(upstream, start_proxy):
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
    assert metric("upstream_retries_total", name=name, reason="503") == 4


async def test_budget_caps_retries_when_everything_fails(upstream, start_proxy):
    name, cfg = upstream_config(upstream.url, retry={"attempts": 3, "backoff_base": "50ms", "backoff_max": "50ms",
                                                     "budget_ratio": 0.2, "budget_min": 3},
                                breaker={"fail_max": 10000})
    p = await start_proxy(cfg)
    gate = asyncio.Event()

    async def slow_fail(request):
        await gate.wait()
        return web.Response(status=503)

    upstream.behaviour = slow_fail
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        tasks = [asyncio.create_task(get(s, p.url + "/x")) for _ in range(100)]
        while upstream.hits < 100:
            await asyncio.sleep(0.01)
        gate.set()
        await asyncio.gather(*tasks)
    # 100 first attempts; retries in flight are capped at max(0.2 * in-flight, 3), far below 200
    retries = upstream.hits - 100
    assert 0 < retries <= 60, retries
    assert metric("upstream_retry_budget_exhausted_total", name=name) > 0


async def test_retry_after_honoured_or_refused(upstream, start_proxy):
    name, cfg = upstream_config(upstream.url, retry={"attempts": 2, "backoff_max": "1s"}, breaker={"fail_max": 100})
    p = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        upstream.behaviour = failing(429, {"Retry-After": "30"})
        status, headers, _ = await get(s, p.url + "/r")
        assert status == 429 and headers["Retry-After"] == "30" and upstream.hits == 1
        calls = []

        async def once(request):
            calls.append(asyncio.get_running_loop().time())
            if len(calls) == 1:
                return web.Response(status=503, headers={"Retry-After": "1"})
            return web.Response(text="ok")

        upstream.behaviour = once
        status, _, _ = await get(s, p.url + "/r")
        assert status == 200 and len(calls) == 2
        assert calls[1] - calls[0] >= 0.95  # the stated wait was honoured


async def test_shed_at_max_in_flight_and_max_pending(upstream, start_proxy):
    name, cfg = upstream_config(upstream.url, retry={"attempts": 1},
                                limits={"max_in_flight": 4, "max_pending": 1, "pending_timeout": "5s"},
                                pool={"max_connections": 2})
    p = await start_proxy(cfg)
    gate = asyncio.Event()

    async def held(request):
        await gate.wait()
        return web.Response(text="ok")

    upstream.behaviour = held
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        tasks = [asyncio.create_task(get(s, p.url + "/x")) for _ in range(8)]
        await asyncio.sleep(0.5)
        assert upstream.hits == 2  # two connections; one waits; the rest are shed at once
        gate.set()
        results = await asyncio.gather(*tasks)
    statuses = sorted(r[0] for r in results)
    assert statuses.count(200) == 3 and statuses.count(503) == 5
    shed = [r for r in results if r[0] == 503]
    assert all(r[1]["X-Fallback-Reason"] == "overloaded" and r[1]["Retry-After"] for r in shed)
    assert metric("upstream_shed_total", name=name) == 5


async def test_fallback_cache_stale_static_with_headers(upstream, start_proxy):
    name, cfg = upstream_config(upstream.url, retry={"attempts": 1}, breaker={"fail_max": 100},
                                fallback={"cache_ttl": "300ms", "stale_ttl": "1h",
                                          "static": {"status": 200, "body": '{"degraded": true}'}})
    p = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        status, _, fresh = await get(s, p.url + "/item/1")
        assert status == 200
        upstream.behaviour = failing(503)
        status, headers, body = await get(s, p.url + "/item/1")
        assert (status, body, headers["X-Fallback"], headers["X-Fallback-Reason"]) == (200, fresh, "cache", "upstream_5xx")
        await asyncio.sleep(0.35)
        status, headers, body = await get(s, p.url + "/item/1")
        assert headers["X-Fallback"] == "stale" and body == fresh
        status, headers, body = await get(s, p.url + "/item/2")
        assert headers["X-Fallback"] == "static" and body == b'{"degraded": true}'
    assert metric("fallback_responses_total", name=name, source="cache", reason="upstream_5xx") == 1
    assert metric("fallback_responses_total", name=name, source="stale", reason="upstream_5xx") == 1
    assert metric("fallback_cache_entries", name=name) == 1


async def test_set_cookie_and_no_store_never_served_to_another_request(upstream, start_proxy):
    name, cfg = upstream_config(upstream.url, retry={"attempts": 1}, breaker={"fail_max": 100})
    p = await start_proxy(cfg)

    async def personal(request):
        if request.path == "/cookie":
            return web.Response(text="alice's page", headers={"Set-Cookie": "session=alice"})
        return web.Response(text="secret", headers={"Cache-Control": "private, max-age=60"})

    upstream.behaviour = personal
    async with aiohttp.ClientSession() as s:
        await get(s, p.url + "/cookie")
        await get(s, p.url + "/private")
        upstream.behaviour = failing(503)
        assert (await get(s, p.url + "/cookie"))[0] == 503
        assert (await get(s, p.url + "/private"))[0] == 503


async def test_per_route_overrides(upstream, start_proxy):
    name, cfg = upstream_config(upstream.url, retry={"attempts": 3, "backoff_base": "1ms", "backoff_max": "1ms"},
                                breaker={"fail_max": 100}, timeouts={"attempt": "2s", "total": "5s"},
                                routes=[{"name": "reports", "match": {"methods": ["GET"], "path_prefix": "/reports"},
                                         "retry": {"attempts": 1}, "timeouts": {"attempt": "100ms", "total": "200ms"}}])
    p = await start_proxy(cfg)
    upstream.behaviour = failing(503)
    async with aiohttp.ClientSession() as s:
        await get(s, p.url + "/reports/q1")
        assert upstream.hits == 1
        await get(s, p.url + "/other")
        assert upstream.hits == 4

        async def slow(request):
            await asyncio.sleep(0.5)
            return web.Response(text="late")

        upstream.behaviour = slow
        status, headers, body = await get(s, p.url + "/reports/slow")
        assert status == 504 and b"attempt timeout (100ms)" in body
    assert metric("upstream_requests_total", name=name, track="stable", route="reports", status="503",
                  outcome="upstream") == 1
    assert metric("upstream_requests_total", name=name, track="stable", route="default", status="503",
                  outcome="upstream") == 1


async def test_operator_controls_need_a_token(upstream, start_proxy, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-admin-token\n")
    name, cfg = upstream_config(upstream.url, retry={"attempts": 1})
    cfg["admin"]["token_file"] = str(token)
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
        async with s.post(f"{p.admin}/admin/log-level", json={"level": "debug"}, headers=auth) as r:
            assert r.status == 200
        async with s.post(f"{p.admin}/admin/log-level", json={"level": "debug"}) as r:
            assert r.status == 401
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
    assert p.upstream.targets[0].breaker.state == "closed"


async def test_admin_reads_need_a_token_off_loopback(upstream, start_proxy, tmp_path):
    from tests.conftest import free_port

    token = tmp_path / "token"
    token.write_text("tok-123456")
    name, cfg = upstream_config(upstream.url, request_headers={"X-Auth-Token": "literal-credential",
                                                               "X-Plain": "visible"})
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
            assert r.status == 200 and "literal-credential" not in text and "visible" in text
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
        assert p.upstream.targets[0].breaker.state == "closed"
        async with s.get(p.url + "/ok") as r:
            assert r.status == 200


async def test_failures_after_headers_open_a_consecutive_breaker(upstream, start_proxy):
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
        for _ in range(3):
            with pytest.raises(aiohttp.ClientPayloadError):
                async with s.get(p.url + "/big") as r:
                    await r.read()
    assert p.upstream.targets[0].breaker.state == "open"


async def test_timeouts_count_when_total_is_shorter_than_attempt(upstream, start_proxy):
    async def hang(request):
        await asyncio.sleep(5)
        return web.Response(text="late")

    upstream.behaviour = hang
    name, cfg = upstream_config(upstream.url, breaker={"fail_max": 3},
                                retry={"attempts": 1}, timeouts={"attempt": "10s", "total": "150ms"})
    p = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            status, _, body = await get(s, p.url + "/x")
            assert status == 504 and b"total timeout (150ms)" in body
    assert p.upstream.targets[0].breaker.state == "open"


async def test_idle_timeout_both_ways(upstream, start_proxy):
    async def stall(request):
        if request.method == "POST":
            await request.read()  # waits for the whole upload
            return web.Response(text="got it")
        resp = web.StreamResponse()
        resp.content_length = 10
        await resp.prepare(request)
        await resp.write(b"12345")
        await asyncio.sleep(2)  # silent past the idle timeout
        await resp.write(b"67890")
        return resp

    upstream.behaviour = stall
    name, cfg = upstream_config(upstream.url, retry={"attempts": 1},
                                timeouts={"idle": "300ms", "attempt": "5s", "total": "5s"})
    p = await start_proxy(cfg)
    t0 = asyncio.get_running_loop().time()
    async with aiohttp.ClientSession() as s:
        # a 10-byte body is read whole before the headers go out: the stall becomes a clean 502/504
        status, _, _ = await get(s, p.url + "/down")
        assert status in (502, 504)
    assert asyncio.get_running_loop().time() - t0 < 1.5
    # the app stalls its upload: 408, nothing forwarded
    host, port = p.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly-part")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
    assert head.startswith(b"HTTP/1.1 408")
    writer.close()
