"""Fixtures over tests/support: real upstreams, an in-process proxy on free loopback ports, redis-server,
toxiproxy, and a per-test metrics baseline."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Callable

import pytest
import yaml

from proxy.app import ProxyApp
from proxy.settings import load
from tests.support import redis as redis_support
from tests.support import toxiproxy as toxi
from tests.support.fake_openai import FakeOpenAI
from tests.support.logs import JsonLog
from tests.support.metrics import Baseline
from tests.support.net import free_port
from tests.support.proxy import Running
from tests.support.tools import stop_process
from tests.support.upstreams import Upstream


def pytest_collection_modifyitems(items) -> None:
    """`chaos`: the test needs a real toxiproxy server (`-m "not chaos"` runs the rest without one)."""
    for item in items:
        if "toxiproxy_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.chaos)


@pytest.fixture
def metrics() -> Baseline:
    """The Prometheus registry as it was when the test began: assert on `metrics.delta(...)`."""
    return Baseline()


@pytest.fixture
def json_log():
    """The proxy's log lines as JSON, as the process prints them."""
    captured = JsonLog().install()
    yield captured
    captured.remove()


@pytest.fixture
async def fake(aiohttp_server) -> FakeOpenAI:
    """A fake OpenAI-compatible upstream on a free port."""
    f = FakeOpenAI()
    server = await aiohttp_server(f.app())
    f.url = f"http://127.0.0.1:{server.port}"
    return f


@pytest.fixture
def make_upstream(aiohttp_server):
    """`await make_upstream(behaviour=None)` → one more real upstream (the app, a second track, ...)."""

    async def make(behaviour: Callable | None = None) -> Upstream:
        u = Upstream()
        u.behaviour = behaviour
        server = await aiohttp_server(u.app())
        u.url = f"http://127.0.0.1:{server.port}"
        return u

    return make


@pytest.fixture
async def raw_upstream():
    """`await raw_upstream(handler)` → the http:// URL of an upstream whose bytes the test writes itself
    (`handler(reader, writer)` per connection: framing an aiohttp server would not send). Closed after."""
    servers: list[asyncio.Server] = []

    async def start(handler) -> str:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for s in servers:
        s.close()


@pytest.fixture
async def upstream(make_upstream) -> Upstream:
    return await make_upstream()


@pytest.fixture
async def start_proxy(tmp_path):
    """`await start_proxy(config, name=None, clock=None)` → Running; closed after the test."""
    apps: list[ProxyApp] = []

    async def _start(config: dict, name: str | None = None, clock=None) -> Running:
        path = tmp_path / f"config-{len(apps)}.yaml"
        path.write_text(yaml.safe_dump(config))
        app = ProxyApp(str(path), **({"clock": clock} if clock is not None else {}))
        await app.start(load(str(path)))
        apps.append(app)
        return Running(app, name or next(iter(config.get("upstreams", {})), None))

    yield _start
    for a in apps:
        await a.close()


@pytest.fixture(scope="session")
def redis_server():
    """A real redis-server on a free loopback port for the whole session."""
    proc, port = redis_support.start_redis()
    yield f"redis://127.0.0.1:{port}"
    stop_process(proc)


@pytest.fixture
def another_redis():
    """`another_redis(*args)` → the port of one more real redis-server, stopped after the test."""
    procs = []

    def start(*args: str, server: str = "redis-server") -> int:
        proc, port = redis_support.start_redis(*args, server=server)
        procs.append(proc)
        return port

    yield start
    for proc in procs:
        stop_process(proc)


@pytest.fixture(scope="session")
def toxiproxy_server():
    proc, client = toxi.start_server()
    yield client
    stop_process(proc)


_links = itertools.count(1)


@pytest.fixture
def toxic_link(toxiproxy_server):
    """`link(upstream_url)` → (toxiproxy proxy, url through it). Destroyed after the test."""
    made = []

    def link(url: str):
        hostport = url.split("://", 1)[1].rstrip("/")
        proxy = toxiproxy_server.create(upstream=hostport, name=f"link{next(_links)}_{os.getpid()}",
                                        listen=f"127.0.0.1:{free_port()}")
        made.append(proxy)
        scheme = url.split("://", 1)[0]
        return proxy, f"{scheme}://{proxy.listen}"

    yield link
    for p in made:
        p.destroy()
