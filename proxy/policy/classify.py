"""The one classifier: it turns each attempt into a Verdict that retry, breaker and fallback all read.

Sits directly under the breaker, so it sees each attempt (attempt timeouts included) exactly once.
"""

from __future__ import annotations

from proxy.policy.base import Failure, Handler, ProxyRequest, ProxyResponse, Reason, Verdict

_PROXY_MADE = frozenset({"overloaded", "circuit_breaker_open", "bad_request"})


class Classify:
    __slots__ = ("failure_statuses",)

    def __init__(self, failure_statuses: frozenset[int]) -> None:
        self.failure_statuses = failure_statuses

    def verdict(self, resp: ProxyResponse) -> Verdict:
        f = resp.failure
        if f is not None:
            return Verdict.REJECTED if f.kind in _PROXY_MADE else Verdict.FAILURE
        status = resp.status
        if status == 429:
            if resp.failure is None:
                resp.failure = Failure("429", Reason.RATE_LIMITED, 429, "rate_limited", "upstream rate limit (429)")
                resp.reason = Reason.RATE_LIMITED
            return Verdict.RETRYABLE
        if status in self.failure_statuses:
            resp.failure = Failure(str(status), Reason.UPSTREAM_5XX, status, "upstream_status",
                                   f"upstream answered {status}")
            resp.reason = Reason.UPSTREAM_5XX
            return Verdict.FAILURE
        return Verdict.SUCCESS

    async def __call__(self, req: ProxyRequest, call_next: Handler) -> ProxyResponse:
        resp = await call_next(req)
        resp.verdict = self.verdict(resp)
        return resp
