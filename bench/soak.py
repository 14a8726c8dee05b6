"""`python -m bench soak --minutes N`: the proxy as a real process under mixed HTTP, LLM (plain and
streamed) and Redis load for N minutes, with a fault toggled on one of its upstreams every 30 s (through
a real toxiproxy: latency above the attempt timeout, the link down, resets, a black hole, then healed).

Reported, from the same run: the proxy's RSS and open fds over time (growth measured from the end of a
warm-up, so start-up allocations are not counted as a leak), error log lines (a warning is what a fault
is for; an `error` line is a bug), and counter consistency: for every upstream, the answers the clients
counted equal the proxy's `upstream_requests_total`. Exits 1 when counters disagree, an error line was
logged, fds grew, or RSS grew more than 10% (runs of two minutes or more; a shorter one reports it).
Writes bench/results/soak-<date>.md and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil
import redis.asyncio as aredis
import yaml
from aiohttp import web

from bench.peers import ROOT, free_port, wait_port

FAULTS = ("latency", "down", "reset_peer", "timeout", None)  # cycled, one every 30 s; None = healed
PERIOD = 30.0
RSS_LIMIT = 0.10


class Counts:
    def __init__(self) -> None:
        self.by: dict[str, dict[str, int]] = {}

    def add(self, upstream: str, outcome: str) -> None:
        d = self.by.setdefault(upstream, {})
        d[outcome] = d.get(outcome, 0) + 1

    def total(self, upstream: str, exclude: tuple[str, ...] = ()) -> int:
        return sum(v for k, v in self.by.get(upstream, {}).items() if k not in exclude)


async def _upstreams():
    """An HTTP upstream and an OpenAI-compatible one, in this process."""
    sys.path.insert(0, str(ROOT))
    from tests.support.fake_openai import FakeOpenAI

    async def item(request):
        return web.json_response({"id": request.match_info["id"], "v": "x" * 200})

    async def write(request):
        await request.read()
        return web.json_response({"ok": True}, status=201)

    http = web.Application()
    http.router.add_get("/item/{id}", item)
    http.router.add_post("/item/{id}", write)
    runners = []
    ports = []
    for app in (http, FakeOpenAI().app()):
        r = web.AppRunner(app, access_log=None)
        await r.setup()
        port = free_port()
        await web.TCPSite(r, "127.0.0.1", port).start()
        runners.append(r)
        ports.append(port)
    return runners, ports


def _metric_totals(admin: int) -> dict[str, float]:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r'^upstream_requests_total\{(.*)\} (\S+)$', line)
        if m:
            name = re.search(r'name="([^"]+)"', m.group(1)).group(1)
            out[name] = out.get(name, 0.0) + float(m.group(2))
    return out


async def _load(stop: asyncio.Event, counts: Counts, ports: dict[str, int]) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        # a blocking pool: a command waits for one of its 16 connections (the default pool would raise
        # "Too many connections" on the client side, which no proxy could count)
        pool = aredis.BlockingConnectionPool(port=ports["cache"], max_connections=16, timeout=60, socket_timeout=60)
        rc = aredis.Redis(connection_pool=pool, retry=None)

        async def http(i):
            try:
                if i % 5:
                    async with s.get(f"http://127.0.0.1:{ports['db']}/item/{i % 50}") as r:
                        await r.read()
                        counts.add("db", "fallback" if "X-Fallback" in r.headers else str(r.status))
                else:
                    async with s.post(f"http://127.0.0.1:{ports['db']}/item/{i}", data=b"{}") as r:
                        await r.read()
                        counts.add("db", str(r.status))
            except aiohttp.ClientError:
                counts.add("db", "client-error")  # an answer cut mid-body still counts at the proxy

        async def llm(i):
            body = {"model": "m", "messages": [{"role": "user", "content": f"q{i % 10}"}], "stream": bool(i % 2)}
            try:
                async with s.post(f"http://127.0.0.1:{ports['llm']}/api/v1/chat/completions", json=body) as r:
                    await r.read()
                    counts.add("llm", str(r.status))
            except aiohttp.ClientError:
                counts.add("llm", "client-error")

        async def cache(i):
            try:
                if i % 4:
                    await rc.get(f"k{i % 100}")
                else:
                    await rc.set(f"k{i % 100}", "v" * 100)
                counts.add("cache", "ok")
            except aredis.ResponseError:
                counts.add("cache", "error")  # -UNAVAILABLE: answered by the proxy, counted there
            except aredis.ConnectionError:
                counts.add("cache", "client-error")

        i = 0
        pending: set[asyncio.Task] = set()
        while not stop.is_set():
            i += 1
            for _ in range(4):
                pending.add(asyncio.ensure_future(http(i)))
            pending.add(asyncio.ensure_future(cache(i)))
            pending.add(asyncio.ensure_future(cache(i + 1)))
            if i % 5 == 0:
                pending.add(asyncio.ensure_future(llm(i)))
            pending = {t for t in pending if not t.done()}
            if len(pending) > 400:  # a fault slows answers: keep the offered load bounded
                await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            await asyncio.sleep(0.01)
        if pending:
            await asyncio.wait(pending)
        # a pool handed to Redis() is not closed by it: without this the client's connections stay open
        # (until the garbage collector finds them) and the proxy's fds look as if they never came back
        await rc.aclose()
        await pool.aclose()


async def soak(minutes: float, out_dir: Path, period: float = PERIOD) -> int:
    import logging

    from tests.support import toxiproxy as toxi
    from tests.support.toxiproxy import add_toxic

    # the in-process upstreams see the proxy hang up on them during faults (that is the point): quiet
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    runners, (http_port, llm_port) = await _upstreams()
    redis_port = free_port()
    redis_proc = subprocess.Popen(["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"],
                                  stdout=subprocess.DEVNULL)
    tools = subprocess.run(["bash", str(ROOT / "scripts/tools.sh")], capture_output=True, text=True, check=True).stdout.strip()
    os.environ["PATH"] = tools + os.pathsep + os.environ["PATH"]
    toxi_proc, tp = toxi.start_server()
    links = {n: tp.create(upstream=f"127.0.0.1:{port}", name=f"soak-{n}", listen=f"127.0.0.1:{free_port()}")
             for n, port in (("db", http_port), ("llm", llm_port), ("cache", redis_port))}
    ports = {n: free_port() for n in links}
    admin = free_port()
    common = {"timeouts": {"connect": "500ms", "attempt": "1s", "total": "3s", "first_byte": "1s", "idle": "5s"},
              "breaker": {"fail_max": 20, "reset_timeout": "5s"}, "health": {"enabled": False},
              "pool": {"idle_timeout": "5s"}}
    cfg = {"admin": {"listen": f"127.0.0.1:{admin}"}, "log": {"level": "warning"}, "upstreams": {
        "db": {"listen": f"127.0.0.1:{ports['db']}", "targets": [{"name": "stable", "url": f"http://{links['db'].listen}"}],
               **common},
        "llm": {"protocol": "openai", "listen": f"127.0.0.1:{ports['llm']}",
                "targets": [{"name": "stable", "url": f"http://{links['llm'].listen}"}], **common},
        "cache": {"protocol": "redis", "listen": f"127.0.0.1:{ports['cache']}",
                  "targets": [{"name": "stable", "url": f"redis://{links['cache'].listen}/0"}], **common}}}
    (tmp / "soak.yaml").write_text(yaml.safe_dump(cfg))
    log_path = tmp / "proxy.log"
    with open(log_path, "wb") as log:
        proxy = subprocess.Popen([sys.executable, "-m", "proxy", "run", "--config", str(tmp / "soak.yaml")],
                                 stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    samples: list[dict] = []
    counts = Counts()
    open_socks: collections.Counter = collections.Counter()
    try:
        wait_port(admin)
        for p in ports.values():
            wait_port(p)
        proc = psutil.Process(proxy.pid)
        fds_idle = proc.num_fds()  # before any load: what it must come back to once the clients have gone
        before = _metric_totals(admin)
        stop = asyncio.Event()
        load = asyncio.ensure_future(_load(stop, counts, ports))
        t0 = time.monotonic()
        seconds = minutes * 60
        fault_i, next_toggle = 0, period
        while time.monotonic() - t0 < seconds:
            await asyncio.sleep(1.0)
            now = time.monotonic() - t0
            if int(now) % 5 == 0:
                samples.append({"t": round(now), "rss": proc.memory_info().rss, "fds": proc.num_fds()})
            if now >= next_toggle:
                next_toggle += period
                name = ("db", "llm", "cache")[fault_i % 3]
                fault = FAULTS[fault_i % len(FAULTS)]
                fault_i += 1
                for n, link in list(links.items()):  # heal all (at once: destroyed, made again), then a fault
                    link.destroy()
                    links[n] = tp.create(upstream=link.upstream, name=link.name, listen=link.listen)
                if fault == "down":
                    links[name].disable()
                elif fault == "latency":
                    add_toxic(links[name], "latency", latency=3000)
                elif fault is not None:
                    add_toxic(links[name], fault, timeout=0)
                print(f"[{now:5.0f}s] fault: {fault or 'none'} on {name}; rss {proc.memory_info().rss >> 20} MiB, "
                      f"fds {proc.num_fds()}", flush=True)
        stop.set()
        await load
        for n, link in list(links.items()):
            link.destroy()
            links[n] = tp.create(upstream=link.upstream, name=link.name, listen=link.listen)
        after = _metric_totals(admin)
        # the clients are gone and the links healed: idle connections close (pool.idle_timeout), fds come back
        deadline = time.monotonic() + 60
        while proc.num_fds() > fds_idle + 5 and time.monotonic() < deadline:
            await asyncio.sleep(1.0)
        samples.append({"t": round(time.monotonic() - t0), "rss": proc.memory_info().rss, "fds": proc.num_fds()})
        # what is still open, by peer: names the leak when the fds are not back
        names = {str(p): n for n, p in ports.items()} | {link.listen.rsplit(":", 1)[1]: f"{n} (upstream)"
                                                        for n, link in links.items()}
        open_socks = collections.Counter(
            f"{names.get(str(c.raddr.port), c.raddr.port) if c.raddr else 'listening'} {c.status}"
            for c in proc.net_connections(kind="inet"))
    finally:
        proxy.terminate()
        proxy.wait(10)
        redis_proc.terminate()
        toxi_proc.terminate()
        for r in runners:
            await r.cleanup()
    errors = [ln for ln in log_path.read_text(errors="replace").splitlines() if '"level": "error"' in ln
              or '"level":"error"' in ln or "Traceback" in ln]
    warm = [s for s in samples if s["t"] >= min(60, seconds / 3)] or samples
    rss0, rss1 = warm[0]["rss"], samples[-1]["rss"]
    fds0, fds1 = fds_idle, samples[-1]["fds"]
    fds_peak = max(s["fds"] for s in samples)
    consistency = {n: {"client": counts.total(n), "proxy": after.get(n, 0) - before.get(n, 0)} for n in links}
    result = {"minutes": minutes, "samples": samples, "counts": counts.by, "consistency": consistency,
              "rss_growth": (rss1 - rss0) / rss0, "rss_start": rss0, "rss_end": rss1, "fds_idle_start": fds0,
              "fds_peak": fds_peak, "fds_idle_end": fds1, "error_lines": errors[:20]}
    problems = [f"{n}: clients counted {c['client']}, the proxy {c['proxy']:g}"
                for n, c in consistency.items() if c["client"] != c["proxy"]]
    if errors:
        problems.append(f"{len(errors)} error log lines, the first: {errors[0][:300]}")
    if fds1 > fds0 + 5:
        problems.append(f"fds idle before the load {fds0}, after it {fds1}: not back (open sockets: "
                        f"{dict(open_socks)})")
    if minutes >= 2 and result["rss_growth"] > RSS_LIMIT:
        problems.append(f"RSS grew {result['rss_growth']:.1%} (limit {RSS_LIMIT:.0%})")
    result["problems"] = problems
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d-%H%M")
    (out_dir / f"soak-{stamp}.json").write_text(json.dumps(result, indent=1))
    md = [f"# Soak: {minutes:g} minutes, {time.strftime('%Y-%m-%d %H:%M')}", "",
          "| upstream | answers counted by the clients | the proxy's upstream_requests_total | outcomes |",
          "|---|---|---|---|"]
    for n, c in consistency.items():
        md.append(f"| {n} | {c['client']} | {c['proxy']:g} | {counts.by.get(n, {})} |")
    md += ["", f"RSS after warm-up {rss0 / 2**20:.1f} MiB → at the end {rss1 / 2**20:.1f} MiB "
               f"({result['rss_growth']:+.1%}); open fds idle before the load {fds0}, at the peak {fds_peak} "
               f"(the clients' connections), idle after it {fds1}; error log lines: {len(errors)}.",
           "", "Faults: " + ", ".join(f or "healed" for f in FAULTS) + f", one every {period:g} s, rotating "
           "over the HTTP, LLM and Redis upstreams.", "",
           "Problems: " + ("; ".join(problems) if problems else "none"), ""]
    (out_dir / f"soak-{stamp}.md").write_text("\n".join(md))
    print("\n".join(md))
    return 1 if problems else 0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench soak")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--period", type=float, default=PERIOD, help="seconds between fault toggles (default 30)")
    ap.add_argument("--out", default=str(ROOT / "bench/results"))
    args = ap.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(soak(args.minutes, Path(args.out), args.period))
