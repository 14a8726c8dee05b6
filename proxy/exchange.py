"""The bottom layer of the data path: what one exchange is, for every protocol.

listener → route → policy chain → upstream all speak these types: the request (`ProxyRequest`, or a
protocol's own record built on `Call`), the response, the verdict the one classifier gives it, the
reason a fresh answer was not served, the failure value, and the answers the proxy makes itself (shed,
timeout, breaker open, the client's fault). Expected failures are values, not exceptions: the upstream
terminal turns connect errors, resets and timeouts into a ProxyResponse with `failure` set, so every
policy reads one shape. This module imports nothing of the proxy's: everything imports it.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from multidict import CIMultiDict

if TYPE_CHECKING:
    from proxy.llm.call import LLMCall


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

    __slots__ = ("kind", "reason", "status", "error_type", "message", "retry_after", "after_head")

    def __init__(self, kind: str, reason: Reason, status: int, error_type: str, message: str,
                 retry_after: float | None = None) -> None:
        self.kind, self.reason, self.status = kind, reason, status
        self.error_type, self.message, self.retry_after = error_type, message, retry_after
        self.after_head = False  # the answer's head had arrived: the upstream's door worked

    def __repr__(self) -> str:
        return f"Failure({self.kind}, {self.reason}, {self.status}, {self.message!r})"


class Call:
    """What the policies read and write of any request, whatever its protocol: the target (track) it
    goes to, whether it may be sent again, its deadline. A protocol's request record extends it (HTTP:
    ProxyRequest; Redis: one command), so the same policy objects decide for both."""

    __slots__ = ("target", "idempotent", "replayable", "deadline", "total", "attempts", "timeout")

    def __init__(self, target: Any, idempotent: bool, replayable: bool) -> None:
        self.target = target
        self.idempotent, self.replayable = idempotent, replayable
        self.deadline: float | None = None      # set by the total timeout; retry reads it
        self.total = 0.0                        # the total timeout in force, for its error message
        self.attempts = 0
        self.timeout: float | None = None       # a per-request cap (X-Proxy-Timeout), within the config's


class ProxyRequest(Call):
    """An HTTP request on its way through the chain."""

    __slots__ = ("method", "path_qs", "path", "headers", "client_headers", "body", "request_id", "route", "llm")

    def __init__(self, method: str, path_qs: str, path: str, headers: CIMultiDict,
                 client_headers: Any, body: bytes | AsyncIterator[bytes] | None, replayable: bool,
                 request_id: str, route: str = "default", target: Any = None, idempotent: bool = True) -> None:
        Call.__init__(self, target, idempotent, replayable)
        self.method, self.path_qs, self.path = method, path_qs, path
        self.headers = headers                  # what goes upstream (hop-by-hop already removed)
        self.client_headers = client_headers    # what the client sent (for cache keys and privacy rules)
        self.body = body
        self.request_id, self.route = request_id, route
        self.llm: LLMCall | None = None         # the LLM path's view of the request (openai only)


AfterBody = Callable[["Verdict | None", "bytes | None"], None]

# HTTP headers that describe one hop, not the message (RFC 9110 §7.6.1): never forwarded, never cached.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                        "trailer", "trailers", "transfer-encoding", "upgrade", "proxy-connection"})
_NONE: frozenset[str] = frozenset()
_PLAIN_CONNECTION = frozenset({"keep-alive", "close"})


def connection_listed(headers) -> frozenset[str]:
    """The header names a Connection header declares hop-by-hop too (RFC 9110 §7.6.1)."""
    if "Connection" not in headers:
        return _NONE
    values = headers.getall("Connection")
    if len(values) == 1 and values[0].lower() in _PLAIN_CONNECTION:
        return _NONE  # "keep-alive"/"close" name nothing beyond the hop-by-hop set: the common case
    return frozenset(t.strip().lower() for v in values for t in v.split(","))


class ProxyResponse:
    """An answer on its way back up the chain. Work that must wait for the end of its body — the
    breaker's verdict on a streamed success, the fallback's copy, the LLM token count — joins the
    after-body phase (`after_body`); the listener runs it once (`body_done`) when the body is through
    (SUCCESS, with the body if some hook asked to keep it and it fit), failed (FAILURE) or was
    abandoned (None)."""

    __slots__ = ("status", "headers", "body", "stream", "verdict", "failure", "outcome", "source",
                 "reason", "elapsed", "target", "keep", "head", "head_version", "_after", "_release")

    def __init__(self, status: int, headers: CIMultiDict | None = None, body: bytes | None = b"",
                 stream: Any = None, verdict: Verdict = Verdict.SUCCESS, failure: Failure | None = None,
                 outcome: str = "upstream", release: Callable[[], None] | None = None) -> None:
        self.status, self.headers, self.body, self.stream = status, headers, body, stream
        self.verdict, self.failure, self.outcome = verdict, failure, outcome
        self.source: str | None = None      # fallback source: cache|stale|static|degraded
        self.reason: Reason | None = failure.reason if failure else None
        self.elapsed = 0.0
        self.target: Any = None
        self.keep = -1                      # body bytes an after-body hook wants kept (-1: none)
        # `headers` already serialised ("Name: value\r\n" lines, hop-by-hop ones out), valid while
        # multidict.getversion(headers) is still head_version: a cached answer's head, made once
        self.head: list[str] | None = None
        self.head_version = 0
        self._after: list[AfterBody] | None = None
        self._release = release

    def after_body(self, hook: AfterBody, keep: int = -1) -> None:
        """Run hook(verdict, body) once the body is done; `keep`: it wants the body, up to that size."""
        if self._after is None:
            self._after = []
        self._after.append(hook)
        if keep > self.keep:
            self.keep = keep

    def body_done(self, verdict: Verdict | None, body: bytes | None = None) -> None:
        """The after-body phase, once: later calls do nothing."""
        hooks, self._after = self._after, None
        if hooks is not None:
            for hook in hooks:
                hook(verdict, body)

    def release(self) -> None:
        """Give the upstream connection back (or drop it); a body never finished is abandoned. Safe to
        call more than once."""
        if self._after is not None:
            self.body_done(None)
        r, self._release = self._release, None
        if r is not None:
            r()


Handler = Callable[[ProxyRequest], Awaitable[ProxyResponse]]


class Policy(Protocol):
    async def __call__(self, req: ProxyRequest, call_next: Handler) -> ProxyResponse: ...




# -- the answers the proxy makes itself ------------------------------------------------------------------
def shed_response(message: str) -> ProxyResponse:
    f = Failure("overloaded", Reason.OVERLOADED, 503, "overloaded", message, retry_after=1.0)
    return ProxyResponse(503, failure=f, verdict=Verdict.REJECTED, outcome="shed", body=None)


def client_fault(status: int, error_type: str, message: str) -> ProxyResponse:
    """The client broke its own request (body too large, stalled, gone): not the upstream's failure."""
    f = Failure("bad_request", Reason.UPSTREAM_ERROR, status, error_type, message)
    return ProxyResponse(status, failure=f, verdict=Verdict.REJECTED, outcome="rejected", body=None)


def timeout_failure(which: str, seconds: str) -> Failure:
    return Failure("timeout", Reason.TIMEOUT, 504, "timeout",
                   f"{which} timeout ({seconds}) expired before the upstream answered")


def timeout_response(which: str, seconds: str) -> ProxyResponse:
    return ProxyResponse(504, failure=timeout_failure(which, seconds), verdict=Verdict.FAILURE,
                         outcome="rejected", body=None)


def model_open_response(track: str, model: str, last_failure: str | None, retry_after: float) -> ProxyResponse:
    """The breaker of one model (protocol: openai) is open: model failover moves on at once."""
    f = Failure("model_breaker_open", Reason.CIRCUIT_BREAKER_OPEN, 503, "circuit_breaker_open",
                f"circuit breaker for model '{model}' on track '{track}' is open"
                + (f" (last failure: {last_failure})" if last_failure else ""), retry_after=retry_after)
    return ProxyResponse(503, failure=f, verdict=Verdict.REJECTED, outcome="rejected", body=None)


def open_response(track: str, last_failure: str | None, retry_after: float) -> ProxyResponse:
    f = Failure("circuit_breaker_open", Reason.CIRCUIT_BREAKER_OPEN, 503, "circuit_breaker_open",
                f"circuit breaker for track '{track}' is open"
                + (f" (last failure: {last_failure})" if last_failure else ""), retry_after=retry_after)
    return ProxyResponse(503, failure=f, verdict=Verdict.REJECTED, outcome="rejected", body=None)
