"""A real toxiproxy server (started by the session, stopped after) between the proxy and an upstream.
toxiproxy-python swallows some errors: every toxic created is checked."""

from __future__ import annotations

import subprocess

import requests
from toxiproxy import Toxiproxy
from toxiproxy.api import APIConsumer

from tests.support.net import free_port
from tests.support.tools import start_process, tool


def start_server() -> tuple[subprocess.Popen, Toxiproxy]:
    port = free_port()
    proc = start_process([tool("toxiproxy-server"), "-host", "127.0.0.1", "-port", str(port)],
                         lambda: _answers(port), "toxiproxy-server")
    APIConsumer.host, APIConsumer.port = "127.0.0.1", port
    return proc, Toxiproxy()


def _answers(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/version", timeout=1).ok
    except requests.RequestException:
        return False


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
