"""The seven scenarios of the benchmark. Each returns a dict of raw numbers; ratios are computed from
numbers measured in the same run (rounds interleaved A B A B …), never across runs."""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

from bench import load, peers
from bench.peers import LOAD_CORE, PROXY_CORE, ROOT, Proc, free_port


def _admin(admin: int, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{admin}{path}", method="POST" if body is not None else "GET",
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": "Bearer bench-token", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def throughput(tmp: Path, ups: list[int], rounds: int, seconds: float, progress) -> dict:
    """Scenario 1 (64 connections) and 2 (one connection; fixed 1,000 rps)."""
    systems: dict[str, Proc] = {}
    px, info = peers.proxy(tmp, ups)
    systems["resilience-proxy"] = px
    if peers.compiled():  # the same proxy from its .py sources: what compiling the hot path is worth
        systems["resilience-proxy (interpreted)"], _ = peers.proxy(tmp, ups, name="resilience-proxy-interpreted",
                                                                   interpreted=True)
    systems["lean-python"] = peers.lean(ups[0])
    systems["naive-aiohttp"] = peers.naive(ups[0])
    systems["nginx"] = peers.nginx_proxy(tmp, ups[0])
    systems["haproxy"] = peers.haproxy(tmp, ups[0])
    c = peers.caddy(tmp, ups[0])
    if c is not None:
        systems["caddy"] = c
    urls = {n: f"http://127.0.0.1:{p.port}/item" for n, p in systems.items()}
    urls["direct"] = f"http://127.0.0.1:{ups[0]}/item"
    res: dict = {"rps": {n: [] for n in urls}, "p50_1conn": {n: [] for n in urls}, "p99_1conn": {n: [] for n in urls},
                 "cpu_us": {n: [] for n in systems},  # the process and its children (nginx's workers)
                 "invalid": []}
    try:
        for n in urls:  # warm up: pools, caches, JIT-less but still
            load.wrk(urls[n], 8, 1)
        for r in range(rounds):
            for n, url in urls.items():
                progress(f"scenario 1 round {r + 1}/{rounds}: {n}")
                before = peers.cpu_seconds(systems[n].pid) if n in res["cpu_us"] else None
                out = load.wrk(url, 64, seconds)
                if before is not None and out["requests"]:  # user + system CPU of the process, per request
                    res["cpu_us"][n].append((peers.cpu_seconds(systems[n].pid) - before) / out["requests"] * 1e6)
                res["rps"][n].append(out["rps"])
                if not out["valid"]:
                    res["invalid"].append((n, "64conn", out))
            for n, url in urls.items():
                progress(f"scenario 2 round {r + 1}/{rounds}: {n} (1 connection)")
                out = load.wrk(url, 1, seconds, latency=True)
                res["p50_1conn"][n].append(out["p50"])
                res["p99_1conn"][n].append(out["p99"])
                if not out["valid"]:
                    res["invalid"].append((n, "1conn", out))
        # fixed rate, interleaved rounds too: one run per system would let the machine's noise decide
        fixed: dict = {n: [] for n in ("direct", "resilience-proxy", "nginx")}
        for r in range(rounds):
            for n in fixed:
                progress(f"scenario 2 round {r + 1}/{rounds}: {n} at a fixed 1,000 requests/s")
                out = load.vegeta(urls[n], 1000, seconds * 2)
                if out is not None:
                    fixed[n].append(out)
                    if not out["valid"]:
                        res["invalid"].append((n, "1000rps", {k: v for k, v in out.items() if k != "latencies"}))
        res["fixed_1000rps"] = fixed if all(fixed.values()) else {}
        # Scenario 3: the upstream is "down" (both tracks forced open): answers from the fallback cache.
        for t in ("stable", "canary"):
            _admin(info["admin"], "/admin/upstreams/db/breaker", {"track": t, "state": "open"})
        res["open_breaker_rps"] = []
        for r in range(rounds):
            progress(f"scenario 3 round {r + 1}/{rounds}: open breaker, cached answers")
            out = load.wrk(urls["resilience-proxy"], 64, seconds)
            res["open_breaker_rps"].append(out["rps"])
            if not out["valid"]:
                res["invalid"].append(("resilience-proxy", "open-breaker", out))
    finally:
        for p in systems.values():
            p.stop()
    return res


def sse(tmp: Path, streams: int, progress) -> dict:
    """Scenario 4: a 50-chunk stream through the proxy vs direct: time to first chunk, gaps between chunks."""
    fake_port = free_port()
    fake = Proc("fake-openai", [sys.executable, "-c", f"""
import asyncio, sys, uvloop
sys.path.insert(0, {str(ROOT)!r})
from aiohttp import web
from tests.support.fake_openai import FakeOpenAI
f = FakeOpenAI(); f.chunks = 50; f.delay = 0.005
web.run_app(f.app(), host='127.0.0.1', port={fake_port}, print=None, access_log=None)
"""], fake_port, LOAD_CORE, cwd=ROOT)
    px = peers.proxy_for(tmp, "resilience-proxy-llm", "openai", f"http://127.0.0.1:{fake_port}")
    port = px.port
    import openai

    res = {"ttfc": {"direct": [], "resilience-proxy": []}, "gap": {"direct": [], "resilience-proxy": []}}
    try:
        clients = {"direct": openai.OpenAI(base_url=f"http://127.0.0.1:{fake_port}/api/v1", api_key="x", max_retries=0),
                   "resilience-proxy": openai.OpenAI(base_url=f"http://127.0.0.1:{port}/api/v1", api_key="x", max_retries=0)}
        for i in range(streams):
            if i % 10 == 0:
                progress(f"scenario 4: stream {i + 1}/{streams}")
            for name, c in clients.items():
                t0 = time.perf_counter()
                times = []
                for _chunk in c.chat.completions.create(model="m", messages=[{"role": "user", "content": f"{name}{i}"}],
                                                        stream=True):
                    times.append(time.perf_counter())
                res["ttfc"][name].append(times[0] - t0)
                gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
                res["gap"][name].append(statistics.median(gaps))
    finally:
        px.stop()
        fake.stop()
    return res


def redis(tmp: Path, requests: int, rounds: int, progress) -> dict:
    """Scenario 5: GET/SET with 50 clients, unpipelined and -P 16: direct Redis, twemproxy, the proxy."""
    import shutil

    rport = free_port()
    server = Proc("redis-server", ["redis-server", "--port", str(rport), "--save", "", "--appendonly", "no"], rport, LOAD_CORE)
    px = peers.proxy_for(tmp, "resilience-proxy-redis", "redis", f"redis://127.0.0.1:{rport}/0")
    procs = [server, px]
    ports = {"direct": rport, "resilience-proxy": px.port}
    if shutil.which("nutcracker"):
        tport = free_port()
        (tmp / "nutcracker.yml").write_text(f"""alpha:
  listen: 127.0.0.1:{tport}
  hash: fnv1a_64
  distribution: ketama
  redis: true
  auto_eject_hosts: true
  server_retry_timeout: 2000
  server_failure_limit: 3
  servers:
    - 127.0.0.1:{rport}:1
""")
        procs.append(Proc("twemproxy", ["nutcracker", "-c", str(tmp / "nutcracker.yml")], tport, PROXY_CORE))
        ports["twemproxy"] = tport
    res: dict = {name: {"GET": [], "SET": [], "GET_P16": []} for name in ports}
    try:
        for r in range(rounds):
            for name, p in ports.items():
                progress(f"scenario 5 round {r + 1}/{rounds}: {name}")
                a = load.redis_benchmark(p, "get,set", requests)
                b = load.redis_benchmark(p, "get", requests * 4, pipeline=16)
                res[name]["GET"].append(a.get("GET"))
                res[name]["SET"].append(a.get("SET"))
                res[name]["GET_P16"].append(b.get("GET"))
    finally:
        for p in procs:
            p.stop()
    return res


def chaos(tmp: Path, ups: list[int], seconds: float, progress) -> dict:
    """Scenario 6: load while toxiproxy cuts the upstream for a third of the run."""
    tport, api = free_port(), free_port()
    tox_bin = peers.tool("toxiproxy-server")
    tox = Proc("toxiproxy", [tox_bin, "-host", "127.0.0.1", "-port", str(api)], api, LOAD_CORE)
    import requests as rq

    rq.post(f"http://127.0.0.1:{api}/proxies", json={"name": "up", "listen": f"127.0.0.1:{tport}",
                                                     "upstream": f"127.0.0.1:{ups[0]}"}).raise_for_status()
    px, info = peers.proxy(tmp, [tport], name="resilience-proxy-chaos",
                           extra={"targets": [{"name": "stable", "url": f"http://127.0.0.1:{tport}"}],
                                  "breaker": {"fail_max": 5, "reset_timeout": "2s"}})
    url = f"http://127.0.0.1:{info['port']}"
    samples, states = [], []
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            try:
                st = _admin(info["admin"], "/admin/upstreams")["db"]["targets"]["stable"]["breaker"]["state"]
            except Exception:
                st = "?"
            states.append((time.monotonic(), st))
            time.sleep(0.05)

    async def drive(t_end):
        import aiohttp

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16)) as s:
            async def worker(k):
                i = 0
                while time.monotonic() < t_end:
                    i += 1
                    t0 = time.monotonic()
                    try:
                        async with s.get(f"{url}/item/{(k * 7 + i) % 50}") as r:
                            await r.read()
                            samples.append((t0, time.monotonic() - t0, r.status, r.headers.get("X-Fallback")))
                    except Exception:
                        samples.append((t0, time.monotonic() - t0, 0, None))

            await asyncio.gather(*(worker(k) for k in range(16)))

    try:
        asyncio.run(drive(time.monotonic() + 1.5))  # warm the cache
        samples.clear()
        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        t0 = time.monotonic()
        cut_at, heal_at = t0 + seconds / 3, t0 + 2 * seconds / 3

        def cutter():
            time.sleep(cut_at - time.monotonic())
            rq.post(f"http://127.0.0.1:{api}/proxies/up", json={"enabled": False}).raise_for_status()
            progress("scenario 6: upstream cut")
            time.sleep(heal_at - time.monotonic())
            rq.post(f"http://127.0.0.1:{api}/proxies/up", json={"enabled": True}).raise_for_status()
            progress("scenario 6: upstream healed")

        threading.Thread(target=cutter, daemon=True).start()
        progress(f"scenario 6: {seconds:g}s of load, cut from {seconds / 3:g}s to {2 * seconds / 3:g}s")
        asyncio.run(drive(t0 + seconds))
        stop.set()
        poller.join()
    finally:
        px.stop()
        tox.stop()
    ok = sum(1 for s in samples if 200 <= s[2] < 300)
    lat = sorted(s[1] for s in samples)
    opened = next((t for t, st in states if t >= cut_at and st == "open"), None)
    closed = next((t for t, st in states if t >= heal_at and st == "closed"), None)
    return {"requests": len(samples), "success_rate": ok / max(1, len(samples)), "poll_interval": 0.05,
            "fallbacks": sum(1 for s in samples if s[3]), "p99": lat[int(0.99 * (len(lat) - 1))] if lat else None,
            "cut_to_open": (opened - cut_at) if opened else None, "heal_to_close": (closed - heal_at) if closed else None,
            "t0": t0, "cut_at": cut_at - t0, "heal_at": heal_at - t0,
            "timeline": [(s[0] - t0, s[2], s[3]) for s in samples[:: max(1, len(samples) // 4000)]],
            "states": [(t - t0, st) for t, st in states]}


def memory(tmp: Path, ups: list[int], progress) -> dict:
    """Scenario 7: RSS idle, with 10,000 cache entries, with 1,000 open client connections."""
    import socket

    px, info = peers.proxy(tmp, ups, name="resilience-proxy-mem")
    try:
        time.sleep(1.0)
        idle = peers.rss_mb(px.pid)
        progress("scenario 7: filling 10,000 cache entries")

        async def fill():
            import aiohttp

            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as s:
                sem = asyncio.Semaphore(32)

                async def one(i):
                    async with sem, s.get(f"http://127.0.0.1:{info['port']}/item/{i}") as r:
                        await r.read()

                await asyncio.gather(*(one(i) for i in range(10_000)))

        asyncio.run(fill())
        entries = _admin(info["admin"], "/admin/upstreams")["db"]["cache"]["default"]["entries"]
        with_cache = peers.rss_mb(px.pid)
        progress("scenario 7: 1,000 open client connections")
        socks = []
        for _ in range(1000):
            s = socket.create_connection(("127.0.0.1", info["port"]))
            s.sendall(b"GET /item/1 HTTP/1.1\r\nHost: x\r\n\r\n")
            socks.append(s)
        for s in socks:
            s.recv(4096)
        time.sleep(0.5)
        with_conns = peers.rss_mb(px.pid)
        for s in socks:
            s.close()
    finally:
        px.stop()
    return {"idle_mb": idle, "cache_10k_mb": with_cache, "cache_entries": entries, "cache_10k_plus_1k_conns_mb": with_conns}

