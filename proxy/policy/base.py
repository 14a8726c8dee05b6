"""The objects that travel the chain (ProxyRequest in, ProxyResponse out) and the fold that builds it.

Expected failures are values, not exceptions: the upstream terminal turns connect errors, resets and
timeouts into a ProxyResponse with `failure` set, so every policy reads one shape.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol

from multidict import CIMultiDict


class Verdict(enum.Enum):
    SUCCESS = "success"        # 2xx-4xx: the upstream answered
    FAILURE = "failure"        # connect error, reset, timeout, a status in breaker.failure_statuses
    RETRYABLE = "retryable"    # 429: not an outage, never counts against the breaker
    REJECTED = "rejected"      # produced by the proxy itself (breaker open, shed, bad request)


class Reason(enum.StrEnum):
    """Why a request did not get a fresh upstream answer: one enum for headers, bodies, logs, metrics."""

    CIRCUIT_BREAKER_OPEN = "circuit_breaker_open"
    TIMEOUT = "timeout"
    UPSTREAM_ERROR = "upstream_error"
    UPSTREAM_5XX = "upstream_5xx"
    RATE_LIMITED = "rate_limited"
    OVERLOADED = "overloaded"


class Failure:
    """What went wrong with an attempt. `kind` is the retry condition it matches."""

    __slots__ = ("kind", "reason", "status", "error_type", "message", "retry_after")

    def __init__(self, kind: str, reason: Reason, status: int, error_type: str, message: str,
                 retry_after: float | None = None) -> None:
        self.kind, self.reason, self.status = kind, reason, status
        self.error_type, self.message, self.retry_after = error_type, message, retry_after

    def __repr__(self) -> str:
        return f"Failure({self.kind}, {self.reason}, {self.status}, {self.message!r})"


class ProxyRequest:
    __slots__ = ("method", "path_qs", "path", "headers", "client_headers", "body", "replayable",
                 "request_id", "route", "target", "idempotent", "deadline", "total", "attempts", "extra")

    def __init__(self, method: str, path_qs: str, path: str, headers: CIMultiDict,
                 client_headers: Any, body: bytes | AsyncIterator[bytes] | None, replayable: bool,
                 request_id: str, route: str = "default", target: Any = None, idempotent: bool = True) -> None:
        self.method, self.path_qs, self.path = method, path_qs, path
        self.headers = headers                  # what goes upstream (hop-by-hop already removed)
        self.client_headers = client_headers    # what the client sent (for cache keys and privacy rules)
        self.body, self.replayable = body, replayable
        self.request_id, self.route, self.target = request_id, route, target
        self.idempotent = idempotent
        self.deadline: float | None = None      # set by the total timeout; retry reads it
        self.total = 0.0                        # the total timeout in force, for its error message
        self.attempts = 0
        self.extra: dict[str, Any] | None = None


class ProxyResponse:
    __slots__ = ("status", "headers", "body", "stream", "verdict", "failure", "outcome", "source",
                 "reason", "capture", "elapsed", "target", "settle", "_release")

    def __init__(self, status: int, headers: CIMultiDict | None = None, body: bytes | None = b"",
                 stream: Any = None, verdict: Verdict = Verdict.SUCCESS, failure: Failure | None = None,
                 outcome: str = "upstream", release: Callable[[], None] | None = None) -> None:
        self.status, self.headers, self.body, self.stream = status, headers, body, stream
        self.verdict, self.failure, self.outcome = verdict, failure, outcome
        self.source: str | None = None      # fallback source: cache|stale|static|degraded
        self.reason: Reason | None = failure.reason if failure else None
        self.capture: Callable[[bytes], None] | None = None   # set by fallback: store the body once streamed
        self.elapsed = 0.0
        self.target: Any = None
        self.settle: Callable[[Verdict | None], None] | None = None  # the breaker's deferred verdict
        self._release = release

    def finish(self, verdict: Verdict | None) -> None:
        """The body is done (SUCCESS), failed (FAILURE) or was abandoned (None): settle the breaker."""
        s, self.settle = self.settle, None
        if s is not None:
            s(verdict)

    def release(self) -> None:
        """Give the upstream connection back (or drop it). Safe to call more than once."""
        if self.settle is not None:
            self.finish(None)
        r, self._release = self._release, None
        if r is not None:
            r()


Handler = Callable[[ProxyRequest], Awaitable[ProxyResponse]]


class Policy(Protocol):
    async def __call__(self, req: ProxyRequest, call_next: Handler) -> ProxyResponse: ...


def build_chain(policies: Sequence[Policy | None], terminal: Handler) -> Handler:
    """Fold once at load time; the first policy is the outermost. `None` entries are skipped, so a
    policy that has nothing to do for a config (no retries, no fallback) costs nothing per request."""
    handler = terminal
    for policy in reversed([p for p in policies if p is not None]):
        handler = functools.partial(policy, call_next=handler)
    return handler
