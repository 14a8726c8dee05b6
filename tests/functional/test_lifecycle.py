"""The process as users run it: `resilience-proxy run` in a subprocess — SIGTERM drain (and its
deadline), a second signal, SIGHUP reload, port conflicts, the demo on a port base, secret rotation
through a re-read ${file:} reference. The upstreams live in this process, so a test holds a request at
the upstream for as long as it needs instead of timing a sleep."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import signal
import subprocess
import sys
import time

import aiohttp
import pytest

from tests.support.net import free_port, free_ports
from tests.support.proxy import Process, upstream_config, wait_http
from tests.support.tools import ROOT
from tests.support.upstreams import Gate, failing
from tests.support.wait import eventually


def events(out: str, name: str) -> list[dict]:
    found = []
    for line in out.splitlines():
        if line.startswith("{"):
            doc = json.loads(line)
            if doc["event"] == name:
                found.append(doc)
    return found


async def test_sigterm_ready_503_in_flight_finish_new_requests_served_exit_0(upstream, tmp_path):
    gate = Gate()
    upstream.behaviour = gate
    name, cfg = upstream_config(upstream.url, timeouts={"attempt": "60s", "total": "60s"})
    cfg["shutdown"] = {"drain_timeout": "60s", "quiet_period": "500ms"}
    proc = Process.run(cfg, tmp_path / "c.yaml")
    listen = f"http://{cfg['upstreams'][name]['listen']}"
    admin = f"http://{cfg['admin']['listen']}"
    try:
        await wait_http(admin + "/health/ready", ok=lambda st: st == 200)
        async with aiohttp.ClientSession() as s:
            async def call(path):
                async with s.get(listen + path) as r:
                    return r.status, await r.text()

            held = [asyncio.create_task(call(f"/held/{i}")) for i in range(20)]
            await eventually(lambda: gate.arrived == 20)
            proc.signal(signal.SIGTERM)
            await wait_http(admin + "/health/ready", ok=lambda st: st == 503)  # readiness turns at once
            upstream.behaviour = None
            assert await call("/during-drain") == (200, '{"path": "/during-drain", "n": 21}')  # egress keeps serving
            assert proc.proc.poll() is None  # 20 requests still in flight: it waits for them
            upstream.behaviour = gate
            gate.open()
            results = await asyncio.gather(*held)
        assert results == [(200, "ok")] * 20
        assert await proc.wait() == 0
        out, _ = proc.output()
        draining, = events(out, "draining")
        drained, = events(out, "drained")
        assert draining["in_flight"] == 20 and drained["in_flight"] == 0
    finally:
        await proc.stop()


async def test_drain_ends_at_drain_timeout_with_work_still_in_flight(upstream, tmp_path):
    """An app that never finishes its call must not keep the pod terminating forever: at drain_timeout
    the process exits (0, as Kubernetes expects from a SIGTERM), and says what it left."""
    gate = Gate()
    upstream.behaviour = gate
    name, cfg = upstream_config(upstream.url, timeouts={"attempt": "1h", "total": "1h"})
    cfg["shutdown"] = {"drain_timeout": "2s", "quiet_period": "0s"}
    proc = Process.run(cfg, tmp_path / "c.yaml")
    listen = f"http://{cfg['upstreams'][name]['listen']}"
    try:
        await wait_http(f"http://{cfg['admin']['listen']}/health/ready", ok=lambda st: st == 200)
        async with aiohttp.ClientSession() as s:
            stuck = asyncio.create_task(s.get(listen + "/forever"))
            await eventually(lambda: gate.arrived == 1)
            t0 = time.monotonic()
            proc.signal(signal.SIGTERM)
            assert await proc.wait() == 0
            assert time.monotonic() - t0 >= 2  # not before drain_timeout
            with pytest.raises(aiohttp.ClientError):
                await stuck  # the request it could not finish: its connection closed
        out, _ = proc.output()
        drained, = events(out, "drained")
        assert drained["in_flight"] == 1
    finally:
        gate.open()
        await proc.stop()


async def test_second_sigterm_exits_at_once(upstream, tmp_path):
    name, cfg = upstream_config(upstream.url)
    cfg["shutdown"] = {"drain_timeout": "120s", "quiet_period": "60s"}
    proc = Process.run(cfg, tmp_path / "c.yaml")
    admin = f"http://{cfg['admin']['listen']}"
    try:
        await wait_http(admin + "/health/live")
        proc.signal(signal.SIGTERM)
        await wait_http(admin + "/health/ready", ok=lambda st: st == 503)  # draining: quiet_period is 60 s
        assert proc.proc.poll() is None
        t0 = time.monotonic()
        proc.signal(signal.SIGTERM)
        assert await proc.wait() == 0
        assert time.monotonic() - t0 < 30  # at once, not after the 60 s quiet period
        out, _ = proc.output()
        assert events(out, "stopping")[0]["forced"] is True
    finally:
        await proc.stop()


async def test_sigint_exits_at_once(upstream, tmp_path):
    name, cfg = upstream_config(upstream.url)
    cfg["shutdown"] = {"drain_timeout": "120s", "quiet_period": "60s"}
    proc = Process.run(cfg, tmp_path / "c.yaml")
    try:
        await wait_http(f"http://{cfg['admin']['listen']}/health/live")
        t0 = time.monotonic()
        proc.signal(signal.SIGINT)
        assert await proc.wait() == 0
        assert time.monotonic() - t0 < 30
        out, _ = proc.output()
        assert events(out, "draining") == [] and events(out, "stopping")[0]["forced"] is True
    finally:
        await proc.stop()


async def test_sighup_reloads_the_config(upstream, tmp_path):
    name, cfg = upstream_config(upstream.url)
    cfg["reload"] = {"interval": "1h"}  # the watcher will not see it: only the signal can
    path = tmp_path / "c.yaml"
    proc = Process.run(cfg, path)
    listen = f"http://{cfg['upstreams'][name]['listen']}"
    try:
        await wait_http(f"http://{cfg['admin']['listen']}/health/ready", ok=lambda st: st == 200)
        changed = copy.deepcopy(cfg)
        changed["upstreams"][name]["request_headers"] = {"X-After-Hup": "yes"}
        path.write_text(json.dumps(changed))  # YAML is a superset of JSON
        proc.signal(signal.SIGHUP)

        async def reloaded():
            async with aiohttp.ClientSession() as s, s.get(listen + "/hup") as r:
                await r.read()
            return upstream.requests[-1]["headers"].get("X-After-Hup") == "yes"

        await eventually(reloaded, what="the reloaded config in effect")
    finally:
        await proc.stop()
    out, _ = proc.output()
    reload_line, = events(out, "reloaded")
    assert reload_line["reason"] == "sighup"


async def test_port_in_use_exits_3_naming_the_address(upstream, tmp_path):
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    name, cfg = upstream_config(upstream.url)
    cfg["upstreams"][name]["listen"] = f"127.0.0.1:{port}"
    proc = Process.run(cfg, tmp_path / "c.yaml")
    rc = await proc.wait()
    busy.close()
    assert rc == 3
    assert f"upstreams.{name}.listen 127.0.0.1:{port}: Address already in use" in proc.output()[1]


async def test_admin_port_in_use_exits_3(upstream, tmp_path):
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    name, cfg = upstream_config(upstream.url)
    cfg["admin"]["listen"] = f"127.0.0.1:{busy.getsockname()[1]}"
    proc = Process.run(cfg, tmp_path / "c.yaml")
    rc = await proc.wait()
    busy.close()
    assert rc == 3 and "admin.listen" in proc.output()[1]


async def test_invalid_config_exits_1_with_paths(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("upstreams:\n  db:\n    listen: 127.0.0.1:1\n    targets: []\n")
    proc = Process("run", "--config", str(path))
    assert await proc.wait() == 1
    assert "upstreams.db.targets" in proc.output()[1]


async def test_secret_file_rotation_is_picked_up_and_never_logged(tmp_path, upstream):
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    (secret_dir / "key").write_text("sk-first-secret\n")
    name, cfg = upstream_config(upstream.url,
                                request_headers={"Authorization": f"Bearer ${{file:{secret_dir / 'key'}}}"})
    cfg["reload"] = {"interval": "200ms"}
    cfg["log"] = {"level": "debug", "access": True}
    path = tmp_path / "c.yaml"
    proc = Process.run(cfg, path)
    listen = f"http://{cfg['upstreams'][name]['listen']}"
    admin = f"http://{cfg['admin']['listen']}"
    seen = lambda: [r["headers"].get("Authorization") for r in upstream.requests]  # noqa: E731
    try:
        await wait_http(admin + "/health/ready", ok=lambda st: st == 200)
        async with aiohttp.ClientSession() as s:
            async with s.get(listen + "/a", headers={"Authorization": "Bearer placeholder"}) as r:
                assert r.status == 200
            (secret_dir / "key.new").write_text("sk-second-secret\n")
            os.replace(secret_dir / "key.new", secret_dir / "key")

            async def rotated():
                async with s.get(listen + "/b") as r:
                    await r.read()
                return seen()[-1] == "Bearer sk-second-secret"

            await eventually(rotated, what="the rotated secret in use")
            async with s.get(admin + "/admin/config") as r:
                shown = await r.text()
            # a broken config that would quote the secret in its error message
            bad = copy.deepcopy(cfg)
            bad["upstreams"][name]["targets"][0]["url"] = f"${{file:{secret_dir / 'key'}}}"
            path.write_text(json.dumps(bad))

            async def reported():
                async with s.get(admin + "/health") as r:
                    return (await r.json()).get("last_reload_error")

            await eventually(reported, what="the reload error is reported")
            async with s.get(admin + "/admin/config") as r:
                shown += await r.text()
            async with s.get(admin + "/health") as r:
                shown += await r.text()
        assert seen()[0] == "Bearer sk-first-secret" and seen()[-1] == "Bearer sk-second-secret"
        assert "sk-first" not in shown and "sk-second" not in shown
    finally:
        await proc.stop()
    out, err = proc.output()
    logs = out + err
    assert len(events(out, "reloaded")) == 1
    assert len(events(out, "reload_failed")) == 1  # reported once, not on every poll
    assert "sk-first-secret" not in logs and "sk-second-secret" not in logs


def _sse_text(out: str) -> tuple[str, bool]:
    """(the streamed answer's text, whether it ended with [DONE]) from curl's SSE output."""
    import json

    text, done = "", False
    for line in out.splitlines():
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            done = True
            continue
        for choice in json.loads(data).get("choices", []):
            text += choice.get("delta", {}).get("content") or ""
    return text, done


async def test_the_demo_on_a_port_base_runs_every_path_as_it_prints_it(tmp_path):
    """`make demo`'s every line, run as printed, in order, on a free port base: HTTP cache and static
    fallbacks and the breaker; an LLM stream cut and continued, a model failover; a stale Redis read with
    the server stopped; a canary aborted by the watchdog."""
    import re

    from proxy.demo import ANSWER

    base = free_ports(8)
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "demo", "--port-base", str(base)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        await wait_http(f"http://127.0.0.1:{base + 1}/health/ready", ok=lambda st: st == 200)
        lines = []
        while True:
            line = (await asyncio.to_thread(proc.stdout.readline)).decode()
            assert line, "the demo ended before printing its lines:\n" + "".join(lines)
            lines.append(line)
            if line.startswith("Ctrl-C"):
                break
        text = "".join(lines)
        assert f"proxy 127.0.0.1:{base} → fake database gateway 127.0.0.1:{base + 2}" in text
        assert f"status page: http://127.0.0.1:{base + 1}/admin/ui" in text
        # each line as bash runs it (its comment is only for the reader): a command printed twice gets both outputs
        commands = [ln.split("  #")[0].strip() for ln in lines if re.match(r"\s+(curl|redis-cli|\S*python\S*|for) ", ln)]
        ports = {int(p) for c in commands for p in re.findall(r"(?:localhost:|-p )(\d+)", c)}
        assert ports == set(range(base, base + 8)) - {base + 6}, ports  # redis-server is reached through the proxy
        out = {}
        for c in commands:
            r = await asyncio.to_thread(subprocess.run, ["bash", "-c", c], capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, (c, r.stdout, r.stderr)
            out.setdefault(c, []).append(r.stdout)
        http = "\n".join(v for c, vs in out.items() if f"localhost:{base}/" in c for v in vs)
        assert "X-Fallback: cache" in http and "X-Fallback: static" in http
        metrics = "\n".join(v for c, vs in out.items() if "/metrics" in c for v in vs)
        assert 'circuit_breaker_state{name="database",track="stable"} 1.0' in metrics
        assert 'canary_weight{name="database",track="canary"} 0.0' in metrics
        streamed = next(vs for c, vs in out.items() if '"stream": true' in c)
        assert len(streamed) == 2  # before and after the cut
        for answer in streamed:
            assert _sse_text(answer) == (f"{ANSWER} (demo/large)", True)  # whole, once, even when cut
        (failover,) = next(vs for c, vs in out.items() if '"stream": false' in c)
        assert '"model": "demo/small"' in failover.replace('":"', '": "') and "(demo/small)" in failover
        gets = next(vs for c, vs in out.items() if c.endswith("GET greeting"))
        assert [g.strip() for g in gets] == ["hello", "hello"]  # the second with redis-server stopped
        import urllib.request

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{base + 1}/metrics", timeout=10) as r:
                return r.read().decode()

        scraped = await asyncio.to_thread(scrape)
        # the stream really was cut and continued (not merely answered whole), and Redis really was away
        assert re.search(r'llm_stream_recoveries_total\{[^}]*outcome="recovered"[^}]*\} 1\.0', scraped), scraped
        assert re.search(r'upstream_requests_total\{name="cache",[^}]*outcome="fallback"[^}]*\} 1\.0', scraped)
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.to_thread(proc.wait, 30)
    assert proc.returncode == 0


async def test_the_process_runs_without_importing_aiohttp(upstream, tmp_path):
    """aiohttp costs ~15 MB of RSS: a plain HTTP config must not load it, and every path of a request —
    an answer, a cached fallback, a connect failure (its error classified without aiohttp), the active
    checks — must work."""
    dead = free_port()
    name, cfg = upstream_config(upstream.url, health={"path": "/healthz", "interval": "200ms"})
    cfg["upstreams"]["down"] = {"protocol": "http", "listen": f"127.0.0.1:{free_port()}",
                                "targets": [{"name": "stable", "url": f"http://127.0.0.1:{dead}"}]}
    path = tmp_path / "c.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    probe = tmp_path / "probe.py"
    # the proxy's own process, reporting at exit (after every request below) which aiohttp modules it loaded
    mods = tmp_path / "mods.json"
    probe.write_text(f"""
import atexit, json, os, sys
sys.argv = ["resilience-proxy", "run", "--config", {str(path)!r}]
def report():
    with open({str(mods)!r} + ".tmp", "w") as f:
        json.dump([m for m in sys.modules if m.startswith("aiohttp")], f)
    os.replace({str(mods)!r} + ".tmp", {str(mods)!r})
atexit.register(report)
from proxy.cli import main
sys.exit(main())
""")
    proc = subprocess.Popen([sys.executable, str(probe)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        listen = f"http://{cfg['upstreams'][name]['listen']}"
        down = f"http://{cfg['upstreams']['down']['listen']}"
        await wait_http(f"http://{cfg['admin']['listen']}/health/ready", ok=lambda st: st == 200)
        await eventually(lambda: "/healthz" in upstream.paths(), what="an active check ran")
        async with aiohttp.ClientSession() as s:
            async with s.get(listen + "/item") as r:
                assert r.status == 200
            upstream.behaviour = failing(503)
            async with s.get(listen + "/item") as r:
                assert r.status == 200 and r.headers["X-Fallback"] == "cache"
            async with s.get(down + "/item") as r:
                body = await r.json()
                assert r.status == 502 and body["error"]["type"] == "connect_failure", body
            async with s.get(f"http://{cfg['admin']['listen']}/health/ready") as r:
                assert r.status == 200  # "down" is not critical
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.to_thread(proc.wait, 30)
    assert json.loads(mods.read_text()) == []
