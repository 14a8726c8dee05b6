"""Hot reload: build → validate → swap; a bad config changes nothing; state survives when its spec did."""

from __future__ import annotations

import copy

import aiohttp

from proxy.clock import ManualClock
from tests.support.net import free_port
from tests.support.proxy import upstream_config
from tests.support.upstreams import failing
from tests.support.wait import eventually

TOKEN = "tok-reload"


async def _started(upstream, start_proxy, tmp_path, clock=None):
    """A proxy with one upstream (no retries, a breaker that opens at once) and an admin token."""
    token = tmp_path / "t"
    token.write_text(TOKEN)
    name, cfg = upstream_config(upstream.url, retry={"attempts": 1}, breaker={"fail_max": 1, "reset_timeout": "1h"})
    cfg["admin"]["token_file"] = str(token)
    return name, cfg, await start_proxy(cfg, clock=clock)


async def reload_with(p, cfg) -> tuple[int, dict]:
    p.rewrite(cfg)
    async with aiohttp.ClientSession() as s:
        async with s.post(p.admin + "/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            return r.status, await r.json()


async def test_failed_reload_keeps_everything_as_it_was(upstream, start_proxy, tmp_path, metrics):
    name, cfg, p = await _started(upstream, start_proxy, tmp_path)
    p.breaker.force("open")  # an operator's decision must survive a bad reload too
    assert metrics.value("circuit_breaker_state", name=name, track="stable") == 3
    before = p.app.runtime
    bad = copy.deepcopy(cfg)
    bad["upstreams"][name]["breaker"]["fail_max"] = 7  # a new breaker would be built for this spec ...
    bad["upstreams"][name]["retry"]["budget_ratio"] = 0.9
    bad["upstreams"][name]["timeouts"] = {"connect": "forever"}  # ... but the config is invalid
    status, body = await reload_with(p, bad)
    assert status == 422 and "upstreams." + name + ".timeouts.connect" in body["message"]
    assert p.app.runtime is before
    assert metrics.value("circuit_breaker_state", name=name, track="stable") == 3  # the live gauge untouched
    assert p.upstream.counters.budget.ratio == 0.2
    assert metrics.delta("config_reload_total", result="failure") == 1
    assert metrics.family_delta("config_reload_total") == 1  # that one failure, and no success
    async with aiohttp.ClientSession() as s:
        async with s.get(p.url + "/x") as r:
            assert r.status == 503  # still the old config, breaker still forced open
        async with s.get(p.admin + "/health") as r:
            h = await r.json()
            assert any(e.startswith(f"upstreams.{name}.timeouts.connect") for e in h["last_reload_error"])


async def test_valid_reload_swaps_keeps_unchanged_state_and_moves_a_listener(upstream, start_proxy, tmp_path, metrics):
    clock = ManualClock()
    name, cfg, p = await _started(upstream, start_proxy, tmp_path, clock)
    old_hash = p.app.runtime.digest
    assert metrics.value("config_info", hash=old_hash) == 1
    upstream.behaviour = failing(503)
    async with aiohttp.ClientSession() as s:
        async with s.get(p.url + "/warm") as r:
            assert r.status == 503
    breaker = p.breaker
    assert breaker.state == "open"  # tripped by the failure (fail_max 1)
    old_url = p.url
    moved = copy.deepcopy(cfg)
    moved["upstreams"][name]["listen"] = f"127.0.0.1:{free_port()}"
    moved["upstreams"][name]["request_headers"] = {"X-Reloaded": "yes"}
    status, body = await reload_with(p, moved)
    assert status == 200 and body["reloaded"] is True
    assert p.breaker is breaker and breaker.state == "open"  # same spec: same breaker, still open
    assert metrics.delta("config_reload_total", result="success") == 1
    # config_info names the running config, and only it
    assert body["hash"] == p.app.runtime.digest != old_hash
    assert metrics.value("config_info", hash=body["hash"]) == 1
    assert metrics.sample("config_info", hash=old_hash) is None
    async with aiohttp.ClientSession() as s:
        async with s.get(p.url + "/still-open") as r:
            assert r.status == 503 and r.headers["X-Fallback-Reason"] == "circuit_breaker_open"
        upstream.behaviour = None
        clock.advance(3600)  # its reset_timeout: the probe goes out on the new listener
        async with s.get(p.url + "/after") as r:
            assert r.status == 200
        assert breaker.state == "closed"
        assert upstream.requests[-1]["headers"]["X-Reloaded"] == "yes"
        try:
            async with s.get(old_url + "/old") as r:
                closed = False
        except aiohttp.ClientConnectionError:
            closed = True
        assert closed, "the old listener must stop accepting"


async def test_the_watcher_survives_what_breaks_a_reload_and_applies_the_next_valid_change(
        upstream, start_proxy, tmp_path, metrics, json_log, monkeypatch):
    """A Secret rotated to bytes that are not text, a config nested 10,000 deep, and an error no config
    check knows: each is reported once (log line, metric, /health), the running config keeps serving,
    and the next valid change is applied by the watcher itself — nobody calls /admin/reload."""
    secret = tmp_path / "api-key"
    secret.write_text("key-1")
    name, cfg = upstream_config(upstream.url, request_headers={"X-Key": "${file:" + str(secret) + "}"})
    cfg["reload"] = {"interval": "50ms"}
    p = await start_proxy(cfg)

    async def header() -> str:
        async with aiohttp.ClientSession() as s:
            async with s.get(p.url + "/x") as r:
                assert r.status == 200
        return upstream.requests[-1]["headers"]["X-Key"]

    async def failures(n: int) -> None:
        await eventually(lambda: metrics.delta("config_reload_total", result="failure") == n)

    assert await header() == "key-1"
    secret.write_bytes(b"\xff\xfe not text")
    await failures(1)
    assert await header() == "key-1"  # the running config serves on
    async with aiohttp.ClientSession() as s:
        async with s.get(p.admin + "/health") as r:
            assert (await r.json())["last_reload_error"] == [
                f"upstreams.{name}.request_headers.X-Key: {secret} is not UTF-8 text"]
    secret.write_text("key-2")
    await eventually(lambda: metrics.delta("config_reload_total", result="success") == 1)
    assert await header() == "key-2"

    deep = copy.deepcopy(cfg)
    deep["upstreams"][name]["request_headers"] = {"X-Deep": "x"}
    p.rewrite(deep)
    with open(p.app.config_path, "a") as f:
        f.write("extra: " + "[" * 10_000 + "]" * 10_000 + "\n")
    await failures(2)

    import proxy.app

    real = proxy.app.Runtime

    def broken(*args, **kwargs):
        raise RuntimeError("something no config check knows")

    monkeypatch.setattr(proxy.app, "Runtime", broken)
    renamed = copy.deepcopy(cfg)
    renamed["upstreams"][name]["request_headers"]["X-Other"] = "1"
    p.rewrite(renamed)
    await failures(3)
    assert len(json_log.events("reload_failed")) == 3  # once each, not at every poll
    assert "something no config check knows" not in str(json_log.events("reload_failed")[-1])
    monkeypatch.setattr(proxy.app, "Runtime", real)
    renamed["upstreams"][name]["request_headers"]["X-Other"] = "2"
    p.rewrite(renamed)
    await eventually(lambda: metrics.delta("config_reload_total", result="success") == 2)
    await header()
    assert upstream.requests[-1]["headers"]["X-Other"] == "2"
