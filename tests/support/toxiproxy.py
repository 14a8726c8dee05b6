"""A real toxiproxy server (started by the session, stopped after) between the proxy and an upstream.
toxiproxy-python swallows some errors: every toxic created is checked."""

from __future__ import annotations

import subprocess
import time

import requests
from toxiproxy import Toxiproxy
from toxiproxy.api import APIConsumer

from tests.support.net import free_port
from tests.support.tools import tool


def start_server() -> tuple[subprocess.Popen, Toxiproxy]:
    port = free_port()
    proc = subprocess.Popen([tool("toxiproxy-server"), "-host", "127.0.0.1", "-port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    APIConsumer.host, APIConsumer.port = "127.0.0.1", port
    deadline = time.monotonic() + 30
    while True:
        try:
            if requests.get(f"http://127.0.0.1:{port}/version", timeout=1).ok:
                return proc, Toxiproxy()
        except requests.RequestException:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError("toxiproxy-server did not start")
        time.sleep(0.05)


def add_toxic(proxy, type_: str, stream: str = "downstream", **attributes) -> str:
    name = f"{type_}_{stream}"
    proxy.add_toxic(type=type_, stream=stream, name=name, attributes=attributes)
    assert name in proxy.toxics(), f"toxic {name} was not created"
    return name


def heal(proxy) -> None:
    """Every toxic removed, the link enabled."""
    for t in list(proxy.toxics()):
        proxy.destroy_toxic(t)
    proxy.enable()
    assert not proxy.toxics()
