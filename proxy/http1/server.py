"""The HTTP/1.1 server side of the egress listeners (and the admin API): bytes from the app → a Request
for the listener; its client side is proxy/http1/client.py.

listener (this, then proxy/listen/http.py) → route → policy chain → upstream pool. One asyncio protocol
per client connection, llhttp (through httptools) for parsing — never a hand-written parser — and the
answer written in one call when it is whole. It replaces aiohttp's server on the data path because that
server's per-request machinery (request/response objects, payload writer, access-log hooks) cost more than
the whole policy chain; the inbound listener (WebSockets) and the admin server stay on aiohttp.

It offers the listeners the small part of aiohttp's request/response surface they use (method, raw_path,
path, headers, raw_headers, content_length, body_exists, content.readany(), remote, transport;
Response/StreamResponse with prepare/write/write_eof), and adds what a sidecar must guarantee at the
socket: bounded header bytes (431) and request-line size, bounded buffering of request bodies
(back-pressure), pipelined requests answered in order, a client that goes away cancels its handler,
idle keep-alive connections closed, and a drain that waits for in-flight requests.
"""

from __future__ import annotations

import asyncio
import collections
import json
import socket
import time
from email.utils import formatdate
from urllib.parse import unquote

import httptools
from multidict import CIMultiDict

from proxy.obs import log

_REASONS = {100: "Continue", 200: "OK", 201: "Created", 202: "Accepted", 204: "No Content",
            206: "Partial Content", 301: "Moved Permanently", 302: "Found", 304: "Not Modified",
            400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict", 413: "Content Too Large",
            429: "Too Many Requests", 431: "Request Header Fields Too Large", 499: "Client Closed Request",
            500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
            503: "Service Unavailable", 504: "Gateway Timeout"}
_HIGH_WATER = 256 * 1024   # request body bytes buffered before the client is paused
_LOW_WATER = 64 * 1024
_HEADER_TIMEOUT = 30.0     # a request's headers must arrive within this (slowloris)
_KEEPALIVE_TIMEOUT = 3630.0  # an idle keep-alive connection is closed after this: longer than the
                             # apps' own pool idle timeouts (Go 90 s, Java minutes), so the app, not us,
                             # closes idle connections and never reuses one we are closing (aiohttp's value)
_PIPELINE_MAX = 16         # pipelined requests parsed ahead of the one being answered
_HEAD_SLICE = 1024         # input is parsed in slices, so parsing stops soon after the queue is full
_BODY_SLICE = 64 * 1024
_SWEEP_EVERY = 1.0
_LINGER = 2.0              # after an error answer, unread input is drained this long so the client reads
                           # the answer instead of a reset


class ClientGone(ConnectionResetError):
    """The app closed its connection: nothing more can be written to it."""


class BodyTooLarge(ValueError):
    """A body over the limit of a handler that reads it whole (the admin API's JSON)."""


class MalformedBody(ConnectionResetError):
    """The request body broke HTTP framing (bad chunk size, ...): a 400, not a timeout."""


def reason_phrase(status: int) -> str:
    return _REASONS.get(status, "Unknown")


_date_cache = [0, ""]


def http_date() -> str:
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0], _date_cache[1] = now, formatdate(now, usegmt=True)
    return _date_cache[1]


class RequestBody:
    """The request body as it arrives. Reading drains the buffer and lets a paused client send on."""

    __slots__ = ("chunks", "size", "eof", "exc", "waiter", "proto")

    def __init__(self, proto: ServerProtocol) -> None:
        self.chunks: collections.deque[bytes] = collections.deque()
        self.size = 0
        self.eof = False
        self.exc: BaseException | None = None
        self.waiter: asyncio.Future | None = None
        self.proto = proto

    # -- fed by the protocol ---------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)
        self._wake()
        if self.size > _HIGH_WATER:
            self.proto.pause_reading()

    def feed_eof(self) -> None:
        self.eof = True
        self._wake()

    def set_exception(self, exc: BaseException) -> None:
        if not self.eof:
            self.exc = exc
            self._wake()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- what the listener reads (aiohttp's StreamReader names) -----------------------------------------
    async def _wait(self) -> None:
        self.proto.resume_reading()
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    def _take(self) -> bytes:
        chunk = self.chunks.popleft()
        self.size -= len(chunk)
        if self.size < _LOW_WATER:
            self.proto.resume_reading()
        return chunk

    async def _ready(self) -> bool:
        """Wait for a chunk: True when one is there, False at the end (or raise what broke the body)."""
        while not self.chunks:
            if self.exc is not None:
                raise self.exc
            if self.eof:
                return False
            await self._wait()
        return True

    async def readany(self) -> bytes:
        return self._take() if await self._ready() else b""

    async def read(self, n: int) -> bytes:
        """At most n bytes (b"" at the end)."""
        if not await self._ready():
            return b""
        chunk = self._take()
        if len(chunk) > n:
            self.chunks.appendleft(chunk[n:])
            self.size += len(chunk) - n
            chunk = chunk[:n]
        return chunk

    async def readexactly(self, n: int) -> bytes:
        parts, got = [], 0
        while got < n:
            chunk = await self.read(n - got)
            if not chunk:
                raise asyncio.IncompleteReadError(b"".join(parts), n)
            parts.append(chunk)
            got += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)


class _NoBody:
    """The body of a request that has none (most of them): one shared, always-empty reader."""

    __slots__ = ()
    eof = True

    def feed(self, data: bytes) -> None:  # llhttp found a body after all (cannot happen): drop it
        pass

    def feed_eof(self) -> None:
        pass

    def set_exception(self, exc: BaseException) -> None:
        pass

    async def readany(self) -> bytes:
        return b""



NO_BODY = _NoBody()


class Request:
    """One request as the listener sees it."""

    __slots__ = ("method", "raw_path", "version", "headers", "raw_headers", "header_bytes", "content", "remote",
                 "keep_alive", "content_length", "body_exists", "upgrade", "_proto", "_path")

    def __init__(self, proto: ServerProtocol, method: str, raw_path: str, version: str, raw_headers: list,
                 header_bytes: int, keep_alive: bool, upgrade: bool) -> None:
        self._proto = proto
        self.method, self.raw_path, self.version = method, raw_path, version
        self.raw_headers, self.header_bytes = raw_headers, header_bytes
        self.headers = headers = CIMultiDict(raw_headers)
        self.remote = proto.remote
        self.keep_alive, self.upgrade = keep_alive, upgrade
        cl = headers.get("Content-Length")
        self.content_length = int(cl) if cl is not None else None  # llhttp has validated it
        self.body_exists = bool(self.content_length) or "Transfer-Encoding" in headers
        self.content = RequestBody(proto) if self.body_exists else NO_BODY
        self._path: str | None = None

    @property
    def path(self) -> str:
        """The decoded path without the query, for route matching."""
        p = self._path
        if p is None:
            raw = self.raw_path.partition("?")[0]
            p = self._path = unquote(raw) if "%" in raw else raw
        return p

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._proto.transport

    async def read(self, limit: int = 1 << 20) -> bytes:
        """The whole body, for small ones (the admin API's JSON); more than `limit` is a ValueError."""
        parts, n = [], 0
        while chunk := await self.content.readany():
            n += len(chunk)
            if n > limit:
                raise BodyTooLarge(f"request body over {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    async def json(self):
        return json.loads(await self.read())

    async def drain(self) -> None:
        """Wait while the app is not reading (the transport's buffer is over its high-water mark)."""
        if self._proto._paused_writing or self._proto.closed:
            await self._proto.drain()

    async def send_continue(self) -> None:
        if self.version == "1.1":
            self._proto.write(b"HTTP/1.1 100 Continue\r\n\r\n")


class HeadLines:
    """An answer's header lines already serialised ("Name: value\\r\\n" each, Content-Length and
    hop-by-hop ones left out by whoever made them): a forwarded answer's head built straight from the
    upstream's raw header list, or a cached answer's, serialised once when it was stored. `Response`
    writes them as they are, instead of copying them into a header map and serialising that."""

    __slots__ = ("lines", "has_date")

    def __init__(self, lines: list[str], has_date: bool) -> None:
        self.lines, self.has_date = lines, has_date

    def __contains__(self, name: str) -> bool:
        prefix = name.lower() + ":"
        return any(line[:len(prefix)].lower() == prefix for line in self.lines)

    def items(self):
        for line in self.lines:
            k, _, v = line.partition(":")
            yield k, v.strip()


def _head_lines(status: int, reason: str | None, head: HeadLines, extra: str) -> bytes:
    date = "" if head.has_date else f"Date: {http_date()}\r\n"
    return "".join((f"HTTP/1.1 {status} {reason or reason_phrase(status)}\r\n", *head.lines, date, extra)).encode(
        "utf-8", "surrogateescape")


def _head(status: int, reason: str | None, headers, extra: str) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason or reason_phrase(status)}\r\n"]
    for k, v in headers.items():
        lines.append(f"{k}: {v}\r\n")
    if "Date" not in headers:
        lines.append(f"Date: {http_date()}\r\n")
    lines.append(extra)
    return "".join(lines).encode("utf-8", "surrogateescape")


def json_response(data, status: int = 200, headers=None) -> Response:
    r = Response(status=status, body=json.dumps(data).encode(), headers=headers)
    r.headers["Content-Type"] = "application/json; charset=utf-8"
    return r


def _error_answer(status: int, error_type: str, message: str) -> bytes:
    """The server's own answer to what never reached a listener (unparseable input, a bug): JSON, closing."""
    body = json.dumps({"error": {"type": error_type, "message": message, "status": status}}).encode()
    return _head(status, None, {"Content-Type": "application/json"},
                 f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n") + body


class Response:
    """A whole answer: status line, headers and body in one write."""

    __slots__ = ("status", "reason", "headers", "body", "prepared")

    def __init__(self, status: int = 200, reason: str | None = None, headers=None, body: bytes | None = None,
                 content_type: str | None = None) -> None:
        self.status, self.reason, self.body = status, reason, body
        # a CIMultiDict or HeadLines is taken as is (the listener builds one per answer anyway); anything
        # else is copied
        cls = headers.__class__
        self.headers = headers if cls is CIMultiDict or cls is HeadLines else CIMultiDict(headers or ())
        if content_type is not None:
            self.headers["Content-Type"] = content_type
        self.prepared = False

    def send(self, request: Request) -> None:
        """Write it all now (no await: the hot path's answer); `prepare` is the awaitable form."""
        if self.prepared:
            return
        self.prepared = True
        proto, status, body = request._proto, self.status, self.body
        headers = self.headers
        lines = headers.__class__ is HeadLines  # never holds a Content-Length
        if status < 200 or status in (204, 304):
            if not lines:
                headers.popall("Content-Length", None)
            extra, body = "\r\n", None
        elif request.method == "HEAD":
            # the length the GET would have, when the caller knows it; never a body
            extra = "\r\n" if not lines and "Content-Length" in headers else f"Content-Length: {len(body or b'')}\r\n\r\n"
            body = None
        else:
            if not lines:
                headers.popall("Content-Length", None)
            extra = f"Content-Length: {len(body) if body else 0}\r\n\r\n"
        if not proto.will_keep_alive(request):
            extra = "Connection: close\r\n" + extra
        elif request.version == "1.0":
            extra = "Connection: keep-alive\r\n" + extra  # HTTP/1.0 (ab -k) closes unless told otherwise
        data = _head_lines(status, self.reason, headers, extra) if lines else _head(status, self.reason, headers, extra)
        proto.responded = True
        proto.write(data + body if body else data)

    async def prepare(self, request: Request) -> None:
        self.send(request)
        await request._proto.drain()


    async def write_eof(self) -> None:
        pass


class StreamResponse:
    """An answer written as it arrives: chunked when its length is unknown (close-delimited for HTTP/1.0)."""

    __slots__ = ("status", "reason", "headers", "content_length", "prepared", "_req", "_chunked", "_no_body",
                 "_done")

    def __init__(self, status: int = 200, reason: str | None = None, headers=None) -> None:
        self.status, self.reason = status, reason
        self.headers = headers if headers.__class__ is CIMultiDict else CIMultiDict(headers or ())
        self.content_length: int | None = None
        self.prepared = False
        self._req: Request | None = None
        self._chunked = self._no_body = self._done = False

    async def prepare(self, request: Request) -> None:
        if self.prepared:
            return
        self.prepared, self._req = True, request
        proto, status, headers = request._proto, self.status, self.headers
        headers.popall("Content-Length", None)
        headers.popall("Transfer-Encoding", None)
        self._no_body = request.method == "HEAD" or status < 200 or status in (204, 304)
        if self.content_length is not None and not (status < 200 or status in (204, 304)):
            extra = f"Content-Length: {self.content_length}\r\n"
        elif self._no_body:
            extra = ""
        elif request.version == "1.1":
            extra, self._chunked = "Transfer-Encoding: chunked\r\n", True
        else:
            extra = ""
            proto.must_close = True  # HTTP/1.0 without a length: the body ends with the connection
        if not proto.will_keep_alive(request):
            extra += "Connection: close\r\n"
        elif request.version == "1.0":
            extra += "Connection: keep-alive\r\n"
        proto.responded = True
        proto.write(_head(status, self.reason, headers, extra + "\r\n"))
        await proto.drain()

    async def write(self, data: bytes) -> None:
        if self._no_body or not data:
            return
        proto = self._req._proto
        if self._chunked:
            proto.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            proto.write(data)
        await proto.drain()

    async def write_eof(self) -> None:
        if self._done:
            return
        self._done = True
        if self._chunked:
            self._req._proto.write(b"0\r\n\r\n")
            await self._req._proto.drain()


class ServerProtocol(asyncio.Protocol):
    """One client connection. Requests are handled one at a time, in order. Pipelined requests queue
    behind the current one up to `_PIPELINE_MAX`; beyond that the rest of the input waits unparsed (and
    the socket is paused), so a flood of pipelined requests costs a bounded amount of memory."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.remote = ""
        self.closed = False
        self.must_close = False
        self._url: list[bytes] = []
        self._headers: list[tuple[str, str]] = []
        self._header_bytes = self._url_bytes = 0
        self._head_seen = 0      # bytes received while a request's head is incomplete
        self._parsing: Request | None = None
        self._queue: collections.deque[Request] = collections.deque()
        self._unparsed = b""     # input held back while the pipeline queue is full
        self._task: asyncio.Task | None = None
        self._current: Request | None = None
        self._paused_reading = False
        self._paused_writing = False
        self._drain: asyncio.Future | None = None
        self._errored = False
        self.responded = False  # the current request's status line is out
        self.last_active = 0.0
        self.headers_started: float | None = None  # set while a request's head is arriving
        self.requests = 0        # heads received: a connection that never sent one gets the header timeout
        self._hosts = 0          # Host header lines of the head being read
        self._te_coding: str | None = None  # a transfer coding other than chunked in that head

    # -- transport ---------------------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) else ""
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:  # a peer that vanished without a FIN is found out eventually (as aiohttp's server did)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            except OSError:
                pass
        self.last_active = time.monotonic()
        self.server.connections.add(self)

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.server.connections.discard(self)
        gone = ClientGone("the client closed the connection")
        for r in (self._parsing, self._current, *self._queue):
            if r is not None:
                r.content.set_exception(gone)
        self._queue.clear()
        self._unparsed = b""
        self._fail_drain()
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the app gave up on the answer: stop working on it

    def eof_received(self) -> bool | None:
        """The app sent FIN. As nginx does (499), that is the app giving up: the transport closes and the
        request in flight is cancelled, which stops upstream work nobody will read (LLM tokens, pool
        slots). TCP cannot tell a half-close (`nc -N`, shutdown(SHUT_WR)) from a full close; only a head
        cut off mid-way still gets its 400 before the close."""
        if self.headers_started is not None and self._current is None and not self._errored:
            self._bad_request(400, "bad_request", "the connection was closed in the middle of a request head")
            return True  # keep our side open for the answer; _bad_request closes after it
        return None

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        d = self._drain
        if d is not None and not d.done():
            d.set_result(None)

    def _fail_drain(self) -> None:
        d = self._drain
        if d is not None and not d.done():
            d.set_exception(ClientGone("the client connection was closed"))

    def pause_reading(self) -> None:
        if not self._paused_reading and not self.closed:
            self._paused_reading = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        """Room again (the queue moved, a body was read): parse what was held back, then read on."""
        if self.closed:
            return
        if self._unparsed:
            held, self._unparsed = self._unparsed, b""
            self._feed(held)
            if self._unparsed or self.closed:
                return
        if self._paused_reading and not self._full():
            self._paused_reading = False
            self.transport.resume_reading()

    def _full(self) -> bool:
        p = self._parsing
        return len(self._queue) >= _PIPELINE_MAX or (p is not None and p.content.size > _HIGH_WATER)

    def write(self, data: bytes) -> None:
        if self.closed:
            raise ClientGone("the client closed the connection")
        self.transport.write(data)

    async def drain(self) -> None:
        if self.closed:
            raise ClientGone("the client closed the connection")
        if self._paused_writing:
            self._drain = asyncio.get_running_loop().create_future()
            try:
                await self._drain
            finally:
                self._drain = None

    def will_keep_alive(self, request: Request) -> bool:
        # An answer sent before its request's body was read says Connection: close: the body's rest
        # cannot be told apart from a next request without reading it.
        return (request.keep_alive and not self.must_close and not self.server.closing
                and not request.upgrade and request.content.eof)

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        if self._errored:
            return
        if self._unparsed:
            self._unparsed += data  # bounded: reading is paused while anything is held back
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        """Parse, in slices, and hold back what follows a full pipeline queue or a full body buffer.
        Heads are parsed in small slices (a slice can hold at most ~60 minimal requests), bodies in large
        ones, so a flood of pipelined requests queues a bounded number of them."""
        n, i = len(data), 0
        while i < n:
            if self._full():
                self._unparsed = data[i:]
                self.pause_reading()
                return
            step = _BODY_SLICE if self._parsing is not None else _HEAD_SLICE
            chunk = data if (i == 0 and n <= step) else data[i:i + step]
            i += len(chunk)
            try:
                self.parser.feed_data(chunk)
            except httptools.HttpParserUpgrade:
                self._upgraded()
                return
            except httptools.HttpParserError as exc:
                if not self._errored:
                    self._bad_request(400, "bad_request", f"malformed HTTP request: {exc}")
                return
            if self._errored:
                return
            if self.headers_started is not None:
                # A head still incomplete after this read. llhttp keeps a header that has not ended in its
                # own buffer, out of on_header's reach: count what arrives so it cannot grow unbounded.
                self._head_seen += len(chunk)
                if self._head_seen > self.server.max_line + self.server.max_header_bytes:
                    self._bad_request(431, "headers_too_large",
                                      f"request head exceeds max_header_bytes ({self.server.max_header_bytes} bytes)")
                    return

    def _upgraded(self) -> None:
        """llhttp stops at a request with Connection: upgrade. The listener refuses WebSockets (501) and
        answers other upgrades (h2c from `curl --http2`) as plain HTTP/1.1; nothing after the head is
        parsed, so the connection closes after that answer, and a body cannot be read at all."""
        self._errored = self.must_close = True
        r = self._parsing
        if r is not None:
            if r.body_exists:
                r.content.set_exception(MalformedBody("a request body together with a protocol upgrade"))
            else:
                r.content.feed_eof()
            self._parsing = None

    def _bad_request(self, status: int, error_type: str, message: str) -> None:
        """A request the parser cannot take: answer (when nothing else is being answered) and close."""
        self._errored = True
        self.must_close = True
        if self._parsing is not None:
            self._parsing.content.set_exception(MalformedBody(message))
        if self._current is None and not self.closed:
            self.transport.write(_error_answer(status, error_type, message))
            self._close(linger=True)

    # -- llhttp callbacks ----------------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url.clear()
        self._headers = []
        self._header_bytes = self._url_bytes = self._head_seen = self._hosts = 0
        self._te_coding = None
        self.headers_started = time.monotonic()

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self._url_bytes += len(url)
        if self._url_bytes > self.server.max_line:
            raise httptools.HttpParserError(f"request target longer than {self.server.max_line} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.headers_started is None:
            return  # a chunked body's trailer: not forwarded (and never mistaken for a request header)
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self.server.max_header_bytes:
            self._bad_request(431, "headers_too_large",
                              f"request headers exceed max_header_bytes ({self.server.max_header_bytes} bytes)")
            raise httptools.HttpParserError("headers too large")
        n = len(name)
        if n == 4 and name.lower() == b"host":
            self._hosts += 1
        elif n == 17 and name.lower() == b"transfer-encoding":
            for coding in value.lower().split(b","):
                coding = coding.strip()
                if coding and coding != b"chunked" and self._te_coding is None:
                    self._te_coding = coding.decode("latin-1")
        self._headers.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        self.headers_started = None
        self.requests += 1
        p = self.parser
        version = p.get_http_version()
        if version != "1.1" and version != "1.0":
            self._bad_request(505, "http_version_not_supported",
                              f"HTTP/{version} is not supported here: send HTTP/1.1")
            raise httptools.HttpParserError("unsupported version")
        if self._hosts > 1 or (self._hosts == 0 and version == "1.1"):
            # RFC 9112 §3.2: which host was meant cannot be told; a guess is how requests get smuggled
            self._bad_request(400, "bad_request", "an HTTP/1.1 request needs exactly one Host header"
                              if self._hosts == 0 else "more than one Host header")
            raise httptools.HttpParserError("bad host")
        if self._te_coding is not None:
            # RFC 9112 §6.1: a coding the proxy does not implement is not silently dropped
            self._bad_request(501, "not_implemented",
                              f"Transfer-Encoding {self._te_coding!r} is not implemented here: send chunked only")
            raise httptools.HttpParserError("transfer coding")
        req = Request(self, p.get_method().decode("ascii", "replace"),
                      b"".join(self._url).decode("utf-8", "surrogateescape"), version,
                      self._headers, self._header_bytes, p.should_keep_alive(), p.should_upgrade())
        self._parsing = req
        if self._current is None:
            self._current = req
            self._task = asyncio.get_running_loop().create_task(self._serve(req))
        else:
            self._queue.append(req)

    def on_body(self, body: bytes) -> None:
        self._parsing.content.feed(body)

    def on_message_complete(self) -> None:
        r = self._parsing
        if r is not None:
            if r.upgrade and r.body_exists:
                # llhttp ends an upgrade request at its head and leaves the body unparsed
                r.content.set_exception(MalformedBody("a request body together with a protocol upgrade"))
            else:
                r.content.feed_eof()
            self._parsing = None

    # -- handling ----------------------------------------------------------------------------------------
    async def _serve(self, req: Request) -> None:
        server = self.server
        while True:
            self.responded = False
            try:
                resp = await server.handler(req)
                if not resp.prepared and not self.closed:
                    await resp.prepare(req)
                    await resp.write_eof()
            except asyncio.CancelledError:
                if not self.closed:
                    self.abort()  # cancelled from outside (shutdown): never leave the app waiting on us
                raise
            except ConnectionResetError:
                self._close()
                return
            except Exception as exc:  # noqa: BLE001 — a bug must cost one request, not the listener
                log.error("listener_error", error=type(exc).__name__, message=str(exc)[:200])
                if not self.closed and not self.responded:
                    self.transport.write(_error_answer(500, "internal_error", "internal proxy error"))
                self._close(linger=True)
                return
            if self.closed or self.transport.is_closing():
                return
            # The next request on this connection, if the app may send one. A body the handler did not
            # read to the end leaves the stream unsynchronised: close rather than guess.
            if not self.will_keep_alive(req):
                self._close(linger=not req.content.eof or self._errored)
                return
            self.last_active = time.monotonic()
            if not self._queue:
                self._current = None
                self._task = None
                self.resume_reading()  # parses what was held back: the next request may start a task
                return
            req = self._current = self._queue.popleft()
            self.resume_reading()  # room in the queue again

    def _close(self, linger: bool = False) -> None:
        """Close; with `linger`, when the client may still be sending (an unread body, a refused request),
        half-close and discard its input for a moment first: closing a socket with unread data sends a
        reset, and the client would lose the answer it was just sent."""
        if self.closed or self.transport is None:
            return
        self.closed = True
        self.server.connections.discard(self)
        self._fail_drain()
        t = self.transport
        if linger and t.can_write_eof():
            self._errored = True  # data_received discards from now on
            self._unparsed = b""
            if self._paused_reading:
                self._paused_reading = False
                t.resume_reading()
            t.write_eof()
            asyncio.get_running_loop().call_later(_LINGER, t.abort)
        else:
            t.close()

    def abort(self) -> None:
        """Close at once, dropping whatever the app has not read (a client that stopped reading)."""
        self._close()
        if self.transport is not None:
            self.transport.abort()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    @property
    def idle(self) -> bool:
        return self._current is None


class Server:
    """The protocol factory for one listener, and what the drain and the idle sweep work on."""

    def __init__(self, handler, max_header_bytes: int, max_line: int = 65536) -> None:
        self.handler = handler
        self.max_header_bytes, self.max_line = max_header_bytes, max_line
        self.connections: set[ServerProtocol] = set()
        self.closing = False
        self.header_timeout, self.keepalive_timeout = _HEADER_TIMEOUT, _KEEPALIVE_TIMEOUT
        self._sweeper: asyncio.TimerHandle | None = None

    def __call__(self) -> ServerProtocol:
        if self._sweeper is None and not self.closing:
            self._sweeper = asyncio.get_running_loop().call_later(_SWEEP_EVERY, self._sweep)
        return ServerProtocol(self)

    def _sweep(self) -> None:
        """One timer per listener rather than one per connection: close keep-alive connections idle past
        the keep-alive timeout, and connections whose request heads stall (slowloris)."""
        try:
            now = time.monotonic()
            for c in list(self.connections):
                if c.idle and c.headers_started is None and now - c.last_active > (
                        self.keepalive_timeout if c.requests else self.header_timeout):
                    c._close()  # idle past keep-alive; or never sent a byte of a request: not kept an hour
                elif c.idle and c.headers_started is not None and now - c.headers_started > self.header_timeout:
                    c._bad_request(408, "request_timeout", "request headers did not arrive in time")
        finally:
            self._sweeper = (asyncio.get_running_loop().call_later(_SWEEP_EVERY, self._sweep)
                             if not self.closing else None)

    async def shutdown(self, timeout: float) -> None:
        """Stop keeping connections alive, close the idle ones, wait for in-flight answers; whatever is
        still open at the timeout (a client that stopped reading) is aborted and its handler cancelled."""
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        deadline = time.monotonic() + timeout
        while True:
            for c in list(self.connections):
                if c.idle:
                    c._close()
            if not self.connections or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        for c in list(self.connections):
            c.abort()
