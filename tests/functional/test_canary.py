"""Dependency canaries and blue/green through the proxy, the local rollback, and the inbound listener."""

from __future__ import annotations

import asyncio
import random

import aiohttp
from aiohttp import web

from tests.support.net import free_port
from tests.support.proxy import upstream_config
from tests.support.toxiproxy import add_toxic
from tests.support.upstreams import failing
from tests.support.wait import eventually


async def two_tracks(make_upstream, canary_behaviour=None):
    return await make_upstream(), await make_upstream(canary_behaviour)


def canary_config(stable_up, canary_up, weights=(95, 5), **sections):
    name, cfg = upstream_config(stable_up.url, **sections)
    cfg["upstreams"][name]["targets"] = [{"name": "stable", "url": stable_up.url, "weight": weights[0]},
                                         {"name": "canary", "url": canary_up.url, "weight": weights[1]}]
    return name, cfg


async def test_split_headers_and_override(make_upstream, start_proxy, metrics):
    stable, canary = await two_tracks(make_upstream)
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
    # sticky keys land on both tracks (20% of 50 keys: 10 expected, 1..25 is beyond ±4σ), and each
    # key's requests reached the track it was given
    on_canary = [k for k, t in keys.items() if t == "canary"]
    assert 1 <= len(on_canary) <= 25, keys
    assert {r["headers"]["X-User-Id"] for r in canary.requests if "X-User-Id" in r["headers"]} == {
        f"user{k}" for k in on_canary}
    assert metrics.value("canary_weight", name=name, track="canary") == 20


async def test_canary_breaker_open_unforced_traffic_on_stable_forced_gets_error(make_upstream, start_proxy):
    async def down(request):
        return web.Response(status=503)

    stable, canary = await two_tracks(make_upstream, down)
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
            assert r.status == 503 and r.headers["X-Fallback-Reason"] == "circuit_breaker_open"  # nothing cached: the error


async def test_auto_abort_on_canary_errors_not_on_stable(make_upstream, start_proxy, metrics):
    rng = random.Random(7)

    async def flaky(request):
        return web.Response(status=500 if rng.random() < 0.03 else 200, text="c")

    stable, canary = await two_tracks(make_upstream, flaky)
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
        assert metrics.delta("canary_aborts_total", name=name, track="canary", reason="error_rate") == 1
        assert metrics.value("canary_weight", name=name, track="canary") == 0
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

    st2, ca2 = await two_tracks(make_upstream)
    st2.behaviour = bad
    n2, cfg2 = canary_config(st2, ca2, (50, 50), retry={"attempts": 1}, breaker={"fail_max": 1000},
                             canary={"rollback": {"min_requests": 10}})
    p2 = await start_proxy(cfg2)
    async with aiohttp.ClientSession() as s:
        for _ in range(200):
            async with s.get(p2.url + "/x", headers={"X-Canary": "never"}) as r:
                await r.read()
    assert p2.upstream.weights == {"stable": 50, "canary": 50}


async def test_abort_survives_an_unrelated_reload_and_clears_on_weight_change(make_upstream, start_proxy, tmp_path):
    async def bad(request):
        return web.Response(status=500)

    stable, canary = await two_tracks(make_upstream, bad)
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


async def test_p99_abort_with_toxiproxy_latency(make_upstream, start_proxy, toxic_link, metrics):
    stable, canary = await two_tracks(make_upstream)
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
    assert metrics.delta("canary_aborts_total", name=name, track="canary", reason="latency_p99") == 1


async def test_blue_green_switch_by_reload_under_load(make_upstream, start_proxy, tmp_path):
    blue, green = await two_tracks(make_upstream)
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
    await eventually(lambda: len(tracks) >= 20)
    assert set(tracks) == {"stable"}
    cfg["upstreams"][name]["targets"][0]["weight"], cfg["upstreams"][name]["targets"][1]["weight"] = 0, 100
    p.rewrite(cfg)
    n0 = len(tracks)
    # the watcher applies it: from then on every request goes to green
    await eventually(lambda: tracks[-20:] == ["canary"] * 20 and len(tracks) - n0 >= 20)
    done.set()
    await t
    assert failures == []
    after = tracks[n0:]
    switched = after.index("canary")
    assert set(after[switched:]) == {"canary"}  # no request went back to blue once the switch happened


async def test_abort_cleared_when_the_canary_url_changes(make_upstream, start_proxy, tmp_path):
    """A new canary build (its URL changed) is a new canary: the abort of the old one does not hold it."""
    stable, canary = await two_tracks(make_upstream, failing(500))
    fixed = await make_upstream()
    name, cfg = canary_config(stable, canary, (90, 10), retry={"attempts": 1}, breaker={"fail_max": 1000},
                              canary={"rollback": {"min_requests": 20}})
    p = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        for _ in range(20):
            async with s.get(p.url + "/x", headers={"X-Canary": "always"}) as r:
                await r.read()
        assert p.upstream.weights["canary"] == 0 and p.upstream.by_name["canary"].canary.aborted == "error_rate"
        cfg["upstreams"][name]["targets"][1]["url"] = fixed.url  # same weight, new build
        p.rewrite(cfg)
        ok, message = await p.app.reload("test")
        assert ok, message
        assert p.upstream.weights == {"stable": 90, "canary": 10}
        assert p.upstream.by_name["canary"].canary.aborted is None
        async with s.get(p.url + "/x", headers={"X-Canary": "always"}) as r:
            assert r.status == 200 and r.headers["X-Canary-Track"] == "canary"
    assert fixed.hits == 1


async def test_min_success_rate_aborts_the_canary(make_upstream, start_proxy, metrics):
    """With the error-rate rule out of the way (max_error_rate 1.0), the success-rate rule alone aborts
    a canary whose share of good answers falls under min_success_rate."""
    rng = random.Random(11)

    async def mostly(request):
        return web.Response(status=503 if rng.random() < 0.3 else 200)

    stable, canary = await two_tracks(make_upstream, mostly)
    name, cfg = canary_config(stable, canary, (90, 10), retry={"attempts": 1}, breaker={"fail_max": 1000},
                              canary={"rollback": {"min_requests": 50, "max_error_rate": 1.0,
                                                   "min_success_rate": 0.9}})
    p = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        n = 0
        while p.upstream.weights["canary"] and n < 500:
            async with s.get(p.url + f"/x{n}", headers={"X-Canary": "always"}) as r:
                await r.read()
            n += 1
    assert p.upstream.weights["canary"] == 0 and n >= 50
    assert p.upstream.by_name["canary"].canary.aborted == "success_rate"
    assert metrics.delta("canary_aborts_total", name=name, track="canary", reason="success_rate") == 1


async def test_inbound_golden_metrics_sse_and_websocket(aiohttp_server, start_proxy, metrics, monkeypatch):
    go_on = asyncio.Event()

    async def hello(request):
        return web.Response(status=int(request.query.get("s", "200")), text="app")

    async def sse(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: 0\n\n")
        await go_on.wait()  # the next event only once the client has the first: nothing is held back
        for i in (1, 2):
            await resp.write(f"data: {i}\n\n".encode())
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
    monkeypatch.setenv("ROLLOUT_TRACK", track)  # the track from the environment (the pod's label, via the Downward API)
    cfg["inbound"] = {"listen": f"127.0.0.1:{free_port()}", "app_url": f"http://127.0.0.1:{server.port}",
                      "track": "${env:ROLLOUT_TRACK}"}
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
            first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 30)
            assert first == b"data: 0\n\n"
            go_on.set()
            assert await r.read() == b"data: 1\n\ndata: 2\n\n"
        async with s.ws_connect(inbound.replace("http", "ws") + "/ws") as w:
            await w.send_str("ping")
            assert (await w.receive()).data == "echo:ping"
    assert metrics.delta("http_requests_total", method="GET", status="200", track=track) == 10  # 9 + /sse
    assert metrics.delta("http_requests_total", method="GET", status="500", track=track) == 1
    assert metrics.delta("http_requests_total", method="POST", status="200", track=track) == 1
    assert metrics.delta("http_requests_total", method="GET", status="101", track=track) == 1
    assert metrics.delta("http_request_duration_seconds_count", method="GET", track=track) == 12
    assert metrics.delta("http_request_duration_seconds_bucket", method="GET", track=track, le="5.0") == 12


async def test_inbound_never_retries_and_enforces_its_limits(make_upstream, start_proxy, metrics):
    """It is the app's own traffic: a 503 or an unreachable app is passed back once, never retried or
    replaced; oversized heads and bodies are refused before the app sees them."""
    from tests.support.relay import CountingRelay

    app = await make_upstream(failing(503))
    name, cfg = upstream_config(app.url)
    track = f"t{free_port()}"
    cfg["inbound"] = {"listen": f"127.0.0.1:{free_port()}", "app_url": app.url, "track": track,
                      "max_header_bytes": "1KiB", "max_request_body": "1KiB"}
    p = await start_proxy(cfg)
    inbound = f"http://{cfg['inbound']['listen']}"
    async with aiohttp.ClientSession() as s:
        async with s.get(inbound + "/busy") as r:
            assert r.status == 503 and await r.text() == "down"
        async with s.post(inbound + "/order", data=b"x") as r:
            assert r.status == 503
        assert [q["method"] for q in app.requests] == ["GET", "POST"]  # each once
        async with s.get(inbound + "/h", headers={"X-Big": "a" * 2000}) as r:
            assert r.status == 431 and (await r.json())["error"]["type"] == "headers_too_large"
        async with s.post(inbound + "/b", data=b"a" * 2000) as r:
            assert r.status == 413 and (await r.json())["error"]["type"] == "request_too_large"

        async def chunks():
            for _ in range(4):
                yield b"c" * 512

        async with s.post(inbound + "/c", data=chunks()) as r:
            assert r.status == 413
        assert len(app.requests) == 2  # none of the refused ones reached the app (the chunked one cut short)
    # the app resetting its connections: a 502, never a retry (GET or POST: one connection each)
    relay = await CountingRelay(1).start()
    relay.down = True
    cfg["inbound"]["app_url"] = f"http://127.0.0.1:{relay.port}"
    p.rewrite(cfg)
    ok, message = await p.app.reload("test")
    assert ok, message
    async with aiohttp.ClientSession() as s:
        async with s.post(inbound + "/gone", data=b"order") as r:
            assert r.status == 502 and (await r.json())["error"]["type"] == "app_unreachable"
        assert relay.accepted == 1
        async with s.get(inbound + "/gone") as r:
            assert r.status == 502
        assert relay.accepted == 2
    relay.close()
    assert metrics.delta("http_requests_total", method="GET", status="503", track=track) == 1
    assert metrics.delta("http_requests_total", method="GET", status="431", track=track) == 1
    assert metrics.delta("http_requests_total", method="POST", status="413", track=track) == 2
    assert metrics.delta("http_requests_total", method="POST", status="502", track=track) == 1
    assert metrics.delta("http_requests_total", method="GET", status="502", track=track) == 1


async def test_inbound_replays_a_get_on_a_kept_alive_connection_the_app_closed(start_proxy):
    """The one replay: the app closed a kept-alive connection just as it was reused, nothing answered.
    Idempotent: sent once more, on a new connection. A POST is not."""
    from tests.support.upstreams import ClosesKeptAlive

    app = await ClosesKeptAlive().start()
    name, cfg = upstream_config(app.url)
    cfg["inbound"] = {"listen": f"127.0.0.1:{free_port()}", "app_url": app.url, "track": f"t{free_port()}"}
    await start_proxy(cfg)
    inbound = f"http://{cfg['inbound']['listen']}"
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.get(inbound + "/page") as r:
                assert r.status == 200 and await r.text() == "ok"
        assert (app.connections, len(app.answered), app.dropped) == (2, 2, [b"GET /page HTTP/1.1"])
        async with s.post(inbound + "/order", data=b"x") as r:
            assert r.status == 502
    assert app.dropped[-1] == b"POST /order HTTP/1.1" and len(app.answered) == 2
    app.close()
