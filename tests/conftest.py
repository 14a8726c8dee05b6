"""Shared fixtures: real aiohttp upstreams, an in-process proxy on free loopback ports, metric reads."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from aiohttp import web
from prometheus_client import REGISTRY

from proxy.app import ProxyApp
from proxy.settings import load

ROOT = Path(__file__).resolve().parents[1]
_names = itertools.count(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(metric_name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(metric_name, labels) or 0.0


class Upstream:
    """A real aiohttp server whose answer is a swappable coroutine; it records every request."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.behaviour: Callable | None = None
        self.url = ""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append({"method": request.method, "path_qs": request.raw_path, "headers": request.headers,
                              "body": body})
        if self.behaviour is not None:
            return await self.behaviour(request)
        return web.json_response({"path": request.raw_path, "n": len(self.requests)})

    def app(self) -> web.Application:
        a = web.Application(client_max_size=1024**3)
        a.router.add_route("*", "/{tail:.*}", self._handle)
        return a

    @property
    def hits(self) -> int:
        return len(self.requests)


@pytest.fixture
async def fake(aiohttp_server):
    """A fake OpenAI-compatible upstream (tests/fakes.py) on a free port."""
    from tests.fakes import FakeOpenAI

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
async def upstream(make_upstream) -> Upstream:
    return await make_upstream()


async def raw_head(url: str, data: bytes, timeout: float = 5) -> bytes:
    """Send raw bytes to a listener (`http://host:port`) and return the answer's head: for requests no
    client library would send."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    finally:
        writer.close()


def upstream_config(url: str, **sections: Any) -> tuple[str, dict]:
    """A one-upstream config on free ports; returns (upstream name, config dict)."""
    name = f"u{next(_names)}"
    up: dict[str, Any] = {"protocol": "http", "listen": f"127.0.0.1:{free_port()}",
                          "targets": [{"name": "stable", "url": url}]}
    up.update(sections)
    return name, {"admin": {"listen": f"127.0.0.1:{free_port()}"}, "upstreams": {name: up}}


class Running:
    def __init__(self, app: ProxyApp, name: str | None) -> None:
        self.app, self.name = app, name

    @property
    def url(self) -> str:
        spec = self.app.runtime.settings.upstreams[self.name]
        return f"http://{spec.listen}"

    def rewrite(self, config: dict) -> None:
        """Replace the running proxy's config file (a reload, the watcher's or an explicit one, reads it)."""
        with open(self.app.config_path, "w") as f:
            f.write(yaml.safe_dump(config))

    @property
    def port(self) -> int:
        return int(self.app.runtime.settings.upstreams[self.name].listen.rsplit(":", 1)[1])

    @property
    def admin(self) -> str:
        return f"http://{self.app.runtime.settings.admin.listen}"

    @property
    def upstream(self):
        return self.app.runtime.upstreams[self.name]


@pytest.fixture
async def start_proxy(tmp_path):
    apps: list[ProxyApp] = []

    async def _start(config: dict, name: str | None = None, clock=None) -> Running:
        path = tmp_path / f"config-{len(apps)}.yaml"
        path.write_text(yaml.safe_dump(config))
        kwargs = {"clock": clock} if clock is not None else {}
        app = ProxyApp(str(path), **kwargs)
        await app.start(load(str(path)))
        apps.append(app)
        return Running(app, name or next(iter(config.get("upstreams", {})), None))

    yield _start
    for a in apps:
        await a.close()


def start_redis(*args: str) -> tuple[subprocess.Popen, int]:
    """A real redis-server on a free loopback port (extra command-line `args`), answering once this returns."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server; .ci/run does it)")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--databases", "16", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16)[:1] in (b"+", b"-"):  # PONG, or NOAUTH with --requirepass: it answers
                    return proc, port
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("redis-server did not start")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def redis_server():
    """A real redis-server on a free loopback port for the whole session."""
    proc, port = start_redis()
    yield f"redis://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(5)


@pytest.fixture
def another_redis():
    """`another_redis(*args)` → the port of one more real redis-server, stopped after the test."""
    procs = []

    def start(*args: str) -> int:
        proc, port = start_redis(*args)
        procs.append(proc)
        return port

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(5)


# -- a real toxiproxy server (started here, stopped after) between the proxy and an upstream -------------
from toxiproxy import Toxiproxy  # noqa: E402
from toxiproxy.api import APIConsumer  # noqa: E402

_ids = itertools.count(1)


def tool(name: str, *also: Path) -> str:
    """A tool the tests drive: on PATH, or where scripts/test.sh's `go install` put it."""
    for c in (shutil.which(name), ROOT / ".tools/bin" / name, Path.home() / "go/bin" / name, *also):
        if c and os.access(c, os.X_OK):
            return str(c)
    raise RuntimeError(f"{name} not found: run `make test` (scripts/test.sh installs it) or .ci/run")


def _binary() -> str:
    return tool("toxiproxy-server", Path.home() / "go/bin/server")  # `go install` names it after its package


@pytest.fixture(scope="session")
def toxiproxy_server():
    port = free_port()
    proc = subprocess.Popen([_binary(), "-host", "127.0.0.1", "-port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    APIConsumer.host, APIConsumer.port = "127.0.0.1", port
    deadline = time.monotonic() + 10
    while True:
        try:
            if requests.get(f"http://127.0.0.1:{port}/version", timeout=1).ok:
                break
        except requests.RequestException:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError("toxiproxy-server did not start")
        time.sleep(0.05)
    yield Toxiproxy()
    proc.terminate()
    proc.wait(5)


@pytest.fixture
def toxic_link(toxiproxy_server):
    """`link(upstream_url)` → (toxiproxy proxy, url through it). Destroyed after the test."""
    made = []

    def link(url: str):
        hostport = url.split("://", 1)[1].rstrip("/")
        proxy = toxiproxy_server.create(upstream=hostport, name=f"link{next(_ids)}_{os.getpid()}",
                                        listen=f"127.0.0.1:{free_port()}")
        made.append(proxy)
        scheme = url.split("://", 1)[0]
        return proxy, f"{scheme}://{proxy.listen}"

    yield link
    for p in made:
        p.destroy()


def add_toxic(proxy, type_: str, stream: str = "downstream", **attributes) -> str:
    name = f"{type_}_{stream}"
    proxy.add_toxic(type=type_, stream=stream, name=name, attributes=attributes)
    assert name in proxy.toxics(), f"toxic {name} was not created"  # the client swallows some errors
    return name
