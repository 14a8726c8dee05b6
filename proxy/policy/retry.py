"""Retry with exponential backoff, full jitter, a retry budget and Retry-After.

Sits under the total timeout and over the breaker. The n-th retry waits `uniform(0, min(backoff_max,
backoff_base * 2**(n-1)))` seconds. A retry is sent only when all of these hold:
- the failed attempt's kind (connect-failure, reset, timeout, or its status) is listed in `on`, or it is
  a 429 whose Retry-After fits (below);
- the request can be replayed (its body was kept: <= max_replay_body) and is idempotent, carries an
  Idempotency-Key, or `non_idempotent: true` — except a connect failure or a 429, which the upstream
  provably did not act on;
- the budget allows it: retries in flight <= max(budget_ratio * requests in flight, budget_min);
- the target's breaker is not open, and the wait fits in what is left of the total timeout.
A 429/503 Retry-After is waited for when it is <= backoff_max and fits; otherwise the answer stands.
"""

from __future__ import annotations

import random
from email.utils import parsedate_to_datetime

from proxy.clock import Clock
from proxy.exchange import Call, Handler, ProxyRequest, ProxyResponse, Verdict
from proxy.settings.spec import RetrySpec

# Attempts the upstream provably did not act on: retried even for non-idempotent requests.
_NOTHING_DONE = frozenset({"connect-failure", "429"})


def backoff(spec: RetrySpec, retry_number: int, rand=random.random) -> float:
    """Full jitter: the n-th retry waits uniform(0, min(backoff_max, backoff_base·2^(n-1)))."""
    return rand() * min(spec.backoff_max, spec.backoff_base * (2 ** (retry_number - 1)))


class RetryBudget:
    """Per upstream; survives reloads. Proportional to the upstream's requests (Redis: commands) in
    flight, read from its Counters — not a second count kept beside it."""

    __slots__ = ("ratio", "minimum", "counters", "retries", "exhausted")

    def __init__(self, ratio: float, minimum: int) -> None:
        self.ratio, self.minimum = ratio, minimum
        self.counters = None  # set by the Counters that owns it
        self.retries = 0
        self.exhausted = 0

    @property
    def active(self) -> int:
        return self.counters.in_flight if self.counters is not None else 0

    @property
    def limit(self) -> int:
        return max(int(self.ratio * self.active), self.minimum)

    def try_acquire(self) -> bool:
        if self.retries >= max(int(self.ratio * self.active), self.minimum):
            self.exhausted += 1
            return False
        self.retries += 1
        return True

    def release(self) -> None:
        self.retries -= 1


def parse_retry_after(value: str | None, now_wall: float | None = None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        import time
        when = parsedate_to_datetime(value).timestamp()
        return max(0.0, when - (now_wall if now_wall is not None else time.time()))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def parse_ratelimit_reset(value: str | None, now_wall: float | None = None) -> float | None:
    """OpenRouter-style `X-RateLimit-Reset`: an epoch timestamp in ms (or s), or seconds to wait."""
    if not value:
        return None
    try:
        v = float(value.strip())
    except ValueError:
        return None
    import time
    now = now_wall if now_wall is not None else time.time()
    if v > 1e12:
        return max(0.0, v / 1000 - now)
    if v > 1e9:
        return max(0.0, v - now)
    return max(0.0, v)


class Retry:
    """`rate_limit_retry`: a 429 without a stated wait is retried once, after a jittered wait of one to
    four times backoff_base (the LLM path: a model's rate limit is often a burst, and the next step is
    another model anyway). `skip`: conditions left to the policy above (model failover takes timeouts)."""

    __slots__ = ("spec", "budget", "clock", "metrics", "conditions", "rand", "rate_limit_retry")

    def __init__(self, spec: RetrySpec, budget: RetryBudget, clock: Clock, metrics, rand=random.random,
                 rate_limit_retry: bool = False, skip: frozenset[str] = frozenset()) -> None:
        self.spec, self.budget, self.clock, self.metrics, self.rand = spec, budget, clock, metrics, rand
        self.rate_limit_retry = rate_limit_retry
        self.conditions = (frozenset(spec.on) | frozenset(
            f"{c[0]}{i:02d}" for c in spec.on if c.endswith("xx") for i in range(100))) - skip

    def backoff(self, retry_number: int) -> float:
        return backoff(self.spec, retry_number, self.rand)

    def delay(self, req: Call, kind: str, status: int | None, headers, retry_number: int) -> float | None:
        """Seconds to wait before retry `retry_number`, or None when this answer must stand. `kind` is
        the failed attempt's condition (connect-failure, reset, timeout) or its status as text."""
        if kind not in self.conditions and status != 429:
            return None
        if not req.idempotent and kind not in _NOTHING_DONE:
            return None
        delay = self.backoff(retry_number)
        if (status == 429 or status == 503) and headers is not None:
            ra = parse_retry_after(headers.get("Retry-After"))
            if ra is None:
                ra = parse_ratelimit_reset(headers.get("X-RateLimit-Reset"))
            if ra is not None:
                if ra > self.spec.backoff_max:
                    return None
                delay = ra
            elif status == 429:
                if not self.rate_limit_retry or retry_number > 1:
                    return None  # a rate limit without a stated wait: retrying now only adds load
                base = self.spec.backoff_base
                delay = min(self.spec.backoff_max, base * (1 + 3 * self.rand()))
        if req.deadline is not None and self.clock.monotonic() + delay >= req.deadline:
            return None
        return delay

    def acquire(self, req: Call, kind: str, status: int | None, headers, retry_number: int) -> float | None:
        """The whole rule as one plain call: the wait before retry `retry_number` with its share of the
        budget taken, or None. The caller gives the budget back (`budget.release()`) once the retried
        attempt has an outcome."""
        if retry_number >= self.spec.attempts or not req.replayable:
            return None
        delay = self.delay(req, kind, status, headers, retry_number)
        if delay is None or req.target.breaker.is_open:
            return None
        if not self.budget.try_acquire():
            self.metrics.budget_exhausted()
            return None
        self.metrics.retry(kind)
        return delay

    async def __call__(self, req: ProxyRequest, call_next: Handler) -> ProxyResponse:
        resp = await call_next(req)
        if resp.verdict is Verdict.SUCCESS or not req.replayable:
            return resp
        n = 1
        while resp.verdict is Verdict.FAILURE or resp.verdict is Verdict.RETRYABLE:
            f = resp.failure
            delay = self.acquire(req, f.kind if f is not None else str(resp.status), resp.status, resp.headers, n)
            if delay is None:
                return resp
            resp.release()
            try:
                if delay > 0:
                    await self.clock.sleep(delay)
                n += 1
                resp = await call_next(req)
            finally:
                self.budget.release()
        return resp
