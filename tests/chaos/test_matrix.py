"""The chaos matrix (tests/chaos/matrix.py): each toxiproxy fault × each kind of upstream, judged against
the cell's steady-state hypothesis, written before the fault is run. See matrix.py for what every cell
holds; docs/reliability.md is the table a run of this module renders."""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import time

import aiohttp
import psutil
import pytest
import redis.asyncio as aredis
from aiohttp import web

from tests.chaos.matrix import ATTEMPT, KINDS, LIMIT_BYTES, SLACK, STEADY_STATE, TOTAL, TOXICS, record
from tests.support.metrics import Baseline
from tests.support.proxy import upstream_config
from tests.support.toxiproxy import add_toxic
from tests.support.wait import eventually

_ids = itertools.count(1)
READS, WRITES = 4, 2


class HttpKind:
    """An aiohttp upstream: GET /read/<k> (cached for fallback), POST /write/<id> (recorded, never retried)."""

    writes = True

    def __init__(self, aiohttp_server):
        self.aiohttp_server = aiohttp_server
        self.applied: dict[str, int] = {}
        self.open = 0

    async def start(self):
        async def read(request):
            return web.json_response({"k": request.match_info["k"], "v": "x" * 120})

        async def write(request):
            wid = request.match_info["id"]
            self.applied[wid] = self.applied.get(wid, 0) + 1
            return web.json_response({"id": wid}, status=201)

        app = web.Application()
        app.router.add_get("/read/{k}", read)
        app.router.add_post("/write/{id}", write)
        self.server = await self.aiohttp_server(app)
        return f"http://127.0.0.1:{self.server.port}"

    def config(self, url):
        return upstream_config(url, **_sections(retry={"attempts": 2, "backoff_base": "10ms", "backoff_max": "20ms"}))

    async def open_client(self, p):
        self.session = aiohttp.ClientSession()
        self.p = p

    async def close_client(self):
        await self.session.close()

    async def read(self, i):
        async with self.session.get(f"{self.p.url}/read/k{i % 2}") as r:
            body = await r.read()
            if r.status == 200:
                return "fallback" if "X-Fallback" in r.headers else "ok"
            return _proxy_error(r.status, body)

    async def write(self, wid):
        async with self.session.post(f"{self.p.url}/write/{wid}", data=b"{}") as r:
            body = await r.read()
            if r.status == 201:
                return "ok"
            return _proxy_error(r.status, body)

    async def upstream_connections(self):
        return sum(1 for c in psutil.Process().net_connections("tcp")
                   if c.laddr and c.laddr.port == self.server.port and c.status == "ESTABLISHED")


class OpenAIKind(HttpKind):
    """The fake OpenAI-compatible upstream; a completion is a read (cached, replayed), there are no writes."""

    writes = False
    stream = False

    def __init__(self, aiohttp_server):
        super().__init__(aiohttp_server)

    async def start(self):
        from tests.support.fake_openai import FakeOpenAI

        self.fake = FakeOpenAI()
        self.server = await self.aiohttp_server(self.fake.app())
        return f"http://127.0.0.1:{self.server.port}"

    def config(self, url):
        return upstream_config(url, protocol="openai", **_sections(
            retry={"attempts": 2, "backoff_base": "10ms", "backoff_max": "20ms"}))

    async def read(self, i):
        body = {"model": "m", "messages": [{"role": "user", "content": f"q{i % 2}"}], "stream": self.stream}
        try:
            async with self.session.post(f"{self.p.url}/api/v1/chat/completions", json=body) as r:
                data = await r.read()
        except aiohttp.ClientPayloadError:
            return "error"  # cut after the first bytes: the documented mid-stream failure
        if r.status != 200:
            return _proxy_error(r.status, data)
        if self.stream:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            if b'"error"' in data:
                assert data.endswith(b"data: [DONE]\n\n")  # an error event, then the end
                return "error"
            assert data.count(b"data: [DONE]") == 1, data[-200:]
            return "fallback" if "X-Fallback" in r.headers else "ok"
        doc = json.loads(data)
        return "fallback" if doc.get("fallback") else "ok"


class OpenAIStreamKind(OpenAIKind):
    stream = True


class RedisKind:
    """A real redis-server: GET (cached for the stale read) and RPUSH of a write id (never retried)."""

    writes = True

    def __init__(self, redis_url):
        self.redis_url = redis_url
        self.key = f"mx{next(_ids)}"

    async def start(self):
        self.direct = aredis.Redis.from_url(self.redis_url)
        await self.direct.set(f"{self.key}:r0", "v" * 40)
        await self.direct.set(f"{self.key}:r1", "w" * 40)
        return self.redis_url

    def config(self, url):
        return upstream_config(url + "/0", protocol="redis", **_sections(
            retry={"attempts": 2, "backoff_base": "10ms", "backoff_max": "20ms"}))

    async def open_client(self, p):
        self.p = p
        self.client = aredis.Redis(port=p.port, retry=None, socket_timeout=TOTAL + SLACK, single_connection_client=False)

    async def close_client(self):
        await self.client.aclose()

    async def read(self, i):
        """A stale read and a fresh one look alike on the wire: "value", told apart by the cell from the
        proxy's fallback counter (and that counter checked against a second one)."""
        try:
            v = await self.client.get(f"{self.key}:r{i % 2}")
        except aredis.ResponseError as exc:
            assert str(exc).startswith("UNAVAILABLE redis upstream"), exc
            return "error"
        assert v in (b"v" * 40, b"w" * 40)
        return "value"

    async def write(self, wid):
        try:
            await self.client.rpush(f"{self.key}:log", wid)
        except aredis.ResponseError as exc:
            assert str(exc).startswith("UNAVAILABLE redis upstream"), exc
            return "error"
        return "ok"

    async def applied_writes(self):
        log = await self.direct.lrange(f"{self.key}:log", 0, -1)
        out: dict[str, int] = {}
        for wid in log:
            out[wid.decode()] = out.get(wid.decode(), 0) + 1
        return out

    async def upstream_connections(self):
        return len(await self.direct.client_list()) - 1  # the proxy's, not this one


def _heal(server, link):
    """The link as it was before the fault: destroyed and made again on the same address. Removing a
    latency toxic makes toxiproxy drain every chunk it holds first (tens of seconds); this is at once."""
    listen, upstream, name = link.listen, link.upstream, link.name
    link.destroy()
    return server.create(upstream=upstream, name=name, listen=listen)


def _proxy_error(status: int, body: bytes) -> str:
    """The proxy's own error answer: 502/503/504 with an error type in the body (OpenAI's shape or ours)."""
    assert status in (502, 503, 504), (status, body[:200])
    err = json.loads(body)["error"]
    assert err.get("proxy_error") or err.get("type"), body[:200]
    return "error"


def _sections(**over):
    s = dict(timeouts={"connect": f"{ATTEMPT:g}s", "attempt": f"{ATTEMPT:g}s", "total": f"{TOTAL:g}s",
                       "first_byte": f"{ATTEMPT:g}s", "idle": "3s"},
             breaker={"fail_max": 1000}, health={"enabled": False}, pool={"idle_timeout": "1s"})
    s.update(over)
    return s


async def _kind(name, aiohttp_server, redis_server):
    k = {"http": HttpKind, "openai": OpenAIKind, "openai_stream": OpenAIStreamKind}.get(name)
    return k(aiohttp_server) if k is not None else RedisKind(redis_server)


async def _timed(coro):
    t0 = time.monotonic()
    out = await coro
    return out, time.monotonic() - t0


def _resources():
    gc.collect()
    return psutil.Process().num_fds(), len(asyncio.all_tasks())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("toxic", list(TOXICS))
async def test_cell(toxic, kind, aiohttp_server, redis_server, start_proxy, toxic_link, toxiproxy_server):
    hypothesis = STEADY_STATE[toxic][kind]  # written before the fault runs
    closed = False
    k = await _kind(kind, aiohttp_server, redis_server)
    url = await k.start()
    link, via = toxic_link(url)
    name, cfg = k.config(via)
    p = await start_proxy(cfg)
    await k.open_client(p)
    # warm: every read cached once, a write through; then the baseline
    for i in range(2):
        assert await k.read(i) in ("ok", "value")
    if k.writes:
        assert await k.write(f"warm{next(_ids)}") == "ok"
    # the baseline without the test's own client connections (both of their ends are in this process)
    await k.close_client()
    await eventually(lambda: _settled(p), what="the client's connections closed")
    base_conns = await k.upstream_connections()
    base_fds, base_tasks = _resources()
    await k.open_client(p)
    metrics = Baseline()

    toxics, _ = TOXICS[toxic]
    if toxics is None:
        link.disable()
    else:
        for t, attrs in toxics:
            if t == "limit_data":
                attrs = {"bytes": LIMIT_BYTES[kind]}
            add_toxic(link, t, **attrs)
    try:
        jobs = [_timed(k.read(i)) for i in range(READS)]
        wids = [f"w{next(_ids)}" for _ in range(WRITES)] if k.writes else []
        jobs += [_timed(k.write(w)) for w in wids]
        results = await asyncio.wait_for(asyncio.gather(*jobs), TOTAL + SLACK + 30)
    finally:
        link = _heal(toxiproxy_server, link)
    reads = [r for r, _ in results[:READS]]
    writes = [r for r, _ in results[READS:]]
    fallbacks = metrics.family_delta("upstream_requests_total", name=name, outcome="fallback")
    values = reads.count("value")  # Redis: stale and fresh values look alike to the client
    if values:  # labelled from the proxy's count, which is then checked against another counter (below)
        stale = min(int(fallbacks), values)
        reads = ["fallback" if r == "value" and (stale := stale - 1) >= 0 else "ok" if r == "value" else r
                 for r in reads]
    slowest = max(t for _, t in results)
    cell = {"toxic": toxic, "kind": kind, "slowest": slowest, "passed": False,
            "reads": {o: reads.count(o) for o in set(reads)}, "writes": {o: writes.count(o) for o in set(writes)}}
    try:
        assert slowest <= TOTAL + SLACK + (3 if toxic in ("bandwidth", "slicer") else 0), cell
        assert set(reads) <= hypothesis["read"], cell
        assert set(writes) <= hypothesis["write"], cell
        # the client's counts are the proxy's
        answered = metrics.family_delta("upstream_requests_total", name=name)
        assert answered == len(results), (answered, cell)
        if values:  # the proxy's stale reads: within what the client got, and the same on both counters
            assert fallbacks <= values, (fallbacks, cell)
            assert metrics.family_delta("fallback_responses_total", name=name) == fallbacks, cell
        else:  # the client told each fallback apart itself (X-Fallback, "fallback": true, a replay)
            assert fallbacks == reads.count("fallback"), (fallbacks, cell)
        # after healing: fresh again; acknowledged writes are there, failed ones at most once
        for i in range(2):
            assert await eventually(lambda i=i: _fresh(k, i), what="a fresh answer after healing")
        if k.writes:
            applied = await k.applied_writes() if isinstance(k, RedisKind) else k.applied
            for w, outcome in zip(wids, writes, strict=True):
                assert applied.get(w, 0) == 1 if outcome == "ok" else applied.get(w, 0) <= 1, (w, outcome, applied)
        await k.close_client()
        closed = True
        try:
            await eventually(lambda: _back_to(k, base_conns, base_fds, base_tasks))
        except AssertionError:
            raise AssertionError(f"not back at the baseline (upstream connections, fds, tasks): "
                                 f"{(base_conns, base_fds, base_tasks)} → "
                                 f"{(await k.upstream_connections(), *_resources())}") from None
        cell["passed"] = True
    finally:
        record(cell)
        if not closed:
            await k.close_client()


def _settled(p):
    """No client connection is open on the listener any more."""
    server = getattr(p.app._bound[p.name], "web_server", None)
    if server is not None:
        return not server.connections
    return p.app.runtime.upstreams[p.name].connections == 0


async def _fresh(k, i):
    return await k.read(i) in ("ok", "value")


async def _back_to(k, conns, fds, tasks):
    now_fds, now_tasks = _resources()
    return await k.upstream_connections() <= conns and now_fds <= fds and now_tasks <= tasks
