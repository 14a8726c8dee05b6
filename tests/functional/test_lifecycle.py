"""The process as users run it: `resilience-proxy run` in a subprocess, SIGTERM drain, second signal,
port conflicts, the demo, and secret rotation through a re-read ${file:} reference."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import aiohttp
import pytest
import yaml
from aiohttp import web

from tests.conftest import upstream_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


async def wait_http(url: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            try:
                async with s.get(url) as r:
                    if r.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError(f"{url} did not come up")


def spawn(config_path: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "proxy", "run", "--config", config_path],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)


@pytest.fixture
async def slow_upstream(aiohttp_server):
    async def slow(request):
        await asyncio.sleep(float(request.query.get("d", "0")))
        return web.Response(text="done")

    app = web.Application()
    app.router.add_get("/{t:.*}", slow)
    server = await aiohttp_server(app)
    return f"http://127.0.0.1:{server.port}"


async def test_sigterm_ready_503_in_flight_finish_new_requests_served_exit_0(slow_upstream, tmp_path):
    name, cfg = upstream_config(slow_upstream, timeouts={"attempt": "10s", "total": "10s"})
    cfg["shutdown"] = {"drain_timeout": "10s", "quiet_period": "500ms"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = spawn(str(path))
    listen = f"http://{cfg['upstreams'][name]['listen']}"
    admin = f"http://{cfg['admin']['listen']}"
    try:
        await wait_http(admin + "/health/ready")
        async with aiohttp.ClientSession() as s:
            async def call(d):
                async with s.get(f"{listen}/x?d={d}") as r:
                    return r.status, await r.text()

            slow = [asyncio.create_task(call(1.0)) for _ in range(20)]
            await asyncio.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.1)
            async with s.get(admin + "/health/ready") as r:
                assert r.status == 503
            assert await call(0) == (200, "done")  # egress keeps serving during the drain
            assert proc.poll() is None
            results = await asyncio.gather(*slow)
        assert results == [(200, "done")] * 20
        t0 = time.monotonic()
        rc = await asyncio.to_thread(proc.wait, 10)
        assert rc == 0
        assert time.monotonic() - t0 < 5
        out = proc.stdout.read().decode()
        assert '"event":"draining"' in out and '"event":"drained"' in out
    finally:
        if proc.poll() is None:
            proc.kill()


async def test_second_sigterm_exits_at_once(slow_upstream, tmp_path):
    name, cfg = upstream_config(slow_upstream, timeouts={"attempt": "30s", "total": "30s"})
    cfg["shutdown"] = {"drain_timeout": "30s", "quiet_period": "10s"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = spawn(str(path))
    try:
        await wait_http(f"http://{cfg['admin']['listen']}/health/live")
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        assert proc.poll() is None  # draining: quiet_period is 10 s
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(proc.wait, 5)
        assert time.monotonic() - t0 < 3 and rc == 0
    finally:
        if proc.poll() is None:
            proc.kill()


async def test_sigint_exits_at_once(slow_upstream, tmp_path):
    name, cfg = upstream_config(slow_upstream)
    cfg["shutdown"] = {"drain_timeout": "30s", "quiet_period": "10s"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = spawn(str(path))
    try:
        await wait_http(f"http://{cfg['admin']['listen']}/health/live")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        await asyncio.to_thread(proc.wait, 5)
        assert time.monotonic() - t0 < 3
    finally:
        if proc.poll() is None:
            proc.kill()


async def test_port_in_use_exits_3_naming_the_address(slow_upstream, tmp_path):
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    name, cfg = upstream_config(slow_upstream)
    cfg["upstreams"][name]["listen"] = f"127.0.0.1:{port}"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = spawn(str(path))
    rc = await asyncio.to_thread(proc.wait, 15)
    busy.close()
    assert rc == 3
    assert f"127.0.0.1:{port}" in proc.stderr.read().decode()


async def test_admin_port_in_use_exits_3(slow_upstream, tmp_path):
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    name, cfg = upstream_config(slow_upstream)
    cfg["admin"]["listen"] = f"127.0.0.1:{busy.getsockname()[1]}"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = spawn(str(path))
    rc = await asyncio.to_thread(proc.wait, 15)
    busy.close()
    assert rc == 3 and "admin.listen" in proc.stderr.read().decode()


async def test_invalid_config_exits_1_with_paths(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("upstreams:\n  db:\n    listen: 127.0.0.1:1\n    targets: []\n")
    proc = spawn(str(path))
    rc = await asyncio.to_thread(proc.wait, 15)
    assert rc == 1
    assert "upstreams.db.targets" in proc.stderr.read().decode()


async def test_secret_file_rotation_is_picked_up_and_never_logged(tmp_path, aiohttp_server):
    seen = []

    async def record(request):
        seen.append(request.headers.get("Authorization"))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/{t:.*}", record)
    server = await aiohttp_server(app)
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    (secret_dir / "key").write_text("sk-first-secret\n")
    name, cfg = upstream_config(f"http://127.0.0.1:{server.port}",
                                request_headers={"Authorization": f"Bearer ${{file:{secret_dir / 'key'}}}"})
    cfg["reload"] = {"interval": "200ms"}
    cfg["log"] = {"level": "debug", "access": True}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = spawn(str(path))
    listen = f"http://{cfg['upstreams'][name]['listen']}"
    try:
        await wait_http(f"http://{cfg['admin']['listen']}/health/ready")
        async with aiohttp.ClientSession() as s:
            async with s.get(listen + "/a", headers={"Authorization": "Bearer placeholder"}) as r:
                assert r.status == 200
            (secret_dir / "key.new").write_text("sk-second-secret\n")
            os.replace(secret_dir / "key.new", secret_dir / "key")
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                async with s.get(listen + "/b") as r:
                    await r.read()
                if seen[-1] == "Bearer sk-second-secret":
                    break
                await asyncio.sleep(0.1)
            async with s.get(f"http://{cfg['admin']['listen']}/admin/config") as r:
                shown = await r.text()
            # a broken config that would quote the secret in its error message
            bad = yaml.safe_load(yaml.safe_dump(cfg))
            bad["upstreams"][name]["targets"][0]["url"] = f"${{file:{secret_dir / 'key'}}}"
            path.write_text(yaml.safe_dump(bad))
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                async with s.get(f"http://{cfg['admin']['listen']}/health") as r:
                    if (await r.json()).get("last_reload_error"):
                        break
                await asyncio.sleep(0.1)
            async with s.get(f"http://{cfg['admin']['listen']}/admin/config") as r:
                shown += await r.text()
        assert seen[0] == "Bearer sk-first-secret" and seen[-1] == "Bearer sk-second-secret"
        assert "sk-first" not in shown and "sk-second" not in shown
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.to_thread(proc.wait, 5)
    logs = proc.stdout.read().decode() + proc.stderr.read().decode()
    assert '"event":"reloaded"' in logs and '"event":"reload_failed"' in logs
    assert logs.count('"event":"reload_failed"') == 1  # reported once, not on every poll
    assert "sk-first-secret" not in logs and "sk-second-secret" not in logs


async def test_demo_starts_and_its_curl_lines_work(tmp_path):
    for port in (9002, 9901, 18002):
        import socket

        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                pytest.fail(f"port {port} is busy: the demo needs it")
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "demo"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        await wait_http("http://127.0.0.1:9901/health/ready")
        lines = []
        while True:
            line = (await asyncio.to_thread(proc.stdout.readline)).decode()
            lines.append(line)
            if line.startswith("Ctrl-C"):
                break
        curls = [ln.split("#")[0].strip() for ln in lines if ln.strip().startswith("curl ")]
        assert len(curls) >= 6
        outputs = []
        for c in curls:
            r = await asyncio.to_thread(subprocess.run, ["bash", "-c", c], capture_output=True, text=True, timeout=20)
            assert r.returncode == 0, (c, r.stderr)
            outputs.append(r.stdout)
        joined = "\n".join(outputs)
        assert "X-Fallback: cache" in joined and "X-Fallback: static" in joined
        assert 'circuit_breaker_state{name="database",track="stable"} 1.0' in joined
        assert '"state": "open"' in joined
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.to_thread(proc.wait, 10)


async def test_the_process_runs_without_importing_aiohttp(upstream, tmp_path):
    """aiohttp costs ~15 MB of RSS: a plain HTTP config must not load it, and every path of a request —
    an answer, a cached fallback, a connect failure (its error classified without aiohttp) — must work."""
    from tests.conftest import free_port

    dead = free_port()
    name, cfg = upstream_config(upstream.url, health={"path": "/healthz", "interval": "200ms"})
    cfg["upstreams"]["down"] = {"protocol": "http", "listen": f"127.0.0.1:{free_port()}",
                                "targets": [{"name": "stable", "url": f"http://127.0.0.1:{dead}"}]}
    path = tmp_path / "c.yaml"
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
    proc = subprocess.Popen([sys.executable, str(probe)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        listen = f"http://{cfg['upstreams'][name]['listen']}"
        down = f"http://{cfg['upstreams']['down']['listen']}"
        await wait_http(listen + "/")
        async with aiohttp.ClientSession() as s:
            async with s.get(listen + "/item") as r:
                assert r.status == 200
            async def failing(request):
                return web.Response(status=503)

            upstream.behaviour = failing
            async with s.get(listen + "/item") as r:
                assert r.status == 200 and r.headers["X-Fallback"] == "cache"
            async with s.get(down + "/item") as r:
                body = await r.json()
                assert r.status == 502 and body["error"]["type"] == "connect_failure", body
            async with s.get(f"http://{cfg['admin']['listen']}/health/ready") as r:
                assert r.status == 200  # "down" is not critical
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
    import json

    assert json.loads(mods.read_text()) == []
    assert any(r["path_qs"] == "/healthz" for r in upstream.requests)  # active checks ran, lean client
