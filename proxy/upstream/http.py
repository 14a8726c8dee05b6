"""The innermost step of the HTTP chain: one attempt against the request's target over its pool.

Every expected failure becomes a Failure value (connect error and TLS verification → 502, reset → 502,
connect or read timeout → 504, no connection slot → 503 shed), so the policies above read one shape.
"""

from __future__ import annotations

import asyncio
import ssl
import sys

from yarl import URL

from proxy.exchange import Failure, ProxyRequest, ProxyResponse, Reason, Verdict, client_fault, shed_response
from proxy.http1.client import UpstreamClosed
from proxy.settings.units import format_duration
from proxy.upstream import aio
from proxy.upstream.pool import ConnectFailed, Overloaded

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_SAFE_IDLE = 1.0  # a non-replayable request only reuses a connection used within the last second


# One vocabulary for what went wrong, whichever client (the lean one or aiohttp) met it:
# case → (retry condition, fallback reason, status, error type)
_CASES = {
    "tls": ("connect-failure", Reason.UPSTREAM_ERROR, 502, "tls_error"),
    "connect_timeout": ("connect-failure", Reason.TIMEOUT, 504, "connect_timeout"),
    "connect": ("connect-failure", Reason.UPSTREAM_ERROR, 502, "connect_failure"),
    "idle_timeout": ("timeout", Reason.TIMEOUT, 504, "timeout"),
    "reset": ("reset", Reason.UPSTREAM_ERROR, 502, "upstream_reset"),
    "invalid": ("reset", Reason.UPSTREAM_ERROR, 502, "upstream_error"),
}


class _Never(Exception):
    """Stands in for aiohttp's exception classes while aiohttp is not loaded (nothing can raise them)."""


class _NoAiohttp:
    def __getattr__(self, name: str) -> type[BaseException]:
        return _Never


def _case(exc: BaseException, pool, where: str) -> tuple[str, str]:
    aio = sys.modules.get("aiohttp") or _NoAiohttp()
    inner = exc.exc if isinstance(exc, ConnectFailed) else exc
    if isinstance(inner, ssl.SSLCertVerificationError | aio.ClientConnectorCertificateError):
        detail = str(getattr(inner, "verify_message", None) or getattr(inner, "certificate_error", None) or inner)
        if "certificate verify failed" not in detail:
            detail = f"certificate verify failed: {detail}"
        return "tls", f"TLS certificate verification failed for {where}: {detail}"
    if isinstance(inner, ssl.SSLError | aio.ClientSSLError):
        return "tls", f"TLS handshake with {where} failed: {getattr(inner, 'os_error', None) or inner}"
    if isinstance(inner, aio.ConnectionTimeoutError) or (isinstance(exc, ConnectFailed) and isinstance(inner, TimeoutError)):
        return "connect_timeout", f"connect timeout ({format_duration(pool.connect_timeout)}) to {where}"
    if isinstance(exc, ConnectFailed) or isinstance(inner, aio.ClientConnectorError):
        os_error = getattr(inner, "os_error", inner)
        return "connect", (f"cannot connect to {where} ({pool.host}:{pool.port}): "
                           f"{getattr(os_error, 'strerror', None) or os_error}")
    if isinstance(inner, TimeoutError):  # aiohttp's read timeout, or the lean client's idle timeout
        return "idle_timeout", f"idle timeout ({format_duration(pool.idle_timeout)}) waiting for {where}"
    if isinstance(inner, UpstreamClosed) and "invalid" in str(inner):
        return "invalid", f"{inner} ({where})"
    if isinstance(inner, UpstreamClosed | aio.ServerDisconnectedError | aio.ClientOSError | aio.ClientPayloadError):
        return "reset", f"{where} closed or reset the connection before answering"
    return "invalid", f"invalid answer from {where}: {type(inner).__name__}"


def failure_response(exc: BaseException, pool, target_name: str) -> ProxyResponse:
    if isinstance(exc, ValueError) and not isinstance(exc, OSError):
        # a request that cannot be sent (e.g. an invalid target): the client's fault
        return client_fault(400, "bad_request", f"request cannot be forwarded: {exc}")
    case, message = _case(exc, pool, f"target '{target_name}'")
    kind, reason, status, error_type = _CASES[case]
    f = Failure(kind, reason, status, error_type, message)
    return ProxyResponse(status, failure=f, verdict=Verdict.FAILURE, outcome="rejected", body=None)


class HttpTerminal:
    """Built once per config load; the target comes with each request."""

    __slots__ = ()

    async def __call__(self, req: ProxyRequest) -> ProxyResponse:
        target = req.target
        pool = target.pool
        if not pool.try_acquire():
            try:
                await pool.acquire()
            except Overloaded as exc:
                return shed_response(str(exc))
        req.attempts += 1
        body = req.body
        if not (pool.fast and req.method != "HEAD" and (body is None or body.__class__ is bytes)):
            return await self._aiohttp(req, target, pool)
        # The lean client, inline (one frame per attempt): the request as one write, the answer parsed
        # by llhttp.
        headers = req.headers
        head = pool.request_head(req.method, req.path_qs, headers)
        if body is not None and "Content-Length" not in headers:
            head.append(f"Content-Length: {len(body)}\r\n")
        elif body is None and req.method in _BODY_METHODS and "Content-Length" not in headers:
            head.append("Content-Length: 0\r\n")
        head.append("\r\n")
        data = "".join(head).encode("utf-8", "surrogateescape")
        if body:
            data += body
        try:
            conn = pool.h1_get(None if req.idempotent else _SAFE_IDLE)
            if conn is None:
                conn = await pool.h1_connect()
            try:
                r = await conn.request(data)
            except UpstreamClosed:
                if not (conn.reused and not conn.got_bytes and req.idempotent):
                    raise
                # a kept-alive connection the upstream had already closed: nothing was processed
                conn = await pool.h1_connect()
                r = await conn.request(data)
        except (ConnectFailed, UpstreamClosed, OSError) as exc:
            pool.release()
            return failure_response(exc, pool, target.name)
        except BaseException:
            pool.release()
            raise
        return ProxyResponse(r.status, r.headers, None, stream=r, release=r.release)

    async def _aiohttp(self, req: ProxyRequest, target, pool) -> ProxyResponse:
        """aiohttp's client, for what the lean one does not do (egress proxy, HEAD, streamed bodies)."""
        gen = pool.session()
        try:
            cr = await aio.request(
                gen.session, req.method, URL(target.base + req.path_qs, encoded=True), headers=req.headers,
                replayable=req.idempotent and (req.body is None or req.body.__class__ is bytes),
                data=req.body, allow_redirects=False, server_hostname=pool.server_hostname,
                proxy=pool.proxy, proxy_auth=pool.proxy_auth,
            )
        except BaseException as exc:
            pool.done(gen)
            pool.release()
            client_error = getattr(req.body, "client_error", None)
            if (client_error is None and isinstance(exc, TimeoutError) and req.body is not None
                    and not getattr(req.body, "done", True)):
                # aiohttp's read timer ran out while the app was still (not) sending its body
                client_error = (408, "request_timeout", "the request body stalled past the idle timeout")
            if client_error is not None and not isinstance(exc, asyncio.CancelledError):
                return client_fault(*client_error)
            if isinstance(exc, sys.modules["aiohttp"].ClientError | OSError | ValueError):
                return failure_response(exc, pool, target.name)
            raise

        def release() -> None:
            cr.release()
            pool.done(gen)
            pool.release()

        return ProxyResponse(cr.status, cr.headers, None, stream=aio.Answer(cr), release=release)
