"""Dependency canaries and blue/green through the proxy, the local rollback, and the inbound listener."""

from __future__ import annotations

import asyncio
import random

import aiohttp
from aiohttp import web

from tests.conftest import Upstream, free_port, metric, upstream_config


async def two_tracks(aiohttp_server, canary_behaviour=None):
    stable, canary = Upstream(), Upstream()
    canary.behaviour = canary_behaviour
    s1 = await aiohttp_server(stable.app())
    s2 = await aiohttp_server(canary.app())
    stable.url, canary.url = f"http://127.0.0.1:{s1.port}", f"http://127.0.0.1:{s2.port}"
    return stable, canary


def canary_config(stable_up, canary_up, weights=(95, 5), **sections):
    name, cfg = upstream_config(stable_up.url, **sections)
    cfg["upstreams"][name]["targets"] = [{"name": "stable", "url": stable_up.url, "weight": weights[0]},
                                         {"name": "canary", "url": canary_up.url, "weight": weights[1]}]
    return name, cfg


async def test_split_headers_and_override(aiohttp_server, start_proxy):
    stable, canary = await two_tracks(aiohttp_server)
    name, cfg = canary_config(stable, canary, (80, 20))
    p = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        seen = {"stable": 0, "canary": 0}
        for _ in range(500):
            async with s.get(p.url + "/x") as r:
                seen[r.headers["X-Canary-Track"]] += 1
        assert 60 <= seen["canary"] <= 140, seen  # 20% of 500 (±4.4σ)
        assert canary.hits == seen["canary"] and stable.hits == seen["stable"]
        assert all(r["headers"]["X-Canary-Track"] == "canary" for r in canary.requests)
        async with s.get(p.url + "/x", headers={"X-Canary": "always"}) as r:
            assert r.headers["X-Canary-Track"] == "canary"
        async with s.get(p.url + "/x", headers={"X-Canary": "never"}) as r:
            assert r.headers["X-Canary-Track"] == "stable"
        async with s.get(p.url + "/x", headers={"X-Canary": "sometimes"}) as r:
            assert r.status == 400 and (await r.json())["error"]["type"] == "bad_canary_override"
        keys = {}
        for k in range(50):
            tracks = set()
            for _ in range(3):
                async with s.get(p.url + "/x", headers={"X-User-Id": f"user{k}"}) as r:
                    tracks.add(r.headers["X-Canary-Track"])
            assert len(tracks) == 1
            keys[k] = tracks.pop()
    assert metric("canary_weight", name=name, track="canary") == 20


async def test_canary_breaker_open_unforced_traffic_on_stable_forced_gets_error(aiohttp_server, start_proxy):
    async def down(request):
        return web.Response(status=503)

    stable, canary = await two_tracks(aiohttp_server, down)
    name, cfg = canary_config(stable, canary, (50, 50), retry={"attempts": 1},
                              breaker={"fail_max": 2, "reset_timeout": "1h"},
                              canary={"rollback": {"enabled": False}})
    p = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.get(p.url + "/x", headers={"X-Canary": "always"}) as r:
                assert r.status == 503
        assert p.upstream.by_name["canary"].breaker.state == "open"
        hits = canary.hits
        for _ in range(200):
            async with s.get(p.url + "/x") as r:
                assert r.status == 200 and r.headers["X-Canary-Track"] == "stable"
        assert canary.hits == hits
        async with s.get(p.url + "/x", headers={"X-Canary": "always"}) as r:
            # forced to the open track: the fallback (the cache is per upstream, about the data)
            assert r.status == 200 and r.headers["X-Fallback"] == "cache"
            assert r.headers["X-Fallback-Reason"] == "circuit_breaker_open"
        async with s.get(p.url + "/never-seen", headers={"X-Canary": "always"}) as r:
            assert r.status == 503 and r.headers["X-Fallback-Reason"] == "circuit_breaker_open"  # or the error


async def test_auto_abort_on_canary_errors_not_on_stable(aiohttp_server, start_proxy):
    rng = random.Random(7)

    async def flaky(request):
        return web.Response(status=500 if rng.random() < 0.03 else 200, text="c")

    stable, canary = await two_tracks(aiohttp_server, flaky)
    name, cfg = canary_config(stable, canary, (50, 50), retry={"attempts": 1}, breaker={"fail_max": 1000},
                              canary={"rollback": {"min_requests": 100, "window": "60s"}})
    p = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        n = 0
        while p.upstream.weights["canary"] and n < 2000:
            async with s.get(p.url + "/x", headers={"X-Canary": "always"}) as r:
                await r.read()
            n += 1
        assert p.upstream.weights["canary"] == 0 and n >= 100
        assert metric("canary_aborts_total", name=name, track="canary", reason="error_rate") == 1
        assert metric("canary_weight", name=name, track="canary") == 0
        hits = canary.hits
        for _ in range(100):
            async with s.get(p.url + "/x") as r:
                assert r.headers["X-Canary-Track"] == "stable"
        assert canary.hits == hits
        async with s.get(p.admin + "/admin/upstreams") as r:
            assert (await r.json())[name]["targets"]["canary"]["canary"]["aborted"] == "error_rate"
    # stable's own errors never abort anything (only tracks after the first are watched)
    async def bad(request):
        return web.Response(status=500)

    st2, ca2 = await two_tracks(aiohttp_server)
    st2.behaviour = bad
    n2, cfg2 = canary_config(st2, ca2, (50, 50), retry={"attempts": 1}, breaker={"fail_max": 1000},
                             canary={"rollback": {"min_requests": 10}})
    p2 = await start_proxy(cfg2)
    async with aiohttp.ClientSession() as s:
        for _ in range(200):
            async with s.get(p2.url + "/x", headers={"X-Canary": "never"}) as r:
                await r.read()
    assert p2.upstream.weights == {"stable": 50, "canary": 50}


async def test_abort_survives_an_unrelated_reload_and_clears_on_weight_change(aiohttp_server, start_proxy, tmp_path):
    async def bad(request):
        return web.Response(status=500)

    stable, canary = await two_tracks(aiohttp_server, bad)
    name, cfg = canary_config(stable, canary, (95, 5), retry={"attempts": 1}, breaker={"fail_max": 1000},
                              canary={"rollback": {"min_requests": 20}})
    token = tmp_path / "tok"
    token.write_text("tok")
    cfg["admin"]["token_file"] = str(token)
    p = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        for _ in range(30):
            async with s.get(p.url + "/x", headers={"X-Canary": "always"}) as r:
                await r.read()
        assert p.upstream.weights["canary"] == 0
        cfg["upstreams"][name]["timeouts"] = {"attempt": "9s"}  # unrelated
        p.rewrite(cfg)
        auth = {"Authorization": "Bearer tok"}
        async with s.post(p.admin + "/admin/reload", headers=auth) as r:
            assert r.status == 200, await r.text()
        assert p.upstream.weights["canary"] == 0
        # an operator re-enables it by hand
        async with s.post(p.admin + f"/admin/upstreams/{name}/weights", json={"stable": 90, "canary": 10}, headers=auth) as r:
            assert r.status == 200 and (await r.json())["weights"] == {"stable": 90, "canary": 10}
        async with s.post(p.admin + f"/admin/upstreams/{name}/weights", json={"canary": 5}) as r:
            assert r.status == 401
        async with s.post(p.admin + f"/admin/upstreams/{name}/weights", json={"nope": 5}, headers=auth) as r:
            assert r.status == 400


async def test_p99_abort_with_toxiproxy_latency(aiohttp_server, start_proxy, toxic_link):
    from tests.conftest import add_toxic

    stable, canary = await two_tracks(aiohttp_server)
    proxy, url = toxic_link(canary.url)
    name, cfg = upstream_config(stable.url, retry={"attempts": 1},
                                canary={"rollback": {"min_requests": 20, "max_p99": "100ms"}})
    cfg["upstreams"][name]["targets"] = [{"name": "stable", "url": stable.url, "weight": 90},
                                         {"name": "canary", "url": url, "weight": 10}]
    p = await start_proxy(cfg)
    add_toxic(proxy, "latency", latency=150)
    async with aiohttp.ClientSession() as s:
        for _ in range(25):
            async with s.get(p.url + "/x", headers={"X-Canary": "always"}) as r:
                assert r.status == 200
    assert p.upstream.weights["canary"] == 0
    assert metric("canary_aborts_total", name=name, track="canary", reason="latency_p99") == 1


async def test_blue_green_switch_by_reload_under_load(aiohttp_server, start_proxy, tmp_path):
    blue, green = await two_tracks(aiohttp_server)
    name, cfg = canary_config(blue, green, (100, 0))
    cfg["reload"] = {"interval": "100ms"}
    p = await start_proxy(cfg)
    failures, done = [], asyncio.Event()
    tracks = []

    async def loop():
        async with aiohttp.ClientSession() as s:
            while not done.is_set():
                async with s.get(p.url + "/bg") as r:
                    await r.read()
                    tracks.append(r.headers["X-Canary-Track"])
                    if r.status != 200:
                        failures.append(r.status)

    t = asyncio.create_task(loop())
    await asyncio.sleep(0.3)
    cfg["upstreams"][name]["targets"][0]["weight"], cfg["upstreams"][name]["targets"][1]["weight"] = 0, 100
    p.rewrite(cfg)
    n0 = len(tracks)
    await asyncio.sleep(0.6)
    done.set()
    await t
    assert failures == []
    after = tracks[n0:]
    assert "canary" in after and after[-20:] == ["canary"] * 20  # all traffic on green within the interval


async def test_inbound_golden_metrics_sse_and_websocket(aiohttp_server, start_proxy):
    async def hello(request):
        return web.Response(status=int(request.query.get("s", "200")), text="app")

    async def sse(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(3):
            await resp.write(f"data: {i}\n\n".encode())
            await asyncio.sleep(0.1)
        await resp.write_eof()
        return resp

    async def ws(request):
        w = web.WebSocketResponse()
        await w.prepare(request)
        async for msg in w:
            await w.send_str("echo:" + msg.data)
        return w

    app = web.Application()
    app.router.add_get("/hello", hello)
    app.router.add_post("/hello", hello)
    app.router.add_get("/sse", sse)
    app.router.add_get("/ws", ws)
    server = await aiohttp_server(app)
    name, cfg = upstream_config(f"http://127.0.0.1:{server.port}")
    track = f"canary-{free_port()}"
    cfg["inbound"] = {"listen": f"127.0.0.1:{free_port()}", "app_url": f"http://127.0.0.1:{server.port}", "track": track}
    await start_proxy(cfg)
    inbound = f"http://{cfg['inbound']['listen']}"
    async with aiohttp.ClientSession() as s:
        for st, n in ((200, 9), (500, 1)):
            for _ in range(n):
                async with s.get(inbound + f"/hello?s={st}") as r:
                    assert r.status == st and await r.text() == "app" and r.headers["X-Request-Id"]
        async with s.post(inbound + "/hello", data=b"body") as r:
            assert r.status == 200
        async with s.get(inbound + "/sse") as r:
            first_at = None
            t0 = asyncio.get_running_loop().time()
            chunks = []
            async for chunk in r.content.iter_any():
                first_at = first_at or asyncio.get_running_loop().time() - t0
                chunks.append(chunk)
            assert b"".join(chunks) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n" and first_at < 0.15
        async with s.ws_connect(inbound.replace("http", "ws") + "/ws") as w:
            await w.send_str("ping")
            assert (await w.receive()).data == "echo:ping"
    assert metric("http_requests_total", method="GET", status="200", track=track) == 10  # 9 + /sse
    assert metric("http_requests_total", method="GET", status="500", track=track) == 1
    assert metric("http_requests_total", method="POST", status="200", track=track) == 1
    assert metric("http_requests_total", method="GET", status="101", track=track) == 1
    assert metric("http_request_duration_seconds_count", method="GET", track=track) == 12
    assert metric("http_request_duration_seconds_bucket", method="GET", track=track, le="5.0") == 12
