"""The rule for re-sending a request over aiohttp's client (the egress path's fallback client, the inbound
listener), in one place: only a request its caller calls replayable (idempotent, no body to stream), only
when the connection it went out on was a kept-alive one the peer had closed, before any answer (RFC 9112
§9.3.1) — then once, and nothing is counted against the upstream. aiohttp's own replay, which also
re-sends on a fresh connection that failed, is turned off: behind the retry policy it is a retry no
budget, breaker or metric sees, and on the inbound side it would be the proxy retrying the app's own
traffic.

The lean client (proxy/http1/client.py) keeps the same rule by its own means. `Answer` gives an aiohttp
response the lean client's shape and error vocabulary, so the listeners read one kind of answer."""

from __future__ import annotations

from proxy.http1.client import UpstreamClosed


class Body:
    """`read()` and `iter_any()` for an answer that has `readany()`, as the listeners read answers."""

    __slots__ = ()

    async def read(self) -> bytes:
        parts = []
        while chunk := await self.readany():
            parts.append(chunk)
        return b"".join(parts)

    async def iter_any(self):
        while chunk := await self.readany():
            yield chunk


class Answer(Body):
    """An aiohttp ClientResponse as the listeners read answers: status, reason, headers, content.readany()
    / iter_any() / read(), release(); a body read that fails raises TimeoutError or UpstreamClosed, as
    the lean client's does (proxy/http1/client.py: BODY_ERRORS)."""

    __slots__ = ("cr", "status", "reason", "headers", "content")

    def __init__(self, cr) -> None:
        self.cr, self.status, self.reason, self.headers = cr, cr.status, cr.reason, cr.headers
        self.content = self

    async def readany(self) -> bytes:
        try:
            return await self.cr.content.readany()
        except TimeoutError:
            raise
        except Exception as exc:  # aiohttp's payload and connection errors: the answer was cut
            if isinstance(exc, _client_error()):
                raise UpstreamClosed(f"{type(exc).__name__}: {exc}") from exc
            raise

    def release(self) -> None:
        self.cr.release()


def _client_error() -> type[BaseException]:
    import aiohttp  # loaded already: an Answer exists only once aiohttp made a request

    return aiohttp.ClientError


def session(**kw):
    """A ClientSession that tells each request whether its connection was reused, without aiohttp's replay."""
    import aiohttp

    async def reused(session, ctx, params) -> None:
        if isinstance(ctx.trace_request_ctx, dict):
            ctx.trace_request_ctx["reused"] = True

    tc = aiohttp.TraceConfig()
    tc.on_connection_reuseconn.append(reused)
    s = aiohttp.ClientSession(trace_configs=[tc], **kw)
    if hasattr(s, "_retry_connection"):  # no public switch; aiohttp's own test client turns it off so
        s._retry_connection = False
    return s


async def request(session, method: str, url, *, replayable: bool, **kw):
    """session.request, sent once more under the rule above."""
    import aiohttp

    ctx: dict = {}
    try:
        return await session.request(method, url, trace_request_ctx=ctx, **kw)
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
        if not (replayable and ctx.get("reused")):
            raise
    return await session.request(method, url, trace_request_ctx={}, **kw)
