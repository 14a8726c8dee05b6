"""The "lean Python" peer: a forwarder on the proxy's own HTTP/1.1 server and lean client
(proxy/http1/), with no route, no policy chain, no metrics, no logs. Beside the full proxy in one run it
shows what the chain itself costs; beside the naive aiohttp forwarder, what the server and client code
saves. `python -m bench.lean PORT UPSTREAM` (UPSTREAM: http://host:port).

The proxy's forwarding rules for what the benchmark sends: its hop-by-hop set (and the Connection-listed
names) dropped both ways, the request body read whole (up to 64 MiB), keep-alive to the upstream, a
request that met a kept-alive connection the upstream had closed sent once more on a new one. Not the
rest: HEAD is refused (501), no timeouts, the upstream is a host:port on loopback (no path, no TLS).
"""

from __future__ import annotations

import asyncio
import sys
import time
from urllib.parse import urlsplit

import uvloop

from proxy.http1.client import ClientConnection, UpstreamClosed
from proxy.http1.server import Response, Server
from proxy.listen.http import HOP_BY_HOP, forwardable

# the proxy's own hop-by-hop set; Host and Content-Length are written here, 100-continue answered by us
_REQ_DROP = HOP_BY_HOP | {"host", "content-length", "expect"}
_RESP_DROP = HOP_BY_HOP | {"content-length"}
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_MAX_BODY = 64 << 20


class LeanPool:
    """What ClientConnection asks of its pool: take an idle connection back, free a slot."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.host_header = f"{host}:{port}" if port != 80 else host
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


async def serve(port: int, upstream: str) -> tuple[asyncio.AbstractServer, Server, LeanPool]:
    """Listen on 127.0.0.1:port (0: any free port) and forward to `upstream`."""
    u = urlsplit(upstream)
    pool = LeanPool(u.hostname or "127.0.0.1", u.port or 80)

    async def handle(request) -> Response:
        if request.method == "HEAD":  # the lean client reads a body by its length; the proxy sends HEAD by aiohttp
            return Response(501, body=b"lean peer: HEAD is not forwarded")
        body = b""
        if request.body_exists:
            if request.headers.get("Expect", "").lower() == "100-continue":
                await request.send_continue()  # the app waits for it before it sends the body
            body = await request.read(_MAX_BODY)
        head = [f"{request.method} {request.raw_path} HTTP/1.1\r\nHost: {pool.host_header}\r\n"]
        head += [f"{k}: {v}\r\n" for k, v in forwardable(request.headers, _REQ_DROP).items()]
        head.append(f"Content-Length: {len(body)}\r\n\r\n" if body or request.method in _BODY_METHODS else "\r\n")
        data = "".join(head).encode("utf-8", "surrogateescape") + body
        for _ in range(2):
            conn = await pool.get()
            try:
                r = await conn.request(data)
            except UpstreamClosed:
                # a kept-alive connection the upstream had closed: once more on a new one, as the proxy does
                if conn.reused and not conn.got_bytes:
                    continue
                raise
            break
        else:
            raise UpstreamClosed("the upstream closed two kept-alive connections in a row")
        try:
            answer = await r.read()
        finally:
            r.release()
        return Response(r.status, headers=forwardable(r.headers, _RESP_DROP), body=answer)

    server = Server(handle, max_header_bytes=65536)
    listener = await asyncio.get_running_loop().create_server(server, "127.0.0.1", port, backlog=1024)
    return listener, server, pool


async def main(port: int, upstream: str) -> None:
    await serve(port, upstream)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), sys.argv[2]))
