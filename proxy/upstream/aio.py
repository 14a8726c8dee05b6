"""The rule for re-sending a request over aiohttp's client (the egress path's fallback client, the inbound
listener), in one place: only an idempotent request with no body to stream, only when the connection it
went out on was a kept-alive one the peer had closed, and no answer came back (RFC 9112 §9.3.1) — then
once, and nothing is counted against the upstream. aiohttp's own replay, which also re-sends on a fresh
connection that failed, is turned off: behind the retry policy it is a retry no budget, breaker or metric
sees, and on the inbound side it would be the proxy retrying the app's own traffic.

The lean client (h1.py) keeps the same rule by its own means."""

from __future__ import annotations

REPLAYABLE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


def session_options() -> dict:
    """ClientSession keyword arguments: a tracer that tells a request whether its connection was reused."""
    import aiohttp

    async def reused(session, ctx, params) -> None:
        if isinstance(ctx.trace_request_ctx, dict):
            ctx.trace_request_ctx["reused"] = True

    tc = aiohttp.TraceConfig()
    tc.on_connection_reuseconn.append(reused)
    return {"trace_configs": [tc]}


def no_hidden_replay(session) -> None:
    """aiohttp has no public switch for its replay; its own test client turns it off the same way."""
    if hasattr(session, "_retry_connection"):
        session._retry_connection = False


def replay_allowed(exc: BaseException, ctx: dict, method: str, body) -> bool:
    """May the request be sent once more after `exc`, raised before any answer?"""
    import aiohttp

    return (ctx.get("reused", False) and method in REPLAYABLE_METHODS and (body is None or body.__class__ is bytes)
            and isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError)
            and not isinstance(exc, aiohttp.ClientConnectorError))


async def request(session, method: str, url, **kw):
    """session.request with the rule above."""
    ctx: dict = {}
    try:
        return await session.request(method, url, trace_request_ctx=ctx, **kw)
    except BaseException as exc:
        if not replay_allowed(exc, ctx, method, kw.get("data")):
            raise
    return await session.request(method, url, trace_request_ctx={}, **kw)
