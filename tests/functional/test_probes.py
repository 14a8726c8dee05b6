"""Probes (fallback-aware readiness, startup independent of the app), and ConfigMap-style hot reload."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import aiohttp
import yaml
from aiohttp import web

from proxy.app import ProxyApp
from proxy.settings import load
from tests.conftest import free_port, metric, upstream_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


async def probe(p, path="/health/ready"):
    async with aiohttp.ClientSession() as s:
        async with s.get(p.admin + path) as r:
            return r.status, await r.json()


async def test_readiness_matrix(upstream, start_proxy, aiohttp_server):
    # critical, nothing to serve: down → not ready
    name, cfg = upstream_config(upstream.url, health={"critical": True})
    p = await start_proxy(cfg)
    assert (await probe(p))[0] == 200
    p.upstream.targets[0].breaker.force("open")
    status, body = await probe(p)
    assert status == 503 and body["status"] == "not_ready"
    dep = body["dependencies"][name]
    assert dep == {**dep, "healthy": False, "status": "down", "breaker": "open", "fallback_available": False}
    assert f"dependency_down:{name}" in body["reasons"]
    # the same with a cached entry: degraded, still ready
    p.upstream.targets[0].breaker.force("auto")
    async with aiohttp.ClientSession() as s:
        async with s.get(p.url + "/x") as r:
            await r.read()
    p.upstream.targets[0].breaker.force("open")
    status, body = await probe(p)
    assert status == 200 and body["dependencies"][name]["status"] == "degraded"
    assert body["dependencies"][name]["fallback_available"] is True
    # critical with only a static answer: degraded
    n2, cfg2 = upstream_config(upstream.url, health={"critical": True}, fallback={"static": {"body": "{}"}})
    p2 = await start_proxy(cfg2)
    p2.upstream.targets[0].breaker.force("open")
    status, body = await probe(p2)
    assert status == 200 and body["dependencies"][n2]["status"] == "degraded"
    # non-critical, nothing to serve: degraded, never not-ready
    n3, cfg3 = upstream_config(upstream.url)
    cfg3["shutdown"] = {"quiet_period": "0s", "drain_timeout": "1s"}
    p3 = await start_proxy(cfg3)
    p3.upstream.targets[0].breaker.force("open")
    status, body = await probe(p3)
    assert status == 200 and body["dependencies"][n3]["status"] == "degraded"
    # shutting down: what SIGTERM runs
    await p3.app.drain()
    status, body = await probe(p3)
    assert status == 503 and "shutting_down" in body["reasons"]
    status, body = await probe(p3, "/health")
    assert status == 503 and body["live"] is True and body["version"]


async def test_active_checks_failing_make_a_critical_upstream_down(upstream, start_proxy):
    state = {"status": 200}

    async def health(request):
        return web.Response(status=state["status"])

    upstream.behaviour = health
    name, cfg = upstream_config(upstream.url,
                                health={"path": "/healthz", "interval": "100ms", "unhealthy_threshold": 2,
                                        "critical": True})
    p = await start_proxy(cfg)
    await asyncio.sleep(0.3)
    status, body = await probe(p)
    assert status == 200 and body["dependencies"][name]["tracks"]["stable"]["check"] == "passing"
    assert body["dependencies"][name]["last_check"].endswith("Z")
    assert metric("upstream_health", name=name, track="stable") == 1
    state["status"] = 500
    await asyncio.sleep(0.5)
    status, body = await probe(p)
    assert status == 503 and body["dependencies"][name]["status"] == "down"
    assert "500" in body["dependencies"][name]["tracks"]["stable"]["check_error"]
    assert metric("upstream_health", name=name, track="stable") == 0
    state["status"] = 200
    await asyncio.sleep(0.3)
    assert (await probe(p))[0] == 200


async def test_app_readiness_gates_ready_but_never_startup(upstream, start_proxy, make_upstream):
    async def app_probes(request):
        if request.path == "/ready":
            return web.Response(status=503, text="warming up")
        return web.Response(text="alive")

    app = await make_upstream(app_probes)
    name, cfg = upstream_config(upstream.url)
    cfg["app"] = {"ready_url": f"{app.url}/ready", "live_url": f"{app.url}/live", "interval": "100ms"}
    p = await start_proxy(cfg)
    await asyncio.sleep(0.3)
    status, body = await probe(p)
    assert status == 503 and body["app"]["ready"] is False and body["app"]["status_code"] == 503
    assert (await probe(p, "/health/startup"))[0] == 200
    assert (await probe(p, "/health/live"))[0] == 200
    r = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "proxy", "wait-ready", "--admin", p.admin,
                                                 "--timeout", "5s"], capture_output=True, text=True, cwd=ROOT)
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
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as s:
        for _ in range(1000):  # 200/s for 5 s
            async with s.get(p.admin + "/health/ready") as r:
                assert r.status == 200
            await asyncio.sleep(max(0.0, t0 + _ * 0.005 - time.monotonic()))
    elapsed = time.monotonic() - t0
    assert upstream.hits <= elapsed / 1.0 + 2  # the active checks, nothing more


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


# -- ConfigMap-style reload ----------------------------------------------------------------------------

class ConfigMapDir:
    """A directory laid out as the kubelet lays out a mounted ConfigMap: `..<ts>/config.yaml`, a `..data`
    symlink to it, and `config.yaml → ..data/config.yaml`. Updates swap `..data` atomically."""

    def __init__(self, root) -> None:
        self.root = root
        self.n = 0

    def write(self, cfg: dict) -> str:
        self.n += 1
        d = self.root / f"..2026_11_29_{self.n:04d}"
        d.mkdir()
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(d.name)
        os.replace(tmp, self.root / "..data")
        link = self.root / "config.yaml"
        if not link.is_symlink():
            link.symlink_to("..data/config.yaml")
        return str(link)


async def wait_for(pred, timeout=3.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await pred():
            return True
        await asyncio.sleep(0.05)
    return False


async def test_configmap_swap_reloads_keeps_state_and_never_fails_a_request(upstream, tmp_path, aiohttp_server):
    other = await aiohttp_server(upstream.app())
    cm = ConfigMapDir(tmp_path)
    name, cfg = upstream_config(upstream.url, retry={"attempts": 1}, breaker={"fail_max": 100})
    cfg["upstreams"][name]["targets"] = [{"name": "blue", "url": upstream.url, "weight": 100},
                                         {"name": "green", "url": f"http://127.0.0.1:{other.port}", "weight": 0}]
    cfg["reload"] = {"interval": "200ms"}
    db = {"listen": f"127.0.0.1:{free_port()}", "targets": [{"name": "stable", "url": upstream.url}]}
    cfg["upstreams"]["db"] = db
    path = cm.write(cfg)
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
        await asyncio.sleep(0.2)
        db_breaker = app.runtime.upstreams["db"].targets[0].breaker
        db_breaker.force("open")  # an open breaker on an upstream the reloads do not touch
        blue = app.runtime.upstreams[name].by_name["blue"]
        cache = app.runtime.upstreams[name].default_route.cache
        assert len(cache) >= 1
        # 1: a weight-only change (blue/green switch): breakers and cache kept, traffic moves
        cfg["upstreams"][name]["targets"][0]["weight"], cfg["upstreams"][name]["targets"][1]["weight"] = 0, 100
        cm.write(cfg)
        assert await wait_for(lambda: _true(app.runtime.upstreams[name].by_name["blue"].weight == 0))
        up = app.runtime.upstreams[name]
        assert up.by_name["blue"].breaker is blue.breaker and up.default_route.cache is cache
        assert app.runtime.upstreams["db"].targets[0].breaker is db_breaker and db_breaker.state == "forced_open"
        # 2: an invalid config: rejected, the old one keeps serving
        hash_before = app.runtime.digest
        bad = yaml.safe_load(yaml.safe_dump(cfg))
        bad["upstreams"][name]["retry"]["attempts"] = 0
        cm.write(bad)
        assert await wait_for(lambda: _true(app.last_reload_error is not None))
        assert app.runtime.digest == hash_before
        assert any("retry.attempts" in e for e in app.last_reload_error)
        # 3: a port change moves the listener (the loop follows the new port)
        old_url = url()
        cfg["upstreams"][name]["listen"] = f"127.0.0.1:{free_port()}"
        cm.write(cfg)
        assert await wait_for(lambda: _true(url() != old_url))
        await asyncio.sleep(0.3)
    finally:
        done.set()
        await loop_task
        await app.close()
    assert failures == []
    assert db_breaker.state == "forced_open"
    green_hits = [r for r in upstream.requests if r["headers"].get("Host", "").endswith(str(other.port))]
    assert green_hits, "traffic moved to green after the switch"


async def _true(v):
    return v
