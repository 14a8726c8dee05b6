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
        self.closed_peers: list[int] = []  # client ports whose connection to us ended

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
