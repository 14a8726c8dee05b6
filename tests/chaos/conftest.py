"""A real toxiproxy server (started here, stopped after) between the proxy and its upstream."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests
from toxiproxy import Toxiproxy
from toxiproxy.api import APIConsumer

from tests.conftest import free_port

_ids = itertools.count(1)


def _binary() -> str:
    root = Path(__file__).resolve().parents[2]
    for candidate in (shutil.which("toxiproxy-server"), root / ".tools/bin/toxiproxy-server",
                      Path.home() / "go/bin/server"):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    raise RuntimeError("toxiproxy-server not found: run `make test` (it builds it with go install)")


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
