"""Load shedding at the entrance: beyond `max_in_flight` a request is answered at once (503, fallback
reason `overloaded`) instead of queuing invisibly. Waiting for a connection slot is bounded in the pool
(`max_pending`, `pending_timeout`). Sits just inside the fallback, so a shed request can still be
served from the cache."""

from __future__ import annotations

from proxy.policy.base import Handler, ProxyRequest, ProxyResponse
from proxy.upstream.http import shed_response


class Shed:
    __slots__ = ("state", "max_in_flight", "counter")

    def __init__(self, state, max_in_flight: int, counter) -> None:
        self.state, self.max_in_flight, self.counter = state, max_in_flight, counter

    async def __call__(self, req: ProxyRequest, call_next: Handler) -> ProxyResponse:
        if self.state.in_flight > self.max_in_flight:
            self.counter.inc()
            return shed_response(f"more than {self.max_in_flight} requests in flight (max_in_flight)")
        resp = await call_next(req)
        if resp.outcome == "shed":
            self.counter.inc()
        return resp
