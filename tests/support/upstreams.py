"""Real upstreams for the proxy to talk to: an aiohttp server whose answer is a swappable coroutine and
which records every request (and the client connection it came on)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiohttp import web


class Upstream:
    """A real aiohttp server; `behaviour(request)` answers (default: JSON with the path and a count)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.behaviour: Callable | None = None
        self.url = ""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.requests.append({"method": request.method, "path_qs": request.raw_path, "headers": request.headers,
                              "body": body, "peer": peer[1] if peer else None, "transport": request.transport})
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

    def paths(self) -> list[str]:
        return [r["path_qs"] for r in self.requests]


def failing(status: int = 503, headers: dict | None = None):
    """A behaviour answering `status` to everything."""

    async def answer(request):
        return web.Response(status=status, text="down", headers=headers)

    return answer


class Gate:
    """A behaviour that holds every request until `open()`: `arrived` counts those waiting, so a test
    waits for "the upstream has N requests" instead of sleeping."""

    def __init__(self, answer: Callable | None = None) -> None:
        self.event = asyncio.Event()
        self.arrived = 0
        self.answer = answer

    async def __call__(self, request):
        self.arrived += 1
        await self.event.wait()
        if self.answer is not None:
            return await self.answer(request)
        return web.Response(text="ok")

    def open(self) -> None:
        self.event.set()


async def hang(request):
    """A behaviour that never answers (until the connection goes away)."""
    await asyncio.Event().wait()


class ClosesKeptAlive:
    """A raw HTTP/1.1 server that answers the first request of every connection (keep-alive) and closes
    the connection, unanswered, when a second request arrives on it: the race of a kept-alive connection
    the server closes just as the client reuses it, made certain."""

    def __init__(self) -> None:
        self.connections = 0
        self.answered: list[bytes] = []   # request lines answered
        self.dropped: list[bytes] = []    # request lines the connection was closed on

    async def start(self) -> ClosesKeptAlive:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def _conn(self, reader, writer) -> None:
        self.connections += 1
        n = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line = head.split(b"\r\n", 1)[0]
                n += 1
                if n > 1:
                    self.dropped.append(line)
                    writer.transport.abort()
                    return
                length = 0
                chunked = b"transfer-encoding: chunked" in head.lower()
                for h in head.split(b"\r\n"):
                    if h.lower().startswith(b"content-length:"):
                        length = int(h.split(b":")[1])
                if length:
                    await reader.readexactly(length)
                elif chunked:
                    while (size := int((await reader.readuntil(b"\r\n")).strip(), 16)):
                        await reader.readexactly(size + 2)
                    await reader.readuntil(b"\r\n")
                self.answered.append(line)
                body = b"" if line.startswith(b"HEAD ") else b"ok"
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\n" + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    def close(self) -> None:
        self.server.close()
