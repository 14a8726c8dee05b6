"""HTTP egress listener (`protocol: http`): the entrance of the data path for one upstream.

listener (this) → route (track choice) → policy chain → upstream pool. It refuses what a sidecar must
not do (CONNECT, absolute-form targets, WebSocket upgrades, oversized headers/bodies) before anything is
forwarded, prepares the upstream request (hop-by-hop headers removed, X-Forwarded-*, X-Request-Id,
configured headers), runs the route's chain, and streams the answer back. Once response headers have
gone out nothing can be retried or replaced: a later upstream failure aborts the client connection and
counts against the target's breaker. The openai listener subclasses this and overrides the hooks.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time

from multidict import CIMultiDict, getversion

from proxy.exchange import HOP_BY_HOP, Failure, ProxyRequest, ProxyResponse, Verdict, connection_listed
from proxy.http1.client import BODY_ERRORS, ClientResponse
from proxy.http1.server import BodyTooLarge, HeadLines, MalformedBody, Request, Response, StreamResponse
from proxy.obs import log
from proxy.obs.tracing import IN_SPAN
from proxy.route.tracks import BadOverride

_REQ_DROP = HOP_BY_HOP | {"host", "expect", "x-request-id", "content-length"}
_RESP_DROP = HOP_BY_HOP | {"content-length", "x-request-id"}
_BUFFER_MAX = 64 * 1024  # answers up to this size are read whole and sent in one write
_ids: list[str] = []
_NETWORK_ERRORS = ("upstream_reset", "connect_failure", "timeout", "connect_timeout", "tls_error")


def new_request_id(given: str | None) -> str:
    if given and len(given) <= 128 and given.isascii() and given.isprintable():
        return given
    if not _ids:
        # 128 random bits each, as a uuid4: from the OS's CSPRNG (an id must not be predictable from
        # earlier ones), 256 at a time, so a request costs a list pop instead of a getrandom syscall
        raw = os.urandom(16 * 256).hex()
        _ids.extend(raw[i:i + 32] for i in range(0, len(raw), 32))
    return _ids.pop()


def forwardable(headers, drop: frozenset[str]) -> CIMultiDict:
    """The headers without the hop-by-hop ones: `drop`, and whatever their Connection header lists."""
    listed = connection_listed(headers)
    if listed:
        drop = drop | listed
    return CIMultiDict([kv for kv in headers.items() if kv[0].lower() not in drop])


def error_body(status: int, error_type: str, message: str, upstream: str, request_id: str) -> bytes:
    return json.dumps({"error": {"type": error_type, "message": message, "upstream": upstream,
                                 "request_id": request_id, "status": status}}).encode()


class Refused(Exception):
    """A request answered by the listener itself, before the chain (4xx)."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error_type, self.message = status, error_type, message


class StreamedBody:
    """A request body forwarded as it arrives (too large to keep for a replay). Each read is bounded by
    the idle timeout. When the client is at fault (over max_request_body, stalled, gone) the body says
    so in `client_error`, and the terminal answers 413/408 instead of blaming the upstream."""

    def __init__(self, prefix: list[bytes], content, limit: int | None, idle: float, seen: int) -> None:
        self.prefix, self.content, self.limit, self.idle, self.seen = prefix, content, limit, idle, seen
        self.client_error: tuple[int, str, str] | None = None
        self.done = False

    async def __aiter__(self):
        for chunk in self.prefix:
            yield chunk
        content, limit = self.content, self.limit
        while True:
            try:
                async with asyncio.timeout(self.idle):
                    chunk = await content.readany()
            except TimeoutError:
                self.client_error = (408, "request_timeout", "the request body stalled past the idle timeout")
                raise
            except ConnectionError:
                self.client_error = (400, "client_closed", "the client closed the connection mid-body")
                raise
            if not chunk:
                self.done = True
                return
            self.seen += len(chunk)
            if limit is not None and self.seen > limit:
                self.client_error = (413, "request_too_large", f"request body exceeds max_request_body ({limit} bytes)")
                raise BodyTooLarge(self.client_error[2])
            yield chunk


async def _read_exactly(content, n: int, idle: float) -> bytes:
    """A body of known length, each read bounded by the idle timeout."""
    if n < 65536:
        async with asyncio.timeout(idle):
            return await content.readexactly(n)
    parts, got = [], 0
    while got < n:
        async with asyncio.timeout(idle):
            chunk = await content.read(min(n - got, 1 << 20))
        if not chunk:
            raise asyncio.IncompleteReadError(b"".join(parts), n)
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


async def collect(content, idle: float, max_body: int | None, keep: int | None = None) -> tuple[list[bytes], int, bool]:
    """A body of unknown length, each read bounded by the idle timeout, until its end or until more than
    `keep` bytes are in → (chunks, bytes, ended). Over `max_body` is the client's 413."""
    chunks, n = [], 0
    while keep is None or n <= keep:
        async with asyncio.timeout(idle):
            chunk = await content.readany()
        if not chunk:
            return chunks, n, True
        chunks.append(chunk)
        n += len(chunk)
        if max_body is not None and n > max_body:
            raise Refused(413, "request_too_large", f"request body exceeds max_request_body ({max_body} bytes)")
    return chunks, n, False


class HttpListener:
    """The request handler of one upstream's listener (proxy/http1/server.py); reads the runtime per request."""

    drop_headers = _REQ_DROP
    plain = True  # no prepare() step: the route's chain runs as is (the openai listener has one)

    def access_fields(self, preq) -> dict:
        """What a protocol adds to the access log line (the LLM listener: the model failed over to)."""
        return {}

    def __init__(self, app, name: str) -> None:
        self.app, self.name = app, name

    # -- hooks the openai listener overrides -----------------------------------------------------------
    def error(self, status: int, error_type: str, message: str, rid: str, headers: dict | None = None) -> Response:
        return Response(status=status, body=error_body(status, error_type, message, self.name, rid),
                            content_type="application/json", headers={"X-Request-Id": rid, **(headers or {})})

    async def read_body(self, request: Request, route, cl: int | None, max_body: int | None):
        """→ (body, replayable). Kept in memory when small enough to replay, streamed otherwise. Only
        called for a request that has a body."""
        keep = route.retry.max_replay_body if route.retry.attempts > 1 else 0
        content = request.content
        idle = route.timeouts.idle
        if cl is not None:
            if cl <= keep:
                return await _read_exactly(content, cl, idle), True
            return StreamedBody([], content, None, idle, 0), False
        chunks, n, ended = await collect(content, idle, max_body, keep)
        if ended:
            return b"".join(chunks), True
        return StreamedBody(chunks, content, max_body, idle, n), False

    async def prepare(self, request: Request, up, route, preq: ProxyRequest):
        """→ the chain to run. May raise Refused, or return a ready Response."""
        return route.chain

    # -- the request -----------------------------------------------------------------------------------
    def refuse(self, request: Request, up) -> None:
        method = request.method
        if method == "CONNECT":
            raise Refused(405, "not_supported", "CONNECT is not supported: this is not a forward proxy")
        if request.raw_path == "*":
            raise Refused(400, "not_supported", "OPTIONS * (asterisk-form) is not forwarded")
        if not request.raw_path.startswith("/"):
            raise Refused(400, "not_supported", "absolute-form request targets are not supported: this is not an open proxy")
        headers = request.headers
        if "Upgrade" in headers and "upgrade" in connection_listed(headers) and "websocket" in headers["Upgrade"].lower():
            raise Refused(501, "not_supported", "WebSocket upgrade is not supported on egress listeners")
        limits = up.limits
        if request.header_bytes > limits.max_header_bytes:
            raise Refused(431, "headers_too_large",
                          f"request headers exceed max_header_bytes ({limits.max_header_bytes} bytes)")
        cl = request.content_length
        if limits.max_request_body is not None and cl is not None and cl > limits.max_request_body:
            raise Refused(413, "request_too_large",
                          f"request body of {cl} bytes exceeds max_request_body ({limits.max_request_body} bytes)")

    def upstream_headers(self, request: Request, up, rid: str) -> CIMultiDict:
        headers_in = request.headers
        out = forwardable(headers_in, self.drop_headers)
        peer = request.remote or ""
        xff = headers_in.get("X-Forwarded-For")
        out["X-Forwarded-For"] = f"{xff}, {peer}" if xff else peer
        out["X-Forwarded-Proto"] = "http"
        out["X-Request-Id"] = rid
        for k, v in up.request_headers.items():
            out[k] = v
        return out

    async def handle(self, request: Request) -> StreamResponse:
        """One request, start to end. Written as one coroutine on purpose: it runs for every request,
        and each nested coroutine is a frame to create, suspend and resume (only the traced path adds one:
        the server span around this same body)."""
        up = self.app.runtime.upstreams.get(self.name)
        rid = new_request_id(request.headers.get("X-Request-Id"))
        if up is None:
            return self.error(503, "unavailable", "upstream removed by a config reload", rid)
        tracing = up.tracing
        if tracing is not None and not IN_SPAN.get() and tracing.sampled(request.headers):
            return await self._traced(request, up)
        # In flight from the first byte: the drain waits for uploads too, and the budget sees them.
        counters = up.counters
        counters.in_flight += 1
        route = None
        resp: ProxyResponse | None = None
        try:
            try:
                self.refuse(request, up)
                route = up.match(request.method, request.path)
                out = self.upstream_headers(request, up, rid)
                cl = request.content_length
                if cl is not None:
                    out["Content-Length"] = str(cl)
                if cl == 0 or (cl is None and not request.body_exists):
                    body, replayable = None, True  # most requests: no body, nothing to read
                else:
                    if request.headers.get("Expect", "").lower() == "100-continue":
                        await request.send_continue()
                    body, replayable = await self.read_body(request, route, cl, up.limits.max_request_body)
                try:
                    target, _forced = up.chooser.choose(request.headers)
                except BadOverride as exc:
                    raise Refused(400, "bad_canary_override", str(exc)) from None
                if up.track_header:
                    out[up.track_header] = target.name
                preq = ProxyRequest(request.method, request.raw_path, request.path, out, request.headers, body,
                                    replayable, rid, route.name, target,
                                    route.idempotent(request.method, request.headers))
                if not self.plain:
                    chain = await self.prepare(request, up, route, preq)
                elif route.traced_chain is not None and IN_SPAN.get():
                    chain = route.traced_chain  # the same chain, with a client span per attempt
                else:
                    chain = route.chain
            except Refused as r:
                if route is not None:
                    up.metrics.request(up.targets[0].name, route.name, str(r.status), "rejected")
                return self.error(r.status, r.error_type, r.message, rid)
            if isinstance(chain, Response | StreamResponse):
                return chain
            started = time.monotonic()
            resp = await chain(preq)
            track = resp.target.name if resp.target is not None else preq.target.name
            if resp.outcome == "upstream":
                up.metrics.duration(track, time.monotonic() - started)
            try:
                status, sent = await self.respond(request, up, route, preq, resp)
                resp.body_done(Verdict.SUCCESS)  # the body is through (a no-op when respond ended the phase)
            except ConnectionResetError:
                status, sent = "client_closed", Response(status=499)  # the app went away; nothing to send
            up.metrics.request(track, route.name, status, resp.outcome)
            if tracing is not None and IN_SPAN.get():
                self.trace_answer(preq, resp, track, route.name, status)
            if preq.target.canary is not None and resp.outcome != "shed" and (
                    resp.failure is None or resp.failure.kind != "bad_request"):
                # the track's own result: a fallback means its upstream failed
                error = resp.outcome == "fallback" or status[0] == "5" or status == "reset"
                up.record_outcome(preq.target, error, time.monotonic() - started)
            if self.app.access_log:
                log.info("access", upstream=self.name, request_id=preq.request_id, method=preq.method,
                         path=preq.path, status=status, outcome=resp.outcome, track=track, route=route.name,
                         duration_ms=round((time.monotonic() - started) * 1000, 2), attempts=preq.attempts,
                         fallback=resp.source, reason=resp.reason.value if resp.reason else None,
                         **self.access_fields(preq))
            return sent
        except MalformedBody as exc:
            return self.error(400, "bad_request", f"malformed request body: {exc}", rid)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionResetError):
            # the app stalled or went away mid-upload: nothing was forwarded
            return self.error(408, "request_timeout", "the request body did not arrive within the idle timeout", rid)
        finally:
            if resp is not None:
                resp.release()
            counters.in_flight -= 1

    async def _traced(self, request: Request, up) -> StreamResponse:
        """The server span of this request: the app's trace context continued, current while the chain
        runs (each attempt's client span is its child), ended once the answer is sent."""
        from opentelemetry import context, trace

        from proxy.obs.tracing import extract

        parent = extract(request.headers)
        span = up.tracing.tracer.start_span(
            f"{request.method} {self.name}", context=parent, kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": request.method, "url.path": request.path,
                        "resilience.upstream": self.name, "network.peer.address": request.remote or ""})
        token = context.attach(trace.set_span_in_context(span, parent))
        try:
            inside = IN_SPAN.set(True)
            try:
                sent = await self.handle(request)  # the same body, now inside the span
            finally:
                IN_SPAN.reset(inside)
        except BaseException as exc:
            span.set_attribute("error.type", type(exc).__name__)
            raise
        else:
            status = getattr(sent, "status", None)
            if isinstance(status, int):
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(trace.Status(trace.StatusCode.ERROR, str(status)))
            return sent
        finally:
            context.detach(token)
            span.end()

    @staticmethod
    def trace_answer(preq: ProxyRequest, resp: ProxyResponse, track: str, route: str, status: str) -> None:
        """What the server span says of the answer: the track, the route, the fallback taken and why, and
        an answer that broke after its headers (`reset`: the app saw a cut body, whatever the status)."""
        from opentelemetry import trace

        span = trace.get_current_span()
        if not status.isdigit():  # reset, client_closed
            span.set_attribute("resilience.result", status)
            if status == "reset":
                span.set_status(trace.Status(trace.StatusCode.ERROR, "the answer broke after its headers were sent"))
        span.set_attribute("resilience.track", track)
        span.set_attribute("resilience.route", route)
        span.set_attribute("resilience.outcome", resp.outcome)
        span.set_attribute("resilience.attempts", preq.attempts)
        if resp.source is not None:
            span.set_attribute("resilience.fallback", resp.source)
        if resp.reason is not None:
            span.set_attribute("resilience.fallback_reason", resp.reason.value)

    # -- the answer ------------------------------------------------------------------------------------
    def error_response(self, preq: ProxyRequest, resp: ProxyResponse) -> Response:
        f: Failure = resp.failure
        headers = {}
        if f.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(f.retry_after)))
        if resp.reason is not None and f.kind != "bad_request":
            headers["X-Fallback-Reason"] = resp.reason.value
        if f.error_type in _NETWORK_ERRORS:
            log.warning("upstream_failed", upstream=self.name, track=preq.target.name, request_id=preq.request_id,
                        error=f.error_type, message=f.message, attempts=preq.attempts)
        return self.error(resp.status, f.error_type, f.message, preq.request_id, headers)

    def response_headers(self, resp: ProxyResponse, rid: str, track_header: str | None = None,
                         track: str | None = None) -> CIMultiDict:
        headers = forwardable(resp.headers, _RESP_DROP)
        headers["X-Request-Id"] = rid
        if track_header and track:
            headers[track_header] = track
        return headers

    def answer_head(self, resp: ProxyResponse, rid: str, track_header: str | None, track: str):
        """The head of an answer sent whole: serialised straight from the upstream's raw header list when
        the lean client's answer goes back as it came (its header map is a read-only proxy, so nothing
        above changed it), from a cached answer's pre-serialised lines while its map is unchanged, else
        from the map (response_headers)."""
        cr = resp.stream
        if cr.__class__ is ClientResponse and resp.headers is cr.headers:
            drop = _RESP_DROP
            listed = connection_listed(cr.headers)
            if listed:
                drop = drop | listed
            if track_header and track_header in cr.headers:  # the upstream sent one: ours replaces it
                drop = drop | {track_header.lower()}
            lines = [f"{k}: {v}\r\n" for k, v in cr.raw if k.lower() not in drop]
            has_date = "date" not in drop and "Date" in cr.headers
        elif resp.head is not None and getversion(resp.headers) == resp.head_version:
            lines = resp.head
            if track_header and track_header in resp.headers:  # stored from the upstream: ours replaces it
                t = track_header.lower() + ":"
                lines = [line for line in lines if line[:len(t)].lower() != t]
            else:
                lines = lines.copy()
            has_date = "Date" in resp.headers
        else:
            return self.response_headers(resp, rid, track_header, track)
        lines.append(f"X-Request-Id: {rid}\r\n")
        if track_header and track:
            lines.append(f"{track_header}: {track}\r\n")
        return HeadLines(lines, has_date)

    async def respond(self, request: Request, up, route, preq: ProxyRequest,
                      resp: ProxyResponse) -> tuple[str, StreamResponse]:
        if resp.stream is None and resp.body is None:
            r = self.error_response(preq, resp)  # an error the proxy produced; no fallback could serve it
            if up.track_header:
                r.headers[up.track_header] = preq.target.name
            await r.prepare(request)
            await r.write_eof()
            return str(resp.status), r
        head = request.method == "HEAD"
        no_body = head or resp.status in (204, 304) or resp.status < 200
        cr = resp.stream
        if cr is not None and not no_body:
            cl = cr.headers.get("Content-Length")
            if cl is not None and cl.isdigit() and int(cl) <= _BUFFER_MAX:
                # Small answer: read it whole and send headers and body in one write. A failure here
                # is still before anything reached the client, so it gets a clean 502.
                try:
                    resp.body = await cr.read()
                except BODY_ERRORS as exc:
                    return self._failed_before_headers(preq, resp, exc)
                cr = None
        if cr is None:
            # in memory (read here, or inside the attempt): each after-body hook applies its own limit
            resp.body_done(Verdict.SUCCESS, resp.body)
            r = Response(status=resp.status, reason=getattr(resp.stream, "reason", None),
                         headers=self.answer_head(resp, preq.request_id, up.track_header, preq.target.name),
                         body=None if no_body and not head else resp.body)
            r.send(request)
            await request.drain()
            return str(resp.status), r
        sr = StreamResponse(status=resp.status, reason=cr.reason,
                            headers=self.response_headers(resp, preq.request_id, up.track_header, preq.target.name))
        cl = cr.headers.get("Content-Length")
        if cl is not None and cl.isdigit():
            sr.content_length = int(cl)
        await sr.prepare(request)
        if no_body:
            await sr.write_eof()
            return str(resp.status), sr
        keep = resp.keep
        buf: list[bytes] | None = [] if keep >= 0 else None
        size = 0
        try:
            async for chunk in cr.content.iter_any():
                await sr.write(chunk)
                if buf is not None:
                    size += len(chunk)
                    if size > keep:
                        buf = None
                    else:
                        buf.append(chunk)
        except BODY_ERRORS as exc:
            self._failed_after_headers(request, preq, resp, exc, size)
            return "reset", sr
        resp.body_done(Verdict.SUCCESS, b"".join(buf) if buf is not None else None)
        await sr.write_eof()
        return str(resp.status), sr

    def _failed_after_headers(self, request: Request, preq: ProxyRequest, resp: ProxyResponse,
                              exc: BaseException, sent: int) -> None:
        """Headers are out: nothing can be retried or replaced. Abort the client connection so it sees
        a truncated answer, not a complete-looking one, and count the failure."""
        resp.body_done(Verdict.FAILURE)
        log.warning("upstream_failed_mid_body", upstream=self.name, track=preq.target.name,
                    request_id=preq.request_id, error=type(exc).__name__, bytes_sent=sent)
        if request.transport is not None:
            request.transport.abort()

    def _failed_before_headers(self, preq: ProxyRequest, resp: ProxyResponse,
                               exc: BaseException) -> tuple[str, Response]:
        resp.body_done(Verdict.FAILURE)
        log.warning("upstream_failed_mid_body", upstream=self.name, track=preq.target.name,
                    request_id=preq.request_id, error=type(exc).__name__, bytes_sent=0)
        status = 504 if isinstance(exc, TimeoutError) else 502
        r = self.error(status, "upstream_reset" if status == 502 else "timeout",
                       f"target '{preq.target.name}' failed while sending its answer ({type(exc).__name__})",
                       preq.request_id)
        return str(status), r
