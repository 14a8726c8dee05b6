"""Loopback sockets: free ports (never fixed ones) and raw requests no client library would send."""

from __future__ import annotations

import asyncio
import socket

_handed_out: set[int] = set()


def free_port() -> int:
    """A port free now, and not one this process handed out before: the kernel may give a just-released
    port again at once, and a config that asks for two (a listener and the admin port) would get it twice."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port not handed out before")


def free_ports(n: int) -> int:
    """A base port with `n` consecutive free ports from it (for what takes a port base, like the demo)."""
    for _ in range(200):
        base = free_port()
        if base + n > 65535:
            continue
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports")


async def raw_head(url: str, data: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes to a listener (`http://host:port`) and return the answer's head."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    finally:
        writer.close()
