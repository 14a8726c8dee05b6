"""The "lean Python" peer: a forwarder on the proxy's own HTTP/1.1 server and lean client
(proxy/http1/), with no route, no policy chain, no metrics, no logs. Beside the full proxy in one run it
shows what the chain itself costs; beside the naive aiohttp forwarder, what the server and client code
saves. `python -m bench.lean PORT UPSTREAM` (UPSTREAM: http://host:port).

Same forwarding rules as the proxy on this request: hop-by-hop headers dropped both ways, the body read
whole, keep-alive to the upstream, a connection that cannot carry another request closed.
"""

from __future__ import annotations

import asyncio
import sys
import time
from urllib.parse import urlsplit

import uvloop
from multidict import CIMultiDict

from proxy.http1.client import ClientConnection
from proxy.http1.server import Response, Server

HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "upgrade", "te", "trailer",
                 "proxy-connection", "host", "content-length"})


class LeanPool:
    """What ClientConnection asks of its pool: take an idle connection back, free a slot."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.host_header = f"{host}:{port}"
        self.idle: list[ClientConnection] = []
        self.idle_timeout = 30.0  # a body that stalls this long is an error (the proxy's default idle timeout)

    async def get(self) -> ClientConnection:
        while self.idle:
            c = self.idle.pop()
            if not c.closed:
                c.reused = True
                return c
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: ClientConnection(self, time.monotonic()), self.host, self.port)
        return conn

    def h1_idle(self, conn: ClientConnection) -> None:
        self.idle.append(conn)

    def release(self) -> None:
        pass


async def serve(port: int, upstream: str) -> asyncio.AbstractServer:
    """Listen on 127.0.0.1:port (0: any free port) and forward to `upstream`."""
    u = urlsplit(upstream)
    pool = LeanPool(u.hostname or "127.0.0.1", u.port or 80)

    async def handle(request) -> Response:
        body = await request.read() if request.body_exists else b""
        head = [f"{request.method} {request.raw_path} HTTP/1.1\r\nHost: {pool.host_header}\r\n"]
        head += [f"{k}: {v}\r\n" for k, v in request.headers.items() if k.lower() not in HOP]
        head.append(f"Content-Length: {len(body)}\r\n\r\n" if body else "\r\n")
        conn = await pool.get()
        r = await conn.request("".join(head).encode("latin-1") + body)
        try:
            data = await r.read()
        finally:
            r.release()
        out = CIMultiDict((k, v) for k, v in r.headers.items() if k.lower() not in HOP)
        return Response(r.status, headers=out, body=data)

    server = Server(handle, max_header_bytes=65536)
    return await asyncio.get_running_loop().create_server(server, "127.0.0.1", port, backlog=1024)


async def main(port: int, upstream: str) -> None:
    await serve(port, upstream)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), sys.argv[2]))
