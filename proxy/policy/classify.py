"""The one classifier: it turns each attempt into a Verdict that retry, breaker and fallback all read.

Sits directly under the breaker, so it sees each attempt (attempt timeouts included) exactly once. An
HTTP attempt is a response (`verdict`); a Redis attempt is a reply or a failure value (`reply`,
`failure`): the RESP rules are stated there, beside the HTTP ones.
"""

from __future__ import annotations

from proxy.exchange import Failure, Handler, ProxyRequest, ProxyResponse, Reason, Verdict

# A value failure whose fault is not the upstream's: the proxy closed the connection, or the client's
# own connection state (a SELECT of a db that does not exist) failed its setup.
_NOT_THE_UPSTREAMS = frozenset({"closed", "client-setup"})
_COLLATERAL = "-collateral"
# A command whose total ran out while it waited behind others: answered as a timeout, no verdict.
_DEADLINE = "deadline"

_PROXY_MADE = frozenset({"overloaded", "circuit_breaker_open", "model_breaker_open", "bad_request"})


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

    @staticmethod
    def reply(kind: str) -> Verdict:
        """RESP: any reply is the upstream answering, an error reply (`-ERR`, `-WRONGTYPE`) included."""
        return Verdict.SUCCESS

    @staticmethod
    def failure(kind: str) -> Verdict | None:
        """RESP: connect-failure, reset and timeout are the upstream's failures. A command lost with a
        shared connection another command broke (`<kind>-collateral`) gets no verdict: the connection's
        failure charges the breaker once, not once per command riding on it. Nor does a command whose
        total ran out before its attempt timeout (`deadline`): it waited, the upstream did not fail."""
        if kind in _NOT_THE_UPSTREAMS:
            return Verdict.REJECTED
        if kind == _DEADLINE or kind.endswith(_COLLATERAL):
            return None
        return Verdict.FAILURE

    @staticmethod
    def condition(kind: str) -> str:
        """The retry condition a value failure matches (`timeout-collateral` is a timeout). A `deadline`
        matches none: its total is spent, no retry fits."""
        return kind.removesuffix(_COLLATERAL)

    @staticmethod
    def timed_out(kind: str) -> bool:
        """The attempt, or the command's total, ran out of time (for the answer's reason)."""
        return kind == _DEADLINE or kind.removesuffix(_COLLATERAL) == "timeout"

    async def __call__(self, req: ProxyRequest, call_next: Handler) -> ProxyResponse:
        resp = await call_next(req)
        resp.verdict = self.verdict(resp)
        return resp
