"""The HTTP/1.1 client side: a lean client for the upstream end of the data path (upstream pool →
this → the target), beside the server side (proxy/http1/server.py). One asyncio protocol per connection,
llhttp (through httptools) for parsing, the request written in one call, keep-alive connections reused
LIFO. It exists because a general-purpose aiohttp ClientSession request costs more than the rest of the
proxy together; it is used for what it handles fully (a body in memory, no egress proxy, not HEAD) and
the pool falls back to aiohttp for the rest.

The response object offers what the listener uses of aiohttp's: status, reason, headers, content.readany()
/ iter_any() / read(), release().
"""

from __future__ import annotations

import asyncio
import collections

import httptools
from multidict import CIMultiDict, CIMultiDictProxy


class UpstreamClosed(ConnectionError):
    """The connection ended before the whole answer arrived."""


# What reading an upstream answer's body can raise, whichever client read it (proxy/upstream/aio.py turns
# aiohttp's errors into these).
BODY_ERRORS: tuple[type[BaseException], ...] = (TimeoutError, UpstreamClosed)


class ClientBody:
    """The response body as it arrives: a queue of chunks with one waiter, bounded by the idle timeout."""

    __slots__ = ("chunks", "eof", "exc", "waiter", "idle", "conn")

    def __init__(self, conn, idle: float) -> None:
        self.chunks: collections.deque[bytes] = collections.deque()
        self.eof = False
        self.exc: BaseException | None = None
        self.waiter: asyncio.Future | None = None
        self.idle, self.conn = idle, conn

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def readany(self) -> bytes:
        while not self.chunks:
            if self.exc is not None:
                raise self.exc
            if self.eof:
                return b""
            self.waiter = asyncio.get_running_loop().create_future()
            self.conn.resume()
            try:
                async with asyncio.timeout(self.idle):
                    await self.waiter
            except TimeoutError:
                self.conn.close()
                raise
            finally:
                self.waiter = None
        chunk = self.chunks.popleft()
        self.conn.resume_if_drained(len(self.chunks))
        return chunk

    async def read(self) -> bytes:
        parts = []
        while True:
            chunk = await self.readany()
            if not chunk:
                return b"".join(parts)
            parts.append(chunk)

    async def iter_any(self):
        while True:
            chunk = await self.readany()
            if not chunk:
                return
            yield chunk


class ClientResponse:
    """`raw`: the header list as it arrived (names and values decoded, in order), for a listener that
    serialises the forwarded head straight from it (proxy/listen/http.py)."""

    __slots__ = ("status", "reason", "headers", "raw", "content", "_conn", "_released")

    def __init__(self, status: int, reason: str, headers: CIMultiDict, body: ClientBody, conn,
                 raw: list[tuple[str, str]] | None = None) -> None:
        self.status, self.reason, self.headers, self.content = status, reason, CIMultiDictProxy(headers), body
        self.raw = raw if raw is not None else list(headers.items())
        self._conn, self._released = conn, False

    async def read(self) -> bytes:
        return await self.content.read()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._conn.finished(self.content.eof and self.content.exc is None)


class _Unasked(Exception):
    """Raised from a parser callback to stop parsing an answer nobody asked for."""


class ClientConnection(asyncio.Protocol):
    def __init__(self, pool, created: float) -> None:
        self.pool, self.created = pool, created
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.reused = False
        self.got_bytes = False
        self.paused = False
        self._headers: CIMultiDict | None = None
        self._raw: list[tuple[str, str]] = []
        self._reason = ""
        self._waiter: asyncio.Future | None = None
        self._body: ClientBody | None = None
        self._done = False
        self._keep_alive = False
        self._close_delimited = False
        self.poisoned = False  # bytes came after a complete answer: whatever they are, never reused
        self.last_used = created

    # -- transport ---------------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.closed = True
        err = UpstreamClosed("the upstream closed the connection")
        w = self._waiter
        if w is not None and not w.done():
            w.set_exception(err)
        b = self._body
        if b is not None and not b.eof:
            if self._close_delimited and exc is None:
                # no Content-Length, not chunked: the body ends where the connection does (HTTP/1.0 style)
                self._done = True
                b.eof = True
            else:
                b.exc = err
            b._wake()

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if self.poisoned:  # bytes after the answer (on_message_begin): the answer itself is whole
                self.close()
                return
            err = UpstreamClosed(f"invalid answer from the upstream: {exc}")
            w = self._waiter
            if w is not None and not w.done():
                w.set_exception(err)
            if self._body is not None:
                self._body.exc = err
                self._body._wake()
            self.close()
            return
        b = self._body
        if b is not None and len(b.chunks) > 64 and not self.paused and self.transport is not None:
            self.paused = True  # back-pressure: a slow client must not make us buffer a whole download
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def resume_if_drained(self, queued: int) -> None:
        if self.paused and queued < 16:
            self.resume()

    # -- parser callbacks (llhttp) ------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._done:
            # an answer nobody asked for (bytes past Content-Length, a second response): the next
            # request on this connection would get it. Parsing stops here; the connection goes.
            self.poisoned = True
            raise _Unasked
        self._raw = []

    def on_status(self, status: bytes) -> None:
        self._reason += status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._raw = []  # an interim answer: wait for the final one
            self._reason = ""
            return
        raw, self._raw = self._raw, []  # the answer's own list: a chunked body's trailers go elsewhere
        self._headers = CIMultiDict(raw)  # one C call, not one add() per header
        self._body = ClientBody(self, self.pool.idle_timeout)
        self._keep_alive = self.parser.should_keep_alive()  # llhttp forgets it once the message completes
        h = self._headers
        self._close_delimited = (status not in (204, 304) and "Content-Length" not in h
                                 and "chunked" not in h.get("Transfer-Encoding", "").lower())
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(ClientResponse(status, self._reason, self._headers, self._body, self, raw))

    def on_body(self, body: bytes) -> None:
        b = self._body
        b.chunks.append(body)
        b._wake()

    def on_message_complete(self) -> None:
        if self._body is None:  # the end of an interim answer
            return
        self._done = True
        self._body.eof = True
        self._body._wake()

    # -- request ------------------------------------------------------------------------------------
    async def request(self, data: bytes) -> ClientResponse:
        self._headers, self._reason, self._body, self._done = None, "", None, False
        self.got_bytes = False
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        try:
            return await self._waiter
        except BaseException:
            self.close()  # cancelled or failed mid-request: the connection cannot be reused
            raise
        finally:
            self._waiter = None

    def finished(self, complete: bool) -> None:
        """The response was released: back to the pool when it can carry another request."""
        if complete and self._done and not self.closed and self._keep_alive and not self.paused and not self.poisoned:
            self.pool.h1_idle(self)
        else:
            self.close()
        self.pool.release()  # the request's connection slot

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
