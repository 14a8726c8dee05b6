"""Load shedding at the entrance: beyond `max_in_flight` a request is answered at once (503, fallback
reason `overloaded`) instead of queuing invisibly. Waiting for a connection slot is bounded in the pool
(`max_pending`, `pending_timeout`). Sits just inside the fallback, so a shed request can still be
served from the cache.

`admits(arriving)` is the rule as one plain call: an HTTP request is already counted in flight when the
chain runs (arriving=0); a Redis command asks before it is counted (arriving=1), and waits unread while
the answer is no (proxy/redis/resilience.py)."""

from __future__ import annotations

from proxy.exchange import Handler, ProxyRequest, ProxyResponse, shed_response


class Shed:
    __slots__ = ("state", "max_in_flight", "events")

    def __init__(self, state, max_in_flight: int, events) -> None:
        self.state, self.max_in_flight, self.events = state, max_in_flight, events

    def admits(self, arriving: int = 0) -> bool:
        return self.state.in_flight + arriving <= self.max_in_flight

    def refusal(self) -> str:
        return f"more than {self.max_in_flight} requests in flight (max_in_flight)"

    async def __call__(self, req: ProxyRequest, call_next: Handler) -> ProxyResponse:
        if not self.admits():
            self.events.shed()
            return shed_response(self.refusal())
        resp = await call_next(req)
        if resp.outcome == "shed":
            self.events.shed()
        return resp
