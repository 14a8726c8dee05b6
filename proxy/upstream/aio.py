"""The rule for re-sending a request over aiohttp's client (the egress path's fallback client, the inbound
listener), in one place: only a request its caller calls replayable (idempotent, no body to stream), only
when the connection it went out on was a kept-alive one the peer had closed, before any answer (RFC 9112
§9.3.1) — then once, and nothing is counted against the upstream. aiohttp's own replay, which also
re-sends on a fresh connection that failed, is turned off: behind the retry policy it is a retry no
budget, breaker or metric sees, and on the inbound side it would be the proxy retrying the app's own
traffic.

The lean client (h1.py) keeps the same rule by its own means."""

from __future__ import annotations


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
