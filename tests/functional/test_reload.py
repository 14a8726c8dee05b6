"""Hot reload: build → validate → swap; a bad config changes nothing; state survives when its spec did."""

from __future__ import annotations

import aiohttp
import yaml

from tests.conftest import free_port, metric, upstream_config

TOKEN = "tok-reload"


async def _started(upstream, start_proxy, tmp_path):
    """A proxy with one upstream (no retries, a breaker that opens at once) and an admin token."""
    token = tmp_path / "t"
    token.write_text(TOKEN)
    name, cfg = upstream_config(upstream.url, retry={"attempts": 1}, breaker={"fail_max": 1, "reset_timeout": "1h"})
    cfg["admin"]["token_file"] = str(token)
    return name, cfg, await start_proxy(cfg)


async def reload_with(p, cfg) -> tuple[int, dict]:
    p.rewrite(cfg)
    async with aiohttp.ClientSession() as s:
        async with s.post(p.admin + "/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            return r.status, await r.json()


async def test_failed_reload_keeps_everything_as_it_was(upstream, start_proxy, tmp_path):
    name, cfg, p = await _started(upstream, start_proxy, tmp_path)
    p.upstream.targets[0].breaker.force("open")
    assert metric("circuit_breaker_state", name=name, track="stable") == 3
    before = p.app.runtime
    bad = yaml.safe_load(yaml.safe_dump(cfg))
    bad["upstreams"][name]["breaker"]["fail_max"] = 7  # a new breaker would be built for this spec ...
    bad["upstreams"][name]["retry"]["budget_ratio"] = 0.9
    bad["upstreams"][name]["timeouts"] = {"connect": "forever"}  # ... but the config is invalid
    status, body = await reload_with(p, bad)
    assert status == 422 and "upstreams." + name + ".timeouts.connect" in body["message"]
    assert p.app.runtime is before
    assert metric("circuit_breaker_state", name=name, track="stable") == 3  # the live gauge untouched
    assert p.upstream.counters.budget.ratio == 0.2
    assert metric("config_reload_total", result="failure") >= 1
    async with aiohttp.ClientSession() as s:
        async with s.get(p.url + "/x") as r:
            assert r.status == 503  # still the old config, breaker still forced open
        async with s.get(p.admin + "/health") as r:
            h = await r.json()
            assert any(e.startswith(f"upstreams.{name}.timeouts.connect") for e in h["last_reload_error"])


async def test_valid_reload_swaps_keeps_unchanged_state_and_moves_a_listener(upstream, start_proxy, tmp_path):
    name, cfg, p = await _started(upstream, start_proxy, tmp_path)
    async with aiohttp.ClientSession() as s:
        async with s.get(p.url + "/warm") as r:
            assert r.status == 200
    breaker = p.upstream.targets[0].breaker
    breaker.force("open")
    old_url = p.url
    moved = yaml.safe_load(yaml.safe_dump(cfg))
    moved["upstreams"][name]["listen"] = f"127.0.0.1:{free_port()}"
    moved["upstreams"][name]["request_headers"] = {"X-Reloaded": "yes"}
    status, body = await reload_with(p, moved)
    assert status == 200 and body["reloaded"] is True
    assert p.upstream.targets[0].breaker is breaker  # same spec: same breaker, still open
    async with aiohttp.ClientSession() as s:
        breaker.force("auto")
        async with s.get(p.url + "/after") as r:
            assert r.status == 200
        assert upstream.requests[-1]["headers"]["X-Reloaded"] == "yes"
        try:
            async with s.get(old_url + "/old") as r:
                closed = False
        except aiohttp.ClientConnectionError:
            closed = True
        assert closed, "the old listener must stop accepting"
    assert metric("config_reload_total", result="success") >= 1
