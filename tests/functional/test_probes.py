"""Probes (fallback-aware readiness, startup independent of the app), and ConfigMap-style hot reload."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import aiohttp
import pytest
import yaml
from aiohttp import web

from proxy.app import ProxyApp
from proxy.settings import load
from tests.support.net import free_port
from tests.support.proxy import upstream_config
from tests.support.tools import ROOT
from tests.support.upstreams import Gate, failing
from tests.support.volume import MountedVolume
from tests.support.wait import eventually


async def probe(p, path="/health/ready"):
    async with aiohttp.ClientSession() as s:
        async with s.get(p.admin + path) as r:
            return r.status, await r.json()


async def test_readiness_matrix(upstream, start_proxy, make_upstream):
    # critical, nothing to serve: its breaker tripped by real failures → down → not ready
    down = await make_upstream(failing(503))
    name, cfg = upstream_config(down.url, health={"critical": True}, retry={"attempts": 1},
                                breaker={"fail_max": 2, "reset_timeout": "1h"})
    p = await start_proxy(cfg)
    assert (await probe(p))[0] == 200
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.get(p.url + f"/never-cached/{_}") as r:
                assert r.status == 503
    assert p.breaker.state == "open"
    status, body = await probe(p)
    assert status == 503 and body["status"] == "not_ready"
    dep = body["dependencies"][name]
    assert dep == {**dep, "healthy": False, "status": "down", "breaker": "open", "fallback_available": False}
    assert body["reasons"] == [f"dependency_down:{name}"]
    # the same with a cached entry: degraded, still ready (the breaker again opened by failures)
    n1, cfg1 = upstream_config(upstream.url, health={"critical": True}, retry={"attempts": 1},
                               breaker={"fail_max": 1, "reset_timeout": "1h"})
    p1 = await start_proxy(cfg1)
    async with aiohttp.ClientSession() as s:
        async with s.get(p1.url + "/x") as r:
            assert r.status == 200
        upstream.behaviour = failing(503)
        async with s.get(p1.url + "/x") as r:
            assert r.status == 200 and r.headers["X-Fallback"] == "cache"
    assert p1.breaker.state == "open"
    status, body = await probe(p1)
    assert status == 200 and body["dependencies"][n1]["status"] == "degraded"
    assert body["dependencies"][n1]["fallback_available"] is True and body["dependencies"][n1]["healthy"] is False
    # critical with only a static answer: degraded (an operator forcing it open is the same state)
    n2, cfg2 = upstream_config(upstream.url, health={"critical": True}, fallback={"static": {"body": "{}"}})
    p2 = await start_proxy(cfg2)
    p2.breaker.force("open")
    status, body = await probe(p2)
    assert status == 200 and body["dependencies"][n2]["status"] == "degraded"
    # non-critical, nothing to serve: degraded, never not-ready
    n3, cfg3 = upstream_config(down.url, retry={"attempts": 1}, breaker={"fail_max": 1, "reset_timeout": "1h"})
    cfg3["shutdown"] = {"quiet_period": "0s", "drain_timeout": "1s"}
    p3 = await start_proxy(cfg3)
    async with aiohttp.ClientSession() as s, s.get(p3.url + "/nothing") as r:
        assert r.status == 503
    status, body = await probe(p3)
    assert status == 200 and body["dependencies"][n3]["status"] == "degraded" and "reasons" not in body
    # shutting down: what SIGTERM runs
    await p3.app.drain()
    status, body = await probe(p3)
    assert status == 503 and body["reasons"] == ["shutting_down"]
    status, body = await probe(p3, "/health")
    assert status == 503 and body["live"] is True and body["version"]


async def test_active_checks_failing_make_a_critical_upstream_down(upstream, start_proxy, metrics):
    state = {"status": 200}

    async def health(request):
        return web.Response(status=state["status"])

    upstream.behaviour = health
    name, cfg = upstream_config(upstream.url,
                                health={"path": "/healthz", "interval": "100ms", "unhealthy_threshold": 2,
                                        "critical": True})
    p = await start_proxy(cfg)

    async def check(status_code, check_state):
        async def seen():
            status, body = await probe(p)
            return status == status_code and body["dependencies"][name]["tracks"]["stable"]["check"] == check_state \
                and (status, body)
        return await eventually(seen, what=f"readiness {status_code} with the check {check_state}")

    status, body = await check(200, "passing")
    assert body["dependencies"][name]["last_check"].endswith("Z")
    assert metrics.value("upstream_health", name=name, track="stable") == 1
    state["status"] = 500
    status, body = await check(503, "failing")
    assert body["dependencies"][name]["status"] == "down"
    assert "500" in body["dependencies"][name]["tracks"]["stable"]["check_error"]
    assert metrics.value("upstream_health", name=name, track="stable") == 0
    state["status"] = 200
    await check(200, "passing")
    assert set(upstream.paths()) == {"/healthz"}


async def test_startup_waits_for_the_first_round_of_checks(upstream, start_proxy):
    """/health/startup is not 200 while the first active check is still out, and is once it is back
    (whatever its result: startup is about the sidecar, not the upstream)."""
    gate = Gate(failing(500))
    upstream.behaviour = gate
    name, cfg = upstream_config(upstream.url, health={"path": "/healthz", "interval": "1h", "timeout": "60s"})
    p = await start_proxy(cfg)
    await eventually(lambda: gate.arrived == 1)
    status, body = await probe(p, "/health/startup")
    assert status == 503 and body == {"started": False, "listeners_bound": True, "first_checks_done": False}
    gate.open()
    status, body = await eventually(lambda: _ok(probe(p, "/health/startup")), what="startup after the first check")
    assert body == {"started": True, "listeners_bound": True, "first_checks_done": True}
    assert p.upstream.targets[0].health.healthy is False  # it failed, and startup is still done


async def _ok(answer):
    status, body = await answer
    return (status, body) if status == 200 else None


async def test_liveness_turns_503_when_the_event_loop_stalls(upstream, start_proxy):
    """The loop blocked for longer than max_loop_lag (here by the test, in the proxy's own loop): live
    says so, then recovers. A busy machine only makes the stall longer, never shorter."""
    name, cfg = upstream_config(upstream.url)
    cfg["liveness"] = {"max_loop_lag": "1s"}
    p = await start_proxy(cfg)
    await eventually(lambda: _ok(probe(p, "/health/live")))
    time.sleep(2.5)  # blocks the event loop everything here runs on
    status, body = await probe(p, "/health/live")
    assert status == 503 and body["status"] == "event_loop_stalled" and body["loop_lag_seconds"] > 1
    assert body["max_loop_lag_seconds"] == 1
    status, body = await eventually(lambda: _ok(probe(p, "/health/live")), what="live again")
    assert body["status"] == "alive"


async def test_app_readiness_gates_ready_but_never_startup(upstream, start_proxy, make_upstream):
    async def app_probes(request):
        if request.path == "/ready":
            return web.Response(status=503, text="warming up")
        return web.Response(text="alive")

    app = await make_upstream(app_probes)
    name, cfg = upstream_config(upstream.url)
    cfg["app"] = {"ready_url": f"{app.url}/ready", "live_url": f"{app.url}/live", "interval": "100ms"}
    p = await start_proxy(cfg)

    async def app_checked():
        status, body = await probe(p)
        return body["app"].get("status_code") == 503 and (status, body)

    status, body = await eventually(app_checked, what="the app's readiness was checked")
    assert status == 503 and body["app"]["ready"] is False and body["reasons"] == ["app_not_ready"]
    assert (await probe(p, "/health/startup"))[0] == 200
    assert (await probe(p, "/health/live"))[0] == 200
    r = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "proxy", "wait-ready", "--admin", p.admin,
                                                 "--timeout", "30s"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    async with aiohttp.ClientSession() as s:
        async with s.get(p.admin + "/app-health/ready") as resp:
            assert resp.status == 503 and await resp.text() == "warming up"
        async with s.get(p.admin + "/app-health/live") as resp:
            assert resp.status == 200 and await resp.text() == "alive"


async def test_wait_ready_times_out_when_nothing_answers():
    r = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "proxy", "wait-ready", "--admin",
                                                 f"http://127.0.0.1:{free_port()}", "--timeout", "1s"],
                                capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "did not start" in r.stderr


async def test_probes_never_fan_out(upstream, start_proxy):
    name, cfg = upstream_config(upstream.url, health={"path": "/healthz", "interval": "1s"})
    p = await start_proxy(cfg)
    await eventually(lambda: upstream.hits >= 1, what="the first active check")
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as s:
        for _ in range(1000):  # as fast as the probes answer
            async with s.get(p.admin + "/health/ready") as r:
                assert r.status == 200
            async with s.get(p.admin + "/health") as r:
                assert r.status == 200
    elapsed = time.monotonic() - t0
    # 2,000 probes; what reached the upstream is the active checks alone, one per interval
    assert set(upstream.paths()) == {"/healthz"}
    assert 1 <= upstream.hits <= elapsed / 1.0 + 2


async def test_status_command_shows_a_table(upstream, start_proxy):
    name, cfg = upstream_config(upstream.url)
    p = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        for _ in range(20):
            async with s.get(p.url + "/x") as r:
                await r.read()
    r = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "proxy", "status", "--admin", p.admin],
                                capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    row = [ln for ln in r.stdout.splitlines() if ln.startswith(name)]
    assert row and "closed" in row[0] and "up" in row[0]
    assert "BREAKER" in r.stdout and "P99" in r.stdout


@pytest.mark.timeout(150)  # three subprocess screens of a second's sampling each, on a loaded machine too
async def test_status_watch_refreshes_and_reads_admin_with_a_token_file(upstream, start_proxy, tmp_path):
    """`status --watch` redraws every second; `--token-file` is what lets it read /admin/upstreams from
    an admin listener that needs a token for reads (not on loopback)."""
    token = tmp_path / "token"
    token.write_text("status-token\n")
    name, cfg = upstream_config(upstream.url)
    port = free_port()
    cfg["admin"] = {"listen": f"0.0.0.0:{port}", "token_file": str(token)}
    p = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s, s.get(p.url + "/cached") as r:
        assert r.status == 200
    admin = f"http://127.0.0.1:{port}"

    async def screens(*args: str, n: int) -> list[str]:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "proxy", "status", "--admin", admin, *args,
                                                    stdout=asyncio.subprocess.PIPE, cwd=ROOT)
        out = b""
        try:
            while out.count(b"\x1b[2J\x1b[H") < n + 1:  # n whole screens, and the start of the next
                chunk = await asyncio.wait_for(proc.stdout.read(4096), 60)
                assert chunk, out
                out += chunk
        finally:
            proc.terminate()
            await proc.wait()
        return out.decode().split("\x1b[2J\x1b[H")[1:n + 1]

    shown = await screens("--watch", "--token-file", str(token), n=2)
    for screen in shown:
        assert "pass --token-file" not in screen
        row = next(ln for ln in screen.splitlines() if ln.startswith(name)).split()
        assert (row[1], row[2], row[8], row[9]) == ("stable", "closed", "1", "up")  # CACHE from /admin/upstreams
    without = await screens("--watch", n=1)
    assert "(/admin/upstreams: HTTP 401; pass --token-file)" in without[0]


# -- ConfigMap-style reload ----------------------------------------------------------------------------

async def test_configmap_swap_reloads_keeps_state_and_never_fails_a_request(upstream, tmp_path, aiohttp_server):
    other = await aiohttp_server(upstream.app())
    cm = MountedVolume(tmp_path, "config.yaml")
    name, cfg = upstream_config(upstream.url, retry={"attempts": 1}, breaker={"fail_max": 100})
    cfg["upstreams"][name]["targets"] = [{"name": "blue", "url": upstream.url, "weight": 100},
                                         {"name": "green", "url": f"http://127.0.0.1:{other.port}", "weight": 0}]
    cfg["reload"] = {"interval": "200ms"}
    # an upstream the reloads do not touch, its breaker opened by a real failure (nothing listens there)
    db = {"listen": f"127.0.0.1:{free_port()}", "targets": [{"name": "stable", "url": f"http://127.0.0.1:{free_port()}"}],
          "retry": {"attempts": 1}, "breaker": {"fail_max": 1, "reset_timeout": "1h"}}
    cfg["upstreams"]["db"] = db
    path = cm.write(yaml.safe_dump(cfg))
    app = ProxyApp(path)
    await app.start(load(path))
    url = lambda: f"http://{app.runtime.settings.upstreams[name].listen}"  # noqa: E731
    failures, done = [], asyncio.Event()

    async def load_loop():
        async with aiohttp.ClientSession() as s:
            while not done.is_set():
                try:
                    async with s.get(url() + "/loop") as r:
                        await r.read()
                        if r.status != 200:
                            failures.append(r.status)
                except aiohttp.ClientError as exc:
                    failures.append(repr(exc))
                await asyncio.sleep(0.005)

    loop_task = asyncio.create_task(load_loop())
    try:
        async with aiohttp.ClientSession() as s, s.get(f"http://{db['listen']}/x") as r:
            assert r.status == 502
        db_breaker = app.runtime.upstreams["db"].targets[0].breaker
        assert db_breaker.state == "open"
        blue = app.runtime.upstreams[name].by_name["blue"]
        cache = app.runtime.upstreams[name].default_route.cache
        await eventually(lambda: len(cache) >= 1, what="the load loop warmed the cache")
        # 1: a weight-only change (blue/green switch): breakers and cache kept, traffic moves
        cfg["upstreams"][name]["targets"][0]["weight"], cfg["upstreams"][name]["targets"][1]["weight"] = 0, 100
        cm.write(yaml.safe_dump(cfg))
        await eventually(lambda: app.runtime.upstreams[name].by_name["blue"].weight == 0)
        up = app.runtime.upstreams[name]
        assert up.by_name["blue"].breaker is blue.breaker and up.default_route.cache is cache
        assert app.runtime.upstreams["db"].targets[0].breaker is db_breaker and db_breaker.state == "open"
        # 2: an invalid config: rejected, the old one keeps serving
        hash_before = app.runtime.digest
        bad = yaml.safe_load(yaml.safe_dump(cfg))
        bad["upstreams"][name]["retry"]["attempts"] = 0
        cm.write(yaml.safe_dump(bad))
        await eventually(lambda: app.last_reload_error is not None)
        assert app.runtime.digest == hash_before
        assert any("retry.attempts" in e for e in app.last_reload_error)
        # 3: a port change moves the listener (the loop follows the new port)
        old_url = url()
        cfg["upstreams"][name]["listen"] = f"127.0.0.1:{free_port()}"
        cm.write(yaml.safe_dump(cfg))
        await eventually(lambda: url() != old_url)
        n = len(upstream.requests)
        await eventually(lambda: len(upstream.requests) > n + 20, what="the loop goes on on the new port")
    finally:
        done.set()
        await loop_task
        await app.close()
    assert failures == []
    assert db_breaker.state == "open"
    green_hits = [r for r in upstream.requests if r["headers"].get("Host", "").endswith(str(other.port))]
    assert green_hits, "traffic moved to green after the switch"

