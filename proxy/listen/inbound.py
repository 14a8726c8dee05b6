"""Inbound listener (optional `inbound:`): a reverse proxy in front of the app's own port (e.g.
0.0.0.0:8080 → 127.0.0.1:8000) that records the design's golden metrics for the app, so rollback
rules and Argo Rollouts / Flagger analysis work on any app without code changes:
`http_requests_total{method,status,track}` and `http_request_duration_seconds{method,track}`.

It is the app's own traffic: bodies stream both ways, WebSocket upgrades and SSE pass, nothing is ever
retried or replaced; header and body limits and X-Request-Id apply as on egress.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict

from proxy.listen.http import HOP_BY_HOP, connection_listed, error_body, forwardable, new_request_id
from proxy.settings.spec import IDEMPOTENT_METHODS
from proxy.upstream import aio

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_DROP = HOP_BY_HOP | {"content-length"}  # Host is kept: the app may route or check on it


class InboundListener:
    def __init__(self, app) -> None:
        self.app = app
        self.session: aiohttp.ClientSession | None = None
        self._children: dict = {}
        self._client_fault: dict[str, tuple[int, str]] = {}  # request id → why its body failed
        self.in_flight = 0  # the drain waits for the app's own requests too

    def _session(self) -> aiohttp.ClientSession:
        if self.session is None or self.session.closed:
            self.session = aio.session(  # never retried: only aio.request's re-send of a stale keep-alive
                auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
                timeout=aiohttp.ClientTimeout(total=None, sock_read=None, connect=5),
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type", "Accept"))
        return self.session

    def _observe(self, method: str, status: str, track: str, seconds: float | None, buckets) -> None:
        m = self.app.metrics
        key = (method, status, track)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = m.inbound_requests.labels(method, status, track)
        c.inc()
        if seconds is not None:
            h = self._children.get((method, track))
            if h is None or h.bounds != tuple(buckets):
                h = self._children[(method, track)] = m.inbound_duration.labels(method, track, buckets=buckets)
                m.inbound_duration.install((method, track), h)
            h.observe(seconds)

    def _error(self, status: int, kind: str, message: str, rid: str) -> web.Response:
        return web.Response(status=status, body=error_body(status, kind, message, "app", rid),
                            content_type="application/json", headers={"X-Request-Id": rid})

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        spec = self.app.runtime.settings.inbound
        rid = new_request_id(request.headers.get("X-Request-Id"))
        method = request.method if request.method in _METHODS else "OTHER"
        started = time.monotonic()
        status, seconds = "000", None
        self.in_flight += 1
        try:
            if spec is None:
                status = "503"
                return self._error(503, "unavailable", "inbound listener removed by a config reload", rid)
            if sum(len(k) + len(v) + 4 for k, v in request.raw_headers) > spec.max_header_bytes:
                status = "431"
                return self._error(431, "headers_too_large", "request headers too large", rid)
            cl = request.content_length
            if spec.max_request_body is not None and cl is not None and cl > spec.max_request_body:
                status = "413"
                return self._error(413, "request_too_large", "request body too large", rid)
            headers = self._headers(request, rid)
            url = spec.app_url + request.raw_path
            if (request.headers.get("Upgrade", "").lower() == "websocket"
                    and "upgrade" in connection_listed(request.headers)):
                seconds = time.monotonic() - started
                resp = await self._websocket(request, url, headers)
                status = str(resp.status)
                return resp
            body = self._body(request, spec, rid) if (cl or request.body_exists) else None
            try:
                r = await aio.request(self._session(), request.method, url, headers=headers, data=body,
                                      replayable=body is None and request.method in IDEMPOTENT_METHODS,
                                      allow_redirects=False)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                fault = self._client_fault.pop(rid, None)
                if fault is not None:
                    status = str(fault[0])  # the client's own fault (body too large, stalled): not the app's 5xx
                    return self._error(fault[0], fault[1], "the request body was too large or stalled", rid)
                status = "502"
                return self._error(502, "app_unreachable", f"the app did not answer: {type(exc).__name__}", rid)
            seconds = time.monotonic() - started
            status = str(r.status)
            try:
                return await self._relay(request, r, rid, spec)
            finally:
                r.release()
        finally:
            self.in_flight -= 1
            self._client_fault.pop(rid, None)
            self._observe(method, status, spec.track if spec else "unknown", seconds,
                          spec.buckets if spec else (1.0,))

    def _headers(self, request, rid: str) -> CIMultiDict:
        out = forwardable(request.headers, _DROP)
        if request.content_length is not None:
            out["Content-Length"] = str(request.content_length)
        xff = request.headers.get("X-Forwarded-For")
        out["X-Forwarded-For"] = f"{xff}, {request.remote}" if xff else (request.remote or "")
        out["X-Forwarded-Proto"] = request.headers.get("X-Forwarded-Proto", "http")
        out["X-Forwarded-Host"] = request.headers.get("Host", "")
        out["X-Request-Id"] = rid
        return out

    async def _body(self, request, spec, rid: str):
        n = 0
        while True:
            try:
                async with asyncio.timeout(spec.idle_timeout):
                    chunk = await request.content.readany()
            except TimeoutError:
                self._client_fault[rid] = (408, "request_timeout")
                raise
            if not chunk:
                return
            n += len(chunk)
            if spec.max_request_body is not None and n > spec.max_request_body:
                self._client_fault[rid] = (413, "request_too_large")
                raise aiohttp.ClientPayloadError("request body too large")
            yield chunk

    async def _relay(self, request, r: aiohttp.ClientResponse, rid: str, spec) -> web.StreamResponse:
        headers = forwardable(r.headers, _DROP)
        headers["X-Request-Id"] = rid
        sr = web.StreamResponse(status=r.status, reason=r.reason, headers=headers)
        cl = r.headers.get("Content-Length")
        if cl is not None and cl.isdigit():
            sr.content_length = int(cl)
        await sr.prepare(request)
        if request.method == "HEAD" or r.status in (204, 304):
            await sr.write_eof()
            return sr
        try:
            while True:
                async with asyncio.timeout(spec.idle_timeout):
                    chunk = await r.content.readany()
                if not chunk:
                    break
                await sr.write(chunk)  # SSE events reach the client as the app writes them
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, TimeoutError):
            if request.transport is not None:
                request.transport.abort()  # truncated, never complete-looking
            return sr
        await sr.write_eof()
        return sr

    async def _websocket(self, request, url: str, headers: CIMultiDict) -> web.StreamResponse:
        protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        for h in ("Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Extensions", "Sec-WebSocket-Protocol"):
            headers.popall(h, None)
        try:
            app_ws = await self._session().ws_connect(url.replace("http://", "ws://", 1), headers=headers,
                                                      protocols=protocols, autoping=False)
        except (aiohttp.ClientError, OSError):
            return self._error(502, "app_unreachable", "the app refused the WebSocket", headers["X-Request-Id"])
        client_ws = web.WebSocketResponse(protocols=[app_ws.protocol] if app_ws.protocol else (), autoping=False)
        await client_ws.prepare(request)

        async def pump(src, dst) -> None:
            async for msg in src:
                if msg.type == WSMsgType.TEXT:
                    await dst.send_str(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await dst.send_bytes(msg.data)
                elif msg.type == WSMsgType.PING:
                    await dst.ping(msg.data)
                elif msg.type == WSMsgType.PONG:
                    await dst.pong(msg.data)
                elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                    break
            await dst.close()

        tasks = [asyncio.create_task(pump(client_ws, app_ws)), asyncio.create_task(pump(app_ws, client_ws))]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            t.cancel()
        await app_ws.close()
        await client_ws.close()
        return client_ws

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
